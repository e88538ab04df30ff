"""The ``.edgeml`` bundle: one zip with ``manifest.json``, ``model.onnx`` and, when signed,
``signature.json``.

Bundles arrive from the network, so the reader trusts nothing: it bounds every member before
reading it, refuses anything that could write outside a directory, checks the signature over
the exact manifest bytes *before* it interprets the manifest, and checks the model's sha256
against the (signed) manifest. Each refusal is its own clear error from :mod:`edgeml.errors`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    SelfTestError,
)
from edgeml.storage.fs import atomic_open
from edgeml.validate import Table, short_repr

if TYPE_CHECKING:
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger("edgeml.bundle")

MANIFEST_VERSION = 1
#: Optional top-level keys added to manifest_version 1 after its first release. A portable
#: manifest (``Manifest.portable``) writes them inside ``provenance.extensions`` instead: a
#: reader from before them refuses them at the top level but takes ``provenance`` as free
#: metadata, so it loads the bundle (and does without them); this reader takes them from
#: either place (docs/bundle-format.md, "Compatibility").
EXTENSION_KEYS = ("release", "reference")
EXTENSIONS = "extensions"
MODEL_MEMBER = "model.onnx"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature.json"
BUNDLE_SUFFIX = ".edgeml"

#: Default bound on any one member (the model); ``read_bundle(max_bytes=...)`` changes it.
DEFAULT_MAX_BYTES = 256 * 2**20
#: The manifest carries the self-test rows, but never needs more than this.
MAX_MANIFEST_BYTES = 16 * 2**20
#: signature.json is three short strings.
MAX_SIGNATURE_BYTES = 4096

SIGNATURE_ALG = "ed25519"
OUTPUT_KINDS = ("classifier", "regressor", "anomaly")
INPUT_DTYPES = ("float32",)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ALLOWED_MEMBERS = (MANIFEST_MEMBER, MODEL_MEMBER, SIGNATURE_MEMBER)
_READ_CHUNK = 1 << 16
# Fixed member time stamps make bundles byte-for-byte reproducible.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def name_is_safe(s: str) -> bool:
    """True when ``s`` can be a directory name on the device: no separators, no dot-dot,
    no leading dot or dash, at most 64 ASCII characters."""
    return isinstance(s, str) and _SAFE_NAME.fullmatch(s) is not None


# --- release ----------------------------------------------------------------------
MAX_RELEASE = 2**63 - 1


def release_of_version(version: str) -> int:
    """The release a bundle without one is treated as: its version when that is a plain
    non-negative integer ("3" -> 3), else 0 (older than any release)."""
    return int(version) if version.isdigit() and len(version) <= 18 else 0


def default_release(version: str) -> int:
    """The release ``edgeml convert`` writes: the version when numeric, else the conversion
    time in seconds (later conversions are newer)."""
    if version.isdigit() and len(version) <= 18:
        return int(version)
    import time

    return int(time.time())


def utc_now_iso() -> str:
    """The ``created`` stamp the writer's callers should use: ISO-8601 UTC, seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``, the form recorded in the manifest."""
    return hashlib.sha256(data).hexdigest()


# --- manifest records -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    """What the ONNX graph takes."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    features: tuple[str, ...]
    window: int | None = None

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def row_width(self) -> int:
        """Floats per row: ``window * n_features`` for window models, else ``n_features``."""
        return (self.window or 1) * len(self.features)


@dataclass(frozen=True)
class ModelOutputs:
    """Which ONNX outputs hold the label and the scores, and what the score columns mean."""

    kind: str
    label: str | None
    scores: str | None
    classes: tuple | None


