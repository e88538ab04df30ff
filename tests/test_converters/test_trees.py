"""edgeml's own IsolationForest lowering (converters/trees.py) and the other tree models.

Parity on the real data sets (Daphnet samples, BasicMotions windows through WindowFeatures),
scored by onnxruntime from the written bundle. Small forests: speed figures belong to
benchmarks/bench_trees.py, not here.
"""

from __future__ import annotations

import re

import joblib
import numpy as np
import onnx
import pytest
from models import score_bundle
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingRegressor,
    IsolationForest,
    RandomForestClassifier,
)
from sklearn.ensemble._iforest import _average_path_length
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from converters import WindowFeatures, convert_estimator
from converters.export import analyse, to_onnx_model
from converters.trees import (
    CONVERTERS,
    average_path_length,
    emulate_isolation_forest,
    float32_down,
    label_depth_threshold,
    score_base,
)
from edgeml.bundle import check_self_test, read_bundle, self_test_array
from edgeml.errors import ConversionError
from edgeml.host.datasets import (
    BASICMOTIONS_CHANNELS,
    BASICMOTIONS_WINDOW,
    load_basicmotions,
    load_daphnet,
)

SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def daphnet():
    return load_daphnet()


@pytest.fixture(scope="module")
def motions():
    return load_basicmotions("TRAIN"), load_basicmotions("TEST")


def n_nodes(bundle) -> int:
    return len(onnx.load_from_string(bundle.model_bytes).graph.node)


def assert_anomaly_bundle(path, model, X: np.ndarray, *, lowered: bool = True):
    """Labels identical and decision_function within 1e-5 on every row of ``X``; self-test
    passes; the manifest describes the outputs exactly as the skl2onnx path did."""
    bundle = read_bundle(path)
    m = bundle.manifest
    labels, scores = score_bundle(bundle, X)
    assert labels.tolist() == model.predict(X).tolist()
    assert scores.shape == (len(X), 1)
    assert np.abs(scores[:, 0] - model.decision_function(X)).max() <= SCORE_TOL
    assert (m.outputs.kind, m.outputs.label, m.outputs.scores) == ("anomaly", "label", "scores")
    assert m.outputs.classes is None
    assert m.provenance["scores"] == "decision_function"
    assert m.provenance["opset"]["ai.onnx.ml"] == 3
    assert m.provenance["lowered"] == (["IsolationForest"] if lowered else [])
    check_self_test(m, *score_bundle(bundle, self_test_array(m)))
    if lowered:  # one TreeEnsemble for the whole forest plus 9 small nodes
        nodes = onnx.load_from_string(bundle.model_bytes).graph.node
        assert sum(n.name.startswith("EdgemlIForest") for n in nodes) == 10
        assert [n.op_type for n in nodes].count("TreeEnsembleRegressor") == 1
        if m.input.window is None:
            assert len(nodes) < 16
    return bundle


# --- the building blocks ---------------------------------------------------------------------
def test_float32_down_keeps_every_float64_comparison():
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.normal(0, 1e3, 20000), rng.normal(0, 1, 20000),
                        np.float32(rng.normal(0, 10, 2000)).astype(np.float64)])
    down = float32_down(t)
    assert down.dtype == np.float32
    assert np.all(down.astype(np.float64) <= t)
    # no float32 between float32_down(t) and t
    above = np.nextafter(down, np.float32(np.inf)).astype(np.float64)
    assert np.all(above > t)
    # float32 inputs near the thresholds compare alike (scikit-learn: promote, compare f64)
    x = np.concatenate([down, above.astype(np.float32), np.float32(t)])
    tt = np.concatenate([t, t, t])
    dd = np.concatenate([down, down, down])
    assert np.array_equal(x.astype(np.float64) <= tt, x <= dd)


def test_average_path_length_is_scikit_learns_bit_for_bit():
    n = np.array([0, 1, 2, 3, 4, 5, 10, 64, 255, 256, 1000, 4096])
    assert np.array_equal(average_path_length(n), _average_path_length(n))
    assert average_path_length([1, 2]).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("offset", [-0.5, -0.5343893194145415, -0.4987145560374557, -0.99])
