"""Parity of every supported estimator, trained on the real data sets and scored by onnxruntime
from the bundle that was written (not from the in-memory ONNX model)."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import onnx
import pytest
from models import build_gait_anomaly_bundle, score_bundle, train_gait_anomaly_model
from sklearn.decomposition import PCA
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import SVC, LinearSVC

from converters import SUPPORTED_ESTIMATORS, ParityMismatch, WindowFeatures, convert_estimator
from edgeml.bundle import check_self_test, read_bundle, self_test_array
from edgeml.host.datasets import (
    BASICMOTIONS_CHANNELS,
    BASICMOTIONS_WINDOW,
    load_basicmotions,
    load_daphnet,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def motions():
    return load_basicmotions("TRAIN"), load_basicmotions("TEST")


@pytest.fixture(scope="module")
def daphnet():
    """Daphnet samples with a synthetic label (vertical ankle + trunk above their median)."""
    data = load_daphnet()
    s = data.X[:, 1] + data.X[:, 7]
    y = (s > np.median(s)).astype(np.int64)
    return data, y


def reference(model, X):
    """scikit-learn's labels and scores in the layout the bundle promises."""
    labels = model.predict(X)
    scores = model.predict_proba(X) if hasattr(model, "predict_proba") else (
        model.decision_function(X))
    return labels, np.asarray(scores, dtype=np.float64).reshape(len(X), -1)


def assert_bundle_matches(path: Path, model, X: np.ndarray, *, kind: str = "classifier"):
    bundle = read_bundle(path)
    m = bundle.manifest
    labels, scores = score_bundle(bundle, X)
    want_labels, want_scores = reference(model, X)
    assert labels.tolist() == want_labels.tolist()
    assert scores.shape == want_scores.shape
    assert np.abs(scores - want_scores).max() <= TOL
    assert m.outputs.kind == kind
    if kind == "classifier":
        assert m.outputs.classes == tuple(model.classes_.tolist())
        assert (m.outputs.label, m.outputs.scores) == ("label", "probabilities")
    # the self-test recorded in the manifest passes against the bundled model
    st_labels, st_scores = score_bundle(bundle, self_test_array(m))
    check_self_test(m, st_labels, st_scores)
    assert m.metrics["parity"]["passed"] is True
    assert m.metrics["parity"]["rows"] == len(X)
    return bundle


# --- BasicMotions windows: WindowFeatures -> preprocessing -> classifier -------------------------
# Trees get the scalers (bit-identical to scikit-learn in the graph); PCA, whose float32 matmul
# rounds differently per CPU, goes in front of models without hard thresholds.
MOTION_CASES = {
    "logreg": (lambda: PCA(n_components=10, random_state=0),
               lambda: LogisticRegression(max_iter=2000)),
    "random_forest": (StandardScaler,
                      lambda: RandomForestClassifier(n_estimators=30, random_state=0)),
    "extra_trees": (MinMaxScaler, lambda: ExtraTreesClassifier(n_estimators=30, random_state=0)),
    "gradient_boosting": (StandardScaler, lambda: GradientBoostingClassifier(
        n_estimators=25, max_depth=2, learning_rate=0.2, random_state=0)),
    "hist_gradient_boosting": (MinMaxScaler,
                               lambda: HistGradientBoostingClassifier(max_iter=20,
                                                                      random_state=0)),
    "mlp": (lambda: PCA(n_components=12, random_state=0),
            lambda: MLPClassifier((32,), solver="lbfgs", max_iter=2000, random_state=0)),
    "linear_svc": (StandardScaler, lambda: LinearSVC(random_state=0)),
    "svc_linear": (MinMaxScaler, lambda: SVC(kernel="linear")),
    "knn": (StandardScaler, lambda: KNeighborsClassifier(n_neighbors=3)),
}


@pytest.mark.parametrize("case", sorted(MOTION_CASES))
def test_basicmotions_window_classifier_parity(case, motions, tmp_path):
    train, test = motions
    pre, clf = MOTION_CASES[case]
    model = make_pipeline(WindowFeatures(6), pre(), clf()).fit(train.flat(), train.y)
    report = convert_estimator(
        model, test.flat(), name=f"bm-{case}", version="1", features=BASICMOTIONS_CHANNELS,
        window=BASICMOTIONS_WINDOW, training_data=train.flat(), out=tmp_path / "m.edgeml",
    )
    assert report.parity.passed and report.parity.label_agreement == 1.0
    assert_bundle_matches(report.path, model, test.flat())


# --- Daphnet single samples, binary synthetic label -----------------------------------------
DAPHNET_CASES = {
    "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression()),
    "random_forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=8,
                                                    random_state=0),
    "extra_trees": lambda: ExtraTreesClassifier(n_estimators=20, max_depth=8, random_state=0),
    "gradient_boosting": lambda: GradientBoostingClassifier(n_estimators=20, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=20,
                                                                     random_state=0),
    "mlp": lambda: make_pipeline(MinMaxScaler(), MLPClassifier(
        (16,), solver="lbfgs", max_iter=300, random_state=0)),
    "linear_svc": lambda: make_pipeline(StandardScaler(), LinearSVC(random_state=0)),
    "svc_linear": lambda: make_pipeline(StandardScaler(), SVC(kernel="linear")),
    "knn": lambda: make_pipeline(MinMaxScaler(), KNeighborsClassifier(n_neighbors=5)),
}


