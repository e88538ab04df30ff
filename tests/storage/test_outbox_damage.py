"""A damaged outbox file: found by check_integrity, moved aside by quarantine, and a fresh
outbox starts in its place. The damage is real: bytes overwritten in the middle (or at the
head) of an outbox database that real records were written to and checkpointed."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from edgeml.errors import OutboxError
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.outbox import (
    DB_NAME,
    Outbox,
    QuarantineReport,
    check_integrity,
    quarantine,
    record_id,
)

LABELS = load_basicmotions("TEST").y
N = 3000
PAGE = 4096


def _item(seq: int) -> tuple[str, str, dict]:
    rid = record_id("watch-01", "activity", seq, "activity", "1", "results")
    return "results", rid, {
        "id": f"in-{seq:06d}", "topic": "sensors/watch-01/imu", "pipeline": "activity",
        "model": "activity", "version": "1",
        "output": {"label": LABELS[seq % len(LABELS)], "scores": [0.125, 0.25, 0.5, 0.125]},
        "policy": "champion", "fallback": False, "latency_ms": 1.5, "ts": 1700000000.25,
        "input_seq": seq,
    }


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """An outbox directory holding N records in small chunks (many B-tree pages), closed."""
    d = tmp_path / "outbox"
    with Outbox(d, chunk_max_records=10) as ob:
        for start in range(0, N, 100):
            ob.put_many([_item(i) for i in range(start, start + 100)], marks={"activity": start})
        assert ob.stats()["backlog"] == N
        assert ob.check_integrity() == []
    assert not (d / (DB_NAME + "-wal")).exists() or (d / (DB_NAME + "-wal")).stat().st_size == 0
    return d


def _overwrite(path: Path, offset: int, nbytes: int) -> None:
    rnd = random.Random(20240601)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(rnd.getrandbits(8) for _ in range(nbytes)))
        fh.flush()
        os.fsync(fh.fileno())


def test_a_sound_outbox_has_no_problems(filled: Path):
    assert check_integrity(filled) == []
    assert check_integrity(filled / DB_NAME) == []
    assert check_integrity(filled.parent / "absent") == []
    with Outbox(filled) as ob:
        assert ob.check_integrity() == []


def test_overwritten_middle_is_found_and_moved_aside(filled: Path):
    db = filled / DB_NAME
    size = db.stat().st_size
    assert size > 64 * PAGE
    _overwrite(db, size // 2 // PAGE * PAGE, 3 * PAGE)  # three whole pages in the middle

    # such a file still opens (the damage is in pages the open does not read) ...
    with Outbox(filled) as ob:
        assert ob.stats()["backlog"] == N
        problems = ob.check_integrity()
        assert problems, "quick_check missed three pages of random bytes"
        # ... and quarantine refuses while it is open
        with pytest.raises(OutboxError, match="in use by another process"):
            quarantine(filled)
    assert check_integrity(filled) == problems

    rep = quarantine(filled, now=1_700_000_000)
    assert isinstance(rep, QuarantineReport)
    assert rep.moved_to == filled / f"{DB_NAME}.damaged-20231114T221320Z"
    assert rep.moved[db] == rep.moved_to and rep.moved_to.exists()
    assert not db.exists()
    assert rep.problems == tuple(problems)
    # the count comes from what can still be read: exact here, or None with the reason
    assert rep.records == N or (rep.records is None and rep.count_error)

    # a fresh outbox starts in its place; the damaged file is left for inspection
    with Outbox(filled) as ob:
        assert ob.stats()["backlog"] == 0 and ob.marks() == {}
        assert ob.put_many([_item(i) for i in range(10)]).stored == 10
        assert ob.check_integrity() == []
    assert rep.moved_to.read_bytes()[:16] == b"SQLite format 3\x00"

    # a second quarantine in the same second does not overwrite the first
    rep2 = quarantine(filled, now=1_700_000_000)
    assert rep2.moved_to != rep.moved_to and rep.moved_to.exists() and rep2.moved_to.exists()
    assert rep2.records == 10 and rep2.problems == ()


def test_overwritten_header_does_not_open_and_is_moved_aside(filled: Path):
    db = filled / DB_NAME
    _overwrite(db, 0, 100)  # the database header: not recognisable as SQLite any more
    with pytest.raises(OutboxError, match="cannot open the outbox"):
        Outbox(filled)
    problems = check_integrity(filled)
    assert problems and any("not a database" in p for p in problems)
    rep = quarantine(db)  # the .db path works as well as the directory
    assert rep.records is None and "not a database" in rep.count_error
    with Outbox(filled) as ob:
        assert ob.stats()["backlog"] == 0


def test_quarantine_moves_the_wal_with_the_database(tmp_path: Path):
    """Records committed only to the WAL stay with the damaged file (same base name), and a
    fresh database never sees the old WAL."""
    d = tmp_path / "outbox"
    ob = Outbox(d)
    ob.put_many([_item(i) for i in range(50)])
    # a crash: the connection never checkpoints; copy the files as a kill -9 would leave them
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in os.listdir(d):
        if name.startswith(DB_NAME):
            (crashed / name).write_bytes((d / name).read_bytes())
    ob.close()
    assert (crashed / (DB_NAME + "-wal")).stat().st_size > 0
    rep = quarantine(crashed)
    wal = rep.moved_to.with_name(rep.moved_to.name + "-wal")
    assert rep.moved[crashed / (DB_NAME + "-wal")] == wal
    assert not (crashed / (DB_NAME + "-wal")).exists()
    assert rep.records == 50
    # the moved pair still opens as one database with the WAL's records
    con = sqlite3.connect(rep.moved_to)
    try:
        assert con.execute("SELECT SUM(count) FROM chunks").fetchone()[0] == 50
    finally:
        con.close()
    with Outbox(crashed) as fresh:
        assert fresh.stats()["backlog"] == 0


def test_quarantine_without_a_file(tmp_path: Path):
    with pytest.raises(OutboxError, match="no outbox file"):
        quarantine(tmp_path / "outbox")
