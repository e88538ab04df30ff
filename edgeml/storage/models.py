"""The on-device model store: ``data_dir/models/<name>/<version>/``.

Each version directory holds the bundle's exact ``manifest.json``, ``model.onnx`` and, when the
bundle was signed, ``signature.json``. Installs are atomic: files are written and fsynced in
``models/.tmp/<random>/`` and the directory is renamed into place, so a power cut leaves either
the whole version or nothing (leftovers in ``.tmp`` are removed the next time a store opens).
Names and versions are checked with :func:`edgeml.bundle.name_is_safe` at every entry point,
so nothing that arrives from the network can address a path outside the store.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeml.bundle import (
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    SIGNATURE_MEMBER,
    Bundle,
    Manifest,
    name_is_safe,
    read_bundle,
    sha256_hex,
)
from edgeml.errors import BundleError, BundleIntegrityError, StoreError
from edgeml.storage.fs import fsync_dir, locked, write_new

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
_NUM_SPLIT = re.compile(r"(\d+)")


def version_key(version: str) -> tuple:
    """Natural sort key: digit runs compare as numbers, so "2" < "10" and "1.9" < "1.10"."""
    parts = []
    for chunk in _NUM_SPLIT.split(version):
        if not chunk:
            continue
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return (tuple(parts), version)


@dataclass(frozen=True)
class InstalledModel:
    """One installed model version."""

    name: str
    version: str
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_MEMBER

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_MEMBER

    @property
    def signature_path(self) -> Path:
        return self.path / SIGNATURE_MEMBER

    @property
    def signed(self) -> bool:
        """True when the bundle carried a signature (verified at install if keys were set)."""
        return self.signature_path.is_file()

    def read_model(self) -> bytes:
        """The model bytes, re-checked against the manifest's sha256 (catches disk rot)."""
        try:
            data = self.model_path.read_bytes()
        except OSError as exc:
            raise StoreError(
                f"{self.name} {self.version}: cannot read {self.model_path}: {exc.strerror or exc}"
            ) from exc
        actual = sha256_hex(data)
        if actual != self.manifest.sha256:
            raise BundleIntegrityError(
                f"{self.name} {self.version}: stored model.onnx sha256 {actual} does not match "
                f"the manifest's {self.manifest.sha256} (disk corruption?); reinstall the bundle"
            )
        return data


def _check_name(kind: str, value: str) -> None:
    if not name_is_safe(value):
        raise StoreError(
            f"{kind} {value!r} is not a safe name (1-64 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit)"
        )