def test_label_depth_threshold_is_the_exact_boundary(offset):
    den = 25 * float(_average_path_length([256])[0])

    def decision(d: float) -> float:  # on an array, as scikit-learn scores
        return float((-(2 ** (-np.divide(np.array([d]), den))) - offset)[0])

    d_star = label_depth_threshold(den, offset)
    assert decision(d_star) >= 0
    assert decision(float(np.nextafter(d_star, 0.0))) < 0


def test_emulation_of_the_lowered_graph_matches_scikit_learn(daphnet):
    model = IsolationForest(n_estimators=10, max_features=0.7, random_state=3).fit(daphnet.X)
    labels, decision = emulate_isolation_forest(model, daphnet.X[::7])
    assert labels.tolist() == model.predict(daphnet.X[::7]).tolist()
    want = model.decision_function(daphnet.X[::7])
    assert np.abs(decision - want).max() <= 1e-14
    # cast to float32 as the graph's scores output is: the same values as scikit-learn's
    assert np.array_equal(decision.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("n_trees,max_samples", [(1, 2), (10, 64), (100, 256), (1000, 4096)])
def test_one_pow_of_the_score_base_is_scikit_learns_two_ops(n_trees, max_samples):
    """The graph computes 2 ** (-depth / denominator) as score_base ** depth (one node less):
    the rounding of the base grows with the exponent, (depth + 2) x 2.2e-16 relative at most
    (2e-14 for 100 trees of 256 samples), far inside the float32 the scores are cast to."""
    den = n_trees * float(_average_path_length([max_samples])[0])
    depth = np.linspace(0.0, 3 * den, 100_001)
    sklearn_way = 2 ** (-np.divide(depth, den))
    graph_way = np.power(score_base(den), depth)
    assert np.all(np.abs(graph_way / sklearn_way - 1) <= (depth + 2) * 2.2e-16)


# --- IsolationForest parity on the real data ------------------------------------------------
IFOREST_CASES = {
    "auto": dict(n_estimators=40),
    "contamination": dict(n_estimators=40, contamination=0.05),
    "max_features_bootstrap": dict(n_estimators=30, max_features=0.5, bootstrap=True,
                                   contamination=0.1),
    "max_samples_small": dict(n_estimators=30, max_samples=64, max_features=4,
                              contamination=0.02),
}


@pytest.mark.parametrize("case", sorted(IFOREST_CASES))
def test_isolation_forest_parity_on_every_daphnet_sample(case, daphnet, tmp_path):
    model = IsolationForest(random_state=0, **IFOREST_CASES[case]).fit(daphnet.X[::2])
    report = convert_estimator(model, daphnet.X[1::10], name=f"if-{case}", version="1",
                               features=daphnet.channels, out=tmp_path / "if.edgeml")
    assert report.parity.passed and report.parity.label_agreement == 1.0
    assert report.parity.max_abs_score_diff <= SCORE_TOL
    # every Daphnet sample, training rows included
    assert_anomaly_bundle(report.path, model, daphnet.X)


def test_scaler_in_front_of_the_forest(daphnet, tmp_path):
    model = make_pipeline(StandardScaler(), IsolationForest(
        n_estimators=30, contamination=0.03, random_state=1)).fit(daphnet.X)
    report = convert_estimator(model, daphnet.X[::10], name="if-scaled", version="1",
                               features=daphnet.channels, out=tmp_path / "if.edgeml")
    assert_anomaly_bundle(report.path, model, daphnet.X)


@pytest.mark.parametrize("pre,forest", [
    (None, dict(n_estimators=50)),
    (StandardScaler, dict(n_estimators=40, max_features=0.6, bootstrap=True, contamination=0.1)),
    (MinMaxScaler, dict(n_estimators=30, contamination=0.2)),
])
def test_window_features_in_front_of_the_forest(pre, forest, motions, tmp_path):
    train, test = motions
    steps = [WindowFeatures(len(BASICMOTIONS_CHANNELS))]
    steps += [pre()] if pre is not None else []
    model = make_pipeline(*steps, IsolationForest(random_state=0, **forest)).fit(train.flat())
    report = convert_estimator(
        model, test.flat(), name="if-windows", version="1", features=BASICMOTIONS_CHANNELS,
        window=BASICMOTIONS_WINDOW, out=tmp_path / "if.edgeml",
    )
    both = np.vstack([train.flat(), test.flat()])
    bundle = assert_anomaly_bundle(report.path, model, both)
    assert bundle.manifest.input.window == BASICMOTIONS_WINDOW
    assert (model.predict(both) == -1).any() and (model.predict(both) == 1).any()


def test_3d_window_input_with_the_lowered_forest(motions, tmp_path):
    train, test = motions
    model = make_pipeline(WindowFeatures(6), IsolationForest(n_estimators=20, random_state=0))
    model.fit(train.flat())
    report = convert_estimator(
        model, test.X, name="if-3d", version="1", features=BASICMOTIONS_CHANNELS,
        window=BASICMOTIONS_WINDOW, input_shape="3d", out=tmp_path / "if.edgeml",
    )
    assert report.manifest.input.shape == (None, BASICMOTIONS_WINDOW, 6)
    assert_anomaly_bundle(report.path, model, test.flat())


def test_rows_exactly_on_the_threshold_keep_scikit_learns_label(daphnet, tmp_path):
    """Duplicated training rows at the contamination percentile make offset_ equal their
    score, so decision_function is exactly 0 and scikit-learn calls them inliers. The lowered
    graph decides labels on the exact float64 depth sum, so it agrees; skl2onnx's float32
    arithmetic flips them (measured: all 301 of them)."""
    X = daphnet.X
    s = IsolationForest(n_estimators=30, random_state=0).fit(X).score_samples(X)
    r = int(np.argsort(s)[int(0.05 * len(X))])
    Xd = np.vstack([X, np.repeat(X[r:r + 1], 300, axis=0)])
    sd = IsolationForest(n_estimators=30, random_state=0).fit(Xd).score_samples(Xd)
    contamination = ((sd < sd[-1]).mean() + (sd <= sd[-1]).mean()) / 2
    model = IsolationForest(n_estimators=30, random_state=0,
                            contamination=contamination).fit(Xd)
    decision = model.decision_function(Xd)
    assert (decision == 0).sum() >= 300 and set(model.predict(Xd[-300:])) == {1}

    report = convert_estimator(model, Xd[-40:], name="if-ties", version="1",
                               features=daphnet.channels, out=tmp_path / "if.edgeml")
    assert_anomaly_bundle(report.path, model, Xd)
    with pytest.raises(Exception, match="labels differ"):
        convert_estimator(model, Xd[-40:], name="if-ties", version="2", converter="skl2onnx",
                          features=daphnet.channels, out=tmp_path / "if2.edgeml")
    assert not (tmp_path / "if2.edgeml").exists()


# --- the converter parameter -----------------------------------------------------------------
def test_skl2onnx_path_stays_selectable(daphnet, tmp_path):
    model = IsolationForest(n_estimators=8, random_state=0).fit(daphnet.X)
    report = convert_estimator(model, daphnet.X[::20], name="if-old", version="1",
                               features=daphnet.channels, converter="skl2onnx",
                               out=tmp_path / "old.edgeml")
    bundle = assert_anomaly_bundle(report.path, model, daphnet.X[::3], lowered=False)
    assert n_nodes(bundle) > 20 * 8  # ~27 nodes a tree


@pytest.mark.parametrize("bad", ["onnx", "EDGEML", "", None, 1])
def test_unknown_converter_is_refused_by_name(bad, daphnet, tmp_path):
    model = IsolationForest(n_estimators=5, random_state=0).fit(daphnet.X[::10])
    with pytest.raises(ConversionError, match=r"converter must be one of 'edgeml', 'skl2onnx'"
                                              rf", not {re.escape(repr(bad))}"):
        convert_estimator(model, daphnet.X[:5], name="x", version="1",
                          features=daphnet.channels, converter=bad, out=tmp_path / "x.edgeml")
    assert not (tmp_path / "x.edgeml").exists()
    assert CONVERTERS == ("edgeml", "skl2onnx")


def test_skl2onnx_refuses_max_features_below_one_the_lowering_does_not(daphnet, tmp_path):
    model = IsolationForest(n_estimators=5, max_features=0.5, random_state=0).fit(daphnet.X)
    with pytest.raises(ConversionError, match="skl2onnx could not convert"):
        convert_estimator(model, daphnet.X[:20], name="x", version="1",
                          features=daphnet.channels, converter="skl2onnx",
                          out=tmp_path / "x.edgeml")
    report = convert_estimator(model, daphnet.X[:20], name="x", version="1",
                               features=daphnet.channels, out=tmp_path / "x.edgeml")
    assert report.parity.passed


def test_lowering_leaves_other_models_to_skl2onnx(daphnet):
    """converter='edgeml' only changes IsolationForest: other trees get skl2onnx's graph."""
    y = (daphnet.X[:, 1] > np.median(daphnet.X[:, 1])).astype(np.int64)
    model = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(
        daphnet.X[::10], y[::10])
    a = analyse(model)
    graphs = [to_onnx_model(model, a, n_inputs=9, window=None, n_features=9,
                            input_shape="flat", converter=c).SerializeToString()
              for c in CONVERTERS]
    assert graphs[0] == graphs[1]


def test_the_estimator_is_not_modified(daphnet, tmp_path):
    model = IsolationForest(n_estimators=10, max_features=0.5, random_state=0).fit(daphnet.X)
    before = joblib.hash(model)
    convert_estimator(model, daphnet.X[:50], name="x", version="1", features=daphnet.channels,
                      out=tmp_path / "x.edgeml")
    assert joblib.hash(model) == before


# --- other tree models: forests with max_features < 1, bootstrap; regressors ------------------
def test_forest_classifiers_with_feature_and_row_subsampling(daphnet, tmp_path):
    y = (daphnet.X[:, 1] + daphnet.X[:, 7] > np.median(daphnet.X[:, 1] + daphnet.X[:, 7]))
    y = y.astype(np.int64)
    for model in (
        RandomForestClassifier(n_estimators=20, max_features=0.5, max_samples=0.5,
                               max_depth=10, random_state=0),
        ExtraTreesClassifier(n_estimators=20, max_features=0.4, bootstrap=True,
                             max_depth=10, random_state=0),
    ):
        model.fit(daphnet.X[::4], y[::4])
        report = convert_estimator(model, daphnet.X[1::7], name="f", version="1",
                                   features=daphnet.channels, out=tmp_path / "f.edgeml")
        assert report.parity.passed
        labels, probs = score_bundle(read_bundle(report.path), daphnet.X)
        want = model.predict_proba(daphnet.X)
        assert np.abs(probs - want).max() <= 1e-4
        # on every Daphnet row, labels differ only where scikit-learn's two class
        # probabilities tie exactly (10 of 20 trees each way: argmax order, a known trap)
        differ = labels != model.predict(daphnet.X)
        assert np.all(want[differ, 0] == want[differ, 1])


def test_hist_gradient_boosting_regressor_converts_without_touching_the_estimator(
        daphnet, tmp_path):
    """skl2onnx 1.20 writes Python bools into nodes_missing_value_tracks_true for HGB trees
    (regressor too); the per-call converter casts them at the graph builder."""
    others = [i for i in range(9) if i != 7]
    X, y = daphnet.X[:, others], daphnet.X[:, 7]
    model = HistGradientBoostingRegressor(max_iter=10, random_state=0).fit(X[::5], y[::5])
    before = joblib.hash(model)
    report = convert_estimator(model, X[2::50], name="hgbr", version="1",
                               features=[daphnet.channels[i] for i in others],
                               out=tmp_path / "r.edgeml")
    assert report.parity.passed
    assert joblib.hash(model) == before
