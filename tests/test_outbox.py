"""The durable outbox on its own: order, idempotence, atomicity, bounds, restarts, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edgeml.datasets import load_basicmotions
from edgeml.errors import ConfigError, OutboxError
from edgeml.outbox import (
    DEFAULT_STREAMS,
    Outbox,
    StreamPolicy,
    encode_record,
    entry_bytes,
    record_id,
)

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


def size_of(it: tuple[str, str, dict]) -> int:
    return entry_bytes(it[0], it[1], encode_record(it[2]))


def record_size() -> int:
    return size_of(uniform(100000))


def simulate(sizes: list[int], budget: int, policy: str) -> tuple[list[int], int]:
    """The policy on one stream, by hand: (indexes kept, number dropped or refused)."""
    kept: list[int] = []
    used = lost = 0
    for i, size in enumerate(sizes):
        if policy == "refuse_new":
            if used + size > budget:
                lost += 1
                continue
        else:
            while used + size > budget:
                used -= sizes[kept.pop(0)]
                lost += 1
        kept.append(i)
        used += size
    return kept, lost


def drain(ob: Outbox, stream: str) -> list[str]:
    ids = []
    while batch := ob.next_batch(stream, max_records=50, max_bytes=1 << 20):
        ids += [r.record_id for r in batch]
        ob.ack(batch)
    return ids


def test_record_id_is_stable_and_unambiguous():
    assert record_id("watch-01", "activity", 1234, "activity", "2", "results") == \
        "watch-01/activity/1234/activity/2/results"
    # a slash inside a part cannot make two different records share an id
    assert record_id("a/b", "c", 1, "m", "1", "results") != \
        record_id("a", "b/c", 1, "m", "1", "results")


def test_put_next_batch_ack_in_order(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        res = ob.put_many([item(i) for i in range(100000, 100120)])
        assert (res.stored, res.duplicates, res.refused) == (120, 0, 0)
        batch = ob.next_batch("results", max_records=50, max_bytes=1 << 20)
        assert [r.record_id for r in batch] == [item(i)[1] for i in range(100000, 100050)]
        assert batch[0].decode() == output_record(100000)
        # max_bytes bounds the batch, but the first record always comes
        small = ob.next_batch("results", max_records=50, max_bytes=1)
        assert len(small) == 1
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
        assert ob.stats()["backlog"] == 15
        assert ob.stats()["bytes_used"] == sum(size_of(item(i)) for i in range(100000, 100015))
        assert drain(ob, "results") == [item(i)[1] for i in range(100000, 100015)]


def test_marks_commit_with_the_records_and_never_go_back(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_many([item(100000)], marks={"activity": 100000})
        ob.put_many([], marks={"activity": 99990, "gait": 7})  # an older mark is ignored
        with pytest.raises(OutboxError):
            ob.put_many([item(100001), ("nope", "y/1", {})], marks={"activity": 100001})
        assert ob.marks() == {"activity": 100000, "gait": 7}
    with Outbox(tmp_path / "outbox") as again:
        assert again.marks() == {"activity": 100000, "gait": 7}


def test_put_many_is_all_or_nothing(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        bad = ("results", "x/1", {"value": object()})
        with pytest.raises(OutboxError, match="cannot be encoded"):
            ob.put_many([item(100000), bad])
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
    ob.put_many([uniform(i) for i in range(100000, 100025)])  # 15 evicted
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
    kept, lost = simulate([size_of(it) for it in items], budget, policy)
    assert lost > 80
    with Outbox(tmp_path / "outbox", budget_bytes=budget, streams=streams) as ob:
        for start in range(0, len(items), 13):
            res = ob.put_many(items[start:start + 13])
            assert ob.stats()["bytes_used"] <= budget
            if policy == "refuse_new":
                assert res.evicted == 0
        st = ob.stats()["streams"]["results"]
        key, other = ("dropped", "refused") if policy == "drop_oldest" else ("refused", "dropped")
        assert (st[key], st[other]) == (lost, 0)
        assert st["backlog"] == len(kept)
        assert drain(ob, "results") == [items[i][1] for i in kept]
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
    size = record_size()
    budget = 20 * size + size // 2
    with Outbox(tmp_path / "outbox", budget_bytes=budget) as ob:
        ob.put_many([uniform(i) for i in range(100000, 100020)])  # results fill the budget
        res = ob.put_many([uniform(i, "outputs") for i in range(100000, 100005)])
        assert (res.stored, res.evicted) == (5, 5)  # outputs take room from results...
        ob.put_many([uniform(i) for i in range(100020, 100025)])
        st = ob.stats()["streams"]
        assert st["outputs"]["backlog"] == 5  # ...but results never evict outputs
        assert st["results"]["dropped"] == 10 and st["outputs"]["dropped"] == 0
        # alerts (refuse_new) never lose what they hold; they too take room from results
        alert = ("alerts", "watch-01/alert/1", {"kind": "test", "ts": 1.0})
        assert ob.put(*alert)
        assert ob.stats()["streams"]["alerts"]["backlog"] == 1


def test_records_in_flight_are_never_evicted(tmp_path: Path):
    size = record_size()
    with Outbox(tmp_path / "outbox", budget_bytes=10 * size + size // 2) as ob:
        ob.put_many([uniform(i) for i in range(100000, 100010)])
        in_flight = ob.next_batch("results", max_records=4, max_bytes=1 << 20)
        ob.put_many([uniform(i) for i in range(100010, 100030)])  # 20 more: evict 20 others
        st = ob.stats()["streams"]["results"]
        assert (st["backlog"], st["dropped"]) == (10, 20)
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


def test_concurrent_writer_and_reader_lose_nothing(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        n = 3000
        done = threading.Event()
        got: list[str] = []

        def reader():
            while True:
                batch = ob.next_batch("results", max_records=100, max_bytes=1 << 20)
                if batch:
                    got.extend(r.record_id for r in batch)
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
    from edgeml.outbox import Outbox
    ob = Outbox(sys.argv[1])
    for start in range(100000, 100500, 50):
        ob.put_many([item(i) for i in range(start, start + 50)])
        print(start + 50, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint
""")


def test_committed_records_survive_a_process_kill(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "outbox"),
                           str(Path(__file__).parent)], capture_output=True, text=True,
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
