"""Damaged outbox files: detect them and move them aside so a fresh outbox can start.

SQLite keeps a committed transaction safe against a crash, not against a bad flash block or
a file overwritten by something else. Such a file may still open and fail later ("database
disk image is malformed"), or not open at all. The way out, for an operator or the daemon:

1. :func:`check_integrity` (or :meth:`Outbox.check_integrity` on an open outbox) lists the
   problems ``PRAGMA quick_check`` finds; empty means sound;
2. :func:`quarantine` renames ``outbox.db`` (with its ``-wal`` and ``-shm``) to
   ``outbox.db.damaged-<UTC timestamp>`` beside it, counting the records it still can, and
   returns a :class:`QuarantineReport`; the next ``Outbox(...)`` creates a fresh, empty file.

The records in the damaged file are not sent (they may be read by hand with ``sqlite3``:
the renamed file is a database with its WAL beside it). Drop counters and high-water marks
live in the same file and start again from zero, so the daemon should report the quarantine
(and the record count) upstream itself.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edgeml.errors import OutboxError
from edgeml.storage.fs import DirLock, fsync_dir
from edgeml.storage.outbox.store import LOCK_NAME, outbox_paths, quick_check

log = logging.getLogger("edgeml.storage.outbox")

DAMAGED_INFIX = ".damaged-"
_SIDE_FILES = ("-wal", "-shm")


@dataclass(frozen=True)
class QuarantineReport:
    """What :func:`quarantine` did. ``records`` is how many records the damaged file still
    showed (None when it could not be read at all; ``count_error`` says why); ``moved`` maps
    every file moved to its new path."""

    path: Path
    moved_to: Path
    moved: dict[Path, Path]
    records: int | None
    count_error: str | None
    problems: tuple[str, ...]


def _connect(db_path: Path) -> sqlite3.Connection:
    # a plain read-write open: a WAL database needs its -shm; nothing is written
    return sqlite3.connect(db_path, isolation_level=None, timeout=5.0)


def check_integrity(path: Path | str) -> list[str]:
    """Problems in the outbox file at ``path`` (its directory, the ``.db``, or a quarantined
    file), empty when it is sound or absent. Safe while an :class:`Outbox` has it open (a WAL
    reader). When nothing else has it open, closing folds a leftover WAL into the file, as
    opening an :class:`Outbox` would."""
    path = Path(path)
    db_path = path if path.is_file() else outbox_paths(path)[1]
    if not db_path.exists():
        return []
    try:
        db = _connect(db_path)
    except sqlite3.Error as exc:
        return [f"cannot open: {exc}"]
    try:
        return quick_check(db)
    finally:
        db.close()


def _count_records(db_path: Path) -> tuple[int | None, str | None]:
    try:
        db = _connect(db_path)
    except sqlite3.Error as exc:
        return None, str(exc)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "chunks" in tables:
            n = db.execute("SELECT COALESCE(SUM(count), 0) FROM chunks").fetchone()[0]
        elif "records" in tables:  # schema 1
            n = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        else:
            n = 0
        return int(n), None
    except sqlite3.Error as exc:
        return None, str(exc)
    finally:
        db.close()


def _free_name(db_path: Path, stamp: str) -> Path:
    base = db_path.with_name(f"{db_path.name}{DAMAGED_INFIX}{stamp}")
    target, k = base, 1
    while any(target.with_name(target.name + s).exists() for s in ("", *_SIDE_FILES)):
        k += 1
        target = base.with_name(f"{base.name}.{k}")
    return target


def quarantine(path: Path | str, *, now: float | None = None) -> QuarantineReport:
    """Move the outbox file at ``path`` (its directory or the ``.db``) aside as
    ``outbox.db.damaged-<YYYYmmddTHHMMSSZ>`` so that the next :class:`Outbox` starts empty.

    Takes the outbox's lock first: an :class:`OutboxError` ("in use by another process") if
    an :class:`Outbox` has it open, here or elsewhere; close it first. Does not check that
    the file is damaged (call :func:`check_integrity` for that); it reports what it finds in
    the moved file. The ``-wal`` file moves first and under the new name, so a fresh database
    never picks up the old one's log, and the moved pair stays one readable database.
    """
    directory, db_path = outbox_paths(path)
    if not db_path.exists():
        raise OutboxError(f"no outbox file to quarantine at {db_path}")
    try:
        lock = DirLock(directory, LOCK_NAME, record_pid=False)
    except BlockingIOError as exc:
        raise OutboxError(f"the outbox {directory} is in use by another process; close it "
                          "before quarantining its file") from exc
    except OSError as exc:
        raise OutboxError(f"cannot lock the outbox {directory}: {exc.strerror or exc}") \
            from exc
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        target = _free_name(db_path, stamp)
        moved: dict[Path, Path] = {}
        try:
            for suffix in (*_SIDE_FILES, ""):
                src = db_path.with_name(db_path.name + suffix)
                if src.exists():
                    dst = target.with_name(target.name + suffix)
                    os.rename(src, dst)
                    moved[src] = dst
            fsync_dir(directory)
        except OSError as exc:
            raise OutboxError(f"cannot move {db_path} aside: {exc.strerror or exc} "
                              f"(moved so far: {sorted(map(str, moved))})") from exc
    finally:
        lock.release()
    # inspected only once moved, as found: opening it may fold its WAL into it (SQLite
    # checkpoints when the last connection closes), which must not happen to outbox.db
    problems = tuple(check_integrity(target))
    records, count_error = _count_records(target)
    log.warning("outbox: moved %s aside to %s (%s record(s) in it%s; %d problem(s) found)",
                db_path, target.name, "?" if records is None else records,
                f"; unreadable: {count_error}" if count_error else "", len(problems))
    return QuarantineReport(db_path, target, moved, records, count_error, problems)
