"""Tree ensembles lowered by edgeml itself instead of skl2onnx's generic converters.

**IsolationForest.** skl2onnx 1.20 writes one small subgraph per tree (Gather of the tree's
features, a one-tree TreeEnsembleRegressor, two LabelEncoders, casts and ~15 arithmetic ops):
~27 nodes a tree, 2,710 for the default 100 trees, each node paying onnxruntime's per-node
overhead at every call. :func:`convert_isolation_forest` writes the whole forest as **one**
``ai.onnx.ml`` ``TreeEnsembleRegressor`` (opset 3) plus a handful of elementwise nodes:

1. ``TreeEnsembleRegressor`` (``BRANCH_LEQ``, ``n_targets`` = number of trees, aggregate
   ``SUM``): tree *t* writes to target *t* the **index** of the leaf the row reaches (a
   global leaf number, an integer that float32 holds exactly). Feature ids are remapped
   through ``estimators_features_`` (``max_features < 1``) so every tree reads the full row.
   Thresholds are rounded *down* to float32 (the largest float32 <= the float64 threshold):
   scikit-learn compares a float32 input promoted to float64 with the float64 threshold, and
   for a float32 ``x``, ``x <= t`` holds exactly when ``x <= float32_down(t)``.
2. ``Cast`` to int64 and ``Gather`` from a float64 table holding, per leaf, exactly the value
   scikit-learn adds for it: ``decision_path_length + c(n_samples in leaf) - 1.0``
   (``c(n) = 2 H(n-1) - 2 (n-1) / n``, ``c(1) = 0``, ``c(2) = 1``).
3. ``CumSum`` along the trees (float64, sequential, the order scikit-learn adds the trees in)
   and a ``Gather`` of the last column: the summed depth, bit for bit scikit-learn's
   ``depths``.
4. Scores: ``Pow(b, depth)`` with ``b = 2 ** (-1 / (n_trees * c(max_samples_)))`` (one node
   for scikit-learn's ``2 ** (-depth / denominator)``, within depth x 2.2e-16 relative),
   ``Sub`` from ``-offset_``, ``Cast`` to float32: the ``decision_function`` in ``scores``
   [N, 1].
5. Label: ``Less(depth, d*)`` then ``Where`` -> -1 / 1 int64 [N, 1], where ``d*`` is the
   smallest float64 depth whose decision_function (computed with numpy exactly as
   scikit-learn computes it) is ``>= 0``. The label therefore depends on the exact depth sum
   only, never on the device's ``pow``: labels equal scikit-learn's even for a row whose
   decision_function is exactly 0 (a training duplicate at the contamination percentile).

10 nodes whatever the number of trees: each small node costs onnxruntime ~0.6 µs per call on
a 2-core x86 host (the walk of all 100 trees ~2.5 µs), so none is spare. The same outputs as
the skl2onnx path (``label`` int64 [N, 1], ``scores`` float32 [N, 1]), so the device runtime
sees no difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeml.errors import ConversionError

#: Accepted values of the ``converter`` parameter: "edgeml" lowers the models edgeml knows
#: how to lower (IsolationForest) and uses skl2onnx for everything else; "skl2onnx" uses
#: skl2onnx's own converters throughout.
CONVERTERS: tuple[str, ...] = ("edgeml", "skl2onnx")
DEFAULT_CONVERTER = "edgeml"

#: Estimators the "edgeml" converter lowers itself (class names).
LOWERED_ESTIMATORS: tuple[str, ...] = ("IsolationForest",)

#: float32 holds every integer up to 2**24 exactly: the leaf numbers must stay below it.
_MAX_EXACT_LEAF_INDEX = 2**24


def check_converter(converter: object) -> str:
    """``converter`` if it is one of :data:`CONVERTERS`, else a ConversionError naming it."""
    if not isinstance(converter, str) or converter not in CONVERTERS:
        raise ConversionError(
            f"converter must be one of {', '.join(repr(c) for c in CONVERTERS)}, "
            f"not {converter!r}"
        )
    return converter


def average_path_length(n_samples_leaf: np.ndarray) -> np.ndarray:
    """scikit-learn's ``_average_path_length``: the average path length of an unsuccessful
    search in a binary search tree of ``n`` nodes; ``c(n <= 1) = 0``, ``c(2) = 1``, else
    ``2 (ln(n - 1) + euler_gamma) - 2 (n - 1) / n``. Same float64 operations, same bits."""
    n = np.asarray(n_samples_leaf, dtype=np.float64)
    out = np.zeros(n.shape)
    mask_1 = n <= 1
    mask_2 = n == 2
    rest = ~(mask_1 | mask_2)
    out[mask_2] = 1.0
    out[rest] = 2.0 * (np.log(n[rest] - 1.0) + np.euler_gamma) - 2.0 * (n[rest] - 1.0) / n[rest]
    return out


def float32_down(values: np.ndarray) -> np.ndarray:
    """The largest float32 ``<= v`` for each float64 ``v``.

    For a float32 ``x`` and a float64 threshold ``t``, ``x <= t`` (the comparison scikit-learn
    makes after promoting ``x``) holds exactly when ``x <= float32_down(t)`` in float32 (the
    comparison onnxruntime makes), because no float32 lies between the two."""
    t = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        f = t.astype(np.float32)
    up = f.astype(np.float64) > t
    f[up] = np.nextafter(f[up], np.float32(-np.inf))
    return f


@dataclass(frozen=True)
class ForestTables:
    """One IsolationForest flattened for a single TreeEnsembleRegressor.

    ``nodes_*`` are the ONNX attribute lists (all trees, node ids local to each tree);
    ``leaf_*`` give each leaf's global number and the float64 value scikit-learn adds for it;
    ``denominator`` is ``n_trees * c(max_samples_)``; ``offset`` is ``offset_``."""

    n_trees: int
    nodes_treeids: np.ndarray
    nodes_nodeids: np.ndarray
    nodes_featureids: np.ndarray
    nodes_values: np.ndarray          # float32 thresholds (rounded down), 0 for leaves
    nodes_modes: list[str]
    nodes_truenodeids: np.ndarray
    nodes_falsenodeids: np.ndarray
    target_treeids: np.ndarray
    target_nodeids: np.ndarray
    target_ids: np.ndarray
    target_weights: np.ndarray        # float32 global leaf numbers
    leaf_values: np.ndarray           # float64, indexed by global leaf number
    denominator: float
    offset: float

    @property
    def n_nodes(self) -> int:
        return len(self.nodes_nodeids)


def _per_tree_leaf_values(forest: Any, t: int, tree: Any) -> np.ndarray:
    """``decision_path_length + c(n_node_samples) - 1.0`` for every node of tree ``t``,
    from scikit-learn's own cached arrays when the version has them."""
    dpl = getattr(forest, "_decision_path_lengths", None)
    apl = getattr(forest, "_average_path_length_per_tree", None)
    if dpl is not None and apl is not None:
        return np.asarray(dpl[t] + apl[t] - 1.0, dtype=np.float64)
    # older scikit-learn: depth counted in nodes on the decision path (root = 1)
    depth = np.zeros(tree.node_count, dtype=np.float64)
    stack = [(0, 1.0)]
    while stack:
        node, d = stack.pop()
        depth[node] = d
        if tree.children_left[node] != -1:
            stack.append((int(tree.children_left[node]), d + 1.0))
            stack.append((int(tree.children_right[node]), d + 1.0))
    return depth + average_path_length(tree.n_node_samples) - 1.0


