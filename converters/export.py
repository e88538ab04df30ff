"""scikit-learn -> ONNX with edgeml's conventions, for the estimators we have proved.

Conventions every bundle follows (the device runtime relies on them): one float32 input named
``input``; classifiers output ``label`` [N] and ``probabilities`` [N, n_classes] as plain
tensors (no ZipMap); IsolationForest outputs ``label`` (1 normal / -1 anomaly) and ``scores``
[N, 1] (its ``decision_function``); regressors output ``variable`` [N, 1]. Estimators without
``predict_proba`` (LinearSVC, SVC without ``probability=True``) put their
``decision_function`` in ``probabilities``: [N, n_classes] one-vs-rest, or [N, 1] for two
classes (positive means ``classes[1]``).

Only the estimator types listed in :data:`SUPPORTED_ESTIMATORS` and :data:`SUPPORTED_TRANSFORMERS`
are accepted: each one has a parity test on the real data sets. Anything else is refused with
:class:`~edgeml.errors.UnsupportedEstimatorError` rather than converted on hope.

StandardScaler and MinMaxScaler are written so they round exactly like scikit-learn does on
float32 input: a one-ulp difference in front of a tree is enough to flip a split.
Per-call skl2onnx hooks (``options``, ``custom_conversion_functions``) carry these choices;
nothing in skl2onnx's global registry changes except the WindowFeatures converter.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters.trees import DEFAULT_CONVERTER, check_converter
from edgeml.errors import ConversionError, UnsupportedEstimatorError

#: ONNX opsets the converters target. IsolationForest needs ``ai.onnx.ml`` 3 (skl2onnx 1.20
#: would otherwise pick 4, which it cannot write); opset 17 keeps bundles loadable by
#: onnxruntime >= 1.13 on older devices.
DEFAULT_TARGET_OPSET: Mapping[str, int] = {"": 17, "ai.onnx.ml": 3}

INPUT_NAME = "input"
LABEL_OUTPUT = "label"
PROBA_OUTPUT = "probabilities"
ANOMALY_SCORES_OUTPUT = "scores"
REGRESSION_OUTPUT = "variable"


@dataclass(frozen=True)
class EstimatorSpec:
    """What edgeml knows about one supported final estimator."""

    module: str            # where scikit-learn defines the class
    name: str              # class name
    kind: str              # "classifier" | "anomaly" | "regressor"
    zipmap: bool           # whether skl2onnx knows the zipmap option for it
    note: str = ""         # shown in the supported list


SUPPORTED_ESTIMATORS: tuple[EstimatorSpec, ...] = (
    EstimatorSpec("sklearn.linear_model", "LogisticRegression", "classifier", True),
    EstimatorSpec("sklearn.ensemble", "RandomForestClassifier", "classifier", True),
    EstimatorSpec("sklearn.ensemble", "ExtraTreesClassifier", "classifier", True),
    EstimatorSpec("sklearn.ensemble", "GradientBoostingClassifier", "classifier", True),
    EstimatorSpec("sklearn.ensemble", "HistGradientBoostingClassifier", "classifier", True),
    EstimatorSpec("sklearn.neural_network", "MLPClassifier", "classifier", True),
    EstimatorSpec("sklearn.svm", "LinearSVC", "classifier", False,
                  "scores are decision_function"),
    EstimatorSpec("sklearn.svm", "SVC", "classifier", True,
                  "kernel='linear'; scores are decision_function unless probability=True"),
    EstimatorSpec("sklearn.neighbors", "KNeighborsClassifier", "classifier", True),
    EstimatorSpec("sklearn.ensemble", "IsolationForest", "anomaly", False,
                  "label 1/-1, scores = decision_function"),
    EstimatorSpec("sklearn.linear_model", "LinearRegression", "regressor", False),
    EstimatorSpec("sklearn.linear_model", "Ridge", "regressor", False),
    EstimatorSpec("sklearn.ensemble", "RandomForestRegressor", "regressor", False),
    EstimatorSpec("sklearn.ensemble", "ExtraTreesRegressor", "regressor", False),
    EstimatorSpec("sklearn.ensemble", "GradientBoostingRegressor", "regressor", False),
    EstimatorSpec("sklearn.ensemble", "HistGradientBoostingRegressor", "regressor", False),
)
"""Final estimators (alone or as the last step of a Pipeline)."""

SUPPORTED_TRANSFORMERS: tuple[tuple[str, str], ...] = (
    ("sklearn.preprocessing", "StandardScaler"),
    ("sklearn.preprocessing", "MinMaxScaler"),
    ("sklearn.decomposition", "PCA"),
    ("converters.features", "WindowFeatures"),
)
"""Pipeline steps allowed in front of the final estimator."""


def supported_names() -> list[str]:
    """Human-readable list for error messages and docs."""
    finals = [s.name + (f" ({s.note})" if s.note else "") for s in SUPPORTED_ESTIMATORS]
    steps = [name for _, name in SUPPORTED_TRANSFORMERS]
    return [*finals, "Pipeline(" + " / ".join(steps) + " ... -> one of the above)"]


def _class_of(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Analysis:
    """The estimator taken apart: its final step and how its outputs look."""

    final: Any
    spec: EstimatorSpec
    steps: tuple[str, ...]                 # class names, input to output
    step_objects: tuple[Any, ...]          # the fitted steps themselves, same order
    classes: tuple | None                  # score-column order; None for anomaly/regressor
    scores_are_proba: bool                 # False: decision_function in the scores output
    n_features_in: int | None


def _unsupported(what: str) -> UnsupportedEstimatorError:
    return UnsupportedEstimatorError(
        f"{what} is not supported; supported: {'; '.join(supported_names())}"
    )


def analyse(estimator: Any) -> Analysis:
    """Check every step is supported and fitted; raise naming the first one that is not."""
    from sklearn.exceptions import NotFittedError
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    steps: list[Any] = []

    def flatten(est: Any) -> None:
        if isinstance(est, Pipeline):
            for _, step in est.steps:
                if step is None or step == "passthrough":
                    continue
                flatten(step)
        else:
            steps.append(est)

    flatten(estimator)
    if not steps:
        raise _unsupported("an empty Pipeline")
    *front, final = steps
    transformer_types = {_class_of(m, n) for m, n in SUPPORTED_TRANSFORMERS}
    for step in front:
        if type(step) not in transformer_types:
            raise _unsupported(f"pipeline step {type(step).__name__}")
    spec = next(
        (s for s in SUPPORTED_ESTIMATORS if type(final) is _class_of(s.module, s.name)), None
    )
    if spec is None:
        where = " (last pipeline step)" if front else ""
        raise _unsupported(f"{type(final).__name__}{where}")
    if spec.name == "SVC" and final.kernel != "linear":
        raise _unsupported(f"SVC with kernel={final.kernel!r} (only kernel='linear')")
    for step in steps:
        try:
            check_is_fitted(step)
        except NotFittedError as exc:
            raise ConversionError(
                f"{type(step).__name__} is not fitted: fit the model before converting it"
            ) from exc
    classes = None
    if spec.kind == "classifier":
        classes = tuple(np.asarray(final.classes_).tolist())
        if len(classes) < 2:
            raise ConversionError(f"{spec.name} was fitted on one class only: {classes}")
    # SVC offers predict_proba only when trained with probability=True (deprecated in 1.9)
    scores_are_proba = spec.kind == "classifier" and hasattr(final, "predict_proba")
    n_in = getattr(steps[0], "n_features_in_", None)
    return Analysis(
        final=final, spec=spec, steps=tuple(type(s).__name__ for s in steps),
        step_objects=tuple(steps),
        classes=classes, scores_are_proba=scores_are_proba,
        n_features_in=None if n_in is None else int(n_in),
    )


# --- HistGradientBoosting workaround --------------------------------------------------------
class _IntAttributeContainer:
    """Delegates to a skl2onnx container, turning Python bools in list attributes into ints.

    skl2onnx 1.20 writes ``nodes_missing_value_tracks_true`` for HistGradientBoosting trees
    with a literal ``False`` for every leaf; current onnx (1.23) refuses booleans in an INTS
    attribute ("Expected an int, got a boolean"). Casting at the container keeps the user's
    estimator and skl2onnx's global registry untouched.
    """

    def __init__(self, container: Any):
        self._container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, op_type, inputs, outputs, *args, **attrs):
        for key, value in attrs.items():
            if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
                attrs[key] = [int(v) if isinstance(v, (bool, np.bool_)) else v for v in value]
        return self._container.add_node(op_type, inputs, outputs, *args, **attrs)


def _hgb_classifier_converter(scope, operator, container) -> None:
    from skl2onnx.common._registration import get_converter

    get_converter("SklearnHistGradientBoostingClassifier")(
        scope, operator, _IntAttributeContainer(container)
    )


def _hgb_regressor_converter(scope, operator, container) -> None:
    from skl2onnx.common._registration import get_converter

    get_converter("SklearnHistGradientBoostingRegressor")(
        scope, operator, _IntAttributeContainer(container)
    )


# --- scalers that round like scikit-learn ----------------------------------------------------
def _minmax_scaler_converter(scope, operator, container) -> None:
    """MinMaxScaler as numpy computes it on float32 input: ``X *= scale_`` and ``X += min_``
    run in float64 and round to float32 after *each* step (the float64 attributes promote the
    in-place ufuncs). skl2onnx multiplies in float32 instead, which moves values by an ulp
    and is enough to send a row down the other branch of a tree threshold."""
    from onnx import TensorProto

    op = operator.raw_operator

    def node(op_type: str, inputs: list[str], seed: str, out: str | None = None, **attrs):
        out = out or scope.get_unique_variable_name(seed)
        container.add_node(
            op_type, inputs, [out], name=scope.get_unique_operator_name(seed), **attrs
        )
        return out

    def const(seed: str, arr: np.ndarray, onnx_type: int) -> str:
        cname = scope.get_unique_variable_name(seed)
        container.add_initializer(cname, onnx_type, list(arr.shape), arr.ravel().tolist())
        return cname

    f64, f32 = TensorProto.DOUBLE, TensorProto.FLOAT
    x = node("Cast", [operator.inputs[0].full_name], "mm_x64", to=f64)
    scaled = node("Cast", [node("Mul", [x, const("mm_scale", np.asarray(op.scale_, np.float64),
                                                 f64)], "mm_mul")], "mm_mul32", to=f32)
    shifted64 = node("Add", [node("Cast", [scaled], "mm_mul64", to=f64),
                             const("mm_min", np.asarray(op.min_, np.float64), f64)], "mm_add")
    final = operator.outputs[0].full_name
    if getattr(op, "clip", False):
        lo, hi = (np.asarray(v, np.float32) for v in op.feature_range)
        shifted = node("Cast", [shifted64], "mm_add32", to=f32)
        node("Clip", [shifted, const("mm_lo", lo, f32), const("mm_hi", hi, f32)], "mm_clip",
             out=final)
    else:
        node("Cast", [shifted64], "mm_add32", out=final, to=f32)


def _conversion_options(analysis: Analysis) -> dict[int, dict[str, Any]]:
    """Per-step skl2onnx options, keyed by ``id(step)``."""
    from sklearn.preprocessing import StandardScaler

    options: dict[int, dict[str, Any]] = {}
    for step in analysis.step_objects:
        if type(step) is StandardScaler:
            # Sub + Div in float32, as StandardScaler.transform does (the default Scaler op
            # multiplies by 1/scale and rounds differently)
            options[id(step)] = {"div": "div"}
    # zipmap=False: plain tensors. LinearSVC has no zipmap option, but inside a Pipeline
    # skl2onnx adds one to every classifier step that has no options of its own.
    options[id(analysis.final)] = {"zipmap": False} if analysis.spec.zipmap else {"nocl": False}
    if analysis.spec.kind != "classifier":
        del options[id(analysis.final)]
    return options


# --- conversion ------------------------------------------------------------------------------
def _rename_value(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for seq in (graph.output, graph.input, graph.value_info):
        for v in seq:
            if v.name == old:
                v.name = new


def _prepend_reshape(model: Any, flat_name: str, window: int, n_features: int) -> None:
    """Accept [N, window, n_features] and flatten it sample-major for the sklearn graph."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    shape_name = "edgeml_flatten_shape"
    graph.initializer.append(
        numpy_helper.from_array(np.array([-1, window * n_features], dtype=np.int64), shape_name)
    )
    reshape = helper.make_node(
        "Reshape", [INPUT_NAME, shape_name], [flat_name], name="edgeml_flatten_window"
    )
    graph.node.insert(0, reshape)
    new_input = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.FLOAT, [None, window, n_features]
    )
    del graph.input[:]
    graph.input.append(new_input)


