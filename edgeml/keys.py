"""Ed25519 key pairs for signing bundles.

The private key (``PREFIX.key``) stays on the host that builds bundles; the public key
(``PREFIX.pub``) goes into every device's ``trusted_keys``. A key is named by its key id, the
first 16 hex digits of the sha256 of the raw 32-byte public key, which is what
``signature.json`` records and what error messages show.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgeml.errors import KeyFileError
from edgeml.storage.fs import atomic_write

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_MAX_KEY_FILE = 64 * 1024



def key_paths(prefix: Path) -> tuple[Path, Path]:
    """``(PREFIX.key, PREFIX.pub)``; the suffix is appended, never substituted."""
    prefix = Path(prefix)
    return (prefix.with_name(prefix.name + PRIVATE_SUFFIX),
            prefix.with_name(prefix.name + PUBLIC_SUFFIX))


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256(raw public key). A private key gives its public key's id."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(prefix: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (PEM PKCS8, mode 0600) and ``PREFIX.pub`` (PEM SubjectPublicKeyInfo).

    Refuses to replace an existing file unless ``overwrite``: losing a signing key silently
    would leave every device trusting a key nobody holds.
    """
    priv_path, pub_path = key_paths(prefix)
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise KeyFileError("exists; refusing to overwrite (use --force)", file=str(p))
    if not priv_path.parent.is_dir():
        raise KeyFileError("directory does not exist", file=str(priv_path.parent))
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # created with its mode: the private key is never readable by others, even briefly
        atomic_write(priv_path, priv_pem, mode=0o600)
        atomic_write(pub_path, pub_pem, mode=0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write key: {exc.strerror or exc}", file=str(prefix)) from exc
    return priv_path, pub_path


def _read(path: Path) -> bytes:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError as exc:
        raise KeyFileError("no such key file", file=str(path)) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror or exc}", file=str(path)) from exc
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError("too large to be a key file", file=str(path))
    return data


def load_private_key(path: Path, *, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM (PKCS8) file written by ``edgeml keygen``."""
    data = _read(path)
    if b"PUBLIC KEY-----" in data:
        raise KeyFileError("holds a public key; signing needs the private .key file",
                           file=str(path))
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        raise KeyFileError(f"cannot load private key: {exc}", file=str(path)) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("not a PEM private key", file=str(path)) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"is a {type(key).__name__}, not an Ed25519 private key",
                           file=str(path))
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    data = _read(path)
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError("holds a private key; give the public .pub file (never copy the "
                           "private key to a device)", file=str(path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError("not a PEM public key", file=str(path)) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"is a {type(key).__name__}, not an Ed25519 public key",
                           file=str(path))
    return key


def load_trusted_keys(paths: Iterable[Path | str]) -> list[Ed25519PublicKey]:
    """Load every public key in ``paths`` (the config's ``trusted_keys``), in order."""
    return [load_public_key(Path(p)) for p in paths]