def isolation_forest_tables(forest: Any, n_features: int) -> ForestTables:
    """Flatten a fitted IsolationForest reading rows of ``n_features`` values."""
    if int(forest.n_features_in_) != n_features:
        raise ConversionError(
            f"IsolationForest was fitted on {forest.n_features_in_} features, the graph "
            f"feeds it {n_features}"
        )
    max_samples = int(getattr(forest, "_max_samples", forest.max_samples_))
    denominator = float(len(forest.estimators_) * average_path_length([max_samples])[0])
    if denominator == 0.0:
        raise ConversionError(
            "IsolationForest with max_samples=1 has no path-length normalisation "
            "(every score is the same constant); refit with max_samples >= 2"
        )
    tree_ids, node_ids, feat_ids, values, modes, true_ids, false_ids = ([] for _ in range(7))
    tgt_tree, tgt_node, tgt_id, tgt_weight = [], [], [], []
    leaf_values: list[np.ndarray] = []
    base = 0
    for t, (est, features) in enumerate(
        zip(forest.estimators_, forest.estimators_features_, strict=True)
    ):
        tree = est.tree_
        features = np.asarray(features, dtype=np.int64)
        left = np.asarray(tree.children_left, dtype=np.int64)
        right = np.asarray(tree.children_right, dtype=np.int64)
        is_leaf = left == -1
        n = int(tree.node_count)
        nodes = np.arange(n, dtype=np.int64)
        local_feature = np.where(is_leaf, 0, np.asarray(tree.feature, dtype=np.int64))
        tree_ids.append(np.full(n, t, dtype=np.int64))
        node_ids.append(nodes)
        feat_ids.append(np.where(is_leaf, 0, features[local_feature]))
        values.append(np.where(is_leaf, np.float32(0), float32_down(tree.threshold)))
        modes.extend("LEAF" if leaf else "BRANCH_LEQ" for leaf in is_leaf)
        true_ids.append(np.where(is_leaf, 0, left))
        false_ids.append(np.where(is_leaf, 0, right))
        leaves = nodes[is_leaf]
        tgt_tree.append(np.full(len(leaves), t, dtype=np.int64))
        tgt_node.append(leaves)
        tgt_id.append(np.full(len(leaves), t, dtype=np.int64))
        tgt_weight.append(np.arange(base, base + len(leaves), dtype=np.float64))
        leaf_values.append(_per_tree_leaf_values(forest, t, tree)[leaves])
        base += len(leaves)
    if base >= _MAX_EXACT_LEAF_INDEX:
        raise ConversionError(
            f"IsolationForest has {base} leaves; the lowering numbers leaves in float32 and "
            f"supports fewer than {_MAX_EXACT_LEAF_INDEX}: use converter='skl2onnx'"
        )
    return ForestTables(
        n_trees=len(forest.estimators_),
        nodes_treeids=np.concatenate(tree_ids),
        nodes_nodeids=np.concatenate(node_ids),
        nodes_featureids=np.concatenate(feat_ids),
        nodes_values=np.concatenate(values).astype(np.float32),
        nodes_modes=modes,
        nodes_truenodeids=np.concatenate(true_ids),
        nodes_falsenodeids=np.concatenate(false_ids),
        target_treeids=np.concatenate(tgt_tree),
        target_nodeids=np.concatenate(tgt_node),
        target_ids=np.concatenate(tgt_id),
        target_weights=np.concatenate(tgt_weight).astype(np.float32),
        leaf_values=np.concatenate(leaf_values),
        denominator=denominator,
        offset=float(forest.offset_),
    )


