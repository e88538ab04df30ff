"""The durable outbox on its own: order, idempotence, atomicity, bounds, restarts, crashes,
chunks (one row per stream and write) and the migration from one row per record."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgpack
import pytest

from edgeml.errors import ConfigError, OutboxError
from edgeml.host.datasets import load_basicmotions
from edgeml.storage import outbox as outbox_mod
from edgeml.storage.outbox import (
    CHUNK_MAX_RECORDS,
    DEFAULT_STREAMS,
    Outbox,
    StreamPolicy,
    chunk_bytes,
    chunk_id,
    pack_record,
    record_id,
)

HERE = Path(__file__).resolve().parent  # this directory: child processes import its modules
DEVICE = "watch-01"
LABELS = load_basicmotions("TEST").y  # real activity labels for realistic records


def output_record(seq: int, version: str = "1", *, label: str | None = None) -> dict:
    """A record with the brief's output fields (labels from the real data set unless given)."""
    label = label or LABELS[seq % len(LABELS)]
    return {
        "id": f"in-{seq:06d}", "topic": f"sensors/{DEVICE}/imu", "pipeline": "activity",
        "model": "activity", "version": version,
        "output": {"label": label, "scores": [0.125, 0.25, 0.5, 0.125]},
        "policy": "champion", "fallback": False, "latency_ms": 1.5, "ts": 1700000000.25,
        "input_seq": seq,
    }


def item(seq: int, version: str = "1", stream: str = "results",
         label: str | None = None) -> tuple[str, str, dict]:
    rid = record_id(DEVICE, "activity", seq, "activity", version, stream)
    return stream, rid, output_record(seq, version, label=label)


def uniform(seq: int, stream: str = "results") -> tuple[str, str, dict]:
    """Same size for every seq (6 digits, one label): for counts that are easy to state."""
    return item(seq, stream=stream, label="Walking")


def chunk_size(its: list[tuple[str, str, dict]]) -> int:
    """What a chunk of these records (one stream) is charged."""
    payload = b"".join(pack_record(rid, rec) for _, rid, rec in its)
    return chunk_bytes(its[0][0], chunk_id(its[0][1], len(its)), payload)


def size_of(it: tuple[str, str, dict]) -> int:
    return chunk_size([it])


def record_size() -> int:
    return size_of(uniform(100000))


def simulate(calls: list[list[tuple[str, str, dict]]], budget: int,
             policy: str) -> tuple[list[str], int]:
    """The policy on one stream, by hand, chunk by chunk: each call's records are one chunk
    (split at CHUNK_MAX_RECORDS); drop_oldest evicts whole older chunks, and of a chunk larger
    than the budget keeps the newest records that fit as one chunk; refuse_new stores a chunk
    that does not fit whole record by record. Returns (ids kept in order, records dropped or
    refused)."""
    stored: list[list[tuple[str, str, dict]]] = []
    used = lost = 0
    for call in calls:
        todo = [call[i:i + CHUNK_MAX_RECORDS] for i in range(0, len(call), CHUNK_MAX_RECORDS)]
        while todo:
            chunk = todo.pop(0)
            size = chunk_size(chunk)
            if used + size > budget:
                evictable = used if policy == "drop_oldest" else 0
                if size > budget or used - evictable + size > budget:
                    tail = next((chunk[j:] for j in range(1, len(chunk))
                                 if chunk_size(chunk[j:]) <= budget), None)
                    if policy == "drop_oldest" and tail:
                        lost += len(chunk) - len(tail)
                        todo.insert(0, tail)
                    elif len(chunk) > 1:
                        todo[:0] = [[it] for it in chunk]
                    else:
                        lost += 1
                    continue
                while used + size > budget:
                    gone = stored.pop(0)
                    used -= chunk_size(gone)
                    lost += len(gone)
            stored.append(chunk)
            used += size
    return [rid for chunk in stored for _, rid, _ in chunk], lost


def drain(ob: Outbox, stream: str) -> list[str]:
    ids = []
    while batch := ob.next_batch(stream, max_records=50, max_bytes=1 << 20):
        ids += [rid for c in batch for rid in c.record_ids()]
        assert ob.ack(batch) == sum(c.count for c in batch)
    return ids


