"""A loaded version scores through onnxruntime's binding directly (InferenceSession.run
checks the same fixed input name on every call): it must give exactly what session.run
gives, and fail the same way, on real models and data."""

from __future__ import annotations

import numpy as np
import pytest

from edgeml.bundle import read_bundle
from edgeml.core.model import LoadedModel
from edgeml.errors import ModelError
from edgeml.host.datasets import load_basicmotions
from edgeml.profiles import load_profile


def _loaded(bundle, tmp_path) -> LoadedModel:
    b = read_bundle(bundle)
    path = tmp_path / "m.onnx"
    path.write_bytes(b.model_bytes)
    model = LoadedModel(b.manifest, path, profile=load_profile("x86-gateway"))
    model.load()
    return model


def test_scoring_through_the_binding_is_session_run(activity_bundle, tmp_path):
    model = _loaded(activity_bundle, tmp_path)
    assert model._run_binding is not None  # the binding is used on this onnxruntime
    X = np.asarray(load_basicmotions("TEST").flat(), dtype=np.float32)
    session = model._session
    names = [o for o in (model.manifest.outputs.label, model.manifest.outputs.scores) if o]
    for n in (1, 7, 40):
        pred = model.predict(X[:n])
        labels, scores = session.run(names, {model.manifest.input.name: X[:n]})
        assert pred.labels.tolist() == labels.tolist()
        np.testing.assert_array_equal(pred.scores, scores)


def test_a_bad_input_fails_as_a_model_error(activity_bundle, tmp_path):
    model = _loaded(activity_bundle, tmp_path)
    width = model.row_width
    with pytest.raises(ModelError, match="scoring failed"):
        model.predict(np.zeros((2, width + 1), dtype=np.float32))  # a column too many
    with pytest.raises(ModelError, match="scoring failed"):
        model.predict(np.zeros((2, width), dtype=np.float64))  # not float32
    model.unload()
    with pytest.raises(ModelError, match="not loaded"):
        model.predict(np.zeros((1, width), dtype=np.float32))