def score_base(denominator: float) -> float:
    """``2 ** (-1 / denominator)``: the graph raises it to the summed depth, one ``Pow``
    where scikit-learn runs ``2 ** (-depth / denominator)`` (a ``Div`` and a ``Pow``). The
    rounding of the base grows with the exponent: the two differ by at most depth x 2.2e-16
    relative (2e-14 for 100 trees of 256 samples), far inside the float32 the scores are
    cast to."""
    return float(np.float64(2.0) ** (-1.0 / np.float64(denominator)))


def _decision_from_depth(depth: np.ndarray | float, denominator: float, offset: float):
    """scikit-learn's float64 arithmetic from summed depth to decision_function."""
    d = np.asarray(depth, dtype=np.float64)
    return -(2 ** (-np.divide(d, np.float64(denominator)))) - np.float64(offset)


def label_depth_threshold(denominator: float, offset: float) -> float:
    """The smallest float64 depth ``d*`` with ``decision_function(d*) >= 0``.

    The decision function rises with the summed depth, so a row is an anomaly (-1) exactly
    when its depth is ``< d*``. Found by bisection over the ordered bit patterns of
    non-negative doubles, with numpy's own float64 arithmetic (the operations scikit-learn
    runs). ``inf`` if no depth reaches 0 (every row is an anomaly)."""
    def ok(bits: int) -> bool:
        # an array, never a numpy scalar: scikit-learn scores arrays, and numpy's array
        # ``power`` (SIMD) and its scalar one (libm) can differ by an ulp
        d = np.array([bits], dtype=np.int64).view(np.float64)
        return bool(_decision_from_depth(d, denominator, offset)[0] >= 0)

    lo = 0
    hi = int(np.array([np.finfo(np.float64).max], dtype=np.float64).view(np.int64)[0])
    if not ok(hi):
        return float("inf")
    if ok(lo):
        return 0.0
    while hi - lo > 1:  # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return float(np.array([hi], dtype=np.int64).view(np.float64)[0])