@dataclass(frozen=True)
class SelfTest:
    """Rows with the outputs the host saw; the device reproduces them before activation."""

    inputs: tuple[tuple[float, ...], ...]
    expected_labels: tuple | None
    expected_scores: tuple[tuple[float, ...], ...] | None
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to trust, feed and check a model."""

    name: str
    version: str
    created: str
    input: ModelInput
    outputs: ModelOutputs
    sha256: str
    size: int
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    self_test: SelfTest | None = None
    description: str = ""
    manifest_version: int = MANIFEST_VERSION
    # release: the anti-downgrade order; None in bundles made before it
    release: int | None = None

    @property
    def effective_release(self) -> int:
        """``release``, else the version when it is a plain integer, else 0 (oldest)."""
        return self.release if self.release is not None else release_of_version(self.version)
    # drift: the training data's profile (docs/bundle-format.md, "reference"); optional
    reference: dict | None = None
    # write release and reference inside provenance.extensions, where readers from before
    # those keys do not look (docs/bundle-format.md, "Compatibility")
    portable: bool = False
    # unknown top-level keys the reader ignored (with a warning): a newer writer's additions
    ignored: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The JSON shape of ``manifest.json`` (plain lists, str keys; numpy values unwrapped)."""
        st = self.self_test
        d = {
            "manifest_version": self.manifest_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "description": self.description,
            "input": {
                "name": self.input.name,
                "dtype": self.input.dtype,
                "shape": list(self.input.shape),
                "features": list(self.input.features),
                "window": self.input.window,
            },
            "outputs": {
                "kind": self.outputs.kind,
                "label": self.outputs.label,
                "scores": self.outputs.scores,
                "classes": None if self.outputs.classes is None else list(self.outputs.classes),
            },
            "model": {"file": MODEL_MEMBER, "sha256": self.sha256, "size": self.size},
            "provenance": self.provenance,
            "metrics": self.metrics,
            "self_test": None if st is None else {
                "inputs": [list(r) for r in st.inputs],
                "expected_labels": None if st.expected_labels is None
                else list(st.expected_labels),
                "expected_scores": None if st.expected_scores is None
                else [list(r) for r in st.expected_scores],
                "atol": st.atol,
                "rtol": st.rtol,
            },
        }
        ext: dict[str, Any] = {}
        if self.release is not None:  # absent from bundles made before it
            ext["release"] = self.release
        if self.reference is not None:  # drift reference: absent from older manifests
            ext["reference"] = self.reference
        if self.portable and ext:
            d["provenance"] = {**self.provenance, EXTENSIONS: ext}
        else:
            d.update(ext)
        return _jsonable(d, "")

    def to_json_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, compact separators, UTF-8, strict JSON (no NaN)."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """Validate every field; :class:`BundleFormatError` names the first bad key."""
        return _parse_manifest(d)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in memory."""

    manifest: Manifest
    model_bytes: bytes
    manifest_bytes: bytes
    signer: str | None  # key id of the verified signer; None when unsigned or not verified
    signature_bytes: bytes | None = None  # the exact signature.json, kept so a store can keep it


