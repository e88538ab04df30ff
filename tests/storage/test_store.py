"""The on-device model store and ``edgeml models``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_bundle import make_bundle, make_manifest, members, rezip, tiny_classifier

from edgeml.bundle import MODEL_MEMBER, SIGNATURE_MEMBER, read_bundle, write_bundle
from edgeml.cli import main
from edgeml.errors import BundleIntegrityError, BundleSignatureError, StoreError
from edgeml.keys import generate_keypair, key_id, load_private_key, load_public_key
from edgeml.storage.models import ModelStore, version_key


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data" / "models")


def bundle_file(tmp_path: Path, name: str = "activity", version: str = "1", **kw) -> Path:
    return make_bundle(tmp_path / f"{name}-{version}.edgeml", name=name, version=version, **kw)


def other_model_bytes() -> bytes:
    """The same classifier with a different doc string: a different sha256, still valid ONNX."""
    import onnx

    model = onnx.load_from_string(tiny_classifier()[0])
    model.doc_string = "retrained"
    return model.SerializeToString()


def test_install_get_list_layout(tmp_path: Path, store: ModelStore) -> None:
    path = bundle_file(tmp_path)
    m = store.install(path)
    assert m.path == store.root / "activity" / "1"
    assert sorted(p.name for p in m.path.iterdir()) == ["manifest.json", "model.onnx"]
    assert m.model_path.read_bytes() == tiny_classifier()[0]
    assert m.read_model() == tiny_classifier()[0]
    assert not m.signed
    assert store.get("activity", "1") == m
    assert store.list() == [m]
    assert store.versions("activity") == ["1"]
    # The stored manifest is the exact signed-over bytes of the bundle.
    assert m.manifest_path.read_bytes() == read_bundle(path).manifest_bytes


def test_install_from_bytes_and_bundle_and_keeps_signature(tmp_path: Path,
                                                           store: ModelStore) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    path = bundle_file(tmp_path, version="2", sign_key=load_private_key(priv))
    a = store.install(path.read_bytes(), trusted_keys=[load_public_key(pub)])
    assert a.signed
    sig = json.loads((a.path / SIGNATURE_MEMBER).read_bytes())
    assert sig["key_id"] == key_id(load_public_key(pub))
    b = store.install(read_bundle(bundle_file(tmp_path, version="3")))
    assert [x.version for x in store.list()] == ["2", "3"] and not b.signed


def test_install_refuses_bad_bundle_and_writes_nothing(tmp_path: Path, store: ModelStore) -> None:
    data = bundle_file(tmp_path).read_bytes()
    m = members(data)
    m[MODEL_MEMBER] += b"\0"
    with pytest.raises(BundleIntegrityError):
        store.install(rezip(list(m.items())))
    _, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(BundleSignatureError, match="unsigned"):
        store.install(data, trusted_keys=[load_public_key(pub)])
    assert store.list() == []
    assert not (store.root / "activity").exists()


def test_natural_version_order_and_names_sorted(tmp_path: Path, store: ModelStore) -> None:
    for name, version in [("zeta", "1"), ("activity", "10"), ("activity", "2"),
                          ("activity", "1.10"), ("activity", "1.9")]:
        store.install(bundle_file(tmp_path, name, version))
    assert [(m.name, m.version) for m in store.list()] == [
        ("activity", "1.9"), ("activity", "1.10"), ("activity", "2"), ("activity", "10"),
        ("zeta", "1"),
    ]
    assert store.versions("activity") == ["1.9", "1.10", "2", "10"]
    assert store.versions("absent") == []
    assert sorted(["10", "2", "b", "a1"], key=version_key) == ["2", "10", "a1", "b"]


def test_reinstall_same_is_noop_and_different_model_conflicts(tmp_path: Path,
                                                              store: ModelStore) -> None:
    first = store.install(bundle_file(tmp_path))
    mtime = first.model_path.stat().st_mtime_ns
    assert store.install(bundle_file(tmp_path)) == first
    assert first.model_path.stat().st_mtime_ns == mtime
    other = other_model_bytes()
    conflicting = write_bundle(tmp_path / "other.edgeml", make_manifest(other), other)
    with pytest.raises(StoreError, match="already installed with a different model"):
        store.install(conflicting)
    assert store.get("activity", "1").read_model() == tiny_classifier()[0]


def test_remove_and_prune(tmp_path: Path, store: ModelStore) -> None:
    for v in ["1", "2", "3", "10", "11"]:
        store.install(bundle_file(tmp_path, version=v))
    store.remove("activity", "2")
    with pytest.raises(StoreError, match="activity 2 is not installed"):
        store.remove("activity", "2")
    with pytest.raises(StoreError, match="activity 2 is not installed"):
        store.get("activity", "2")
    assert store.prune("activity", keep=2, protect={"1"}) == ["3"]
    assert store.versions("activity") == ["1", "10", "11"]
    assert store.prune("activity", keep=5) == []
    assert store.prune("activity", keep=0) == ["1", "10", "11"]
    assert not (store.root / "activity").exists()  # name directory goes with its last version
    with pytest.raises(StoreError, match="keep must be"):
        store.prune("activity", keep=-1)


@pytest.mark.parametrize("name, version", [("../etc", "1"), ("activity", ".."),
                                           ("a/b", "1"), ("activity", "/abs")])
def test_unsafe_names_refused(store: ModelStore, name: str, version: str) -> None:
    with pytest.raises(StoreError, match="is not a safe name"):
        store.get(name, version)
    with pytest.raises(StoreError, match="is not a safe name"):
        store.remove(name, version)


def test_failed_install_leaves_nothing_visible(tmp_path: Path, store: ModelStore) -> None:
    """A write that fails half-way (here: after model.onnx and manifest.json are written)
    leaves neither a version directory nor temp files behind."""
    import dataclasses

    good = read_bundle(bundle_file(tmp_path))
    broken = dataclasses.replace(good, signature_bytes="not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.install(broken)
    assert store.list() == []
    assert not (store.root / "activity" / "1").exists()
    assert list((store.root / ".tmp").iterdir()) == []
    assert store.install(good).read_model() == good.model_bytes


def test_crash_leftovers_cleaned_at_construction(tmp_path: Path, store: ModelStore) -> None:
    store.install(bundle_file(tmp_path))
    half = store.root / ".tmp" / "install-deadbeef"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half a model")
    reopened = ModelStore(store.root)
    assert not half.exists()
    assert [m.version for m in reopened.list()] == ["1"]


def test_disk_rot_detected_on_load(tmp_path: Path, store: ModelStore, caplog) -> None:
    m = store.install(bundle_file(tmp_path))
    store.install(bundle_file(tmp_path, version="2"))
    data = bytearray(m.model_path.read_bytes())
    data[100] ^= 0xFF
    m.model_path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="disk corruption"):
        store.get("activity", "1").read_model()
    m.model_path.write_bytes(bytes(data[:-10]))
    with pytest.raises(BundleIntegrityError, match=r"stored model\.onnx has"):
        store.get("activity", "1")
    with caplog.at_level(logging.WARNING, logger="edgeml.storage.models"):
        assert [x.version for x in store.list()] == ["2"]  # the damaged one is skipped
    assert "skipping damaged model" in caplog.text


# --- CLI ------------------------------------------------------------------------------------
def test_models_cli_install_ls_rm(tmp_path: Path, capsys) -> None:
    data_dir = tmp_path / "data"
    path = bundle_file(tmp_path)
    assert main(["models", "install", str(path), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "installed activity 1" in out and "self-test passed (5 rows)" in out
    assert main(["models", "install", str(path), "--data-dir", str(data_dir)]) == 0
    assert "already installed activity 1" in capsys.readouterr().out
    assert main(["models", "install", str(bundle_file(tmp_path, version="2")),
                 "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    assert main(["models", "ls", "--data-dir", str(data_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"], r["kind"]) for r in rows] == [
        ("activity", "1", "classifier"), ("activity", "2", "classifier")]
    assert main(["models", "ls", "--data-dir", str(data_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "VERSION", "KIND"] and len(table) == 3
    assert main(["models", "rm", "activity", "1", "--data-dir", str(data_dir)]) == 0
    assert main(["models", "rm", "activity", "1", "--data-dir", str(data_dir)]) == 1
    assert "activity 1 is not installed" in capsys.readouterr().err
    assert main(["models", "prune", "activity", "--keep", "0", "--data-dir",
                 str(data_dir)]) == 0
    assert "removed activity 2" in capsys.readouterr().out


def test_models_cli_refuses_bad_bundles_with_reason(tmp_path: Path, capsys) -> None:
    data_dir = tmp_path / "data"
    priv, pub = generate_keypair(tmp_path / "k")
    _, other_pub = generate_keypair(tmp_path / "other")
    signed = bundle_file(tmp_path, sign_key=load_private_key(priv))

    assert main(["models", "install", str(signed), "--trusted-key", str(other_pub),
                 "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "not trusted" in err and key_id(load_public_key(pub)) in err

    m = members(signed.read_bytes())
    m[MODEL_MEMBER] += b"\0"
    tampered = tmp_path / "tampered.edgeml"
    tampered.write_bytes(rezip(list(m.items())))
    assert main(["models", "install", str(tampered), "--data-dir", str(data_dir)]) == 1
    assert "does not match" in capsys.readouterr().err

    # A self-test that the model does not reproduce: refused before anything is written.
    wrong = make_manifest()
    st = wrong.self_test
    import dataclasses
    bad_scores = tuple(tuple(v + 0.5 for v in row) for row in st.expected_scores)
    wrong = dataclasses.replace(wrong, self_test=dataclasses.replace(
        st, expected_scores=bad_scores))
    bad = write_bundle(tmp_path / "bad.edgeml", wrong, tiny_classifier()[0])
    assert main(["models", "install", str(bad), "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "self-test row" in err and "20 of 20 values out of tolerance" in err

    assert main(["models", "install", str(signed), "--trusted-key", str(pub),
                 "--data-dir", str(data_dir)]) == 0
    assert f"signed by {key_id(load_public_key(pub))}" in capsys.readouterr().out
    assert [m.version for m in ModelStore(data_dir / "models").list()] == ["1"]
