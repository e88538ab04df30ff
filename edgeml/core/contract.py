"""The output contract: a model's outputs must be what its manifest says, checked
before a version is activated (:meth:`edgeml.core.model.LoadedModel.load`) and on every batch
(:meth:`LoadedModel.outputs` raises, so scoring counts an error and the watch acts).

Checked: the named outputs exist and are distinct, their element types fit (string or integer
labels as the class list says, float scores), one label and one score row per input row, the
labels are in the class list, and the score columns match the class list (classifier) or are
one column (regressor, anomaly)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeml.errors import ModelError

_INT = ("tensor(int64)", "tensor(int32)", "tensor(int16)", "tensor(int8)", "tensor(uint8)")
_FLOAT = ("tensor(float)", "tensor(double)", "tensor(float16)")


def check_declared(manifest: Any, session_outputs: dict[str, str]) -> None:
    """Names and element types, from the graph (before anything runs)."""
    o = manifest.outputs
    who = f"{manifest.name} {manifest.version}"
    if o.label is not None and o.label == o.scores:
        raise ModelError(f"{who}: output contract: label and scores name the same output "
                         f"{o.label!r}")
    if o.label is not None:
        t = session_outputs.get(o.label, "")
        if t.startswith("tensor("):
            if o.kind == "classifier" and o.classes:
                want = ("tensor(string)",) if isinstance(o.classes[0], str) else _INT
            elif o.kind == "regressor":
                want = _FLOAT
            else:
                want = _INT + _FLOAT
            if t not in want:
                raise ModelError(f"{who}: output contract: label output {o.label!r} is {t}, "
                                 f"the manifest needs {' or '.join(want)}")
    if o.scores is not None:
        t = session_outputs.get(o.scores, "")
        if t.startswith("tensor(") and t not in _FLOAT:
            raise ModelError(f"{who}: output contract: scores output {o.scores!r} is {t}, "
                             "not a float tensor")


def check_values(manifest: Any, labels: Any, scores: Any, n: int) -> None:
    """Shapes and values of one run over ``n`` rows (raises ModelError)."""
    o = manifest.outputs
    who = f"{manifest.name} {manifest.version}"
    if o.label is not None:
        if labels is None:
            raise ModelError(f"{who}: output contract: no label output")
        arr = np.asarray(labels)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1 or len(arr) != n:
            raise ModelError(f"{who}: output contract: {n} rows gave labels of shape "
                             f"{arr.shape}")
        if o.kind == "classifier" and o.classes:
            allowed = set(o.classes)
            got = [x.decode() if isinstance(x, bytes) else x for x in arr.tolist()]
            bad = [x for x in got if x not in allowed]
            if bad:
                raise ModelError(f"{who}: output contract: label {bad[0]!r} is not in the "
                                 f"manifest's classes {list(o.classes)[:10]}")
    if o.scores is not None:
        if scores is None:
            raise ModelError(f"{who}: output contract: no scores output")
        arr = np.asarray(scores)
        cols = 1 if arr.ndim == 1 else (arr.shape[1] if arr.ndim == 2 else -1)
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise ModelError(f"{who}: output contract: {n} rows gave scores of shape "
                             f"{arr.shape}")
        want = len(o.classes) if (o.kind == "classifier" and o.classes) else 1
        if cols != want:
            what = f"{want} class(es) in the manifest" if o.kind == "classifier" else \
                f"one score per row ({o.kind})"
            raise ModelError(f"{who}: output contract: scores have {cols} column(s), "
                             f"expected {what}")
