"""Optional int8 dynamic quantization, reported rather than enforced.

``onnxruntime.quantization.quantize_dynamic`` turns MatMul weights into int8 (MLPs, PCA).
Tree ensembles, LinearClassifier (LogisticRegression, LinearSVC) and the other ``ai.onnx.ml``
operators have nothing it can quantize; for them the float model is kept and the report says
so. A quantized model is *expected* to differ a little from scikit-learn, so its parity is
measured and reported, never used to refuse the bundle.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.parity import Outputs, ParityReport, _same_labels
from edgeml.errors import ConversionError

#: Operators whose presence in the quantized graph means quantization did something.
_QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
     "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
)


@dataclass(frozen=True)
class QuantizationReport:
    """What int8 dynamic quantization did to the model."""

    applied: bool
    reason: str                            # why not, or which operators were quantized
    size_before: int
    size_after: int                        # == size_before when not applied
    label_agreement: float | None = None   # quantized vs float ONNX model on the sample
    max_abs_score_change: float | None = None
    accuracy_float: float | None = None    # when true labels were given
    accuracy_quantized: float | None = None
    accuracy_change: float | None = None   # quantized - float
    parity: ParityReport | None = None     # quantized vs scikit-learn (reported only)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity"] = None if self.parity is None else self.parity.to_dict()
        return d

    def summary(self) -> str:
        if not self.applied:
            return f"quantization: not applied ({self.reason})"
        text = (
            f"quantization: int8 dynamic, {self.size_before} -> {self.size_after} bytes, "
            f"label agreement with the float model {self.label_agreement:.4f}, "
            f"max |score change| {self.max_abs_score_change:.3g}"
        )
        if self.accuracy_change is not None:
            text += (
                f", accuracy {self.accuracy_float:.4f} -> {self.accuracy_quantized:.4f} "
                f"({self.accuracy_change:+.4f})"
            )
        return text


def quantizable_ops(model_bytes: bytes) -> list[str]:
    """MatMul/Gemm nodes whose second input is a constant weight (what int8 dynamic targets)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    consts = {i.name for i in model.graph.initializer}
    return [
        n.op_type for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts
    ]


class _DropPreprocessAdvice(logging.Filter):
    """onnxruntime.quantization logs advice to run its pre-processing on the *root* logger for
    every call; for these small sklearn graphs it changes nothing we report, so keep it out
    of the user's terminal while (and only while) we quantize."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def quantize_int8(model_bytes: bytes) -> tuple[bytes, list[str]]:
    """Quantize with onnxruntime; returns the new bytes and the quantized operator types found
    in the result (empty: nothing was quantized, keep the float model)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgeml-quant-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        advice_filter = _DropPreprocessAdvice()
        logging.getLogger().addFilter(advice_filter)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        except Exception as exc:  # onnxruntime.quantization raises assorted exception types
            raise ConversionError(f"int8 dynamic quantization failed: {exc}") from exc
        finally:
            logging.getLogger().removeFilter(advice_filter)
        out = dst.read_bytes()
    ops = sorted({n.op_type for n in onnx.load_from_string(out).graph.node} & _QUANTIZED_OPS)
    return out, ops


def accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(_same_labels(np.asarray(labels).reshape(-1), np.asarray(truth)).mean())


def report_change(
    *,
    size_before: int,
    size_after: int,
    ops: list[str],
    float_out: Outputs,
    quant_out: Outputs,
    truth: np.ndarray | None,
    parity: ParityReport,
) -> QuantizationReport:
    acc_f = acc_q = change = None
    if truth is not None:
        acc_f = accuracy(float_out.labels, truth)
        acc_q = accuracy(quant_out.labels, truth)
        change = acc_q - acc_f
    return QuantizationReport(
        applied=True,
        reason="quantized operators: " + ", ".join(ops),
        size_before=size_before,
        size_after=size_after,
        label_agreement=float(_same_labels(float_out.labels, quant_out.labels).mean()),
        max_abs_score_change=float(np.max(np.abs(float_out.scores - quant_out.scores))),
        accuracy_float=acc_f,
        accuracy_quantized=acc_q,
        accuracy_change=change,
        parity=parity,
    )
