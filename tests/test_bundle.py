"""The bundle format: round trips, and every way a hostile or damaged bundle is refused."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeml.bundle import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    SIGNATURE_MEMBER,
    Manifest,
    ModelInput,
    ModelOutputs,
    SelfTest,
    check_self_test,
    name_is_safe,
    read_bundle,
    self_test_array,
    sha256_hex,
    utc_now_iso,
    write_bundle,
)
from edgeml.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    SelfTestError,
)
from edgeml.keys import generate_keypair, key_id, load_private_key, load_public_key

CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")


# --- helpers shared with test_store.py and test_profiles.py -----------------------------------
@functools.cache
def tiny_classifier() -> tuple[bytes, np.ndarray, tuple, np.ndarray, tuple]:
    """LogisticRegression on per-channel means of the real BasicMotions windows, converted
    with skl2onnx: (onnx bytes, X rows, sklearn labels, sklearn probabilities, classes)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    from edgeml.host.datasets import load_basicmotions

    train = load_basicmotions("TRAIN")
    X = train.X.mean(axis=1).astype(np.float32)  # [40, 6]: one "sample" per window
    y = np.asarray(train.y)
    clf = LogisticRegression(max_iter=2000).fit(X, y)
    onx = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
        options={id(clf): {"zipmap": False}}, target_opset=17,
    )
    return (onx.SerializeToString(), X, tuple(clf.predict(X).tolist()),
            clf.predict_proba(X), tuple(clf.classes_.tolist()))


def make_manifest(model_bytes: bytes | None = None, *, name: str = "activity",
                  version: str = "1", rows: int = 5, **changes) -> Manifest:
    model, X, labels, proba, classes = tiny_classifier()
    model_bytes = model if model_bytes is None else model_bytes
    m = Manifest(
        name=name, version=version, created=utc_now_iso(),
        input=ModelInput(name="input", dtype="float32", shape=(None, 6), features=CHANNELS),
        outputs=ModelOutputs(kind="classifier", label="label", scores="probabilities",
                             classes=classes),
        sha256=sha256_hex(model_bytes), size=len(model_bytes),
        provenance={"framework": "scikit-learn", "estimator": "LogisticRegression",
                    "opset": {"": 17}, "training_rows": np.int64(len(X))},
        metrics={"accuracy": 1.0},
        self_test=SelfTest(inputs=tuple(tuple(r) for r in X[:rows].tolist()),
                           expected_labels=labels[:rows],
                           expected_scores=tuple(tuple(r) for r in proba[:rows].tolist())),
        description="test model",
    )
    return dataclasses.replace(m, **changes) if changes else m


