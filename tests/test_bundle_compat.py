"""A bundle with a drift reference, converted for older devices, loads on the previous
release: that release's own code (extracted from git) installs it, loads it and passes its
self-test; the default layout is refused there, as documented. The current device side (the
reference is used from the portable layout) is in tests/core/test_drift_watch.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgeml.bundle import read_bundle
from edgeml.host.datasets import load_daphnet
from edgeml.keys import generate_keypair, load_private_key, load_public_key

REPO = Path(__file__).resolve().parents[1]
#: the release tests/fixtures/datadir-previous-release.tar.gz was written with
PREVIOUS_RELEASE = "7b4fc43e213690cca902bfb2707271a8a26a092c"

OLD_DEVICE = """
import json, sys
from pathlib import Path
import edgeml
from edgeml.keys import load_public_key
from edgeml.model import ModelSlot
from edgeml.profiles import load_profile
from edgeml.store import ModelStore

root, pub, *bundles = sys.argv[1:]
out = {"edgeml": edgeml.__file__}
store = ModelStore(Path(root))
for path in bundles:
    try:
        inst = store.install(Path(path), trusted_keys=[load_public_key(Path(pub))])
        slot = ModelSlot.from_installed(inst, role="champion", priority=0,
                                        profile=load_profile("x86-gateway"))
        slot.load()  # the device's own path: session, warm-up, self-test
        out[path] = {"ok": True, "version": inst.version}
    except Exception as exc:
        out[path] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """The previous release's edgeml and firmware_profiles packages, from git."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of edgeml with its history")
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip("the previous release's commit is not in this checkout (shallow clone?)")
    dest = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "edgeml",
                              "firmware_profiles"], capture_output=True, check=True).stdout
    tar_path = dest / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tf:
        tf.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The Daphnet gait IsolationForest converted twice with a reference and a signature:
    portable (``--older-devices``) and the default layout."""
    sys.path.insert(0, str(REPO / "tests"))
    from models import train_gait_anomaly_model

    from converters import convert_estimator

    d = tmp_path_factory.mktemp("compat")
    priv, pub = generate_keypair(d / "release")
    data = load_daphnet()
    est = train_gait_anomaly_model()
    out = {}
    for layout, portable in (("portable", True), ("default", False)):
        out[layout] = convert_estimator(
            est, data.X[::10], name="gait", version="3", features=data.channels,
            training_data=data.X, sign_key=load_private_key(priv), portable=portable,
            out=d / f"gait-{layout}.edgeml").path
    return out, pub


def test_the_portable_layout_reads_the_same_on_a_current_device(bundles):
    paths, pub = bundles
    new = read_bundle(paths["portable"], trusted_keys=[load_public_key(pub)])
    default = read_bundle(paths["default"], trusted_keys=[load_public_key(pub)])
    assert new.signer is not None and new.manifest.portable and not default.manifest.portable
    assert new.manifest.reference == default.manifest.reference is not None
    assert new.manifest.release == default.manifest.release == 3
    top = json.loads(new.manifest_bytes)
    assert "reference" not in top and "release" not in top
    assert set(top["provenance"]["extensions"]) == {"release", "reference"}


def test_the_previous_release_loads_the_portable_bundle_and_refuses_the_default(
        previous_release, bundles, tmp_path):
    paths, pub = bundles
    run = subprocess.run(
        [sys.executable, "-c", OLD_DEVICE, str(tmp_path / "store"), str(pub),
         str(paths["portable"]), str(paths["default"])],
        env={"PYTHONPATH": str(previous_release), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path, capture_output=True, text=True, timeout=120)  # not this tree's cwd
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["edgeml"].startswith(str(previous_release))  # the old code, not this tree
    assert out[str(paths["portable"])] == {"ok": True, "version": "3"}
    refused = out[str(paths["default"])]
    assert not refused["ok"]
    assert "BundleFormatError: manifest key 'reference': unknown key" in refused["error"]
