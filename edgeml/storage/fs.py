"""The file-system basics every store shares: write a file atomically, make a rename
durable, hold a directory against a second writer. One copy, so a fix lands everywhere."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make a create, rename or unlink inside ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, *, mode: int | None = None,
                sync_dir: bool = True) -> Iterator[BinaryIO]:
    """:func:`atomic_write` for a writer that streams (a zip, a large JSON): write to the
    yielded binary file; on a clean exit it is fsynced and renamed over ``path``, on an
    exception the temp file is removed and ``path`` is untouched. Without ``mode`` the file
    is created 0600 (``mkstemp``'s mode): give ``mode=0o644`` for a file others read."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes, *, mode: int | None = None,
                 sync_dir: bool = True) -> None:
    """Temp file beside ``path`` (created with ``mode`` from the start, so a private key is
    never readable by others even for an instant), fsync, rename, fsync the directory: a
    reader sees the old file or the new one, never half of either. The temp file's name
    starts with ``.`` and ends with ``.tmp`` (stores remove such leftovers at open)."""
    with atomic_open(path, mode=mode, sync_dir=sync_dir) as fh:
        fh.write(data)


def write_new(path: str | Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class LockHeldError(BlockingIOError):
    """:class:`DirLock` with ``wait=False``: another process holds the lock; ``holder`` is the
    pid it recorded (``"?"`` when it recorded none)."""

    def __init__(self, errno: int, message: str, holder: str) -> None:
        super().__init__(errno, message)
        self.holder = holder


class DirLock:
    """An exclusive ``flock`` on ``directory/name``, released when closed (or when the process
    dies: a kill -9 never leaves a stale lock). ``wait=False`` fails at once with
    :class:`LockHeldError` (a :class:`BlockingIOError`) when another process holds it; the
    holder's pid is in the file and on the error."""

    def __init__(self, directory: str | Path, name: str = ".lock", *, wait: bool = False,
                 record_pid: bool = True) -> None:
        self.path = Path(directory) / name
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            holder = os.read(self._fd, 32).decode("ascii", "replace").strip()
            os.close(self._fd)
            self._fd = None
            raise LockHeldError(exc.errno, f"{self.path} is held by pid {holder or '?'}",
                                holder or "?") from exc
        if record_pid:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(directory: str | Path, name: str = ".lock") -> Iterator[None]:
    """Serialise writers across processes for the duration of a block (waits its turn)."""
    lock = DirLock(directory, name, wait=True, record_pid=False)
    try:
        yield
    finally:
        lock.release()
