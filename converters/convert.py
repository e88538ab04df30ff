"""A fitted scikit-learn estimator in, a checked (optionally signed) ``.edgeml`` bundle out.

The order matters: convert, prove parity on the caller's sample with the exact bytes that will
ship, optionally quantize, and only then write. A bundle on disk has passed its parity check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.export import (
    ANOMALY_SCORES_OUTPUT,
    INPUT_NAME,
    LABEL_OUTPUT,
    PROBA_OUTPUT,
    REGRESSION_OUTPUT,
    analyse,
    opset_of,
    to_onnx_model,
)
from converters.parity import (
    Outputs,
    ParityMismatch,
    ParityReport,
    compare,
    failure_message,
    reference_outputs,
    run_onnx,
)
from converters.quantize import (
    QuantizationReport,
    accuracy,
    quantizable_ops,
    quantize_int8,
    report_change,
)
from converters.trees import DEFAULT_CONVERTER, check_converter, lowered_steps
from edgeml.bundle import (
    Manifest,
    ModelInput,
    ModelOutputs,
    SelfTest,
    default_release,
    name_is_safe,
    sha256_hex,
    utc_now_iso,
    write_bundle,
)
from edgeml.errors import ConversionError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

INPUT_SHAPES = ("flat", "3d")
_ESTIMATOR_REPR_CHARS = 300


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_estimator` wrote and the evidence that it scores like scikit-learn."""

    path: Path
    manifest: Manifest
    parity: ParityReport
    quantization: QuantizationReport | None

    def summary(self) -> str:
        lines = [self.parity.summary()]
        if self.quantization is not None:
            lines.append(self.quantization.summary())
        lines.append(f"bundle: {self.path} ({self.manifest.name} {self.manifest.version}, "
                     f"{self.manifest.size} bytes of ONNX)")
        return "\n".join(lines)


def training_fingerprint(X: np.ndarray) -> str:
    """sha256 over ``b"float32:" + shape as "d0,d1,...\\n"`` followed by the C-ordered float32
    bytes: the same data gives the same fingerprint on any machine."""
    arr = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
    h = hashlib.sha256()
    h.update(b"float32:" + ",".join(str(d) for d in arr.shape).encode() + b"\n")
    h.update(arr.tobytes())
    return h.hexdigest()


def _short_repr(estimator: Any) -> str:
    text = re.sub(r"\s+", " ", repr(estimator)).strip()
    if len(text) > _ESTIMATOR_REPR_CHARS:
        text = text[: _ESTIMATOR_REPR_CHARS - 3] + "..."
    return text