class ModelStore:
    """Install, list, find and remove model versions under ``root`` (``data_dir/models``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / TMP_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create model store {self.root}: {exc.strerror or exc}") \
                from exc
        with self._locked():
            self._clean_tmp()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # --- internals ----------------------------------------------------------------------
    def _locked(self) -> AbstractContextManager[None]:
        """Serialise writers across processes (the daemon and ``edgeml models``)."""
        return locked(self.root, LOCK_FILE)

    def _clean_tmp(self) -> None:
        tmp_root = self.root / TMP_DIR
        for entry in tmp_root.iterdir():
            log.info("removing leftover %s from an interrupted install or removal", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _new_tmp(self, tag: str) -> Path:
        return self.root / TMP_DIR / f"{tag}-{secrets.token_hex(8)}"

    def _dir(self, name: str, version: str) -> Path:
        _check_name("model name", name)
        _check_name("model version", version)
        return self.root / name / version

    def _load(self, name: str, version: str, path: Path) -> InstalledModel:
        try:
            raw = (path / MANIFEST_MEMBER).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"{name} {version}: {path} has no {MANIFEST_MEMBER}") from exc
        except OSError as exc:
            raise StoreError(f"{name} {version}: cannot read manifest: {exc.strerror or exc}") \
                from exc
        try:
            manifest = Manifest.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, BundleError) as exc:
            raise StoreError(f"{name} {version}: stored manifest is corrupt: {exc}") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"{path}: holds {manifest.name} {manifest.version}, not {name} {version}"
            )
        model = path / MODEL_MEMBER
        try:
            size = model.stat().st_size
        except OSError as exc:
            raise StoreError(f"{name} {version}: {model} is missing") from exc
        if size != manifest.size:
            raise BundleIntegrityError(
                f"{name} {version}: stored model.onnx has {size} bytes, the manifest says "
                f"{manifest.size} (disk corruption?); reinstall the bundle"
            )
        return InstalledModel(name=name, version=version, path=path, manifest=manifest)

    # --- public API ---------------------------------------------------------------------
    def install(
        self,
        source: Path | bytes | Bundle,
        *,
        trusted_keys: Sequence[Ed25519PublicKey] = (),
        require_signature: bool | None = None,
    ) -> InstalledModel:
        """Verify ``source`` (unless it is an already verified Bundle) and install it.

        Installing the same name and version with the same sha256 again returns the existing
        install; a different sha256 under an installed name and version is a StoreError
        (versions are immutable: bump the version instead).
        """
        if isinstance(source, Bundle):
            bundle = source
        else:
            bundle = read_bundle(
                source, trusted_keys=trusted_keys, require_signature=require_signature
            )
        m = bundle.manifest
        dest = self._dir(m.name, m.version)
        with self._locked():
            if dest.exists():
                existing = self._load(m.name, m.version, dest)
                if existing.manifest.sha256 == m.sha256:
                    return existing
                raise StoreError(
                    f"{m.name} {m.version} is already installed with a different model "
                    f"(sha256 {existing.manifest.sha256[:12]}..., new {m.sha256[:12]}...); "
                    "versions are immutable: give the new model a new version"
                )
            tmp = self._new_tmp("install")
            try:
                tmp.mkdir()
                write_new(tmp / MODEL_MEMBER, bundle.model_bytes)
                write_new(tmp / MANIFEST_MEMBER, bundle.manifest_bytes)
                if bundle.signature_bytes is not None:
                    write_new(tmp / SIGNATURE_MEMBER, bundle.signature_bytes)
                fsync_dir(tmp)
                name_dir = dest.parent
                if not name_dir.exists():
                    name_dir.mkdir()
                    fsync_dir(self.root)
                os.rename(tmp, dest)
                fsync_dir(name_dir)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(
                    f"cannot install {m.name} {m.version} into {self.root}: "
                    f"{exc.strerror or exc}"
                ) from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("installed %s %s (sha256 %s)", m.name, m.version, m.sha256[:12])
        return InstalledModel(name=m.name, version=m.version, path=dest, manifest=m)

    def get(self, name: str, version: str) -> InstalledModel:
        """The installed version, or StoreError when it is not installed."""
        path = self._dir(name, version)
        if not path.is_dir():
            raise StoreError(f"{name} {version} is not installed in {self.root}")
        return self._load(name, version, path)

    def names(self) -> builtins.list[str]:
        """Names that have at least one installed version, sorted."""
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot list {self.root}: {exc.strerror or exc}") from exc
        return [e.name for e in entries
                if e.is_dir() and name_is_safe(e.name) and self.versions(e.name)]

    def versions(self, name: str) -> builtins.list[str]:
        """Installed versions of ``name``, oldest first in natural order."""
        _check_name("model name", name)
        d = self.root / name
        if not d.is_dir():
            return []
        found = [e.name for e in d.iterdir()
                 if name_is_safe(e.name) and (e / MANIFEST_MEMBER).is_file()]
        return sorted(found, key=version_key)

    def list(self) -> builtins.list[InstalledModel]:
        """Every installed version, by name and then natural version order. A version whose
        files are damaged is logged and left out rather than hiding all the others."""
        out = []
        for name in self.names():
            for version in self.versions(name):
                try:
                    out.append(self._load(name, version, self.root / name / version))
                except (StoreError, BundleError) as exc:
                    log.warning("skipping damaged model: %s", exc)
        return out

    def remove(self, name: str, version: str) -> None:
        """Remove one version (StoreError when absent). The directory is first renamed into
        ``.tmp`` so a crash mid-delete never leaves a half version that looks installed."""
        path = self._dir(name, version)
        with self._locked():
            if not path.is_dir():
                raise StoreError(f"{name} {version} is not installed in {self.root}")
            trash = self._new_tmp("remove")
            try:
                os.rename(path, trash)
                fsync_dir(path.parent)
                shutil.rmtree(trash)
                try:
                    path.parent.rmdir()  # last version gone: drop the name directory too
                    fsync_dir(self.root)
                except OSError:
                    pass
            except OSError as exc:
                raise StoreError(
                    f"cannot remove {name} {version}: {exc.strerror or exc}"
                ) from exc
        log.info("removed %s %s", name, version)

    def prune(self, name: str, keep: int, protect: Collection[str] = ()) -> builtins.list[str]:
        """Remove all but the newest ``keep`` versions of ``name``, never one in ``protect``
        (the versions a running pipeline uses). Returns the removed versions, oldest first."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise StoreError(f"prune keep must be an integer >= 0, got {keep!r}")
        versions = self.versions(name)
        newest = set(versions[max(0, len(versions) - keep):]) if keep else set()
        removed = []
        for v in versions:
            if v in newest or v in protect:
                continue
            self.remove(name, v)
            removed.append(v)
        return removed