def rows(ob: Outbox) -> list[tuple[str, int]]:
    """(stream, count) of every stored row, in order."""
    return ob._db.execute("SELECT stream, count FROM chunks ORDER BY seq").fetchall()


def test_record_id_is_stable_and_unambiguous():
    assert record_id("watch-01", "activity", 1234, "activity", "2", "results") == \
        "watch-01/activity/1234/activity/2/results"
    # a slash inside a part cannot make two different records share an id
    assert record_id("a/b", "c", 1, "m", "1", "results") != \
        record_id("a", "b/c", 1, "m", "1", "results")


def test_put_next_batch_ack_in_order(tmp_path: Path):
    with Outbox(tmp_path / "outbox", chunk_max_records=10) as ob:
        res = ob.put_many([item(i) for i in range(100000, 100120)])
        assert (res.stored, res.duplicates, res.refused) == (120, 0, 0)
        assert rows(ob) == [("results", 10)] * 12  # one write, capped chunks
        batch = ob.next_batch("results", max_records=55, max_bytes=1 << 20)
        assert [c.count for c in batch] == [10] * 5  # whole chunks, up to the limit
        assert [rid for c in batch for rid in c.record_ids()] == \
            [item(i)[1] for i in range(100000, 100050)]
        rid, rec = item(100000)[1:]
        assert batch[0].records()[0] == {"record_id": rid, **rec}
        # max_bytes bounds the batch, but the first chunk always comes, whole
        small = ob.next_batch("results", max_records=5, max_bytes=1)
        assert [c.count for c in small] == [10]
        assert ob.ack(batch) == 50
        st = ob.stats()
        assert st["streams"]["results"]["backlog"] == 70
        assert st["backlog"] == 70
        assert st["streams"]["results"]["oldest_unsynced_age_s"] >= 0
        assert st["streams"]["outputs"]["oldest_unsynced_age_s"] is None
        assert drain(ob, "results") == [item(i)[1] for i in range(100050, 100120)]
        assert ob.stats()["bytes_used"] == 0


