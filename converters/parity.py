"""Does the ONNX model score what scikit-learn scores?

The parity check runs the exact model bytes that go into the bundle with onnxruntime and
compares them with the estimator's own outputs on the same float32 rows: labels must be
identical on every row, scores (probabilities / decision_function) within an absolute
tolerance. A bundle that misses is never written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from converters.export import Analysis
from edgeml.errors import ConversionError, ParityError


@dataclass(frozen=True)
class ParityReport:
    """How closely onnxruntime reproduced scikit-learn on the sample rows."""

    rows: int
    label_agreement: float        # fraction of rows with identical labels (1.0 = all)
    max_abs_score_diff: float     # max |onnx - sklearn| over every score value
    tolerance: float
    passed: bool                  # every label identical and max diff <= tolerance
    labels_differ: int = 0        # rows whose labels differ
    ties: int = 0                 # of those, rows where sklearn's top two scores are a tie
    relative: bool = False        # regressors: the tolerance scales with max(1, |prediction|)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.relative:
            return (
                f"parity: {self.rows} rows, {self.labels_differ} predictions out of tolerance, "
                f"max |diff| {self.max_abs_score_diff:.3g}, tolerance {self.tolerance:g} x "
                f"max(1, |prediction|): {verdict}"
            )
        return (
            f"parity: {self.rows} rows, label agreement {self.label_agreement:.4f} "
            f"({self.labels_differ} differ), max |score diff| {self.max_abs_score_diff:.3g}, "
            f"tolerance {self.tolerance:g}: {verdict}"
        )


class ParityMismatch(ParityError):
    """Parity failed; ``report`` holds the figures (the CLI prints them before exiting)."""

    def __init__(self, message: str, report: ParityReport):
        self.report = report
        super().__init__(message)


@dataclass(frozen=True)
class Outputs:
    """Labels [N] and scores [N, k] in the layout of the ONNX outputs."""

    labels: np.ndarray
    scores: np.ndarray


def reference_outputs(estimator: Any, analysis: Analysis, X: np.ndarray) -> Outputs:
    """scikit-learn's labels and scores, shaped like the ONNX model's outputs."""
    labels = np.asarray(estimator.predict(X))
    if analysis.spec.kind == "regressor":
        pred = labels.astype(np.float64).reshape(len(X), -1)
        return Outputs(labels=pred[:, 0] if pred.shape[1] == 1 else pred, scores=pred)
    if analysis.spec.kind == "anomaly" or not analysis.scores_are_proba:
        scores = np.asarray(estimator.decision_function(X), dtype=np.float64)
    else:
        scores = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    if scores.ndim == 1:
        scores = scores.reshape(-1, 1)
    return Outputs(labels=labels, scores=scores)


def run_onnx(model_bytes: bytes, X: np.ndarray, output_names: tuple[str, ...]) -> Outputs:
    """Score ``X`` (already shaped for the model's input) with onnxruntime on the CPU.

    ``output_names`` is ``(label, scores)``, or ``(variable,)`` for a regressor, whose
    predictions then serve as both labels and scores."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        results = session.run(list(output_names), {session.get_inputs()[0].name: X})
    except Exception as exc:  # onnxruntime raises its own non-public exception types
        raise ConversionError(f"onnxruntime cannot run the converted model: {exc}") from exc
    if len(results) == 1:  # a regressor's predictions
        scores = np.asarray(results[0], dtype=np.float64).reshape(len(X), -1)
        return Outputs(labels=scores[:, 0] if scores.shape[1] == 1 else scores, scores=scores)
    labels, scores = results
    scores = np.asarray(scores, dtype=np.float64).reshape(len(X), -1)
    return Outputs(labels=np.asarray(labels).reshape(-1), scores=scores)


def _same_labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise equality across str/bytes/int/float label arrays."""
    def norm(arr: np.ndarray) -> list:
        out = []
        for v in arr.tolist():
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            out.append(v)
        return out

    return np.array([x == y for x, y in zip(norm(a), norm(b), strict=True)], dtype=bool)


def compare(reference: Outputs, onnx_out: Outputs, tolerance: float, *,
            regression: bool = False) -> ParityReport:
    """Parity figures of ``onnx_out`` against ``reference``.

    For regressors there are no exact labels: a prediction agrees when
    ``|onnx - sklearn| <= tolerance * max(1, |sklearn|)`` (absolute below 1, relative above,
    since float32 carries ~7 significant digits whatever the scale)."""
    rows = len(reference.labels)
    if len(onnx_out.labels) != rows:
        raise ConversionError(
            f"the ONNX model returned {len(onnx_out.labels)} labels for {rows} rows"
        )
    if reference.scores.shape != onnx_out.scores.shape:
        raise ConversionError(
            f"the ONNX model returned scores of shape {onnx_out.scores.shape}, scikit-learn "
            f"{reference.scores.shape}"
        )
    diff = np.abs(reference.scores - onnx_out.scores)
    max_diff = float(np.nanmax(diff)) if diff.size else 0.0
    if np.isnan(diff).any():
        max_diff = float("inf")
    if regression:
        scaled = diff / np.maximum(1.0, np.abs(reference.scores))
        same = ~(np.isnan(scaled) | (scaled > tolerance)).any(axis=1)
        differ = int((~same).sum())
        return ParityReport(
            rows=rows, label_agreement=float(same.mean()) if rows else 1.0,
            max_abs_score_diff=max_diff, tolerance=float(tolerance), passed=differ == 0,
            labels_differ=differ, ties=0, relative=True,
        )
    same = _same_labels(reference.labels, onnx_out.labels)
    differ = int((~same).sum())
    ties = 0
    if differ and reference.scores.shape[1] >= 2:
        top2 = np.sort(reference.scores[~same], axis=1)[:, -2:]
        ties = int((top2[:, 1] - top2[:, 0] <= max(tolerance, 1e-12)).sum())
    return ParityReport(
        rows=rows,
        label_agreement=float(same.mean()) if rows else 1.0,
        max_abs_score_diff=max_diff,
        tolerance=float(tolerance),
        passed=differ == 0 and max_diff <= tolerance,
        labels_differ=differ,
        ties=ties,
    )


def failure_message(report: ParityReport, *, regression: bool = False) -> str:
    if regression:
        return (
            f"parity check failed, no bundle written: {report.labels_differ} of {report.rows} "
            f"predictions differ by more than {report.tolerance:g} x max(1, |prediction|) "
            f"(max |diff| {report.max_abs_score_diff:.3g})"
        )
    parts = []
    if report.labels_differ:
        tie_note = (
            f" ({report.ties} of them where scikit-learn's top two scores tie within the "
            "tolerance, so float32 rounding picks the other class)" if report.ties else ""
        )
        parts.append(f"{report.labels_differ} of {report.rows} labels differ{tie_note}")
    if report.max_abs_score_diff > report.tolerance:
        parts.append(
            f"max |score diff| {report.max_abs_score_diff:.3g} exceeds the tolerance "
            f"{report.tolerance:g} by {report.max_abs_score_diff - report.tolerance:.3g}"
        )
    else:
        parts.append(
            f"max |score diff| {report.max_abs_score_diff:.3g} (within the tolerance "
            f"{report.tolerance:g})"
        )
    return "parity check failed, no bundle written: " + "; ".join(parts)