def make_bundle(path: Path, *, sign_key=None, **manifest_kwargs) -> Path:
    manifest = make_manifest(**manifest_kwargs)
    return write_bundle(path, manifest, tiny_classifier()[0], sign_key=sign_key)


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rezip(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return buf.getvalue()


def edit_manifest(data: bytes, fn) -> bytes:
    """The bundle with its manifest JSON changed by ``fn(dict)``; other members unchanged."""
    m = members(data)
    doc = json.loads(m[MANIFEST_MEMBER])
    fn(doc)
    m[MANIFEST_MEMBER] = json.dumps(doc).encode()
    return rezip(list(m.items()))


@pytest.fixture
def keypair(tmp_path: Path):
    priv, pub = generate_keypair(tmp_path / "signer")
    return load_private_key(priv), load_public_key(pub)


@pytest.fixture
def other_keypair(tmp_path: Path):
    priv, pub = generate_keypair(tmp_path / "other")
    return load_private_key(priv), load_public_key(pub)


@pytest.fixture
def unsigned(tmp_path: Path) -> bytes:
    return make_bundle(tmp_path / "unsigned.edgeml").read_bytes()


@pytest.fixture
def signed(tmp_path: Path, keypair) -> bytes:
    return make_bundle(tmp_path / "signed.edgeml", sign_key=keypair[0]).read_bytes()


# --- round trips ----------------------------------------------------------------------------
def test_unsigned_round_trip_scores_like_sklearn(tmp_path: Path) -> None:
    model, X, labels, _, classes = tiny_classifier()
    manifest = make_manifest()
    path = write_bundle(tmp_path / "a.edgeml", manifest, model)
    b = read_bundle(path)
    assert b.signer is None and b.signature_bytes is None
    assert b.model_bytes == model
    assert b.manifest == Manifest.from_dict(json.loads(b.manifest_bytes))
    assert b.manifest.provenance["training_rows"] == len(X)  # numpy value unwrapped
    assert b.manifest.outputs.classes == classes
    assert b.manifest_bytes == manifest.to_json_bytes()
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [MANIFEST_MEMBER, MODEL_MEMBER]
    # The self-test recorded from scikit-learn passes through onnxruntime.
    sess = ort.InferenceSession(b.model_bytes, providers=["CPUExecutionProvider"])
    got_labels, got_scores = sess.run(["label", "probabilities"],
                                      {"input": self_test_array(b.manifest)})
    check_self_test(b.manifest, got_labels, got_scores)
    assert list(got_labels) == list(labels[:5])


def test_signed_round_trip(tmp_path: Path, keypair, signed: bytes) -> None:
    pub = keypair[1]
    b = read_bundle(signed, trusted_keys=[pub])
    assert b.signer == key_id(pub)
    sig = json.loads(b.signature_bytes)
    assert sig["alg"] == "ed25519" and sig["key_id"] == key_id(pub)
    # Without trusted keys a signed bundle is accepted but reported as unverified.
    assert read_bundle(signed).signer is None


def test_writer_is_reproducible_and_leaves_no_temp_files(tmp_path: Path, keypair) -> None:
    manifest = make_manifest()
    model = tiny_classifier()[0]
    a = write_bundle(tmp_path / "out" / "a.edgeml", manifest, model, sign_key=keypair[0])
    b = write_bundle(tmp_path / "out" / "b.edgeml", manifest, model, sign_key=keypair[0])
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.edgeml", "b.edgeml"]


def test_writer_refuses_model_that_does_not_match_manifest(tmp_path: Path) -> None:
    target = tmp_path / "a.edgeml"
    target.write_bytes(b"previous")
    with pytest.raises(BundleIntegrityError, match="sha256"):
        write_bundle(target, make_manifest(), tiny_classifier()[0] + b"x")
    assert target.read_bytes() == b"previous"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a.edgeml"]


def test_writer_refuses_non_finite_metric(tmp_path: Path) -> None:
    m = make_manifest(metrics={"parity": {"max_abs": float("nan")}})
    with pytest.raises(BundleFormatError, match=r"metrics\.parity\.max_abs"):
        write_bundle(tmp_path / "a.edgeml", m, tiny_classifier()[0])


def test_window_model_shapes_validate() -> None:
    base = make_manifest().to_dict()
    base["self_test"] = None
    base["input"].update(window=10, shape=[None, 60])
    assert Manifest.from_dict(base).input.row_width == 60
    base["input"]["shape"] = [None, 10, 6]
    assert Manifest.from_dict(base).input.shape == (None, 10, 6)
    base["input"]["shape"] = [None, 59]
    with pytest.raises(BundleFormatError, match=r"'input\.shape'"):
        Manifest.from_dict(base)


# --- refusals -------------------------------------------------------------------------------
def test_changed_model_bytes_refused(unsigned: bytes) -> None:
    m = members(unsigned)
    m[MODEL_MEMBER] = m[MODEL_MEMBER][:-1] + bytes([m[MODEL_MEMBER][-1] ^ 1])
    with pytest.raises(BundleIntegrityError, match=r"sha256 .* does not match"):
        read_bundle(rezip(list(m.items())))


def test_changed_model_bytes_refused_even_when_signed(signed: bytes, keypair) -> None:
    m = members(signed)
    m[MODEL_MEMBER] = m[MODEL_MEMBER] + b"\0"
    with pytest.raises(BundleIntegrityError):
        read_bundle(rezip(list(m.items())), trusted_keys=[keypair[1]])


def test_changed_manifest_refused_by_signature(signed: bytes, keypair) -> None:
    tampered = edit_manifest(signed, lambda d: d.update(description="evil"))
    with pytest.raises(BundleSignatureError, match="bad signature by key"):
        read_bundle(tampered, trusted_keys=[keypair[1]])


def test_wrong_key_refused_naming_the_key(signed: bytes, keypair, other_keypair) -> None:
    with pytest.raises(BundleSignatureError, match="not trusted") as exc:
        read_bundle(signed, trusted_keys=[other_keypair[1]])
    assert key_id(keypair[1]) in str(exc.value)
    assert key_id(other_keypair[1]) in str(exc.value)


def test_signature_forged_with_trusted_key_id_refused(tmp_path, keypair, other_keypair) -> None:
    """Signed by another key but claiming the trusted key's id: the signature fails."""
    data = make_bundle(tmp_path / "x.edgeml", sign_key=other_keypair[0]).read_bytes()
    m = members(data)
    sig = json.loads(m[SIGNATURE_MEMBER])
    sig["key_id"] = key_id(keypair[1])
    m[SIGNATURE_MEMBER] = json.dumps(sig).encode()
    with pytest.raises(BundleSignatureError, match="bad signature"):
        read_bundle(rezip(list(m.items())), trusted_keys=[keypair[1]])


def test_unsigned_refused_when_keys_configured(unsigned: bytes, keypair) -> None:
    with pytest.raises(BundleSignatureError, match="unsigned but a signature is required"):
        read_bundle(unsigned, trusted_keys=[keypair[1]])
    with pytest.raises(BundleSignatureError, match="unsigned"):
        read_bundle(unsigned, require_signature=True)
    # ...and explicitly allowed when the caller says so.
    assert read_bundle(unsigned, trusted_keys=[keypair[1]], require_signature=False)


def test_signature_required_without_keys_refused(signed: bytes) -> None:
    with pytest.raises(BundleSignatureError, match="no trusted keys"):
        read_bundle(signed, require_signature=True)


@pytest.mark.parametrize("doc, match", [
    (b"not json", "malformed signature.json: not JSON"),
    (b'{"alg": "rsa", "key_id": "0123456789abcdef", "sig": ""}', "unsupported signature alg"),
    (b'{"alg": "ed25519", "key_id": "xyz", "sig": ""}', "bad key_id"),
    (b'{"alg": "ed25519", "key_id": "0123456789abcdef", "sig": "!!"}', "not base64"),
    (b'{"alg": "ed25519", "key_id": "0123456789abcdef", "sig": "AAAA"}', "64 bytes"),
])
def test_malformed_signature_refused(signed: bytes, keypair, doc: bytes, match: str) -> None:
    m = members(signed)
    m[SIGNATURE_MEMBER] = doc
    with pytest.raises(BundleSignatureError, match=match):
        read_bundle(rezip(list(m.items())), trusted_keys=[keypair[1]])


@pytest.mark.parametrize("member, match", [
    ("../evil.sh", "path traversal"),
    ("models/../../evil", "path traversal"),
    ("/etc/passwd", "absolute path"),
    ("C:/evil", "absolute path"),
    ("..\\evil", "backslash"),
    ("extra.txt", "unexpected member 'extra.txt'"),
])
def test_bad_member_names_refused(unsigned: bytes, member: str, match: str) -> None:
    items = [*members(unsigned).items(), (member, b"x")]
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(rezip(items))


def test_duplicate_member_refused(unsigned: bytes) -> None:
    m = members(unsigned)
    with pytest.warns(UserWarning):  # zipfile itself warns about the duplicate
        data = rezip([*m.items(), (MODEL_MEMBER, b"other")])
    with pytest.raises(BundleFormatError, match=r"duplicate member 'model\.onnx'"):
        read_bundle(data)


@pytest.mark.parametrize("missing", [MANIFEST_MEMBER, MODEL_MEMBER])
def test_missing_member_refused(unsigned: bytes, missing: str) -> None:
    items = [(k, v) for k, v in members(unsigned).items() if k != missing]
    with pytest.raises(BundleFormatError, match=f"missing {missing}"):
        read_bundle(rezip(items))


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_file_refused(tmp_path: Path, unsigned: bytes, cut: float) -> None:
    path = tmp_path / "cut.edgeml"
    path.write_bytes(unsigned[: int(len(unsigned) * cut)])
    with pytest.raises(BundleFormatError, match="not a zip file or truncated"):
        read_bundle(path)


def test_not_a_zip_and_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError, match="not a zip file"):
        read_bundle(b"hello world")
    with pytest.raises(BundleFormatError, match="no such file"):
        read_bundle(tmp_path / "absent.edgeml")


