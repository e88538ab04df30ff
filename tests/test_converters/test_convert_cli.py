"""``edgeml convert`` end to end: joblib file in, bundle out, self-test passes when loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from models import score_bundle, train_activity_model, train_gait_anomaly_model
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from edgeml.bundle import check_self_test, read_bundle, self_test_array
from edgeml.cli import main
from edgeml.host.datasets import DAPHNET_CHANNELS, load_basicmotions, load_daphnet
from edgeml.keys import generate_keypair, key_id, load_public_key


def self_test_passes(path: Path, **read_kw) -> None:
    bundle = read_bundle(path, **read_kw)
    labels, scores = score_bundle(bundle, self_test_array(bundle.manifest))
    check_self_test(bundle.manifest, labels, scores)


@pytest.fixture(scope="module")
def activity_files(tmp_path_factory):
    """A joblib'd activity MLP and an npz sample (TEST windows with their labels)."""
    d = tmp_path_factory.mktemp("activity")
    test = load_basicmotions("TEST")
    joblib.dump(train_activity_model("mlp"), d / "activity.joblib")
    np.savez(d / "test.npz", X=test.flat(), y=np.asarray(test.y))
    np.save(d / "train.npy", load_basicmotions("TRAIN").flat())
    return d


def test_console_script_converts_and_the_bundle_self_test_passes(activity_files, tmp_path):
    """A separate process through the CLI entry point (``python -m edgeml`` runs the same
    ``edgeml.cli:main`` as the ``edgeml`` console script)."""
    out = tmp_path / "activity-2.edgeml"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeml", "convert", str(activity_files / "activity.joblib"),
         "--sample", str(activity_files / "test.npz"), "--name", "activity",
         "--version", "2", "--features", "ax,ay,az,gx,gy,gz", "--window", "100",
         "--training-data", str(activity_files / "train.npy"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "parity: 40 rows, label agreement 1.0000 (0 differ)" in proc.stdout
    assert "tolerance 0.0001: PASS" in proc.stdout
    assert f"bundle: {out}" in proc.stdout
    self_test_passes(out)
    m = read_bundle(out).manifest
    assert (m.name, m.version, m.input.window) == ("activity", "2", 100)
    assert m.metrics["sample_accuracy"] >= 0.9  # y from the npz
    assert m.provenance["training_rows"] == 40


def test_signed_quantized_conversion(activity_files, tmp_path, capsys):
    private, public = generate_keypair(tmp_path / "k")
    out = tmp_path / "a.edgeml"
    rc = main(["convert", str(activity_files / "activity.joblib"),
               "--sample", str(activity_files / "test.npz"), "--name", "activity",
               "--version", "3", "--features", "ax,ay,az,gx,gy,gz", "--window", "100",
               "--input-shape", "3d", "--quantize", "--sign-key", str(private), "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "quantization: int8 dynamic" in text and "accuracy" in text
    pub = load_public_key(public)
    assert f"signed with key {key_id(pub)}" in text
    self_test_passes(out, trusted_keys=[pub])
    assert read_bundle(out, trusted_keys=[pub]).manifest.input.shape == (None, 100, 6)


def test_csv_header_names_the_features(tmp_path, capsys):
    data = load_daphnet()
    joblib.dump(train_gait_anomaly_model(), tmp_path / "gait.joblib")
    rows = data.X[::40]
    lines = [",".join(DAPHNET_CHANNELS)] + [",".join(f"{v:g}" for v in r) for r in rows]
    (tmp_path / "sample.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "gait.edgeml"
    rc = main(["convert", str(tmp_path / "gait.joblib"), "--sample", str(tmp_path / "sample.csv"),
               "--name", "gait", "--version", "1", "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    m = read_bundle(out).manifest
    assert m.input.features == DAPHNET_CHANNELS
    assert m.outputs.kind == "anomaly"
    assert m.metrics["parity"]["rows"] == len(rows)
    self_test_passes(out)


def test_older_devices_flag_writes_release_and_reference_into_provenance(tmp_path, capsys):
    """--older-devices: the portable layout (the previous release loading it is tested in
    tests/test_bundle_compat.py)."""
    import json

    data = load_daphnet()
    joblib.dump(train_gait_anomaly_model(), tmp_path / "gait.joblib")
    np.save(tmp_path / "s.npy", data.X[::70])
    np.save(tmp_path / "train.npy", data.X)
    out = tmp_path / "gait.edgeml"
    rc = main(["convert", str(tmp_path / "gait.joblib"), "--sample", str(tmp_path / "s.npy"),
               "--features", ",".join(DAPHNET_CHANNELS), "--name", "gait", "--version", "4",
               "--training-data", str(tmp_path / "train.npy"), "--older-devices",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    b = read_bundle(out)
    top = json.loads(b.manifest_bytes)
    assert "release" not in top and "reference" not in top
    assert top["provenance"]["extensions"]["release"] == 4
    assert b.manifest.portable and b.manifest.release == 4
    assert set(b.manifest.reference["inputs"]) == set(DAPHNET_CHANNELS)


def test_converter_flag_picks_the_isolation_forest_graph(tmp_path, capsys):
    """The default lowers the forest to a handful of nodes; ``--converter skl2onnx`` keeps
    skl2onnx's graph. Both score what scikit-learn scores."""
    import onnx

    data = load_daphnet()
    model = train_gait_anomaly_model()
    joblib.dump(model, tmp_path / "gait.joblib")
    np.save(tmp_path / "s.npy", data.X[::70])
    nodes = {}
    for conv in ("edgeml", "skl2onnx"):
        out = tmp_path / f"gait-{conv}.edgeml"
        rc = main(["convert", str(tmp_path / "gait.joblib"), "--sample", str(tmp_path / "s.npy"),
                   "--features", ",".join(DAPHNET_CHANNELS), "--name", "gait", "--version", "1",
                   "--converter", conv, "-o", str(out)])
        assert rc == 0, capsys.readouterr()
        b = read_bundle(out)
        nodes[conv] = len(onnx.load_from_string(b.model_bytes).graph.node)
        labels, _ = score_bundle(out, data.X[:2000])
        assert (labels.ravel() == model.predict(data.X[:2000])).all()
    assert nodes["edgeml"] < 16 < 300 < nodes["skl2onnx"]


def test_parity_failure_prints_fail_and_exits_1(tmp_path, capsys):
    data = load_daphnet()
    y = (data.X[:, 1] > np.median(data.X[:, 1])).astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(data.X[::7], y[::7])
    joblib.dump(model, tmp_path / "m.joblib")
    np.save(tmp_path / "s.npy", data.X[1::50])
    np.savetxt(tmp_path / "labels.txt", y[1::50], fmt="%d")
    out = tmp_path / "m.edgeml"
    rc = main(["convert", str(tmp_path / "m.joblib"), "--sample", str(tmp_path / "s.npy"),
               "--features", ",".join(DAPHNET_CHANNELS), "--labels", str(tmp_path / "labels.txt"),
               "--name", "m", "--version", "1", "--tolerance", "1e-12", "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "tolerance 1e-12: FAIL" in cap.out
    assert "edgeml convert: error: parity check failed, no bundle written" in cap.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda d: None, [], "no such file"),
        (lambda d: (d / "s.txt").write_text("1,2\n"), [], "unknown sample format '.txt'"),
        (lambda d: np.savez(d / "s.npz", Z=np.zeros((2, 9))), [], "no array 'X'"),
        (lambda d: np.save(d / "s.npy", np.zeros((2, 9), np.float32)), [],
         "--features is required"),
        (lambda d: (d / "s.csv").write_text("a,b\n1,x\n"), [], "line 2 is not all numbers"),
    ],
)
def test_bad_sample_files_give_one_clear_line(setup, extra, message, tmp_path, capsys):
    joblib.dump(train_gait_anomaly_model(), tmp_path / "m.joblib")
    setup(tmp_path)
    sample = next((p for p in tmp_path.glob("s.*")), tmp_path / "missing.npy")
    rc = main(["convert", str(tmp_path / "m.joblib"), "--sample", str(sample), "--name", "m",
               "--version", "1", "-o", str(tmp_path / "o.edgeml"), *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
