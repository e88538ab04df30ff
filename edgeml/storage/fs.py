"""The file-system basics every store shares: write a file atomically, make a rename
durable, hold a directory against a second writer. One copy, so a fix lands everywhere."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


def atomic_write(path: str | Path, data: bytes, *, mode: int | None = None,
                 sync_dir: bool = True) -> None:
    """Temp file beside ``path`` (created with ``mode`` from the start, so a private key is
    never readable by others even for an instant), fsync, rename, fsync the directory: a
    reader sees the old file or the new one, never half of either."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_new(path: str | Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class DirLock:
    """An exclusive ``flock`` on ``directory/name``, released when closed (or when the process
    dies: a kill -9 never leaves a stale lock). ``wait=False`` fails at once with
    :class:`BlockingIOError` when another process holds it; the holder's pid is in the file."""

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
            raise BlockingIOError(exc.errno, f"{self.path} is held by pid {holder or '?'}") \
                from exc
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
