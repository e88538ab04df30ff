"""Window features that run inside the ONNX graph.

A device feeds raw sensor windows; the model computes its own features. Keeping the feature
code in the graph means host (scikit-learn) and device (onnxruntime) compute the same numbers
from the same float32 inputs, instead of two hand-written implementations drifting apart.

:class:`WindowFeatures` takes flat sample-major windows ``[n, size * n_channels]`` (all channels
of sample 0, then of sample 1, ...) and returns ``[n, n_channels * len(stats)]`` ordered
stat-major: every channel's first statistic, then every channel's second, and so on.
Its skl2onnx converter is attached by :func:`register_converters`, which the conversion code
calls explicitly (importing this module registers nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

STATS: tuple[str, ...] = ("mean", "std", "min", "max", "rms")
"""Statistics :class:`WindowFeatures` knows, computed per channel over a window."""

ONNX_ALIAS = "EdgemlWindowFeatures"


def _check_params(n_channels: object, stats: object) -> tuple[int, tuple[str, ...]]:
    if isinstance(n_channels, bool) or not isinstance(n_channels, (int, np.integer)) or (
        n_channels < 1
    ):
        raise ValueError(f"n_channels must be a positive integer, not {n_channels!r}")
    if isinstance(stats, str) or not isinstance(stats, Sequence) or not stats:
        raise ValueError(f"stats must be a non-empty sequence of names from {STATS}")
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown stats {unknown}; known: {', '.join(STATS)}")
    if len(set(stats)) != len(stats):
        raise ValueError(f"stats must not repeat: {tuple(stats)}")
    return int(n_channels), tuple(stats)


def _fold_plan(length: int) -> list[tuple[int, bool]]:
    """The pairwise folding steps for a window of ``length``: (half, odd) per level."""
    plan = []
    while length > 1:
        half, odd = length // 2, bool(length % 2)
        plan.append((half, odd))
        length = half + odd
    return plan


def _fold_sum(x: np.ndarray) -> np.ndarray:
    """Sum ``[n, m, c]`` over axis 1 by pairwise folding, in float32.

    A plain reduction's summation order is an implementation detail (numpy and onnxruntime
    differ in the last bits); folding the window in halves with element-wise adds fixes the
    order, and IEEE float32 addition is exact-rounded on both sides, so the sums are identical.
    """
    for half, odd in _fold_plan(x.shape[1]):
        s = x[:, :half] + x[:, half : 2 * half]
        x = np.concatenate([s, x[:, 2 * half :]], axis=1) if odd else s
    return x[:, 0]


class WindowFeatures(TransformerMixin, BaseEstimator):
    """Per-channel statistics of flat sample-major windows, in float32.

    ``std`` is the population standard deviation (ddof=0) computed in two passes (mean first,
    then the mean squared deviation), ``rms`` is ``sqrt(mean(x**2))``. Everything is float32 and
    sums use a fixed pairwise order, so the ONNX graph reproduces the values bit for bit; the
    window length is learnt in :meth:`fit`.
    """

    def __init__(self, n_channels: int, stats: Sequence[str] = STATS):
        self.n_channels = n_channels
        self.stats = stats

    def fit(self, X, y=None) -> WindowFeatures:
        n_channels, _ = _check_params(self.n_channels, self.stats)
        X = check_array(X, dtype=np.float32)
        self.n_features_in_ = X.shape[1]
        if X.shape[1] % n_channels:
            raise ValueError(
                f"{X.shape[1]} columns is not a whole number of samples of "
                f"{n_channels} channels"
            )
        self.window_ = X.shape[1] // n_channels
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "window_")
        n_channels, stats = _check_params(self.n_channels, self.stats)
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} columns, WindowFeatures was fitted with {self.n_features_in_}"
            )
        x = X.reshape(X.shape[0], self.window_, n_channels)
        size = np.float32(self.window_)
        parts: list[np.ndarray] = []
        mean = None
        for stat in stats:
            if stat in ("mean", "std") and mean is None:
                mean = _fold_sum(x) / size
            if stat == "mean":
                parts.append(mean)
            elif stat == "std":
                d = x - mean[:, None, :]
                parts.append(np.sqrt(_fold_sum(d * d) / size))
            elif stat == "min":
                parts.append(x.min(axis=1))
            elif stat == "max":
                parts.append(x.max(axis=1))
            else:  # rms
                parts.append(np.sqrt(_fold_sum(x * x) / size))
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``mean_ch0, mean_ch1, ..., std_ch0, ...`` (stat-major, like the columns)."""
        check_is_fitted(self, "window_")
        return np.asarray(
            [f"{s}_ch{c}" for s in self.stats for c in range(self.n_channels)], dtype=object
        )