def test_replayed_records_are_not_duplicated(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_many([item(i) for i in range(100000, 100010)])
        res = ob.put_many([item(i) for i in range(100005, 100015)])  # half are replays
        assert (res.stored, res.duplicates) == (5, 5)
        assert ob.put(*item(100003)) is True  # already there: accepted, not stored twice
        res = ob.put_many([item(100020), item(100020)])  # twice in one write: stored once
        assert (res.stored, res.duplicates) == (1, 1)
        assert ob.stats()["backlog"] == 16
        assert ob.stats()["bytes_used"] == (
            chunk_size([item(i) for i in range(100000, 100010)])
            + chunk_size([item(i) for i in range(100010, 100015)]) + size_of(item(100020)))
        assert drain(ob, "results") == [item(i)[1] for i in [*range(100000, 100015), 100020]]


def test_marks_commit_with_the_records_and_never_go_back(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_many([item(100000)], marks={"activity": 100000})
        ob.put_many([], marks={"activity": 99990, "gait": 7})  # an older mark is ignored
        with pytest.raises(OutboxError):
            ob.put_many([item(100001), ("nope", "y/1", {})], marks={"activity": 100001})
        assert ob.marks() == {"activity": 100000, "gait": 7}
    with Outbox(tmp_path / "outbox") as again:
        assert again.marks() == {"activity": 100000, "gait": 7}


def test_an_unencodable_record_is_refused_alone(tmp_path: Path):
    """Encoded before the transaction: the bad record is counted, its neighbours stored."""
    with Outbox(tmp_path / "outbox") as ob:
        bad = [("results", "x/1", {"value": object()}), ("outputs", "x/2", {"id": 2**70})]
        res = ob.put_many([item(100000), *bad, item(100001)], marks={"activity": 100001})
        assert res.stored == 2
        assert ob.stats()["unencodable"] == 2 and ob.stats()["backlog"] == 2
        assert ob.marks() == {"activity": 100001}
        got = [r["input_seq"] for c in ob.next_batch("results", max_records=10,
                                                    max_bytes=2**20) for r in c.records()]
        assert got == [100000, 100001]


def test_put_many_is_all_or_nothing(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        with pytest.raises(OutboxError, match="unknown stream 'nope'"):
            ob.put_many([item(100001), ("nope", "y/1", {})])
        with pytest.raises(OutboxError, match="reserved"):
            ob.put_many([item(100002), ("results", "z/1", {"record_id": "mine"})])
        assert ob.stats()["backlog"] == 0


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="on_full"):
        StreamPolicy("results", 2, "drop_newest")
    with pytest.raises(ConfigError, match="stream name"):
        StreamPolicy("a/b", 1)
    with pytest.raises(ConfigError, match="budget_bytes"):
        Outbox(Path("/nonexistent-never-created"), budget_bytes=0)


def test_backlog_and_counters_survive_reopen(tmp_path: Path):
    budget = 10 * record_size()
    ob = Outbox(tmp_path / "outbox", budget_bytes=budget)
    for start in range(100000, 100025, 5):  # chunks of 5; the oldest are evicted
        ob.put_many([uniform(i) for i in range(start, start + 5)])
    ob.put_many([uniform(i, "outputs") for i in range(100000, 100003)])
    with pytest.raises(OutboxError, match="in use"):
        Outbox(tmp_path / "outbox")  # a second opener would corrupt the accounting
    before = ob.stats()
    ob.close()
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as again:
        after = again.stats()
        for key in ("backlog", "bytes_used", "dropped", "refused"):
            assert after[key] == before[key]
        assert after["dropped"] > 0
        assert drain(again, "outputs") == [uniform(i, "outputs")[1]
                                           for i in range(100000, 100003)]
        assert drain(again, "results")[-1] == uniform(100024)[1]


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_new"])
def test_budget_policy_counts_exactly(tmp_path: Path, policy: str):
    streams = {**DEFAULT_STREAMS, "results": StreamPolicy("results", 2, policy)}
    items = [item(i) for i in range(100000, 100130)]  # real labels: sizes differ
    budget = 40 * record_size()
    calls = [items[i:i + 13] for i in range(0, len(items), 13)]
    kept, lost = simulate(calls, budget, policy)
    assert lost > 60
    with Outbox(tmp_path / "outbox", budget_bytes=budget, streams=streams) as ob:
        stored = evicted = refused = 0
        for call in calls:
            res = ob.put_many(call)
            stored, evicted, refused = (stored + res.stored, evicted + res.evicted,
                                        refused + res.refused)
            assert ob.stats()["bytes_used"] <= budget
            if policy == "refuse_new":
                assert res.evicted == 0
        st = ob.stats()["streams"]["results"]
        key, other = ("dropped", "refused") if policy == "drop_oldest" else ("refused", "dropped")
        assert (st[key], st[other]) == (lost, 0)
        assert st["backlog"] == len(kept) == sum(n for _, n in rows(ob))
        assert stored - evicted == len(kept) and evicted + refused == lost
        if policy == "drop_oldest":  # whole chunks went: every row left holds one write
            assert {n for _, n in rows(ob)} == {13}
        assert drain(ob, "results") == kept
        report = ob.take_drop_report()
        assert report["streams"]["results"][key] == lost
        assert report["streams"]["results"][f"{key}_total"] == lost
        ob.ack_drop_report(report)
        assert ob.take_drop_report() is None
        assert not ob.has_unreported_drops
        ob.put_many(items[:100])  # new losses are reported as a delta, totals keep growing
        again = ob.take_drop_report()["streams"]["results"]
        assert again[f"{key}_total"] == lost + again[key] > lost


def test_full_outbox_gives_room_to_higher_priority_streams(tmp_path: Path):
    results = [[uniform(i) for i in range(start, start + 5)] for start in range(100000, 100020, 5)]
    outputs = [uniform(i, "outputs") for i in range(100000, 100005)]
    budget = 4 * chunk_size(results[0]) + chunk_size(results[0]) // 2
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as ob:
        for call in results:  # four writes of 5 results: four chunks fill the budget
            ob.put_many(call)
        res = ob.put_many(outputs)
        # outputs take room from results: the oldest results chunk goes whole, 5 records
        assert (res.stored, res.evicted) == (5, 5)
        ob.put_many([uniform(i) for i in range(100020, 100025)])
        st = ob.stats()["streams"]
        assert st["outputs"]["backlog"] == 5  # ...but results never evict outputs
        assert st["results"]["dropped"] == 10 and st["outputs"]["dropped"] == 0
        assert st["results"]["backlog"] == 15
        assert ob.stats()["bytes_used"] <= budget
        # alerts (refuse_new) never lose what they hold; they too take room from results
        alert = ("alerts", "watch-01/alert/1", {"kind": "test", "ts": 1.0})
        assert ob.put(*alert)
        st = ob.stats()["streams"]
        assert st["alerts"]["backlog"] == 1
        kept = st["results"]["backlog"]
        assert kept + st["results"]["dropped"] == 25 and kept % 5 == 0
        assert ob.stats()["bytes_used"] <= budget
        assert drain(ob, "results") == [uniform(i)[1] for i in range(100025 - kept, 100025)]


def test_records_in_flight_are_never_evicted(tmp_path: Path):
    calls = [[uniform(i) for i in range(start, start + 2)] for start in range(100000, 100030, 2)]
    with Outbox(tmp_path / "outbox", budget_bytes=5 * chunk_size(calls[0]) + 10) as ob:
        for call in calls[:5]:
            ob.put_many(call)  # five chunks of two fill the budget
        in_flight = ob.next_batch("results", max_records=4, max_bytes=1 << 20)
        assert [c.count for c in in_flight] == [2, 2]
        for call in calls[5:]:
            ob.put_many(call)  # 20 more: only the three chunks not in flight can go
        st = ob.stats()["streams"]["results"]
        assert (st["backlog"], st["dropped"], st["refused"]) == (10, 20, 0)
        assert ob.ack(in_flight) == 4  # still stored: delivered records are not "dropped"
        rest = drain(ob, "results")
        assert rest == [uniform(i)[1] for i in range(100024, 100030)]


def test_disk_use_stays_near_the_budget_and_shrinks_when_drained(tmp_path: Path):
    budget = 2 * 2**20
    outbox_dir = tmp_path / "data" / "outbox"
    sentinel = tmp_path / "data" / "rawlog" / "keep.bin"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_bytes(b"x" * 1000)
    with Outbox(outbox_dir, budget_bytes=budget) as ob:
        for start in range(100000, 112000, 64):
            ob.put_many([item(i, v) for i in range(start, start + 32) for v in ("1", "2")])
        st = ob.stats()
        assert st["bytes_used"] <= budget
        assert st["dropped"] > 0
        # the records account for the file: database within 25% of the budget, WAL bounded
        assert os.path.getsize(outbox_dir / "outbox.db") <= budget * 1.25
        assert st["file_bytes"] <= budget * 1.25 + 512 * 1024
        drain(ob, "results")
        assert ob.stats()["file_bytes"] < budget / 2  # free pages went back to the disk
    # nothing outside the outbox directory was written
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(f.startswith("data/outbox/outbox.") or f == "data/rawlog/keep.bin"
               for f in files), files
    assert sentinel.read_bytes() == b"x" * 1000


def test_space_freed_while_records_wait_is_reused_not_given_back(tmp_path: Path):
    """A backlog that drains while the stream goes on: the pages its acknowledged records
    free are where the next records go. Giving them back mid-stream moved the live pages to
    the file's start every 64 acknowledgements (a rewrite of the backlog, for the file to
    grow straight back); only a drained outbox returns its space."""
    budget = 8 * 2**20
    db = tmp_path / "outbox" / "outbox.db"
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as ob:
        def write(start: int, n: int) -> None:
            for s in range(start, start + n, 50):
                ob.put_many([item(i, v) for i in range(s, s + 25) for v in ("1", "2")])

        write(100000, 16000)
        used = ob.stats()["bytes_used"]
        assert ob.stats()["dropped"] == 0 and used > 4 * 2**20
        full = os.path.getsize(db)
        acks = acked = 0
        while ob.stats()["bytes_used"] > used // 4:  # three quarters acknowledged
            acked += ob.ack(ob.next_batch("results", max_records=50, max_bytes=1 << 20))
            acks += 1
        assert acks > 128  # the old policy looked every 64 acknowledgements
        kept = os.path.getsize(db)
        assert kept >= full  # not shrunk (pages the WAL held may have joined it)
        # the stream goes on (as many again, two versions per id): into the free pages
        write(200000, acked // 2)
        assert os.path.getsize(db) <= kept * 1.05
        assert ob.stats()["dropped"] == 0
        drain(ob, "results")
        assert ob.stats()["file_bytes"] < budget / 8  # drained: the space goes back


def test_a_drained_outbox_shrinks_and_keeps_its_marks_counters_and_order(tmp_path: Path):
    """Drained, the file is rebuilt (VACUUM): what is not a record (marks, drop counters,
    the chunk numbering the uplink's order rests on) comes through it, and the same
    records are refused as duplicates afterwards as before."""
    budget = 2 * 2**20
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as ob:
        for start in range(100000, 112000, 64):  # past the budget: some dropped
            ob.put_many([item(i, v) for i in range(start, start + 32) for v in ("1", "2")],
                        marks={"activity": start})
        dropped = ob.stats()["dropped"]
        assert dropped > 0
        last_seq = ob._db.execute("SELECT max(seq) FROM chunks").fetchone()[0]
        statements: list[str] = []
        ob._db.set_trace_callback(statements.append)
        drain(ob, "results")
        ob._db.set_trace_callback(None)
        assert "VACUUM" in statements
        assert ob.stats()["file_bytes"] < budget / 8
        assert ob.marks() == {"activity": 111968}
        assert ob.stats()["dropped"] == dropped
        ob.put_many([item(200000)])
        assert ob._db.execute("SELECT min(seq) FROM chunks").fetchone()[0] > last_seq
        assert drain(ob, "results") == [item(200000)[1]]
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as ob:  # and after a restart
        assert ob.marks() == {"activity": 111968} and ob.stats()["dropped"] == dropped
        assert ob.check_integrity() == []


def test_concurrent_writer_and_reader_lose_nothing(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        n = 3000
        done = threading.Event()
        got: list[str] = []

        def reader():
            while True:
                batch = ob.next_batch("results", max_records=100, max_bytes=1 << 20)
                if batch:
                    got.extend(rid for c in batch for rid in c.record_ids())
                    ob.ack(batch)
                elif done.is_set():
                    return

        t = threading.Thread(target=reader)
        t.start()
        for start in range(100000, 100000 + n, 30):
            ob.put_many([item(i) for i in range(start, start + 30)])
        done.set()
        t.join(30)
        assert got == [item(i)[1] for i in range(100000, 100000 + n)]
        assert ob.stats()["bytes_used"] == 0


CRASHER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_outbox import item
    from edgeml.storage.outbox import Outbox
    ob = Outbox(sys.argv[1])
    for start in range(100000, 100500, 50):
        ob.put_many([item(i) for i in range(start, start + 50)])
        print(start + 50, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
""")


def test_committed_records_survive_a_process_kill(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "outbox"),
                           str(HERE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    committed = int(proc.stdout.split()[-1])
    assert committed == 100500
    assert (tmp_path / "outbox" / "outbox.db-wal").stat().st_size > 0  # not checkpointed
    with Outbox(tmp_path / "outbox") as ob:
        assert drain(ob, "results") == [item(i)[1] for i in range(100000, committed)]


def test_fsync_every_commit_is_selectable(tmp_path: Path):
    with Outbox(tmp_path / "outbox", fsync_interval_s=0) as ob:
        assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        ob.put_many([item(i) for i in range(100000, 100010)])
        assert ob.stats()["backlog"] == 10


def test_a_write_is_one_row_per_stream(tmp_path: Path):
    """The daemon's flush: 200 inputs x (answer + 3 versions' results) = 800 records in one
    put_many become 2 + 6 rows (chunks of at most CHUNK_MAX_RECORDS), counted in records."""
    flush = [it for seq in range(100000, 100200)
             for it in [item(seq, "1", "outputs"), *(item(seq, v) for v in ("1", "2", "3"))]]
    with Outbox(tmp_path / "outbox") as ob:
        assert ob.put_many(flush).stored == 800
        assert rows(ob) == [("outputs", 100)] * 2 + [("results", 100)] * 6
        st = ob.stats()
        assert (st["backlog"], st["streams"]["outputs"]["backlog"],
                st["streams"]["results"]["backlog"]) == (800, 200, 600)
        assert st["bytes_used"] == sum(
            chunk_size(part) for stream in ("outputs", "results")
            for rs in [[it for it in flush if it[0] == stream]]
            for part in (rs[i:i + 100] for i in range(0, len(rs), 100)))
        assert ob.put(*item(100300))  # a single record is a chunk of one
        assert rows(ob)[-1] == ("results", 1)
        assert drain(ob, "results") == [it[1] for it in flush if it[0] == "results"] + \
            [item(100300)[1]]
        assert drain(ob, "outputs") == [it[1] for it in flush if it[0] == "outputs"]
        assert ob.stats()["bytes_used"] == 0 and rows(ob) == []


def test_replays_are_ignored_across_a_restart(tmp_path: Path):
    """After a crash the daemon re-scores what came after the committed mark: those records
    may already be stored, in chunks grouped differently; their ids are ignored again."""
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_many([item(i) for i in range(100000, 100050)], marks={"activity": 100049})
    with Outbox(tmp_path / "outbox") as ob:
        res = ob.put_many([item(i) for i in range(100040, 100060)])
        assert (res.stored, res.duplicates) == (10, 10)
        assert drain(ob, "results") == [item(i)[1] for i in range(100000, 100060)]
        # a record that left the outbox (acked) may be stored again, as before chunks
        assert ob.put_many([item(100000)]).stored == 1


def test_records_older_than_the_dedup_window(tmp_path: Path, monkeypatch):
    """Beyond the window a re-stored record may be stored twice (upstream drops it by id);
    a chunk identical to a stored one is still recognised; nothing is ever lost."""
    monkeypatch.setattr(outbox_mod.store, "DEDUP_WINDOW", 8)  # the Outbox reads it there
    calls = [[item(i) for i in range(start, start + 4)] for start in range(100000, 100020, 4)]
    with Outbox(tmp_path / "outbox") as ob:
        for call in calls:
            ob.put_many(call)
        # the first chunk again, exactly: its chunk id says it is stored already
        assert ob.put_many(calls[0]).duplicates == 4
        # the same first record and count but other records: stored under a new chunk id
        other = [calls[0][0], *(item(i) for i in range(100100, 100103))]
        assert ob.put_many(other).stored == 4
        ids = ob._db.execute("SELECT chunk_id FROM chunks ORDER BY seq").fetchall()
        assert ids[0][0] == chunk_id(calls[0][0][1], 4)
        assert ids[-1][0] == chunk_id(calls[0][0][1], 4) + "~2"
        got = drain(ob, "results")
        assert got == [it[1] for call in calls for it in call] + [it[1] for it in other]
        assert got.count(calls[0][0][1]) == 2  # the one local duplicate


V1_SCHEMA = """
CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
    record_id TEXT NOT NULL UNIQUE, created REAL NOT NULL, size INTEGER NOT NULL,
    payload BLOB NOT NULL);
CREATE INDEX records_by_stream ON records (stream, seq, created, size);
CREATE TABLE counters (stream TEXT PRIMARY KEY, dropped INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0, reported_dropped INTEGER NOT NULL DEFAULT 0,
    reported_refused INTEGER NOT NULL DEFAULT 0);
CREATE TABLE marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
PRAGMA user_version=1;
"""


def test_a_version_1_outbox_is_migrated_in_place(tmp_path: Path):
    """An outbox written by the previous release (a row per record) opens as chunks of one:
    same order, same records on the wire, counters and marks kept, ids still deduplicated."""
    (tmp_path / "outbox").mkdir()
    db = sqlite3.connect(tmp_path / "outbox" / "outbox.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    wide = ("alerts", "watch-01/canary/1", {"kind": "canary", **{f"v{k}": k for k in range(18)}})
    old = [item(100000, "1", "outputs"), item(100000), wide, item(100001), item(100001, "2")]
    for n, (stream, rid, rec) in enumerate(old):
        payload = msgpack.packb(rec, use_bin_type=True)
        db.execute("INSERT INTO records (stream, record_id, created, size, payload) VALUES "
                   "(?, ?, ?, ?, ?)", (stream, rid, 1700000000.0 + n,
                                       len(payload) + 2 * len(rid) + len(stream) + 96, payload))
    db.execute("INSERT INTO counters VALUES ('results', 7, 0, 5, 0)")
    db.execute("INSERT INTO marks VALUES ('activity', 100001)")
    db.commit()
    db.close()
    with Outbox(tmp_path / "outbox") as ob:
        assert ob._db.execute("PRAGMA user_version").fetchone()[0] == outbox_mod._SCHEMA_VERSION
        assert not ob._db.execute("SELECT 1 FROM sqlite_master WHERE name='records'").fetchone()
        assert rows(ob) == [(s, 1) for s, _, _ in old]
        st = ob.stats()
        assert (st["backlog"], st["streams"]["results"]["backlog"]) == (5, 3)
        assert (st["dropped"], st["streams"]["results"]["unreported_dropped"]) == (7, 2)
        assert st["bytes_used"] == sum(size_of(it) for it in old)
        assert ob.marks() == {"activity": 100001}
        assert ob.put_many([item(100001), item(100002)]).duplicates == 1
        batch = ob.next_batch("alerts", max_records=10, max_bytes=1 << 20)
        assert batch[0].records() == [{"record_id": wide[1], **wide[2]}]
        assert drain(ob, "results") == [item(100000)[1], item(100001)[1],
                                        item(100001, "2")[1], item(100002)[1]]
    with Outbox(tmp_path / "outbox") as again:  # opens as version 2 without migrating again
        assert again.stats()["backlog"] == 2


def test_chunks_are_cut_at_the_byte_cap(tmp_path: Path):
    its = [uniform(i) for i in range(100000, 100010)]
    one = len(pack_record(its[0][1], its[0][2]))
    with Outbox(tmp_path / "outbox", chunk_max_bytes=3 * one) as ob:
        ob.put_many(its)
        assert rows(ob) == [("results", 3)] * 3 + [("results", 1)]
        assert drain(ob, "results") == [it[1] for it in its]


def test_an_evicted_record_may_be_stored_again(tmp_path: Path):
    """Dedup covers what is stored, not what was dropped: a record evicted (even superseded by
    later records of the same write) is stored again when it comes again, as before chunks."""
    its = [uniform(i) for i in range(100000, 100006)]
    with Outbox(tmp_path / "outbox", budget_bytes=3 * size_of(its[0])) as ob:
        res = ob.put_many(its)  # larger than the budget: the newest records that fit stay
        kept = ob.stats()["backlog"]
        assert 3 <= kept < 6 and rows(ob) == [("results", kept)]
        assert (res.stored, res.evicted, res.refused) == (6, 6 - kept, 0)
        assert ob.stats()["streams"]["results"]["dropped"] == 6 - kept
        assert ob.put_many([its[5]]).duplicates == 1
        assert ob.put_many([its[0]]).stored == 1
        assert drain(ob, "results")[-1] == its[0][1]


def test_a_write_larger_than_the_budget_keeps_its_newest_records(tmp_path: Path):
    """drop_oldest: the records a write would evict itself are counted, never written;
    refuse_new: the oldest that fit are kept, the rest refused. Exact counts either way."""
    its = [item(i) for i in range(100000, 100300)]
    budget = 40 * record_size()
    for policy in ("drop_oldest", "refuse_new"):
        streams = {**DEFAULT_STREAMS, "results": StreamPolicy("results", 2, policy)}
        kept, lost = simulate([its[:150], its[150:]], budget, policy)
        with Outbox(tmp_path / policy, budget_bytes=budget, streams=streams) as ob:
            ob.put_many(its[:150])
            ob.put_many(its[150:])
            st = ob.stats()["streams"]["results"]
            assert (st["backlog"], st["dropped"] + st["refused"]) == (len(kept), lost)
            assert ob.stats()["bytes_used"] <= budget
            assert drain(ob, "results") == kept
        if policy == "drop_oldest":
            assert kept[-1] == its[-1][1]
        else:
            assert kept[0] == its[0][1]


def stored_rows(ob: Outbox) -> list[tuple]:
    """Every stored row as it is on disk, minus its creation time."""
    return ob._db.execute("SELECT seq, stream, chunk_id, count, size, payload FROM chunks "
                          "ORDER BY seq").fetchall()


def as_groups(its: list[tuple[str, str, dict]], *, packed: bool) -> list[tuple]:
    """``put_many`` items as put_groups runs of one stream (records or their packed bytes)."""
    groups: list[tuple] = []
    for stream, rid, rec in its:
        if not groups or groups[-1][0] != stream:
            groups.append((stream, [], [], []))
        groups[-1][1].append(rid)
        groups[-1][2].append(rec)
        groups[-1][3].append(pack_record(rid, rec))
    return [(s, ids, None, parts) if packed else (s, ids, recs, None)
            for s, ids, recs, parts in groups]


@pytest.mark.parametrize("packed", [False, True])
def test_put_groups_stores_exactly_what_put_many_stores(tmp_path: Path, packed: bool):
    """Runs of records (or of their packed bytes) give the same rows, byte for byte, as the
    same items through put_many: chunks per stream and cap, ids, sizes, counters, marks."""
    writes = [
        [item(i, v, s) for i in range(100000, 100150) for s, vs in
         (("outputs", "1"), ("results", "123")) for v in vs],
        [item(i, "1", "outputs") for i in range(100150, 100160)]
        + [("alerts", "watch-01/*/alert/x/1.0", {"kind": "x", "ts": 1.0})]
        + [item(i, "2") for i in range(100150, 100160)],
    ]
    for name, put in (("many", "many"), ("groups", "groups")):
        with Outbox(tmp_path / name, chunk_max_records=40) as ob:
            for its in writes:
                if put == "many":
                    ob.put_many(its, marks={"activity": its[-1][2].get("input_seq", 0)})
                else:
                    ob.put_groups(as_groups(its, packed=packed),
                                  marks={"activity": its[-1][2].get("input_seq", 0)})
            if put == "many":
                expected = (stored_rows(ob), ob.stats(), ob.marks())
            else:
                got = (stored_rows(ob), ob.stats(), ob.marks())
    assert got[0] == expected[0] and len(got[0]) > 10
    assert (got[1]["backlog"], got[1]["bytes_used"]) == (expected[1]["backlog"],
                                                         expected[1]["bytes_used"])
    for s in expected[1]["streams"]:  # all but the age, which moves with the clock
        del got[1]["streams"][s]["oldest_unsynced_age_s"]
        del expected[1]["streams"][s]["oldest_unsynced_age_s"]
    assert got[1]["streams"] == expected[1]["streams"]
    assert got[2] == expected[2]


@pytest.mark.parametrize("packed", [False, True])
def test_put_groups_drops_replays_and_refuses_only_the_unencodable(tmp_path: Path,
                                                                   packed: bool):
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_groups(as_groups([item(i) for i in range(100000, 100010)], packed=packed))
        # half replays, one repeated within the call: stored once each
        res = ob.put_groups(as_groups([item(i) for i in (*range(100005, 100015), 100014)],
                                      packed=packed))
        assert (res.stored, res.duplicates) == (5, 6)
        # an unencodable record among dict runs: it alone is refused, the rest stored
        bad = ("results", [record_id(DEVICE, "activity", 7, "activity", "1", "results")],
               [{"value": object()}], None)
        res = ob.put_groups([*as_groups([item(100015)], packed=packed), bad,
                             *as_groups([item(100016)], packed=False)])
        assert (res.stored, res.refused) == (2, 0)
        assert ob.stats()["unencodable"] == 1 and ob.stats()["backlog"] == 17
        with pytest.raises(OutboxError, match="reserved"):
            ob.put_groups([("results", ["z/1"], [{"record_id": "mine"}], None)])
        with pytest.raises(OutboxError, match="unknown stream 'nope'"):
            ob.put_groups([("nope", ["y/1"], None, [b"\x80"])])
        assert ob.stats()["backlog"] == 17
        assert drain(ob, "results") == [record_id(DEVICE, "activity", i, "activity", "1",
                                                  "results") for i in range(100000, 100017)]
