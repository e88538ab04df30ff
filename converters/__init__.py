"""Host side of edgeml: scikit-learn model -> ONNX -> checked, optionally signed bundle.

``convert_estimator`` is the one entry point; ``WindowFeatures`` lets a pipeline take raw sensor
windows so the device feeds exactly what it receives. Needs the ``host`` extra
(scikit-learn, skl2onnx, onnx).
"""

from __future__ import annotations

from converters.convert import ConversionReport, convert_estimator, training_fingerprint
from converters.export import (
    DEFAULT_TARGET_OPSET,
    SUPPORTED_ESTIMATORS,
    SUPPORTED_TRANSFORMERS,
    supported_names,
)
from converters.features import STATS, WindowFeatures, register_converters
from converters.parity import ParityMismatch, ParityReport
from converters.quantize import QuantizationReport
from converters.trees import CONVERTERS, DEFAULT_CONVERTER, LOWERED_ESTIMATORS

__all__ = [
    "CONVERTERS",
    "DEFAULT_CONVERTER",
    "DEFAULT_TARGET_OPSET",
    "LOWERED_ESTIMATORS",
    "STATS",
    "SUPPORTED_ESTIMATORS",
    "SUPPORTED_TRANSFORMERS",
    "ConversionReport",
    "ParityMismatch",
    "ParityReport",
    "QuantizationReport",
    "WindowFeatures",
    "convert_estimator",
    "register_converters",
    "supported_names",
    "training_fingerprint",
]