# --- skl2onnx -------------------------------------------------------------------------------
def _shape_calculator(operator) -> None:
    from skl2onnx.common.data_types import FloatTensorType

    op = operator.raw_operator
    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, op.n_channels * len(op.stats)])


def _converter(scope, operator, container) -> None:
    """Reshape to [n, size, channels], fold-sum over axis 1, concatenate stat-major.

    Every operation mirrors :meth:`WindowFeatures.transform` step by step (same adds in the same
    order, then one division by the window length), which is what makes the results identical.
    """
    from onnx import TensorProto

    op: WindowFeatures = operator.raw_operator
    n_channels, stats = _check_params(op.n_channels, op.stats)
    if container.target_opset < 13:
        raise RuntimeError("WindowFeatures needs target opset >= 13")
    reduce_axes_as_input = container.target_opset >= 18

    def node(op_type: str, inputs: list[str], seed: str, **attrs) -> str:
        out = scope.get_unique_variable_name(seed)
        container.add_node(
            op_type, inputs, [out], name=scope.get_unique_operator_name(seed), **attrs
        )
        return out

    consts: dict[tuple, str] = {}

    def const(values, dtype=np.int64, onnx_type=TensorProto.INT64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, tuple(arr.ravel().tolist()))
        if key not in consts:
            cname = scope.get_unique_variable_name("wf_const")
            container.add_initializer(cname, onnx_type, list(arr.shape), arr.ravel().tolist())
            consts[key] = cname
        return consts[key]

    axis1 = const([1])
    size = const(op.window_, np.float32, TensorProto.FLOAT)
    x3 = node(
        "Reshape", [operator.inputs[0].full_name, const([0, op.window_, n_channels])], "wf_x3"
    )

    def fold_sum(x: str) -> str:
        for half, odd in _fold_plan(op.window_):
            lo = node("Slice", [x, const([0]), const([half]), axis1], "wf_lo")
            hi = node("Slice", [x, const([half]), const([2 * half]), axis1], "wf_hi")
            s = node("Add", [lo, hi], "wf_add")
            if odd:
                last = node(
                    "Slice", [x, const([2 * half]), const([2 * half + 1]), axis1], "wf_last"
                )
                s = node("Concat", [s, last], "wf_cat", axis=1)
            x = s
        return node("Reshape", [x, const([0, n_channels])], "wf_sum")

    def reduce_extreme(op_type: str, seed: str) -> str:
        if reduce_axes_as_input:
            return node(op_type, [x3, axis1], seed, keepdims=0)
        return node(op_type, [x3], seed, axes=[1], keepdims=0)

    parts: list[str] = []
    mean = None
    for stat in stats:
        if stat in ("mean", "std") and mean is None:
            mean = node("Div", [fold_sum(x3), size], "wf_mean")
        if stat == "mean":
            parts.append(mean)
        elif stat == "std":
            d = node("Sub", [x3, node("Unsqueeze", [mean, axis1], "wf_mean3")], "wf_dev")
            sq = node("Mul", [d, d], "wf_dev2")
            var = node("Div", [fold_sum(sq), size], "wf_var")
            parts.append(node("Sqrt", [var], "wf_std"))
        elif stat == "min":
            parts.append(reduce_extreme("ReduceMin", "wf_min"))
        elif stat == "max":
            parts.append(reduce_extreme("ReduceMax", "wf_max"))
        else:
            sq = node("Mul", [x3, x3], "wf_x2")
            ms = node("Div", [fold_sum(sq), size], "wf_ms")
            parts.append(node("Sqrt", [ms], "wf_rms"))
    container.add_node(
        "Concat", parts, [operator.outputs[0].full_name],
        name=scope.get_unique_operator_name("wf_concat"), axis=1,
    )


def register_converters() -> None:
    """Tell skl2onnx how to convert :class:`WindowFeatures` (idempotent; call before converting).

    Called by :func:`converters.convert_estimator`; call it yourself only when you use
    skl2onnx directly on a pipeline containing :class:`WindowFeatures`.
    """
    from skl2onnx import update_registered_converter

    update_registered_converter(
        WindowFeatures, ONNX_ALIAS, _shape_calculator, _converter, overwrite=True
    )