# --- JSON helpers ---------------------------------------------------------------------------
def _jsonable(value: Any, path: str) -> Any:
    """Plain JSON values only: tuples -> lists, numpy scalars/arrays unwrapped, str keys,
    finite floats. Raises BundleFormatError naming the path of anything else."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleFormatError(f"manifest {path or 'value'}: {value} is not finite")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BundleFormatError(f"manifest {path or 'value'}: key {k!r} is not a string")
            out[k] = _jsonable(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _jsonable(tolist(), path)
    raise BundleFormatError(
        f"manifest {path or 'value'}: {type(value).__name__} is not JSON-serialisable"
    )


_SAFE_NAME_RULE = "a safe name (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"


def _manifest_error(message: str, *, key: str | None, file: str | None) -> BundleFormatError:
    """The error factory for manifest fields: the message names the manifest key."""
    return BundleFormatError(f"manifest key {key!r}: {message}" if key else
                             f"manifest: {message}")


def _parse_input(t: Table) -> ModelInput:
    name = t.str("name", nonempty=True)
    dtype = t.choice("dtype", INPUT_DTYPES)
    dims = t.seq("shape")
    if len(dims) not in (2, 3):
        raise t.error("shape", f"expected 2 or 3 dimensions, got {len(dims)}")
    shape: list[int | None] = [dims.int(i, None, min=1) for i in range(len(dims))]
    features = t.list_of_str("features", nonempty=True, unique=True)
    window = t.int("window", None, min=1)
    t.finish()
    n = len(features)
    if window is None:
        if len(shape) != 2 or shape[1] not in (None, n):
            raise t.error("shape", f"{shape} does not fit {n} features per row "
                                   "(expected [null, n_features] for a sample model)")
    elif len(shape) == 2:
        if shape[1] not in (None, window * n):
            raise t.error("shape", f"{shape} does not fit a window of {window} x {n} "
                                   f"features (expected [null, {window * n}])")
    elif shape[1] not in (None, window) or shape[2] not in (None, n):
        raise t.error("shape", f"{shape} does not fit a window of {window} x {n} "
                               f"features (expected [null, {window}, {n}])")
    return ModelInput(name=name, dtype=dtype, shape=tuple(shape), features=features,
                      window=window)


def _parse_outputs(t: Table) -> ModelOutputs:
    kind = t.choice("kind", OUTPUT_KINDS)
    label = t.str("label", None, nonempty=True)
    scores = t.str("scores", None, nonempty=True)
    if label is None and scores is None:
        raise t.error(None, "at least one of 'label' and 'scores' must name an output")
    classes: tuple | None = None
    cs = t.seq("classes", None)
    if cs is not None:
        items = [cs.typed(i, (str, int), what="a string or integer") for i in range(len(cs))]
        if len(set(items)) != len(items):
            raise t.error("classes", "class labels must be unique")
        classes = tuple(items)
    t.finish()
    if kind == "classifier" and not classes:
        raise t.error("classes", "a classifier needs its class labels")
    return ModelOutputs(kind=kind, label=label, scores=scores, classes=classes)


def _parse_self_test(t: Table | None, model_input: ModelInput) -> SelfTest | None:
    if t is None:
        return None
    rows = t.seq("inputs")
    if not len(rows):
        raise t.error("inputs", "must hold at least one row")
    width = model_input.row_width
    inputs = []
    for i in range(len(rows)):
        r = rows.seq(i)
        if len(r) != width:
            raise rows.error(i, f"has {len(r)} values, the input takes {width}")
        inputs.append(tuple(r.number(j) for j in range(len(r))))
    labels: tuple | None = None
    ls = t.seq("expected_labels", None)
    if ls is not None:
        if len(ls) != len(inputs):
            raise t.error("expected_labels", f"has {len(ls)} entries for {len(inputs)} input rows")
        labels = tuple(ls.typed(i, (str, int, float), what="a string or number")
                       for i in range(len(ls)))
    scores: tuple | None = None
    ss = t.seq("expected_scores", None)
    if ss is not None:
        if len(ss) != len(inputs):
            raise t.error("expected_scores", f"has {len(ss)} rows for {len(inputs)} input rows")
        out = []
        for i in range(len(ss)):
            r = ss.seq(i)
            out.append(tuple(r.number(j) for j in range(len(r))))
        if len({len(r) for r in out}) > 1:
            raise t.error("expected_scores", "rows differ in length")
        scores = tuple(out)
    atol = t.number("atol", 1e-4, min=0)
    rtol = t.number("rtol", 1e-3, min=0)
    t.finish()
    return SelfTest(inputs=tuple(inputs), expected_labels=labels, expected_scores=scores,
                    atol=atol, rtol=rtol)


def _parse_manifest(d: Any) -> Manifest:
    t = Table(d, error=_manifest_error, mapping="object")
    # The version decides the schema, so check it before anything else.
    mv = t.int("manifest_version")
    if mv != MANIFEST_VERSION:
        raise BundleFormatError(
            f"unknown manifest_version {mv}: this edgeml reads version {MANIFEST_VERSION}"
        )
    name = t.str("name", pattern=_SAFE_NAME, what=_SAFE_NAME_RULE)
    version = t.str("version", pattern=_SAFE_NAME, what=_SAFE_NAME_RULE)
    created = t.str("created", nonempty=True)
    try:
        stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise t.error("created", f"{short_repr(created)} is not an ISO-8601 time") from None
    if stamp.tzinfo is None or stamp.utcoffset() != timezone.utc.utcoffset(None):
        raise t.error("created", f"{created!r} must be UTC (end in 'Z' or '+00:00')")
    description = t.str("description", "")
    model_input = _parse_input(t.table("input"))
    outputs = _parse_outputs(t.table("outputs"))
    model = t.table("model")
    file = model.value("file")
    if file != MODEL_MEMBER:
        raise model.error("file", f"must be {MODEL_MEMBER!r}, got {short_repr(file)}")
    sha = model.str("sha256")
    if not _SHA256_HEX.fullmatch(sha):
        raise model.error("sha256", f"expected 64 lowercase hex digits, got {short_repr(sha)}")
    size = model.int("size", min=1)
    model.finish()
    provenance = dict(t.mapping("provenance", {}))
    metrics = t.mapping("metrics", {})
    self_test = _parse_self_test(t.table("self_test", None), model_input)
    ext = None
    if EXTENSIONS in provenance:  # a portable manifest (docs/bundle-format.md)
        ext = Table(provenance.pop(EXTENSIONS), f"provenance.{EXTENSIONS}",
                    error=_manifest_error, mapping="object")
        for key in EXTENSION_KEYS:
            if key in ext and key in t:
                raise t.error(key, f"given twice: at the top level and in provenance."
                                   f"{EXTENSIONS}")

    def where(key: str) -> Table:
        return ext if ext is not None and key in ext else t

    release = where("release").int("release", None, min=0, max=MAX_RELEASE)  # anti-downgrade
    reference = _parse_reference(where("reference"), model_input)  # drift reference
    # Unknown top-level keys are a newer writer's optional additions: ignored with a warning
    # (a change an older reader must not ignore comes with a new manifest_version). Unknown
    # keys inside input, outputs, model and self_test stay refused: they say how the model is
    # fed, run and checked.
    ignored = t.unknown() + ([f"provenance.{EXTENSIONS}.{k}" for k in ext.unknown()]
                             if ext is not None else [])
    for key in ignored:
        log.warning("manifest key %r: unknown to this edgeml, ignored (a bundle from a newer "
                    "edgeml?)", key)
    return Manifest(
        name=name, version=version, created=created, input=model_input, outputs=outputs,
        sha256=sha, size=size, provenance=provenance, metrics=metrics, self_test=self_test,
        description=description, manifest_version=mv, release=release,
        reference=reference, portable=ext is not None, ignored=tuple(ignored),
    )


def _parse_reference(t: Table, model_input: ModelInput) -> dict | None:
    """The drift reference: checked enough that the device can bin against it."""
    ref = t.mapping("reference", None)
    if ref is None:
        return None
    r = t.table("reference")
    inputs = r.mapping("inputs", {})
    for f, col in inputs.items():
        if f not in model_input.features or not isinstance(col, dict):
            raise r.error(f"inputs.{f}", "not a feature of the model's input")
        edges, freq = col.get("edges"), col.get("freq")
        if (not isinstance(edges, list) or not isinstance(freq, list)
                or len(freq) != len(edges) + 1
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in [*edges, *freq, col.get("min"), col.get("max")])
                or any(edges[i + 1] < edges[i] for i in range(len(edges) - 1))):
            raise r.error(f"inputs.{f}", "needs sorted numeric 'edges', 'freq' with one more "
                                         "entry, 'min' and 'max'")
    r.mapping("outputs", {})
    return dict(ref)


# --- signatures -----------------------------------------------------------------------------
def _key_id(public_key: Ed25519PublicKey) -> str:
    from edgeml.keys import key_id

    return key_id(public_key)


def _signature_bytes(manifest_bytes: bytes, sign_key: Ed25519PrivateKey) -> bytes:
    doc = {
        "alg": SIGNATURE_ALG,
        "key_id": _key_id(sign_key.public_key()),
        "sig": base64.b64encode(sign_key.sign(manifest_bytes)).decode("ascii"),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parse_signature(raw: bytes) -> tuple[str, bytes]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError = huge integers
        raise BundleSignatureError(f"malformed {SIGNATURE_MEMBER}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) != {"alg", "key_id", "sig"}:
        raise BundleSignatureError(
            f"malformed {SIGNATURE_MEMBER}: expected exactly the keys alg, key_id, sig"
        )
    if doc["alg"] != SIGNATURE_ALG:
        raise BundleSignatureError(
            f"unsupported signature alg {doc['alg']!r} (only {SIGNATURE_ALG!r})"
        )
    kid = doc["key_id"]
    if not isinstance(kid, str) or not re.fullmatch(r"[0-9a-f]{16}", kid):
        raise BundleSignatureError(f"malformed {SIGNATURE_MEMBER}: bad key_id {kid!r}")
    try:
        sig = base64.b64decode(doc["sig"], validate=True)
    except (TypeError, binascii.Error) as exc:
        raise BundleSignatureError(f"malformed {SIGNATURE_MEMBER}: sig is not base64") from exc
    if len(sig) != 64:
        raise BundleSignatureError(
            f"malformed {SIGNATURE_MEMBER}: an Ed25519 signature has 64 bytes, got {len(sig)}"
        )
    return kid, sig


def _verify(
    manifest_bytes: bytes,
    signature_raw: bytes | None,
    trusted_keys: Sequence[Ed25519PublicKey],
    required: bool,
) -> str | None:
    if signature_raw is None:
        if required:
            raise BundleSignatureError(
                "bundle is unsigned but a signature is required (trusted keys are configured)"
            )
        return None
    kid, sig = _parse_signature(signature_raw)
    if not trusted_keys:
        if required:
            raise BundleSignatureError("a signature is required but no trusted keys were given")
        return None  # signed, but nothing to check it against: report it as unverified
    by_id = {_key_id(k): k for k in trusted_keys}
    key = by_id.get(kid)
    if key is None:
        raise BundleSignatureError(
            f"bundle is signed by key {kid}, which is not trusted "
            f"(trusted: {', '.join(sorted(by_id))})"
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature as exc:
        raise BundleSignatureError(
            f"bad signature by key {kid}: manifest.json was changed after signing "
            "or the signature is corrupt"
        ) from exc
    return kid


# --- writer ---------------------------------------------------------------------------------
def _zip_info(name: str, compress: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


def write_bundle(
    path: Path,
    manifest: Manifest,
    model_bytes: bytes,
    *,
    sign_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a bundle atomically (temp file in the same directory, fsync, rename).

    The manifest is validated by reading it back, and its sha256/size must match
    ``model_bytes``: the writer never produces a bundle its own reader would refuse.
    """
    path = Path(path)
    manifest_bytes = manifest.to_json_bytes()
    Manifest.from_dict(json.loads(manifest_bytes))
    actual = sha256_hex(model_bytes)
    if actual != manifest.sha256 or len(model_bytes) != manifest.size:
        raise BundleIntegrityError(
            f"manifest says model.onnx has sha256 {manifest.sha256} and {manifest.size} bytes, "
            f"the model given has {actual} and {len(model_bytes)} bytes"
        )
    members = [
        (MANIFEST_MEMBER, manifest_bytes),
        (MODEL_MEMBER, bytes(model_bytes)),
    ]
    if sign_key is not None:
        members.append((SIGNATURE_MEMBER, _signature_bytes(manifest_bytes, sign_key)))

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, mode=0o644) as fh, zipfile.ZipFile(fh, "w") as zf:
        for name, data in members:
            zf.writestr(_zip_info(name, zipfile.ZIP_DEFLATED), data)
    return path


