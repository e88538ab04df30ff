"""One model version loaded for scoring: the load / predict / unload / ready lifecycle.

A :class:`LoadedModel` owns one onnxruntime session built from the firmware profile. Loading
warms the session up and runs the manifest's self-test, so a model that reports ``ready``
has already reproduced the host's outputs on this device. What a version *does* in a
pipeline (its role and priority) is not the model's business: a :class:`Member` pairs the
two, so a promotion makes a new member around the same loaded session.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml.bundle import Manifest, check_self_test, self_test_array
from edgeml.core import contract
from edgeml.core.outputs import Outputs
from edgeml.errors import EdgemlError, ModelError

log = logging.getLogger("edgeml.core.model")


@dataclass(frozen=True)
class Prediction:
    """Outputs of one batch: ``labels`` ``[n]`` and/or ``scores`` ``[n, k]``."""

    labels: np.ndarray | None
    scores: np.ndarray | None
    elapsed_ms: float

    def __len__(self) -> int:
        ref = self.labels if self.labels is not None else self.scores
        return 0 if ref is None else len(ref)


class LoadedModel:
    """A model version with its session. ``predict`` is safe to call from any thread
    (onnxruntime sessions are thread-safe and release the GIL while they run)."""

    def __init__(self, manifest: Manifest, model_path: Path, *, profile: Any) -> None:
        self.manifest = manifest
        self.model_path = Path(model_path)
        self.profile = profile
        self._session: Any = None
        self._run_binding: Any = None
        self._input_name = manifest.input.name
        self._label_name = manifest.outputs.label
        self._scores_name = manifest.outputs.scores
        self._outputs: list[str] = [n for n in (self._label_name, self._scores_name) if n]
        self._shape3d = len(manifest.input.shape) == 3
        classes = manifest.outputs.classes
        self.classes: tuple | None = tuple(classes) if classes is not None else None
        self.load_ms: float | None = None
        self._installed: Any = None
        # score maps are keyed by the class as a string: JSON needs it, and msgpack readers
        # refuse integer map keys by default
        self._class_keys = tuple(str(c) for c in self.classes) if self.classes else ()

    @classmethod
    def from_installed(cls, installed: Any, *, profile: Any) -> LoadedModel:
        model = cls(installed.manifest, installed.model_path, profile=profile)
        model._installed = installed  # load() re-checks the model's sha256 (disk rot)
        return model

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.manifest.name, self.manifest.version)

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def row_width(self) -> int:
        return self.manifest.input.row_width

    def load(self, *, self_test: bool = True) -> None:
        """Build the session, warm it up and run the self-test; raise if any of it fails."""
        from edgeml.profiles import create_session

        t0 = time.perf_counter()
        source = self._installed.read_model() if self._installed is not None else self.model_path
        session = create_session(source, self.profile)
        names = {o.name for o in session.get_outputs()}
        missing = [n for n in self._outputs if n not in names]
        if missing:
            raise ModelError(f"{self.name} {self.version}: the model has no output "
                             f"{', '.join(missing)} (it has {', '.join(sorted(names))})")
        # the output contract (names, dtypes, counts, classes, score shape)
        contract.check_declared(self.manifest, {o.name: o.type for o in session.get_outputs()})
        self._session = session
        # the binding under InferenceSession.run: run() checks, on every call, the input
        # names (ours are fixed, checked here at load), OrtValue ownership (we pass numpy
        # arrays) and WebGPU graph capture (not used): three calls per run at batch size one
        binding = getattr(session, "_sess", None)
        self._run_binding = binding.run if callable(getattr(binding, "run", None)) and [
            i.name for i in session.get_inputs()] == [self._input_name] else None
        try:
            if self.manifest.self_test is not None and self_test:
                x = self_test_array(self.manifest)
                labels, scores = self._run(x)  # first run doubles as the warm-up
                contract.check_values(self.manifest, labels, scores, len(x))
                check_self_test(self.manifest, labels, scores)
            else:
                x = np.zeros((1, self.row_width), dtype=np.float32)
                contract.check_values(self.manifest, *self._run(x), 1)
        except EdgemlError:
            self._session = self._run_binding = None
            raise
        self.load_ms = (time.perf_counter() - t0) * 1000
        log.info("loaded %s %s in %.1f ms", self.name, self.version, self.load_ms)

    def _run(self, x: np.ndarray) -> tuple[Any, Any]:
        session = self._session
        if session is None:
            raise ModelError(f"{self.name} {self.version} is not loaded")
        if self._shape3d and x.ndim == 2:
            x = x.reshape(len(x), self.manifest.input.window or 1,
                          len(self.manifest.input.features))
        try:
            run = self._run_binding
            outs = (run(self._outputs, {self._input_name: x}, None) if run is not None
                    else session.run(self._outputs, {self._input_name: x}))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.name} {self.version}: scoring failed: {exc}") from exc
        labels = outs[0] if self._label_name else None
        scores = outs[-1] if self._scores_name else None
        return labels, scores

    def predict(self, x: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        labels, scores = self._run(x)
        if labels is not None and labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if scores is not None and scores.ndim == 1:
            scores = scores.reshape(-1, 1)
        return Prediction(labels, scores, (time.perf_counter() - t0) * 1000)

    def unload(self) -> None:
        self._session = None
        self._run_binding = None

    def outputs(self, pred: Prediction) -> Outputs:
        """Per-row ``output`` fields of the record (label and/or scores), as a column that
        builds each row's map when it is read and packs them straight from the arrays."""
        n = len(pred)
        labels = pred.labels.tolist() if pred.labels is not None else [None] * n
        kind = self.manifest.outputs.kind
        if pred.scores is None:
            return Outputs("value" if kind == "regressor" else "label", labels, None)
        scores = pred.scores
        width = scores.shape[1] if scores.ndim == 2 else 1
        if kind == "classifier" and self.classes and len(self.classes) != width:
            # outputs that stopped fitting the manifest are an error (counted)
            raise ModelError(f"{self.name} {self.version}: output contract: scores have "
                             f"{width} columns, the manifest has "
                             f"{len(self.classes)} classes")
        if kind == "classifier" and self.classes:
            return Outputs("scores", labels, scores, self._class_keys)
        return Outputs("score" if width == 1 else "list", labels, scores)


@dataclass(frozen=True)
class Member:
    """A loaded model version with its role and priority in one pipeline's active set."""

    model: LoadedModel
    role: str
    priority: int

    @property
    def name(self) -> str:
        return self.model.manifest.name

    @property
    def version(self) -> str:
        return self.model.manifest.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.model.manifest.name, self.model.manifest.version)

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def classes(self) -> tuple | None:
        return self.model.classes

    def predict(self, x: np.ndarray) -> Prediction:
        return self.model.predict(x)

    def outputs(self, pred: Prediction) -> Outputs:
        return self.model.outputs(pred)

    def with_role(self, role: str, priority: int) -> Member:
        """The same loaded session in another role: batches in flight keep the old member."""
        return Member(self.model, role, priority)
