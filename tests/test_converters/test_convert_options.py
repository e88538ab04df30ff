"""Refusals (unsupported, unfitted, parity misses), quantization, signing and provenance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import build_activity_bundle, score_bundle, train_activity_model
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from sklearn.svm import SVC

from converters import ParityMismatch, WindowFeatures, convert_estimator, training_fingerprint
from edgeml.bundle import check_self_test, read_bundle, self_test_array
from edgeml.errors import ConversionError, ParityError, UnsupportedEstimatorError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions, load_daphnet
from edgeml.keys import generate_keypair, key_id, load_private_key, load_public_key


@pytest.fixture(scope="module")
def motions():
    return load_basicmotions("TRAIN"), load_basicmotions("TEST")


@pytest.fixture(scope="module")
def daphnet():
    data = load_daphnet()
    return data, (data.X[:, 1] > np.median(data.X[:, 1])).astype(np.int64)


def convert(model, X, out, **kw):
    kw.setdefault("features", [f"f{i}" for i in range(X.shape[1])])
    return convert_estimator(model, X, name="m", version="1", out=out, **kw)


# --- refusals ----------------------------------------------------------------------------------
def test_unsupported_estimator_is_named_with_the_supported_list(daphnet, tmp_path):
    data, y = daphnet
    model = GaussianNB().fit(data.X[:500], y[:500])
    with pytest.raises(UnsupportedEstimatorError) as err:
        convert(model, data.X[:10], tmp_path / "m.edgeml")
    msg = str(err.value)
    assert "GaussianNB is not supported" in msg
    for name in ("LogisticRegression", "IsolationForest", "HistGradientBoostingClassifier",
                 "StandardScaler", "WindowFeatures"):
        assert name in msg
    assert not (tmp_path / "m.edgeml").exists()


def test_unsupported_pipeline_step_and_svc_kernel_are_named(daphnet, tmp_path):
    data, y = daphnet
    poly = make_pipeline(PolynomialFeatures(2), StandardScaler(), LogisticRegression()).fit(
        data.X[:300], y[:300])
    with pytest.raises(UnsupportedEstimatorError, match="pipeline step PolynomialFeatures"):
        convert(poly, data.X[:10], tmp_path / "m.edgeml")
    rbf = make_pipeline(StandardScaler(), SVC()).fit(data.X[:300], y[:300])
    with pytest.raises(UnsupportedEstimatorError, match="kernel='rbf'"):
        convert(rbf, data.X[:10], tmp_path / "m.edgeml")


def test_unfitted_model_and_wrong_widths_are_refused(daphnet, tmp_path):
    data, y = daphnet
    with pytest.raises(ConversionError, match="LogisticRegression is not fitted"):
        convert(LogisticRegression(), data.X[:10], tmp_path / "m.edgeml")
    model = LogisticRegression().fit(data.X[:300], y[:300])
    with pytest.raises(ConversionError, match="takes 9 values per row"):
        convert(model, data.X[:10, :8], tmp_path / "m.edgeml", features=["a", "b"], window=4)
    with pytest.raises(ConversionError, match=r"sample has shape \[10, 8\], expected \[n, 9\]"):
        convert(model, data.X[:10, :8], tmp_path / "m.edgeml", features=data.channels)
    with pytest.raises(ConversionError, match="not a safe name"):
        convert_estimator(model, data.X[:10], name="../evil", version="1",
                          features=data.channels, out=tmp_path / "m.edgeml")
    with pytest.raises(ConversionError, match="needs a window"):
        convert(model, data.X[:10], tmp_path / "m.edgeml", input_shape="3d")
    assert not (tmp_path / "m.edgeml").exists()


def test_score_miss_beyond_tolerance_refuses_to_write(daphnet, tmp_path):
    """float32 ONNX vs float64 scikit-learn differ by ~1e-7: a 1e-12 tolerance must fail."""
    data, y = daphnet
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(data.X[::7], y[::7])
    out = tmp_path / "m.edgeml"
    with pytest.raises(ParityError) as err:
        convert(model, data.X[1::13], out, tolerance=1e-12)
    assert "no bundle written" in str(err.value)
    assert "exceeds the tolerance 1e-12" in str(err.value)
    report = err.value.report
    assert not report.passed and report.label_agreement == 1.0
    assert 1e-12 < report.max_abs_score_diff < 1e-4
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temp file left behind either


def test_label_miss_on_a_score_tie_refuses_to_write(motions, tmp_path):
    """This boosted model gives some TEST windows four exactly equal class scores in float32
    (float64 breaks the tie by rounding noise): the device would answer differently, so the
    converter refuses and says why."""
    train, test = motions
    model = make_pipeline(
        WindowFeatures(6), StandardScaler(),
        GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0),
    ).fit(train.flat(), train.y)
    with pytest.raises(ParityMismatch) as err:
        convert_estimator(model, test.flat(), name="gb", version="1",
                          features=BASICMOTIONS_CHANNELS, window=100, out=tmp_path / "gb.edgeml")
    report = err.value.report
    assert report.labels_differ >= 1 and report.ties == report.labels_differ
    assert f"{report.labels_differ} of 40 labels differ" in str(err.value)
    assert "tie" in str(err.value)
    assert not (tmp_path / "gb.edgeml").exists()


# --- quantization ------------------------------------------------------------------------------
def test_quantize_mlp_reports_size_agreement_and_accuracy(motions, tmp_path):
    path = build_activity_bundle(tmp_path, kind="mlp", version="q", quantize=True)
    bundle = read_bundle(path)
    m = bundle.manifest
    q = m.metrics["quantization"]
    assert q["applied"] is True and "MatMulInteger" in q["reason"]
    assert q["size_after"] == m.size and q["size_before"] > 0
    assert 0.0 <= q["label_agreement"] <= 1.0
    assert q["accuracy_float"] is not None
    assert q["accuracy_change"] == pytest.approx(q["accuracy_quantized"] - q["accuracy_float"])
    assert q["parity"]["rows"] == 40  # measured against scikit-learn, reported only
    ops = {n.op_type for n in onnx.load_from_string(bundle.model_bytes).graph.node}
    assert "MatMulInteger" in ops
    assert m.provenance["quantized"] is True
    assert m.provenance["self_test_source"] == "onnxruntime-int8"
    # the device checks the quantized model against what it scored on the host
    check_self_test(m, *score_bundle(bundle, self_test_array(m)))


def test_quantize_does_not_apply_to_trees_and_keeps_the_float_model(tmp_path):
    plain = read_bundle(build_activity_bundle(tmp_path / "a", kind="forest", version="1"))
    quant = read_bundle(build_activity_bundle(tmp_path / "b", kind="forest", version="1",
                                              quantize=True))
    q = quant.manifest.metrics["quantization"]
    assert q["applied"] is False and "no MatMul/Gemm" in q["reason"]
    assert q["size_before"] == q["size_after"]
    assert quant.manifest.sha256 == plain.manifest.sha256  # same float model, byte for byte
    assert quant.manifest.provenance["quantized"] is False


def test_quantize_mlp_on_daphnet_reports_the_accuracy_change(daphnet, tmp_path):
    data, y = daphnet
    model = make_pipeline(StandardScaler(), MLPClassifier(
        (16,), solver="lbfgs", max_iter=300, random_state=0)).fit(data.X[::5], y[::5])
    report = convert(model, data.X[3::11], tmp_path / "q.edgeml", labels=y[3::11],
                     quantize=True)
    q = report.quantization
    assert q is not None and q.applied
    assert q.accuracy_float == pytest.approx(
        float(np.mean(model.predict(data.X[3::11]) == y[3::11])))
    assert q.accuracy_change == pytest.approx(q.accuracy_quantized - q.accuracy_float)
    assert report.parity.passed  # the float model's parity is still enforced first
    assert "quantization: int8 dynamic" in report.summary()


# --- signing and provenance --------------------------------------------------------------------
def test_signed_bundle_verifies_with_the_public_key(tmp_path):
    private, public = generate_keypair(tmp_path / "release")
    path = build_activity_bundle(tmp_path, sign_key=load_private_key(private))
    pub = load_public_key(public)
    bundle = read_bundle(path, trusted_keys=[pub])
    assert bundle.signer == key_id(pub)


def test_provenance_and_metrics_describe_the_conversion(motions, tmp_path):
    train, test = motions
    model = train_activity_model("logreg")
    report = convert_estimator(
        model, test.flat(), name="activity", version="9", features=BASICMOTIONS_CHANNELS,
        window=100, training_data=train.X, labels=test.y, metrics={"note": "from a test"},
        out=tmp_path / "a.edgeml", self_test_rows=3, description="demo",
    )
    m = read_bundle(report.path).manifest
    p = m.provenance
    assert p["framework"] == "scikit-learn" and p["converter"] == "skl2onnx"
    assert p["framework_version"] and p["converter_version"]
    assert 13 <= p["opset"]["ai.onnx"] <= 17  # skl2onnx records the lowest opset it needs
    assert p["estimator_steps"] == ["WindowFeatures", "StandardScaler", "LogisticRegression"]
    assert p["estimator"].startswith("Pipeline(")
    assert p["training_data_sha256"] == training_fingerprint(train.X)
    assert p["training_data_sha256"] != training_fingerprint(train.flat())  # shape counts
    assert p["training_rows"] == 40
    assert m.metrics["note"] == "from a test"
    assert m.metrics["sample_accuracy"] == pytest.approx(
        float(np.mean(model.predict(test.flat()) == np.asarray(test.y))))
    assert m.metrics["parity"] == report.parity.to_dict()
    assert len(m.self_test.inputs) == 3 and m.self_test.atol == 1e-4
    assert m.self_test.expected_labels == tuple(model.predict(test.flat()[:3]).tolist())
    assert m.description == "demo"
    assert report.manifest == m