# --- reader ---------------------------------------------------------------------------------
def _check_member_name(name: str) -> None:
    if "\\" in name:
        raise BundleFormatError(f"refusing member {name!r}: backslash in path")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BundleFormatError(f"refusing member {name!r}: absolute path")
    if ".." in name.split("/"):
        raise BundleFormatError(f"refusing member {name!r}: path traversal ('..')")
    if "\x00" in name:
        raise BundleFormatError(f"refusing member {name!r}: NUL in name")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read one member without ever holding more than ``limit`` bytes (zip bombs)."""
    if info.file_size > limit:
        raise BundleFormatError(
            f"member {info.filename!r} declares {info.file_size} bytes, over the limit of {limit}"
        )
    buf = bytearray()
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(_READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise BundleFormatError(
                        f"member {info.filename!r} inflates past the limit of {limit} bytes"
                    )
    except BundleFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError,
            NotImplementedError) as exc:
        raise BundleFormatError(
            f"member {info.filename!r} is corrupt or truncated: {exc}"
        ) from exc
    if len(buf) != info.file_size:
        raise BundleFormatError(
            f"member {info.filename!r} has {len(buf)} bytes, its header says {info.file_size}"
        )
    return bytes(buf)


def read_bundle(
    source: Path | bytes,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] = (),
    require_signature: bool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Bundle:
    """Read and verify a bundle from a file or from bytes.

    ``require_signature=None`` means "required when trusted keys are given". A signed bundle
    read without trusted keys is accepted as unverified (``signer`` is None).
    """
    required = bool(trusted_keys) if require_signature is None else require_signature
    label = "bundle" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            zf = zipfile.ZipFile(io.BytesIO(bytes(source)))
        else:
            zf = zipfile.ZipFile(os.fspath(source))
    except FileNotFoundError as exc:
        raise BundleFormatError(f"{label}: no such file") from exc
    except IsADirectoryError as exc:
        raise BundleFormatError(f"{label}: is a directory, not a bundle file") from exc
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise BundleFormatError(
            f"{label}: not a zip file or truncated (no valid zip directory): {exc}"
        ) from exc
    except OSError as exc:
        raise BundleFormatError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    with zf:
        found: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            _check_member_name(info.filename)
            if info.filename in found:
                raise BundleFormatError(f"duplicate member {info.filename!r}")
            if info.filename not in _ALLOWED_MEMBERS:
                raise BundleFormatError(
                    f"unexpected member {info.filename!r} (a bundle holds only "
                    f"{', '.join(_ALLOWED_MEMBERS)})"
                )
            if info.flag_bits & 0x1:
                raise BundleFormatError(f"member {info.filename!r} is encrypted")
            found[info.filename] = info
        for required_member in (MANIFEST_MEMBER, MODEL_MEMBER):
            if required_member not in found:
                raise BundleFormatError(f"{label}: missing {required_member}")
        manifest_bytes = _read_member(
            zf, found[MANIFEST_MEMBER], min(max_bytes, MAX_MANIFEST_BYTES)
        )
        signature_raw = None
        if SIGNATURE_MEMBER in found:
            signature_raw = _read_member(zf, found[SIGNATURE_MEMBER], MAX_SIGNATURE_BYTES)
        # Authenticate the manifest before interpreting it.
        signer = _verify(manifest_bytes, signature_raw, trusted_keys, required)
        try:
            doc = json.loads(manifest_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # huge ints
            raise BundleFormatError(f"{MANIFEST_MEMBER} is not valid UTF-8 JSON: {exc}") from exc
        manifest = Manifest.from_dict(doc)
        model_bytes = _read_member(zf, found[MODEL_MEMBER], max_bytes)
    actual = sha256_hex(model_bytes)
    if actual != manifest.sha256:
        raise BundleIntegrityError(
            f"model.onnx sha256 {actual} does not match the manifest's {manifest.sha256}"
        )
    if len(model_bytes) != manifest.size:
        raise BundleIntegrityError(
            f"model.onnx has {len(model_bytes)} bytes, the manifest says {manifest.size}"
        )
    return Bundle(manifest=manifest, model_bytes=model_bytes, manifest_bytes=manifest_bytes,
                  signer=signer, signature_bytes=signature_raw)


# --- self-test ------------------------------------------------------------------------------
def self_test_array(manifest: Manifest) -> np.ndarray:
    """The self-test rows as the model's input tensor (float32, 3-D when the input is)."""
    import numpy as np

    if manifest.self_test is None:
        raise SelfTestError(f"{manifest.name} {manifest.version}: the manifest has no self-test")
    arr = np.asarray(manifest.self_test.inputs, dtype=np.float32)
    spec = manifest.input
    if len(spec.shape) == 3:
        arr = arr.reshape(len(arr), spec.window or 1, len(spec.features))
    return arr