@pytest.mark.parametrize("case", sorted(DAPHNET_CASES))
def test_daphnet_sample_classifier_parity(case, daphnet, tmp_path):
    data, y = daphnet
    model = DAPHNET_CASES[case]().fit(data.X[::5], y[::5])
    sample = data.X[2::9]
    report = convert_estimator(
        model, sample, name=f"dp-{case}", version="1", features=data.channels,
        labels=y[2::9], out=tmp_path / "m.edgeml",
    )
    bundle = assert_bundle_matches(report.path, model, sample)
    assert bundle.manifest.input.shape == (None, 9)
    assert bundle.manifest.input.window is None
    # two classes with decision_function scores: one column, positive means classes[1]
    if case in ("linear_svc", "svc_linear"):
        assert bundle.manifest.provenance["scores"] == "decision_function"
        assert score_bundle(bundle, sample[:5])[1].shape == (5, 1)


def test_every_supported_estimator_has_a_parity_case():
    names = {s.name for s in SUPPORTED_ESTIMATORS}
    covered = {type(f[1]() if isinstance(f, tuple) else f()).__name__
               for f in MOTION_CASES.values()}
    for factory in DAPHNET_CASES.values():
        est = factory()
        covered.add(type(est.steps[-1][1] if isinstance(est, Pipeline) else est).__name__)
    covered.add("IsolationForest")  # test_isolation_forest_parity below
    covered |= {type(f()).__name__ if not isinstance(f(), Pipeline)
                else type(f().steps[-1][1]).__name__ for f in REGRESSION_CASES.values()}
    assert names <= covered


def test_isolation_forest_parity_on_every_daphnet_sample(tmp_path):
    data = load_daphnet()
    path = build_gait_anomaly_bundle(tmp_path, version="7")
    model = train_gait_anomaly_model()
    bundle = read_bundle(path)
    labels, scores = score_bundle(bundle, data.X)
    assert labels.tolist() == model.predict(data.X).tolist()
    assert np.abs(scores[:, 0] - model.decision_function(data.X)).max() <= TOL
    m = bundle.manifest
    assert (m.outputs.kind, m.outputs.label, m.outputs.scores) == ("anomaly", "label", "scores")
    assert m.provenance["opset"]["ai.onnx.ml"] == 3
    assert m.input.features == data.channels
    check_self_test(m, *score_bundle(bundle, self_test_array(m)))
    # edgeml's lowering (the default): one TreeEnsemble for the whole forest plus 10 small
    # nodes, whatever the number of trees (skl2onnx writes ~27 nodes a tree: test_trees.py)
    assert len(onnx.load_from_string(bundle.model_bytes).graph.node) < 16
    assert m.provenance["lowered"] == ["IsolationForest"]


def test_hist_gradient_boosting_is_converted_without_touching_the_estimator(daphnet, tmp_path):
    """skl2onnx 1.20 writes a Python bool into an INTS attribute for HGB leaves; the converter
    casts it at the graph builder, never on the user's fitted model."""
    data, y = daphnet
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(data.X[::5], y[::5])
    before = joblib.hash(model)
    convert_estimator(model, data.X[1::50], name="hgb", version="1", features=data.channels,
                      out=tmp_path / "hgb.edgeml")
    assert joblib.hash(model) == before
    assert (tmp_path / "hgb.edgeml").is_file()


# --- regressors: predict the vertical trunk acceleration from the other eight channels ---------
REGRESSION_CASES = {
    "linear": LinearRegression,
    "ridge": lambda: make_pipeline(StandardScaler(), Ridge()),
    "random_forest": lambda: RandomForestRegressor(n_estimators=20, max_depth=8,
                                                   random_state=0),
    "extra_trees": lambda: ExtraTreesRegressor(n_estimators=20, max_depth=8, max_features=0.6,
                                               bootstrap=True, random_state=0),
    "gradient_boosting": lambda: GradientBoostingRegressor(n_estimators=30, random_state=0),
    "hist_gradient_boosting": lambda: HistGradientBoostingRegressor(max_iter=20,
                                                                    random_state=0),
}


@pytest.fixture(scope="module")
def trunk_regression():
    data = load_daphnet()
    others = [i for i in range(9) if i != 7]
    return data.X[:, others], data.X[:, 7], [data.channels[i] for i in others]


@pytest.mark.parametrize("case", sorted(REGRESSION_CASES))
def test_regressor_parity(case, trunk_regression, tmp_path):
    X, y, names = trunk_regression
    model = REGRESSION_CASES[case]().fit(X[::5], y[::5])
    report = convert_estimator(model, X[2::9], name=f"reg-{case}", version="1",
                               features=names, out=tmp_path / "r.edgeml")
    assert report.parity.passed and report.parity.relative
    bundle = read_bundle(report.path)
    m = bundle.manifest
    assert (m.outputs.kind, m.outputs.label, m.outputs.scores) == ("regressor", "variable", None)
    pred, _ = score_bundle(bundle, X[2::9])
    want = model.predict(X[2::9])
    # float32 carries ~7 digits: compare relative to the target's scale (~1000 here)
    assert np.all(np.abs(pred - want) <= TOL * np.maximum(1.0, np.abs(want)))
    assert all(isinstance(v, float) for v in m.self_test.expected_labels)
    check_self_test(m, *score_bundle(bundle, self_test_array(m)))


def test_regressor_parity_miss_is_refused(trunk_regression, tmp_path):
    X, y, names = trunk_regression
    model = LinearRegression().fit(X[::5], y[::5])
    with pytest.raises(ParityMismatch, match="predictions differ by more than 1e-12"):
        convert_estimator(model, X[2::9], name="reg", version="1", features=names,
                          tolerance=1e-12, out=tmp_path / "r.edgeml")
    assert not (tmp_path / "r.edgeml").exists()