def _slice_first_column(model: Any, output: str) -> None:
    """SVC's binary decision scores come out as [N, 2] = [d, -d]; keep [N, 1] = d like
    LinearSVC so every two-class decision model has the same layout."""
    from onnx import helper, numpy_helper

    graph = model.graph
    raw = output + "_two_columns"
    _rename_value(graph, output, raw)
    for v in graph.output:
        if v.name == raw:
            v.name = output
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 2:
                dims[1].ClearField("dim_param")
                dims[1].dim_value = 1
    for name, value in (("edgeml_c0", [0]), ("edgeml_c1", [1]), ("edgeml_ax1", [1])):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    graph.node.append(helper.make_node(
        "Slice", [raw, "edgeml_c0", "edgeml_c1", "edgeml_ax1"], [output],
        name="edgeml_binary_decision",
    ))


def to_onnx_model(
    estimator: Any,
    analysis: Analysis,
    *,
    n_inputs: int,
    window: int | None,
    n_features: int,
    input_shape: str,
    target_opset: Mapping[str, int] | None = None,
    converter: str = DEFAULT_CONVERTER,
) -> Any:
    """Convert to an ``onnx.ModelProto`` that follows edgeml's input and output names.

    ``converter="edgeml"`` (the default) writes the models of
    :data:`~converters.trees.LOWERED_ESTIMATORS` with edgeml's own lowering
    (:mod:`converters.trees`) and everything else with skl2onnx; ``"skl2onnx"`` uses
    skl2onnx's converters throughout."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        IsolationForest,
    )
    from sklearn.preprocessing import MinMaxScaler

    from converters.features import register_converters
    from converters.trees import convert_isolation_forest

    check_converter(converter)
    register_converters()
    custom: dict[type, Any] = {
        HistGradientBoostingClassifier: _hgb_classifier_converter,
        HistGradientBoostingRegressor: _hgb_regressor_converter,
        MinMaxScaler: _minmax_scaler_converter,
    }
    if converter == "edgeml":
        custom[IsolationForest] = convert_isolation_forest
    spec = analysis.spec
    flat_name = INPUT_NAME if input_shape == "flat" else "edgeml_flat_input"
    options = _conversion_options(analysis)
    opset = dict(target_opset or DEFAULT_TARGET_OPSET)
    try:
        with warnings.catch_warnings():
            # skl2onnx reads SVC.probA_/probB_, deprecated in scikit-learn 1.9: not the
            # user's fault, so not the user's warning
            warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
            model = convert_sklearn(
                estimator,
                initial_types=[(flat_name, FloatTensorType([None, n_inputs]))],
                target_opset=opset,
                options=options,
                custom_conversion_functions=custom,
            )
    except ConversionError:
        raise
    except Exception as exc:  # skl2onnx raises bare RuntimeError/ValueError/NameError
        raise ConversionError(
            f"skl2onnx could not convert {' -> '.join(analysis.steps)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc

    graph = model.graph
    outputs = [o.name for o in graph.output]
    wanted = {
        "classifier": [LABEL_OUTPUT, PROBA_OUTPUT],
        "anomaly": [LABEL_OUTPUT, ANOMALY_SCORES_OUTPUT],
        "regressor": [REGRESSION_OUTPUT],
    }[spec.kind]
    if len(outputs) != len(wanted):
        raise ConversionError(
            f"skl2onnx produced outputs {outputs} for {spec.name}, expected {len(wanted)}"
        )
    for old, new in zip(outputs, wanted, strict=True):
        _rename_value(graph, old, new)
    if (
        spec.name == "SVC" and not analysis.scores_are_proba
        and analysis.classes is not None and len(analysis.classes) == 2
    ):
        _slice_first_column(model, PROBA_OUTPUT)
    if input_shape == "3d":
        assert window is not None
        _prepend_reshape(model, flat_name, window, n_features)
    graph.name = f"edgeml_{spec.name}"
    return model


def opset_of(model: Any) -> dict[str, int]:
    """``{domain: version}`` with the default domain spelled ``ai.onnx``."""
    return {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
