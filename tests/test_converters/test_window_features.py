"""WindowFeatures: the numbers are right, and the ONNX graph computes the very same ones."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from models import ACTIVITY_KINDS, build_activity_bundle, score_bundle, train_activity_model
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from converters import STATS, WindowFeatures, register_converters
from edgeml.bundle import check_self_test, read_bundle, self_test_array
from edgeml.host.datasets import load_basicmotions


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    """All 80 BasicMotions windows, flat sample-major [80, 600]."""
    return np.vstack([load_basicmotions("TRAIN").flat(), load_basicmotions("TEST").flat()])


def onnx_features(wf: WindowFeatures, X: np.ndarray, opset: int = 17) -> np.ndarray:
    register_converters()
    model = convert_sklearn(
        wf, initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
        target_opset={"": opset, "ai.onnx.ml": 3},
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


def test_statistics_are_per_channel_and_stat_major(windows):
    wf = WindowFeatures(n_channels=6).fit(windows)
    out = wf.transform(windows)
    x = windows.reshape(len(windows), 100, 6).astype(np.float64)
    expected = np.concatenate([
        x.mean(axis=1), x.std(axis=1, ddof=0), x.min(axis=1), x.max(axis=1),
        np.sqrt((x ** 2).mean(axis=1)),
    ], axis=1)
    assert out.shape == (80, 30) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert wf.get_feature_names_out()[[0, 6, 29]].tolist() == ["mean_ch0", "std_ch0", "rms_ch5"]


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_onnx_features_are_bit_identical_to_scikit_learn(windows, opset):
    wf = WindowFeatures(n_channels=6).fit(windows)
    assert np.array_equal(onnx_features(wf, windows, opset), wf.transform(windows))


def test_odd_window_lengths_and_stat_subsets_stay_identical():
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(50, 7 * 3)) * 1000 + 500).astype(np.float32)  # 7 samples x 3 ch
    wf = WindowFeatures(n_channels=3, stats=("rms", "std", "max")).fit(X)
    out = wf.transform(X)
    assert out.shape == (50, 9)
    assert np.array_equal(onnx_features(wf, X), out)


@pytest.mark.parametrize(
    ("kwargs", "X", "match"),
    [
        ({"n_channels": 0}, np.zeros((2, 6)), "n_channels"),
        ({"n_channels": 6, "stats": ("mean", "median")}, np.zeros((2, 6)), "median"),
        ({"n_channels": 4}, np.zeros((2, 6)), "whole number"),
        ({"n_channels": 2, "stats": ("min", "min")}, np.zeros((2, 6)), "repeat"),
    ],
)
def test_bad_parameters_are_refused_at_fit(kwargs, X, match):
    with pytest.raises(ValueError, match=match):
        WindowFeatures(**kwargs).fit(X)


def test_known_stats_are_the_documented_ones():
    assert STATS == ("mean", "std", "min", "max", "rms")


@pytest.mark.parametrize("kind", ACTIVITY_KINDS)
def test_activity_bundle_labels_equal_scikit_learn_on_the_whole_test_set(kind, tmp_path):
    test = load_basicmotions("TEST")
    path = build_activity_bundle(tmp_path, kind=kind, version="3")
    labels, _ = score_bundle(path, test.flat())
    assert labels.tolist() == train_activity_model(kind).predict(test.flat()).tolist()
    m = read_bundle(path).manifest
    assert m.input.shape == (None, 600) and m.input.window == 100
    assert m.input.features == ("ax", "ay", "az", "gx", "gy", "gz")
    assert m.metrics["test_accuracy"] >= 0.9  # sanity: the model learnt the activities


def test_3d_input_takes_windows_as_samples_by_channels(tmp_path):
    test = load_basicmotions("TEST")
    path = build_activity_bundle(tmp_path, kind="logreg", version="3d", input_shape="3d")
    bundle = read_bundle(path)
    assert bundle.manifest.input.shape == (None, 100, 6)
    session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"input": test.X})[0]  # [40, 100, 6] as recorded
    assert labels.tolist() == train_activity_model("logreg").predict(test.flat()).tolist()
    st = self_test_array(bundle.manifest)
    assert st.shape == (8, 100, 6)
    check_self_test(bundle.manifest, *session.run(["label", "probabilities"], {"input": st}))
