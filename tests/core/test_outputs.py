"""A version's outputs kept as columns: each row's map, and its packed bytes, must be exactly
what building and packing the maps one by one gives (answers, records and the collector's
per-row records rely on them), for every output kind and odd values."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edgeml.core.outputs import VECTOR_MIN_ROWS, Outputs
from edgeml.host.datasets import load_daphnet


def reference(kind: str, labels: list, scores, keys) -> list[dict]:
    """The maps as the scoring stage built them before outputs became columns."""
    if kind in ("label", "value"):
        return [{kind: lab} for lab in labels]
    rows = scores.tolist()
    if kind == "scores":
        return [{"label": lab, "scores": dict(zip(keys, s, strict=True))}
                for lab, s in zip(labels, rows, strict=True)]
    if kind == "score":
        return [{"label": lab, "score": s[0]} for lab, s in zip(labels, rows, strict=True)]
    return [{"label": lab, "scores": s} for lab, s in zip(labels, rows, strict=True)]


LABELS = {
    "small ints": lambda n, rng: rng.integers(0, 3, n).tolist(),
    "the fixint edge": lambda n, rng: [127, 0] * (n // 2) + [127] * (n % 2),
    "large and negative ints": lambda n, rng: rng.integers(-2**40, 2**40, n).tolist(),
    "strings": lambda n, rng: [["Walking", "Standing", "x" * 40][i % 3] for i in range(n)],
    "bools and None": lambda n, rng: [[True, False, None][i % 3] for i in range(n)],
}


@pytest.mark.parametrize("labels_of", LABELS.values(), ids=LABELS.keys())
@pytest.mark.parametrize("n", [1, VECTOR_MIN_ROWS - 1, VECTOR_MIN_ROWS, 64])
@pytest.mark.parametrize("k", [1, 2, 4, 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_outputs_are_the_packed_maps(labels_of, n, k, dtype):
    rng = np.random.default_rng(n * 100 + k)
    labels = labels_of(n, rng)
    # real accelerometer values as scores, with the values floats can hold at the edges
    x = load_daphnet().X[:n, :1].repeat(k, axis=1)[:n].astype(dtype)
    x = np.resize(x, (n, k))
    x.flat[::7] = np.nan
    x.flat[3::11] = -np.inf
    x.flat[5::13] = np.finfo(dtype).max
    keys = [str(i) for i in range(k)]
    for kind in ("scores", "score", "list", "label", "value"):
        scores = None if kind in ("label", "value") else x
        out = Outputs(kind, labels, scores, keys)
        want = reference(kind, labels, scores, keys)
        # maps compared as packed bytes: NaN is never equal to itself
        want_packed = [msgpack.packb(m, use_bin_type=True) for m in want]
        assert out.packed() == want_packed, kind
        # one array of every row's bytes: a classifier's rows with small int labels, enough
        # of them; read before packed() and after
        whole = kind == "scores" and n >= VECTOR_MIN_ROWS and all(
            type(lab) is int and 0 <= lab < 128 for lab in labels)
        for mat in (Outputs(kind, labels, scores, keys).matrix(), out.matrix()):
            assert (mat is not None) == whole
            if mat is not None:
                assert [bytes(r) for r in mat] == want_packed
        assert [msgpack.packb(m, use_bin_type=True) for m in out] == want_packed
        assert len(out) == n


@pytest.mark.parametrize("which", ["activity", "gait"])
def test_a_real_model_packs_its_batch_as_the_maps(which, activity_bundle, gait_bundle,
                                                  tmp_path):
    """Real models on real data (a classifier on BasicMotions windows, an anomaly score on
    Daphnet samples): the outputs packed from the arrays are the maps the daemon answers
    with, whatever the batch size."""
    from edgeml.bundle import read_bundle
    from edgeml.core.model import LoadedModel
    from edgeml.host.datasets import load_basicmotions
    from edgeml.profiles import load_profile

    b = read_bundle(activity_bundle if which == "activity" else gait_bundle)
    path = tmp_path / "m.onnx"
    path.write_bytes(b.model_bytes)
    model = LoadedModel(b.manifest, path, profile=load_profile("x86-gateway"))
    model.load()
    X = (load_basicmotions("TEST").flat() if which == "activity" else load_daphnet().X)
    X = np.asarray(X, dtype=np.float32)
    for n in (1, 5, VECTOR_MIN_ROWS, 40):
        out = model.outputs(model.predict(X[:n]))
        assert out.kind == ("scores" if which == "activity" else "score")
        assert out.packed() == [msgpack.packb(m, use_bin_type=True) for m in out.maps()]
        assert [m["label"] for m in out] == out.labels
        assert out.maps() == reference(out.kind, out.labels, out.scores, out._keys)
