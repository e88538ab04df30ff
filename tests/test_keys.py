"""Ed25519 key files and ``edgeml keygen``."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edgeml.cli import main
from edgeml.keys import (
    KeyFileError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
)


def test_generate_writes_pem_pair_with_private_mode_0600(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "release")
    assert (priv.name, pub.name) == ("release.key", "release.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(priv), load_public_key(pub)
    assert re.fullmatch(r"[0-9a-f]{16}", key_id(public))
    assert key_id(private) == key_id(public)
    public.verify(private.sign(b"manifest"), b"manifest")  # a real matching pair
    assert [key_id(k) for k in load_trusted_keys([pub, str(pub)])] == [key_id(public)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.key", "release.pub"]


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    before = key_id(load_public_key(pub))
    with pytest.raises(KeyFileError, match=r"k\.key: exists; refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    assert key_id(load_public_key(pub)) == before
    generate_keypair(tmp_path / "k", overwrite=True)
    assert key_id(load_public_key(pub)) != before
    assert key_id(load_private_key(priv)) == key_id(load_public_key(pub))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(KeyFileError, match=r"k\.key: holds a private key"):
        load_public_key(priv)
    with pytest.raises(KeyFileError, match=r"k\.pub: holds a public key"):
        load_private_key(pub)
    with pytest.raises(KeyFileError, match=r"absent\.pub: no such key file"):
        load_public_key(tmp_path / "absent.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(junk)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(rsa_pub)


def test_keygen_cli(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "release"
    assert main(["keygen", "-o", str(prefix)]) == 0
    out = capsys.readouterr().out
    kid = key_id(load_public_key(tmp_path / "release.pub"))
    assert kid in out
    assert main(["keygen", "-o", str(prefix)]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "--force" in err
    assert key_id(load_public_key(tmp_path / "release.pub")) == kid
    assert main(["keygen", "-o", str(prefix), "--force"]) == 0
    assert key_id(load_public_key(tmp_path / "release.pub")) != kid
    assert main(["keygen", "-o", str(tmp_path / "nodir" / "k")]) == 1
    assert "directory does not exist" in capsys.readouterr().err
