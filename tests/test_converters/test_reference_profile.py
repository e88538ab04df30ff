"""The drift reference profile edgeml convert stores in the manifest from --training-data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgeml.bundle import Manifest, read_bundle
from edgeml.core.drift import compare_inputs, make_reference
from edgeml.errors import BundleFormatError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions


def test_activity_bundle_carries_a_signed_reference_of_a_few_kb(activity_bundle):
    m = read_bundle(activity_bundle).manifest
    ref = m.reference
    assert ref is not None and ref["window"] == 100 and ref["rows"] == 40
    assert ref["samples"] == 4000  # per channel over every sample of every window
    assert set(ref["inputs"]) == set(BASICMOTIONS_CHANNELS)
    ax = ref["inputs"]["ax"]
    assert 10 <= len(ax["freq"]) <= 20 and len(ax["edges"]) == len(ax["freq"]) - 1
    assert abs(sum(ax["freq"]) - 1) < 1e-4 and ax["missing"] == 0.0
    train = load_basicmotions("TRAIN").X[:, :, 0]
    assert ax["min"] == pytest.approx(train.min(), rel=1e-5)
    assert ax["mean"] == pytest.approx(train.mean(), rel=1e-4)
    labels = ref["outputs"]["label"]
    assert sorted(labels["labels"]) == ["Badminton", "Running", "Standing", "Walking"]
    assert "score" in ref["outputs"]  # the top-class probability's distribution
    assert 1000 < len(json.dumps(ref)) < 8000
    # the manifest (and so its signature) covers it
    assert b'"reference"' in read_bundle(activity_bundle).manifest_bytes


def test_train_against_its_own_reference_reads_zero_and_a_scaled_channel_does_not():
    train = load_basicmotions("TRAIN").flat()
    ref = make_reference(train, BASICMOTIONS_CHANNELS, 100, kind="classifier")
    same = compare_inputs(ref, train, BASICMOTIONS_CHANNELS, 100)
    assert max(v["psi"] for v in same.values()) < 1e-3
    scaled = train.reshape(40, 100, 6).copy()
    scaled[:, :, 0] *= 3
    figs = compare_inputs(ref, scaled.reshape(40, -1), BASICMOTIONS_CHANNELS, 100)
    assert figs["ax"]["psi"] > 0.25 and figs["ay"]["psi"] < 1e-3


def test_manifest_round_trip_and_a_bad_reference_is_refused(activity_bundle):
    m = read_bundle(activity_bundle).manifest
    again = Manifest.from_dict(json.loads(m.to_json_bytes()))
    assert again.reference == m.reference
    assert "reference" not in dataclasses.replace(m, reference=None).to_dict()
    bad = json.loads(m.to_json_bytes())
    bad["reference"]["inputs"]["ax"]["freq"] = [1.0]
    with pytest.raises(BundleFormatError, match=r"reference\.inputs\.ax"):
        Manifest.from_dict(bad)
    bad["reference"]["inputs"] = {"nope": {"edges": [], "freq": [1.0], "min": 0, "max": 0}}
    with pytest.raises(BundleFormatError, match=r"reference\.inputs\.nope"):
        Manifest.from_dict(bad)


def test_convert_without_training_data_has_no_reference(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from converters import convert_estimator

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    rep = convert_estimator(LogisticRegression().fit(X, y), X[:10], name="t", version="1",
                            features=["a", "b", "c"], out=tmp_path / "t.edgeml")
    assert rep.manifest.reference is None
    rep = convert_estimator(LogisticRegression().fit(X, y), X[:10], name="t", version="2",
                            features=["a", "b", "c"], out=tmp_path / "t2.edgeml",
                            training_data=X)
    assert rep.manifest.reference["outputs"]["label"]["labels"] == ["0", "1"]
    assert read_bundle(tmp_path / "t2.edgeml").manifest.reference == rep.manifest.reference