def _label_matches(expected: Any, actual: Any, st: SelfTest) -> bool:
    if isinstance(actual, bytes):
        actual = actual.decode("utf-8", "replace")
    if isinstance(expected, str):
        return isinstance(actual, str) and actual == expected
    if isinstance(actual, (str, bool)):
        return False
    if isinstance(expected, int) and isinstance(actual, int):
        return actual == expected  # class labels: exact
    # Regressor outputs are floats (JSON may have stored 6.0 as 6): compare with tolerance.
    return abs(float(actual) - float(expected)) <= st.atol + st.rtol * abs(float(expected))


def check_self_test(manifest: Manifest, labels: Any, scores: Any) -> None:
    """Compare the model's outputs on the self-test rows with what the host recorded.

    ``labels`` and ``scores`` are the ONNX outputs named by ``manifest.outputs`` (either may
    be None when the manifest expects nothing of it). Raises SelfTestError naming the row,
    the column and by how much it missed.
    """
    import numpy as np

    st = manifest.self_test
    if st is None:
        return
    who = f"{manifest.name} {manifest.version}"
    n = len(st.inputs)
    if st.expected_labels is not None:
        if labels is None:
            raise SelfTestError(f"{who}: self-test expects labels but the model gave none")
        arr = np.asarray(labels)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1 or len(arr) != n:
            raise SelfTestError(
                f"{who}: self-test expects {n} labels, the model gave shape {arr.shape}"
            )
        for i, (want, got) in enumerate(zip(st.expected_labels, arr.tolist(), strict=True)):
            if not _label_matches(want, got, st):
                raise SelfTestError(
                    f"{who}: self-test row {i}: label {got!r}, expected {want!r}"
                )
    if st.expected_scores is not None:
        if scores is None:
            raise SelfTestError(f"{who}: self-test expects scores but the model gave none")
        got = np.asarray(scores, dtype=np.float64)
        if got.ndim == 1:
            got = got.reshape(-1, 1)
        want = np.asarray(st.expected_scores, dtype=np.float64)
        if got.shape != want.shape:
            raise SelfTestError(
                f"{who}: self-test expects scores of shape {want.shape}, got {got.shape}"
            )
        diff = np.abs(got - want)
        allowed = st.atol + st.rtol * np.abs(want)
        excess = np.where(np.isnan(diff), np.inf, diff - allowed)
        if (excess > 0).any():
            i, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
            raise SelfTestError(
                f"{who}: self-test row {i} score column {j}: got {got[i, j]:.6g}, expected "
                f"{want[i, j]:.6g} (|diff| {diff[i, j]:.3g} > allowed {allowed[i, j]:.3g} = "
                f"atol {st.atol:g} + rtol {st.rtol:g} x |expected|); "
                f"{int((excess > 0).sum())} of {want.size} values out of tolerance"
            )