def test_oversized_member_refused_before_reading(tmp_path: Path) -> None:
    model = bytes(range(256)) * 64  # 16 KiB; the reader does not parse the ONNX itself
    path = write_bundle(tmp_path / "big.edgeml", make_manifest(model), model)
    with pytest.raises(BundleFormatError, match=r"'model\.onnx' declares 16384 bytes, over"):
        read_bundle(path, max_bytes=len(model) - 1)
    assert read_bundle(path, max_bytes=len(model)).manifest.size == len(model)


def test_zip_bomb_with_lying_size_header_is_read_bounded() -> None:
    """A member that claims 100 bytes but inflates to 50 MB: the reader stops at the claim
    and refuses the member instead of inflating it."""
    bomb = b"\0" * (50 * 2**20)
    doc = make_manifest().to_dict()
    doc["model"]["size"] = 100
    data = bytearray(rezip([(MANIFEST_MEMBER, json.dumps(doc).encode()), (MODEL_MEMBER, bomb)]))
    # Patch the uncompressed size in the central directory entry of model.onnx.
    name_at = data.rfind(MODEL_MEMBER.encode())
    cd = data.rfind(b"PK\x01\x02", 0, name_at)
    struct.pack_into("<I", data, cd + 24, 100)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert zf.getinfo(MODEL_MEMBER).file_size == 100
    with pytest.raises(BundleFormatError, match=r"'model\.onnx' is corrupt or truncated"):
        read_bundle(bytes(data))