def _check_args(
    name: str, version: str, features: Sequence[str], window: int | None, input_shape: str,
    tolerance: float, self_test_rows: int,
) -> tuple[str, ...]:
    for key, value in (("name", name), ("version", version)):
        if not name_is_safe(value):
            raise ConversionError(
                f"{key} {value!r} is not a safe name (1-64 of A-Z a-z 0-9 . _ -, starting with "
                "a letter or digit)"
            )
    if isinstance(features, str):
        raise ConversionError("features must be a sequence of names, not one string")
    feats = tuple(features)
    if not feats or not all(isinstance(f, str) and f for f in feats):
        raise ConversionError(f"features must be non-empty names, got {list(feats)!r}")
    if len(set(feats)) != len(feats):
        raise ConversionError(f"feature names must be unique: {list(feats)!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ConversionError(f"window must be a positive integer or None, not {window!r}")
    if input_shape not in INPUT_SHAPES:
        raise ConversionError(
            f"input_shape must be one of {', '.join(INPUT_SHAPES)}, not {input_shape!r}"
        )
    if input_shape == "3d" and window is None:
        raise ConversionError("input_shape '3d' needs a window (samples per window)")
    if not (isinstance(tolerance, (int, float)) and np.isfinite(tolerance) and tolerance >= 0):
        raise ConversionError(f"tolerance must be a finite number >= 0, not {tolerance!r}")
    if isinstance(self_test_rows, bool) or not isinstance(self_test_rows, int) or (
        self_test_rows < 0
    ):
        raise ConversionError(f"self_test_rows must be an integer >= 0, not {self_test_rows!r}")
    return feats


def _sample_rows(sample: np.ndarray, width: int, window: int | None, n_features: int) -> np.ndarray:
    """The sample as flat float32 rows ``[n, width]`` (accepts ``[n, window, n_features]``)."""
    try:
        arr = np.asarray(sample, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"sample is not numeric: {exc}") from exc
    if arr.ndim == 3 and window is not None and arr.shape[1:] == (window, n_features):
        arr = arr.reshape(len(arr), width)
    if arr.ndim != 2 or arr.shape[1] != width:
        expected = f"[n, {width}]" + (
            f" or [n, {window}, {n_features}]" if window is not None else ""
        )
        raise ConversionError(f"sample has shape {list(arr.shape)}, expected {expected}")
    if len(arr) == 0:
        raise ConversionError("sample has no rows: parity needs at least one")
    if not np.isfinite(arr).all():
        raise ConversionError("sample holds NaN or infinite values")
    return np.ascontiguousarray(arr)


def _python_labels(labels: np.ndarray, *, regression: bool = False) -> tuple:
    """JSON-ready labels; whole-number float class labels become ints (compared exactly),
    regression predictions stay floats (compared with the self-test tolerances)."""
    out = []
    for v in np.asarray(labels).reshape(-1).tolist():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if regression:
            v = float(v)
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(v)
    return tuple(out)


def _self_test(
    rows: np.ndarray, outputs: Outputs, n: int, tolerance: float, *, regression: bool
) -> SelfTest | None:
    if n == 0:
        return None
    n = min(n, len(rows))
    return SelfTest(
        inputs=tuple(tuple(float(v) for v in r) for r in rows[:n]),
        expected_labels=_python_labels(outputs.labels[:n], regression=regression),
        expected_scores=None if regression
        else tuple(tuple(float(v) for v in r) for r in outputs.scores[:n]),
        atol=float(tolerance),
        rtol=max(1e-3, float(tolerance)),
    )


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    import edgeml

    return {
        "framework_version": sklearn.__version__,
        "converter_version": skl2onnx.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "edgeml_version": edgeml.__version__,
    }


def convert_estimator(
    estimator: Any,
    sample: np.ndarray,
    *,
    name: str,
    version: str,
    features: Sequence[str],
    out: Path,
    window: int | None = None,
    input_shape: str = "flat",
    training_data: np.ndarray | None = None,
    labels: Sequence[Any] | np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    quantize: bool = False,
    sign_key: Ed25519PrivateKey | None = None,
    tolerance: float = 1e-4,
    self_test_rows: int = 8,
    description: str = "",
    target_opset: Mapping[str, int] | None = None,
    converter: str = DEFAULT_CONVERTER,
    portable: bool = False,
) -> ConversionReport:
    """Convert ``estimator``, prove parity on ``sample``, write the bundle to ``out``.

    ``sample`` holds rows as the device will feed them: ``[n, window * len(features)]``
    sample-major (or ``[n, window, len(features)]``), or ``[n, len(features)]`` for a model that
    scores single samples. ``labels`` (true labels of ``sample``) add accuracy figures.
    ``converter``: ``"edgeml"`` (default) lowers IsolationForest to one TreeEnsemble plus a
    few elementwise nodes (:mod:`converters.trees`), everything else goes through skl2onnx;
    ``"skl2onnx"`` uses skl2onnx's own converters for every step. Parity is checked on the
    graph that is written either way.
    ``portable``: write ``release`` and ``reference`` inside ``provenance.extensions``, so
    devices from before those keys load the bundle too (docs/bundle-format.md).
    Raises UnsupportedEstimatorError, ParityError (nothing written) or ConversionError.
    """
    check_converter(converter)
    feats = _check_args(name, version, features, window, input_shape, tolerance, self_test_rows)
    analysis = analyse(estimator)
    n_features = len(feats)
    width = (window or 1) * n_features
    if analysis.n_features_in is not None and analysis.n_features_in != width:
        raise ConversionError(
            f"the estimator takes {analysis.n_features_in} values per row, but "
            f"{n_features} features x window {window or 1} = {width}"
        )
    rows = _sample_rows(sample, width, window, n_features)
    truth = None if labels is None else np.asarray(labels).reshape(-1)
    if truth is not None and len(truth) != len(rows):
        raise ConversionError(f"{len(truth)} labels for {len(rows)} sample rows")
    if metrics is not None:
        try:
            json.dumps(dict(metrics), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"metrics must be plain JSON values: {exc}") from exc

    onnx_model = to_onnx_model(
        estimator, analysis, n_inputs=width, window=window, n_features=n_features,
        input_shape=input_shape, target_opset=target_opset, converter=converter,
    )
    model_bytes = onnx_model.SerializeToString()
    feed = rows.reshape(len(rows), window, n_features) if input_shape == "3d" else rows
    kind = analysis.spec.kind
    regression = kind == "regressor"
    label_name, scores_name = {
        "classifier": (LABEL_OUTPUT, PROBA_OUTPUT),
        "anomaly": (LABEL_OUTPUT, ANOMALY_SCORES_OUTPUT),
        "regressor": (REGRESSION_OUTPUT, None),
    }[kind]
    output_names = (label_name,) if scores_name is None else (label_name, scores_name)

    reference = reference_outputs(estimator, analysis, rows)
    float_out = run_onnx(model_bytes, feed, output_names)
    parity = compare(reference, float_out, tolerance, regression=regression)
    if not parity.passed:
        raise ParityMismatch(failure_message(parity, regression=regression), parity)

    quant_report: QuantizationReport | None = None
    expected = reference
    if quantize:
        size_before = len(model_bytes)
        if not quantizable_ops(model_bytes):
            quant_report = QuantizationReport(
                applied=False,
                reason=f"no MatMul/Gemm with constant weights in the graph "
                f"({' -> '.join(analysis.steps)}); the float model is kept",
                size_before=size_before, size_after=size_before,
            )
        else:
            q_bytes, ops = quantize_int8(model_bytes)
            if not ops:
                quant_report = QuantizationReport(
                    applied=False, reason="onnxruntime quantized no operator; the float "
                    "model is kept", size_before=size_before, size_after=size_before,
                )
            else:
                quant_out = run_onnx(q_bytes, feed, output_names)
                quant_report = report_change(
                    size_before=size_before, size_after=len(q_bytes), ops=ops,
                    float_out=float_out, quant_out=quant_out, truth=truth,
                    parity=compare(reference, quant_out, tolerance, regression=regression),
                )
                model_bytes = q_bytes
                # the device must reproduce the quantized model, not scikit-learn
                expected = quant_out

    all_metrics: dict[str, Any] = {"parity": parity.to_dict()}
    if truth is not None and not regression:
        all_metrics["sample_accuracy"] = accuracy(reference.labels, truth)
    if quant_report is not None:
        all_metrics["quantization"] = quant_report.to_dict()
    if metrics:
        all_metrics.update(dict(metrics))

    final_model = onnx_model
    if quant_report is not None and quant_report.applied:
        import onnx

        final_model = onnx.load_from_string(model_bytes)
    provenance: dict[str, Any] = {
        "framework": "scikit-learn",
        "converter": "skl2onnx",
        **_versions(),
        # which steps edgeml wrote itself instead of skl2onnx (empty: skl2onnx throughout)
        "lowered": lowered_steps(analysis.steps, converter),
        "opset": opset_of(final_model),
        "estimator": _short_repr(estimator),
        "estimator_steps": list(analysis.steps),
        "scores": "prediction" if regression
        else "probabilities" if analysis.scores_are_proba else "decision_function",
        "quantized": bool(quant_report is not None and quant_report.applied),
        "self_test_source": "onnxruntime-int8" if expected is not reference else "scikit-learn",
        "training_data_sha256": None,
        "training_rows": None,
    }
    reference = None
    if training_data is not None:
        td = np.asarray(training_data)
        provenance["training_data_sha256"] = training_fingerprint(td)
        provenance["training_rows"] = int(td.shape[0]) if td.ndim else 1
        # the drift reference profile (converters/reference.py), signed with the manifest
        from converters.reference import build_reference

        reference = build_reference(estimator, analysis, td, feats, window)

    shape: tuple[int | None, ...] = (
        (None, window, n_features) if input_shape == "3d" else (None, width)
    )
    manifest = Manifest(
        name=name,
        version=version,
        release=default_release(version),  # anti-downgrade order
        created=utc_now_iso(),
        input=ModelInput(name=INPUT_NAME, dtype="float32", shape=shape, features=feats,
                         window=window),
        outputs=ModelOutputs(kind=kind, label=label_name, scores=scores_name,
                             classes=analysis.classes),
        sha256=sha256_hex(model_bytes),
        size=len(model_bytes),
        provenance=provenance,
        metrics=all_metrics,
        self_test=_self_test(rows, expected, self_test_rows, tolerance, regression=regression),
        description=description,
        reference=reference,
        portable=portable,
    )
    path = write_bundle(Path(out), manifest, model_bytes, sign_key=sign_key)
    return ConversionReport(path=path, manifest=manifest, parity=parity,
                            quantization=quant_report)