def emulate_isolation_forest(forest: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the lowered graph computes, in numpy: ``(labels [n], decision_function [n])``
    (float64, before the graph's cast of the scores to float32).

    Walks the flattened tables with float32 comparisons, for tests and diagnostics: the
    summed depth and the labels are scikit-learn's bit for bit, the decision_function within
    ~1e-14 relative (see :func:`score_base`)."""
    X = np.asarray(X, dtype=np.float32)
    tables = isolation_forest_tables(forest, X.shape[1])
    # per tree: node id -> flat position
    starts = np.searchsorted(tables.nodes_treeids, np.arange(tables.n_trees))
    leaf_of = {(int(t), int(nd)): int(w) for t, nd, w in zip(
        tables.target_treeids, tables.target_nodeids, tables.target_weights, strict=True)}
    depth = np.zeros(len(X))
    for t in range(tables.n_trees):
        node = np.zeros(len(X), dtype=np.int64)
        while True:
            pos = starts[t] + node
            leaf = np.array([tables.nodes_modes[p] == "LEAF" for p in pos])
            if leaf.all():
                break
            go_left = X[np.arange(len(X)), tables.nodes_featureids[pos]] <= tables.nodes_values[pos]
            nxt = np.where(go_left, tables.nodes_truenodeids[pos], tables.nodes_falsenodeids[pos])
            node = np.where(leaf, node, nxt)
        depth += tables.leaf_values[[leaf_of[(t, int(n))] for n in node]]
    decision = -np.float64(tables.offset) - np.power(score_base(tables.denominator), depth)
    d_star = label_depth_threshold(tables.denominator, tables.offset)
    return np.where(depth < d_star, -1, 1), decision


def convert_isolation_forest(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx conversion function for IsolationForest (passed per call through
    ``custom_conversion_functions``): writes the 10-node graph described in the module doc
    into skl2onnx's container, so a Pipeline's front steps (scalers, WindowFeatures) are
    converted by skl2onnx as usual and feed it."""
    from onnx import TensorProto, numpy_helper

    forest = operator.raw_operator
    x_name = operator.inputs[0].full_name
    n_features = operator.inputs[0].type.shape[1]
    if not isinstance(n_features, int):
        n_features = int(forest.n_features_in_)
    tables = isolation_forest_tables(forest, n_features)
    ml_opset = container.target_opset_any_domain("ai.onnx.ml")
    if ml_opset is not None and ml_opset < 1:
        raise ConversionError("the IsolationForest lowering needs the ai.onnx.ml domain")
    if container.target_opset < 11:
        raise ConversionError(
            f"the IsolationForest lowering needs opset >= 11 (CumSum), not "
            f"{container.target_opset}"
        )

    def name(seed: str) -> str:
        return scope.get_unique_variable_name(f"edgeml_iforest_{seed}")

    def const(seed: str, arr: np.ndarray) -> str:
        cname = name(seed)
        container.add_initializer(cname, None, None, numpy_helper.from_array(arr, cname))
        return cname

    def node(op_type: str, inputs: list[str], seed: str, out: str | None = None,
             domain: str = "", version: int | None = None, **attrs: Any) -> str:
        out = out or name(seed)
        container.add_node(
            op_type, inputs, [out], op_domain=domain, op_version=version,
            name=scope.get_unique_operator_name(f"EdgemlIForest{op_type}"), **attrs,
        )
        return out

    leaf_numbers = node(
        "TreeEnsembleRegressor", [x_name], "leaf_numbers", domain="ai.onnx.ml",
        version=min(3, ml_opset or 3),
        n_targets=tables.n_trees, aggregate_function="SUM", post_transform="NONE",
        nodes_treeids=tables.nodes_treeids.tolist(),
        nodes_nodeids=tables.nodes_nodeids.tolist(),
        nodes_featureids=tables.nodes_featureids.tolist(),
        nodes_values=tables.nodes_values.tolist(),
        nodes_modes=tables.nodes_modes,
        nodes_truenodeids=tables.nodes_truenodeids.tolist(),
        nodes_falsenodeids=tables.nodes_falsenodeids.tolist(),
        target_treeids=tables.target_treeids.tolist(),
        target_nodeids=tables.target_nodeids.tolist(),
        target_ids=tables.target_ids.tolist(),
        target_weights=tables.target_weights.tolist(),
    )
    leaf_index = node("Cast", [leaf_numbers], "leaf_index", to=TensorProto.INT64)
    per_tree = node("Gather", [const("leaf_values", tables.leaf_values), leaf_index],
                    "per_tree_depth", axis=0)
    running = node("CumSum", [per_tree, const("tree_axis", np.array(1, dtype=np.int64))],
                   "running_depth")
    depth = node("Gather", [running, const("last", np.array([tables.n_trees - 1], np.int64))],
                 "depth", axis=1)
    # scores: decision_function = (-offset) - base ** depth, base = 2 ** (-1 / denominator)
    power = node("Pow", [const("base", np.array([score_base(tables.denominator)], np.float64)),
                         depth], "power")
    decision = node("Sub", [const("neg_offset", np.array([-tables.offset], np.float64)),
                            power], "decision64")
    node("Cast", [decision], "scores", out=operator.outputs[1].full_name, to=TensorProto.FLOAT)
    # label: -1 where the summed depth is below the depth at which decision_function hits 0
    d_star = label_depth_threshold(tables.denominator, tables.offset)
    anomalous = node("Less", [depth, const("label_depth", np.array([d_star], np.float64))],
                     "anomalous")
    node("Where", [anomalous, const("minus_one", np.array([-1], np.int64)),
                   const("plus_one", np.array([1], np.int64))], "label",
         out=operator.outputs[0].full_name)


def lowered_steps(steps: tuple[str, ...] | list[str], converter: str) -> list[str]:
    """The pipeline steps (class names) the given converter writes with edgeml's lowering."""
    if check_converter(converter) == "skl2onnx":
        return []
    return [s for s in steps if s in LOWERED_ESTIMATORS]