def test_oversized_manifest_refused() -> None:
    data = rezip([(MANIFEST_MEMBER, b" " * (17 * 2**20)), (MODEL_MEMBER, b"x")])
    with pytest.raises(BundleFormatError, match=r"'manifest\.json' declares .* over the limit"):
        read_bundle(data)


def test_unknown_manifest_version_refused(unsigned: bytes) -> None:
    data = edit_manifest(unsigned, lambda d: d.update(manifest_version=2))
    with pytest.raises(BundleFormatError, match="unknown manifest_version 2"):
        read_bundle(data)


def test_manifest_not_json_refused(unsigned: bytes) -> None:
    m = members(unsigned)
    m[MANIFEST_MEMBER] = b"\xff\xfe not json"
    with pytest.raises(BundleFormatError, match="not valid UTF-8 JSON"):
        read_bundle(rezip(list(m.items())))


def _delete(path: str):
    def fn(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return fn


def _set(path: str, value):
    def fn(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return fn


@pytest.mark.parametrize("edit, match", [
    (_delete("outputs"), "'outputs': missing"),
    (_delete("model.sha256"), "'model.sha256': missing"),
    (_delete("input.features"), "'input.features': missing"),
    (_set("input.shape", "600"), "'input.shape': expected an array, got string '600'"),
    (_set("model.size", "12"), "'model.size': expected an integer, got str"),
    (_set("model.size", True), "'model.size': expected an integer, got bool"),
    (_set("outputs.kind", "ranker"), "'outputs.kind': 'ranker' is not one of"),
    (_set("input.dtype", "float64"), "'input.dtype': 'float64' is not one of float32"),
    (_set("name", "../../etc"), "'name': '../../etc' is not a safe name"),
    (_set("version", ".hidden"), "'version': '.hidden' is not a safe name"),
    (_set("created", "yesterday"), "'created': 'yesterday' is not an ISO-8601"),
    (_set("model.file", "../model.onnx"), "'model.file': must be 'model.onnx'"),
    (_set("model.sha256", "ABC"), "'model.sha256': expected 64 lowercase hex"),
    (_set("input.extra", 1), "'input.extra': unknown key"),
    (_set("model.extra", 1), "'model.extra': unknown key"),
    (_set("outputs.extra", 1), "'outputs.extra': unknown key"),
    (_set("self_test.extra", 1), "'self_test.extra': unknown key"),
    (_set("self_test.inputs", [[1.0, 2.0]]), r"'self_test.inputs\[0\]': has 2 values"),
    (_set("self_test.expected_labels", ["a"]), "'self_test.expected_labels': has 1 entries"),
    (_set("outputs.classes", None), "'outputs.classes': a classifier needs"),
    (_set("provenance", []), "'provenance': expected an object"),
])
def test_bad_manifest_field_refused_by_name(unsigned: bytes, edit, match: str) -> None:
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(edit_manifest(unsigned, edit))


def test_check_self_test_names_row_and_miss() -> None:
    m = make_manifest()
    _, _, labels, proba, _ = tiny_classifier()
    good_scores = np.asarray(proba[:5], dtype=np.float32)
    check_self_test(m, np.asarray(labels[:5]), good_scores)
    bad = good_scores.copy()
    bad[3, 1] += 0.05
    with pytest.raises(SelfTestError, match=r"row 3 score column 1: .*\|diff\| 0\.05"):
        check_self_test(m, np.asarray(labels[:5]), bad)
    wrong = list(labels[:5])
    wrong[2] = "Nope"
    with pytest.raises(SelfTestError, match="row 2: label 'Nope'"):
        check_self_test(m, np.asarray(wrong), good_scores)
    with pytest.raises(SelfTestError, match="expects 5 labels"):
        check_self_test(m, np.asarray(labels[:4]), good_scores)


@pytest.mark.parametrize("s, ok", [
    ("activity", True), ("v1.2.3", True), ("1", True), ("a_b-c", True), ("x" * 64, True),
    ("", False), (".", False), ("..", False), ("../x", False), ("a/b", False),
    ("-rf", False), (".hidden", False), ("x" * 65, False), ("a b", False), ("a\n", False),
    ("é", False),
])
def test_name_is_safe(s: str, ok: bool) -> None:
    assert name_is_safe(s) is ok


def test_check_self_test_regressor_labels_use_tolerance() -> None:
    """Converters store a regressor's 6.0 as JSON 6; the device's float32 6.0000x passes."""
    m = make_manifest(
        outputs=ModelOutputs(kind="regressor", label="variable", scores=None, classes=None),
        self_test=SelfTest(inputs=((0.0,) * 6,), expected_labels=(6,), expected_scores=None),
    )
    m = Manifest.from_dict(json.loads(m.to_json_bytes()))
    check_self_test(m, np.array([[6.00001]], dtype=np.float32), None)
    with pytest.raises(SelfTestError, match=r"row 0: label 6\.1"):
        check_self_test(m, np.array([[6.1]]), None)
    # Class labels stay exact: integer 1 is not the string "1".
    c = make_manifest()
    c = dataclasses.replace(c, self_test=dataclasses.replace(
        c.self_test, expected_labels=(1,) * 5, expected_scores=None))
    with pytest.raises(SelfTestError, match="label '1', expected 1"):
        check_self_test(c, np.array(["1"] * 5), None)


# --- manifest versioning: unknown optional keys, portable manifests ---------------------------
_REF = {"v": 1, "bins": 2, "inputs": {"ax": {"edges": [0.5], "freq": [0.4, 0.6], "min": 0.0,
                                             "max": 1.0}}, "outputs": {}}


def test_an_unknown_top_level_key_is_ignored_with_a_warning(unsigned: bytes, caplog) -> None:
    data = edit_manifest(unsigned, _set("expires", "2030-01-01T00:00:00Z"))
    with caplog.at_level("WARNING", logger="edgeml.bundle"):
        b = read_bundle(data)
    assert b.manifest.ignored == ("expires",) and b.manifest.name == "activity"
    assert "manifest key 'expires': unknown to this edgeml, ignored" in caplog.text
    assert read_bundle(unsigned).manifest.ignored == ()


def test_a_portable_manifest_carries_release_and_reference_in_provenance(tmp_path, keypair):
    m = make_manifest(version="7", release=7, reference=_REF, portable=True)
    doc = m.to_dict()
    assert "release" not in doc and "reference" not in doc
    assert doc["provenance"]["extensions"] == {"release": 7, "reference": _REF}
    assert doc["provenance"]["framework"] == "scikit-learn"
    b = read_bundle(write_bundle(tmp_path / "p.edgeml", m, tiny_classifier()[0],
                                 sign_key=keypair[0]), trusted_keys=[keypair[1]])
    got = b.manifest
    assert got.portable and got.release == 7 and got.reference == _REF and got.ignored == ()
    assert "extensions" not in got.provenance  # lifted out, not kept twice
    assert got.to_json_bytes() == b.manifest_bytes  # a rewrite keeps the portable layout
    plain = dataclasses.replace(m, portable=False).to_dict()
    assert plain["release"] == 7 and "extensions" not in plain["provenance"]


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(release=7), r"'release': given twice: at the top level and in "
                                    r"provenance\.extensions"),
    (_set("provenance.extensions.reference.inputs.nope", {"edges": [], "freq": [1.0],
                                                          "min": 0, "max": 0}),
     r"'provenance\.extensions\.reference\.inputs\.nope': not a feature"),
    (_set("provenance.extensions.release", -1),
     r"'provenance\.extensions\.release': -1 is out of range"),
    (_set("provenance.extensions", [1]), r"'provenance\.extensions': expected an object"),
])
def test_bad_portable_extensions_are_refused_by_name(tmp_path, edit, match) -> None:
    m = make_manifest(version="7", release=7, reference=_REF, portable=True)
    data = write_bundle(tmp_path / "p.edgeml", m, tiny_classifier()[0]).read_bytes()
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(edit_manifest(data, edit))


def test_an_unknown_extension_is_ignored_with_a_warning(tmp_path, caplog) -> None:
    m = make_manifest(version="7", release=7, portable=True)
    data = write_bundle(tmp_path / "p.edgeml", m, tiny_classifier()[0]).read_bytes()
    with caplog.at_level("WARNING", logger="edgeml.bundle"):
        got = read_bundle(edit_manifest(data, _set("provenance.extensions.later", 1))).manifest
    assert got.ignored == ("provenance.extensions.later",) and got.release == 7
