"""The raw-input archive: framing, crash recovery, corruption, retention, snapshots.

Payloads are BasicMotions samples as JSON (tests/rawlog_writer.py makes them), so what is
checked byte for byte is the kind of message the daemon archives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import rawlog_writer as W

from edgeml.errors import RawLogError
from edgeml.storage.rawlog import (
    RawLog,
    RawLogBusyError,
    open_reader,
    pipeline_dir,
    verify_snapshot,
)

WRITER = Path(__file__).resolve().parents[1] / "rawlog_writer.py"
HDR = 32  # segment file header, see docs/rawlog.md


def expected(seqs, now):
    return [(s, *W.record_for(s, now)) for s in seqs]


def as_tuples(records):
    return [(r.seq, r.topic, r.payload, r.received) for r in records]


def exp_tuples(seqs, now):
    return [(s, t, p, r) for s, t, p, r in expected(seqs, now)]


def record_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every record, parsed from the documented layout alone."""
    data = path.read_bytes()
    pos, out = HDR, []
    while pos + 12 <= len(data):
        magic, blen, _crc = struct.unpack_from("<4sII", data, pos)
        assert magic == b"\xedRLg"
        out.append((pos, pos + 12 + blen))
        pos += 12 + blen
    return out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return pipeline_dir(tmp_path, "activity")


# ---- round trip ----------------------------------------------------------------------------
def test_roundtrip_is_byte_identical_across_segments_and_reopen(d, now):
    log = RawLog(d, segment_bytes=4096, budget_bytes=None)
    assert log.recovery.truncated_bytes == 0 and log.next_seq == 0
    for s in range(300):
        assert log.append(*W.record_for(s, now)) == s
    assert log.append_many([W.record_for(s, now) for s in range(300, 400)]) == range(300, 400)
    assert log.append_many([]) == range(400, 400)
    assert as_tuples(log.read()) == exp_tuples(range(400), now)

    log.wait_sealed()  # rolled segments are sealed by a background thread
    assert log.stats["pending_seals"] == 0
    segs = log.segments()
    assert len(segs) > 5
    assert all(s.sealed for s in segs[:-1]) and not segs[-1].sealed
    assert sum(s.records for s in segs) == 400
    for s in segs[:-1]:
        assert s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
        assert s.bytes == s.path.stat().st_size <= 4096
        assert s.path.name == f"seg-{s.first_seq:020d}.log"
        spans = record_spans(s.path)
        assert len(spans) == s.records and spans[-1][1] == s.bytes
    # consecutive segments continue each other
    assert [s.first_seq for s in segs[1:]] == [s.last_seq + 1 for s in segs[:-1]]
    log.close()
    with pytest.raises(RawLogError, match="closed"):
        log.append("t", b"x", now)

    log = RawLog(d, segment_bytes=4096, budget_bytes=None)
    assert log.recovery.truncated_bytes == 0 and log.next_seq == 400
    assert log.append(*W.record_for(400, now)) == 400
    assert as_tuples(log.read()) == exp_tuples(range(401), now)
    assert as_tuples(open_reader(d).read()) == exp_tuples(range(401), now)
    log.close()


def test_read_filters_by_seq_time_and_topic(d, now):
    with RawLog(d, segment_bytes=4096, budget_bytes=None) as log:
        log.append_many([W.record_for(s, now) for s in range(300)])
        assert [r.seq for r in log.read(start_seq=120, end_seq=130)] == list(range(120, 131))
        # received = now + seq * 0.01; since inclusive, until exclusive
        got = [r.seq for r in log.read(since=now + 1.0, until=now + 1.5)]
        want = [s for s in range(300) if now + 1.0 <= W.record_for(s, now)[2] < now + 1.5]
        assert got == want and 45 <= len(got) <= 55
        assert {r.topic for r in log.read(topic="sensors/watch-02/imu")} == \
            {"sensors/watch-02/imu"}
        assert [r.seq for r in log.read(topic="sensors/watch-02/imu", end_seq=10)] == \
            [1, 4, 7, 10]
        assert len(list(log.read(topic="sensors/+/imu"))) == 300
        assert len(list(log.read(topic="sensors/#"))) == 300
        assert list(log.read(topic="other/#")) == []
        assert list(log.read(start_seq=1000)) == []


def test_large_payloads_and_binary_topics_round_trip(d, now):
    big = os.urandom(3 * 2**20)  # bigger than a segment: it gets one of its own
    with RawLog(d, segment_bytes=64 * 1024, budget_bytes=None) as log:
        log.append("a/ü/topic", b"", now)
        log.append("b", big, now + 1)
        log.append("c", b"\x00\xff", now + 2)
        recs = list(log.read())
    assert [(r.topic, r.payload) for r in recs] == [("a/ü/topic", b""), ("b", big),
                                                    ("c", b"\x00\xff")]


def test_daemon_archives_a_live_stream_byte_identical(broker, collector, daemon_factory,
                                                      tmp_path, activity_bundle):
    """The real daemon on a real mosquitto: every message is in the archive, byte for byte, in
    arrival order, with seqs from 0, its topic and its receive time; every output's input_seq
    points at the archived input it came from. Read while the daemon is running."""
    import msgpack
    from conftest import publish_all, write_config

    from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

    ds = load_basicmotions("TEST")
    items = []
    for s in range(6):  # series 0-2 on one watch, 3-5 on another; JSON and msgpack
        topic = "sensors/w1/imu" if s < 3 else "sensors/w2/imu"
        for i, row in enumerate(ds.X[s]):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
            body["id"] = f"s{s}-{i}"
            items.append((topic, json.dumps(body).encode() if s % 2 == 0
                          else msgpack.packb(body)))
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = collector("edgeml/watch-01/out/activity")
    daemon_factory(cfg)
    t0 = time.time()
    publish_all(broker, items)
    answers = [msgpack.unpackb(m.payload) for m in out.wait_count(6, timeout=60)]
    t1 = time.time()

    recs = list(open_reader(pipeline_dir(tmp_path / "data", "activity")).read())
    assert [(r.topic, r.payload) for r in recs] == items
    assert [r.seq for r in recs] == list(range(len(items)))
    assert t0 <= recs[0].received and recs[-1].received <= t1
    assert all(a.received <= b.received for a, b in itertools.pairwise(recs))
    by_seq = {r.seq: r for r in recs}
    for ans in answers:
        src = by_seq[ans["input_seq"]]
        assert src.topic == ans["topic"]
        decoded = (json.loads(src.payload) if src.payload[:1] == b"{"
                   else msgpack.unpackb(src.payload))
        assert decoded["id"] == ans["id"]
        assert ans["ts"] == pytest.approx(src.received)


# ---- crash recovery ------------------------------------------------------------------------
def _run_writer_and_kill(d: Path, now: float) -> dict:
    """Start tests/rawlog_writer.py, read its reports, and kill -9 it while the kernel copies
    its big record into the segment (we see the file grow past the reported size)."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(d), "--now", repr(now), "--bursts", "8"],
        stdout=subprocess.PIPE, text=True)
    flushed, big = -1, None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, *rest = line.split()
            if kind == "flushed":
                flushed = int(rest[0])
                continue
            big = {"seq": int(rest[0]), "segment": rest[1], "size": int(rest[2]),
                   "rec_len": int(rest[3])}
            path = d / big["segment"]
            while path.stat().st_size <= big["size"]:
                pass  # the write has not started yet
            os.kill(proc.pid, signal.SIGKILL)
            break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rest_lines = proc.stdout.read().split("\n") if proc.stdout else []
    for line in rest_lines:  # bursts reported after the big record (if it was not torn)
        if line.startswith("flushed "):
            flushed = int(line.split()[1])
    assert big is not None, "writer never reached its big record"
    big["flushed"] = flushed
    big["size_after"] = (d / big["segment"]).stat().st_size
    return big


def test_kill9_mid_append_cuts_torn_tail_keeps_every_flushed_record(d, now, caplog):
    caplog.set_level(logging.INFO, logger="edgeml.storage.rawlog")
    torn_seen = False
    for _attempt in range(5):
        k = _run_writer_and_kill(d, now)
        torn = k["size_after"] < k["size"] + k["rec_len"]
        # a read-only view first: it sees every reported record and cuts nothing
        seen = list(open_reader(d).read())
        assert (d / k["segment"]).stat().st_size == k["size_after"]
        small = [r for r in seen if r.topic != "sensors/big"]
        assert as_tuples(small) == exp_tuples([r.seq for r in small], now)
        assert {r.seq for r in seen} >= set(range(k["flushed"] + 1))
        assert all(r.payload == b"x" * 24 * 2**20 for r in seen if r.topic == "sensors/big")
        assert [r.seq for r in seen] == sorted(r.seq for r in seen)

        caplog.clear()
        log = RawLog(d, budget_bytes=None)
        rep = log.recovery
        if torn:
            torn_seen = True
            assert rep.segment == k["segment"]
            assert rep.truncated_bytes == k["size_after"] - k["size"] > 0
            assert rep.records_kept == sum(1 for r in seen if r.segment == k["segment"])
            # never the torn record's seq again (it was handed out): the log
            # continues past the reserved high-water mark
            assert log.next_seq > k["seq"] == k["flushed"] + 1
            warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(k["segment"] in m and f"cut {rep.truncated_bytes} bytes" in m
                       for m in warn), warn
            assert (d / k["segment"]).stat().st_size == k["size"]
        else:
            assert rep.truncated_bytes == 0
        # nothing fully written was lost, and appends continue with the next seq
        after = list(log.read())
        assert as_tuples(after) == as_tuples(seen)
        nxt = log.next_seq
        assert nxt >= after[-1].seq + 1  # past the high-water mark after a kill
        assert log.append(*W.record_for(nxt, now)) == nxt
        log.close()
        assert as_tuples(open_reader(d).read()) == as_tuples(seen) + exp_tuples([nxt], now)
        if torn_seen:
            break
    assert torn_seen, "no attempt left a torn record (the kill always came too late)"


@pytest.mark.parametrize("damage", ["half_record", "zero_fill", "header_only", "torn_magic"])
def test_power_cut_tail_is_cut_and_reported(d, now, caplog, damage):
    log = RawLog(d, budget_bytes=None)
    log.append_many([W.record_for(s, now) for s in range(50)])
    log.close()
    seg = log.segments()[-1].path
    spans = record_spans(seg)
    size = seg.stat().st_size
    with open(seg, "r+b") as fh:
        if damage == "half_record":  # the last record only half made it to the disk
            fh.truncate((spans[-1][0] + spans[-1][1]) // 2)
            good_end, kept = spans[-1][0], 49
        elif damage == "zero_fill":  # ext4 after a power cut: size grew, data did not
            fh.seek(size)
            fh.write(b"\x00" * 4096)
            good_end, kept = size, 50
        elif damage == "header_only":
            fh.truncate(spans[-1][0] + 12)
            good_end, kept = spans[-1][0], 49
        else:
            fh.truncate(spans[-1][0] + 2)
            good_end, kept = spans[-1][0], 49
    damaged = seg.stat().st_size
    with caplog.at_level(logging.WARNING, logger="edgeml.storage.rawlog"):
        log = RawLog(d, budget_bytes=None)
    assert log.recovery.segment == seg.name
    assert log.recovery.truncated_bytes == damaged - good_end
    assert log.recovery.records_kept == kept
    assert seg.stat().st_size == good_end
    assert f"cut {damaged - good_end} bytes" in caplog.text and seg.name in caplog.text
    # seqs never go backwards (seq.json high-water mark): seq 49 was handed out
    # before the power cut took its record, so appending continues at 50, not 49 again
    assert log.next_seq == 50
    assert log.append(*W.record_for(50, now)) == 50
    assert as_tuples(log.read()) == exp_tuples([*range(kept), 50], now)
    log.close()


def test_torn_segment_header_is_rewritten(d, now):
    with RawLog(d, budget_bytes=None, segment_bytes=2048) as log:
        log.append_many([W.record_for(s, now) for s in range(20)])
        log.roll()
        first = log.next_seq
    seg = d / f"seg-{first:020d}.log"
    with open(seg, "r+b") as fh:  # a crash right after creating the new segment
        fh.truncate(10)
    log = RawLog(d, budget_bytes=None)
    assert log.recovery.truncated_bytes == 10 and log.next_seq == first == 20
    assert log.append(*W.record_for(20, now)) == 20
    assert as_tuples(log.read()) == exp_tuples(range(21), now)
    log.close()


def test_crash_after_seal_before_next_segment(d, now):
    with RawLog(d, budget_bytes=None) as log:
        log.append_many([W.record_for(s, now) for s in range(30)])
        log.roll()
    (d / f"seg-{30:020d}.log").unlink()  # the new segment was never created
    with RawLog(d, budget_bytes=None) as log:
        assert log.next_seq == 30
        assert log.append(*W.record_for(30, now)) == 30
        assert as_tuples(log.read()) == exp_tuples(range(31), now)
        assert [s.sealed for s in log.segments()] == [True, False]


def test_write_error_leaves_a_clean_segment_and_counts_the_loss(d, now):
    """A full disk (simulated with RLIMIT_FSIZE in a child process): the failed write is cut
    off, the error is a RawLogError, the loss is counted, and the log reopens clean."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        sys.path.insert(0, {str(WRITER.parent)!r})
        import rawlog_writer as W
        from edgeml.errors import RawLogError
        from edgeml.storage.rawlog import RawLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = RawLog({str(d)!r}, budget_bytes=None, buffer_bytes=4096)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        s = 0
        try:
            while True:
                log.append(*W.record_for(s, {now!r})); s += 1
        except RawLogError as exc:
            print(json.dumps({{"error": str(exc), "stats": log.stats, "handed_out": s}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    res = json.loads(out.stdout)
    assert "write failed" in res["error"]
    st = res["stats"]
    assert st["write_errors"] == 1 and st["records_lost"] > 0
    log = RawLog(d, budget_bytes=None)
    assert log.recovery.truncated_bytes == 0  # nothing torn was left behind
    kept = list(log.read())
    assert as_tuples(kept) == exp_tuples(range(len(kept)), now)
    # lost = records handed a seq earlier and still in the buffer, plus the failing call's own
    assert len(kept) + st["records_lost"] == res["handed_out"] + 1
    assert st["next_seq"] == res["handed_out"] + 1  # seqs are not reused while it runs
    assert (d / log.segments()[-1].name).stat().st_size <= 20000
    log.close()


# ---- corruption in the middle --------------------------------------------------------------
def test_corrupt_byte_mid_segment_is_skipped_and_reported(d, now, caplog):
    log = RawLog(d, segment_bytes=8192, budget_bytes=None)
    log.append_many([W.record_for(s, now) for s in range(120)])
    log.wait_sealed()
    segs = log.segments()
    sealed = segs[0]
    spans = record_spans(sealed.path)
    bad = sealed.first_seq + 5
    start, end = spans[5]
    flip(sealed.path, end - 3)  # a byte of record 5's payload
    with caplog.at_level(logging.WARNING, logger="edgeml.storage.rawlog"):
        got = [r.seq for r in log.read()]
    assert got == [s for s in range(120) if s != bad]
    assert log.stats["corrupt_records_skipped"] == 1
    assert log.stats["corrupt_bytes_skipped"] == end - start
    assert sealed.name in caplog.text and f"bytes {start}-{end}" in caplog.text

    # a damaged length field: the reader resynchronises on the next record's magic
    s2 = segs[1]
    spans2 = record_spans(s2.path)
    with open(s2.path, "r+b") as fh:
        fh.seek(spans2[2][0] + 4)
        fh.write(struct.pack("<I", 0x0FFFFFFF))
    got = [r.seq for r in log.read()]
    assert got == [s for s in range(120) if s not in (bad, s2.first_seq + 2)]
    assert as_tuples(log.read(start_seq=s2.first_seq + 3, end_seq=s2.first_seq + 3)) == \
        exp_tuples([s2.first_seq + 3], now)
    log.close()


def test_corrupt_record_in_open_segment_is_not_mistaken_for_a_tail(d, now, caplog):
    log = RawLog(d, budget_bytes=None)
    log.append_many([W.record_for(s, now) for s in range(40)])
    log.close()
    seg = log.segments()[-1].path
    start, _end = record_spans(seg)[10]
    flip(seg, start)  # record 10's magic
    size = seg.stat().st_size
    with caplog.at_level(logging.WARNING, logger="edgeml.storage.rawlog"):
        log = RawLog(d, budget_bytes=None)
    assert log.recovery.truncated_bytes == 0 and seg.stat().st_size == size
    assert log.next_seq == 40
    assert [r.seq for r in log.read()] == [s for s in range(40) if s != 10]
    assert log.stats["corrupt_records_skipped"] == 1 and "corrupt record" in caplog.text
    log.close()


# ---- retention -----------------------------------------------------------------------------
def test_retention_by_budget_removes_oldest_first_and_counts(d, now):
    seg, budget = 4096, 6 * 4096
    log = RawLog(d, segment_bytes=seg, budget_bytes=budget)
    total = 0
    for burst in range(60):
        log.append_many([W.record_for(s, now) for s in range(burst * 40, burst * 40 + 40)])
        total += 40
        on_disk = sum(p.stat().st_size for p in d.glob("seg-*.log"))
        assert on_disk <= budget
    log.wait_sealed()
    st = log.stats
    segs = log.segments()
    assert st["segments_removed"] > 20
    assert st["records_removed"] + sum(s.records for s in segs) == total
    assert st["bytes_removed"] > 20 * 3000
    # what is left is the newest data, contiguous up to the last record
    kept = [r.seq for r in log.read()]
    assert kept == list(range(kept[0], total)) and kept[0] == st["oldest_seq"]
    assert kept[0] == st["records_removed"]
    assert [s.first_seq for s in segs[1:]] == [s.last_seq + 1 for s in segs[:-1]]
    assert len(list(d.glob("*.seal.json"))) == len(segs) - 1
    log.close()
    # a smaller budget applies at the next open
    log = RawLog(d, segment_bytes=seg, budget_bytes=3 * seg)
    assert sum(p.stat().st_size for p in d.glob("seg-*.log")) <= 3 * seg
    assert log.stats["segments_removed"] >= 3
    log.close()


def test_retention_by_age(d, now):
    old, limit = now - 40 * 86400, 30 * 86400
    log = RawLog(d, segment_bytes=4096, budget_bytes=None, max_age_s=limit)
    log.append_many([W.record_for(s, old) for s in range(100)])  # 40 days old
    log.wait_sealed()
    st = log.stats
    # each roll sealed an all-old segment and retention removed it at once; the open
    # segment is never removed
    assert st["segments_removed"] >= 3
    assert [s.sealed for s in log.segments()] == [False]
    assert st["records_removed"] + log.segments()[0].records == 100
    log.append_many([W.record_for(s, now) for s in range(100, 200)])
    log.wait_sealed()
    st = log.stats
    segs = log.segments()
    assert all(s.max_received >= now - limit for s in segs if s.sealed)
    left = [r.seq for r in log.read()]
    assert left == list(range(st["records_removed"], 200))
    assert st["records_removed"] >= 60
    log.close()

    # at open: a log written without an age limit is trimmed when it is opened with one
    d2 = d.with_name("other")
    with RawLog(d2, segment_bytes=4096, budget_bytes=None, max_age_s=None) as log:
        log.append_many([W.record_for(s, old) for s in range(100)])
        log.append_many([W.record_for(s, now - 3600) for s in range(100, 150)])  # 1 h old
        log.wait_sealed()
        n_old = sum(1 for s in log.segments() if s.sealed and s.max_received < now - limit)
        assert n_old >= 3
    with RawLog(d2, segment_bytes=4096, budget_bytes=None, max_age_s=limit) as log:
        assert log.stats["segments_removed"] == n_old
        # an idle log: enforce_retention() applies a (here: stricter) limit without a roll
        sealed = [s for s in log.segments() if s.sealed]
        before = log.stats["records_removed"]
        log.max_age_s = 60.0  # everything sealed is now "too old"
        removed = log.enforce_retention()
        assert removed == {"segments": len(sealed), "records": sum(s.records for s in sealed),
                           "bytes": sum(s.bytes for s in sealed)}
        assert log.stats["records_removed"] == before + removed["records"]
        assert [s.sealed for s in log.segments()] == [False]


# ---- versioned data ------------------------------------------------------------------------
def test_snapshot_and_verify(d, now):
    log = RawLog(d, segment_bytes=4096, budget_bytes=None)
    log.append_many([W.record_for(s, now) for s in range(200)])
    m = log.snapshot()
    assert m["format"] == "edgeml-rawlog-snapshot" and m["version"] == 1
    assert m["pipeline"] == "activity" and m["records"] == 200
    assert m["first_seq"] == 0 and m["last_seq"] == 199
    assert m["open_segment_excluded"] is None  # the open segment was sealed first
    assert len(m["id"]) == 64
    for s in m["segments"]:
        assert hashlib.sha256((d / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    m = json.loads(json.dumps(m))  # as shipped
    assert verify_snapshot(d, m).ok

    # appending more does not disturb the cited data
    log.append_many([W.record_for(s, now) for s in range(200, 220)])
    assert verify_snapshot(d, m).ok

    # a range cites only the segments that hold it
    part = log.snapshot(start_seq=50, end_seq=60)
    assert all(s["first_seq"] <= 60 and s["last_seq"] >= 50 for s in part["segments"])
    assert part["range"] == {"start_seq": 50, "end_seq": 60}
    assert len(part["segments"]) < len(m["segments"])

    # a read-only view cannot seal: the newest records stay out and it says so
    log.append_many([W.record_for(s, now) for s in range(220, 230)])
    ro = open_reader(d).snapshot()
    excluded = ro["open_segment_excluded"]
    assert excluded["records"] == 230 - excluded["first_seq"] > 0
    assert ro["last_seq"] == excluded["first_seq"] - 1

    target = m["segments"][2]["file"]
    flip(d / target, 100)
    rep = verify_snapshot(d, m)
    assert not rep.ok and rep.changed == (target,) and rep.missing == ()
    assert target in rep.problems[0]
    gone = m["segments"][0]["file"]
    (d / gone).unlink()
    rep = verify_snapshot(d, m)
    assert rep.missing == (gone,) and rep.changed == (target,) and rep.checked == \
        len(m["segments"])
    m2 = dict(m, segments=m["segments"][1:])
    assert any("manifest id" in p for p in verify_snapshot(d, m2).problems)
    with pytest.raises(RawLogError, match=r"segments\[0\]\.file"):
        verify_snapshot(d, dict(m, segments=[dict(m["segments"][0], file="../../etc/passwd")]))
    log.close()


# ---- concurrency, durability knobs, errors -------------------------------------------------
def test_reader_on_a_live_log_and_single_writer(d, now):
    log = RawLog(d, budget_bytes=None)
    log.append_many([W.record_for(s, now) for s in range(25)])
    log.append(*W.record_for(25, now))  # buffered, not yet in the OS
    assert [r.seq for r in open_reader(d).read()] == list(range(25))
    log.flush()
    assert [r.seq for r in open_reader(d).read()] == list(range(26))
    with pytest.raises(RawLogBusyError, match="already open for writing"):
        RawLog(d)
    # a record being written (a partial tail) is invisible to readers, not an error
    seg = log.segments()[-1].path
    with open(seg, "ab") as fh:
        fh.write(b"\xedRLg\x40\x00")
    reader = open_reader(d)
    assert len(list(reader.read())) == 26 and reader.stats["corrupt_records_skipped"] == 0
    log.close()
    with pytest.raises(RawLogError, match="no raw-input log"):
        open_reader(d.parent / "nope")


def test_fsync_policies(d, now):
    with RawLog(d, fsync_interval_s=0, budget_bytes=None) as log:
        for s in range(10):
            log.append(*W.record_for(s, now))
            assert log.stats["buffered_bytes"] == 0
        log.append_many([W.record_for(s, now) for s in range(10, 15)])
        assert log.stats["fsyncs"] == 11
    with RawLog(d, fsync_interval_s=3600, budget_bytes=None) as log:
        log.append(*W.record_for(15, now))
        assert log.stats["buffered_bytes"] > 0
        log.maybe_sync()
        assert log.stats["fsyncs"] == 0 and log.stats["buffered_bytes"] > 0
        log.sync()
        assert log.stats["fsyncs"] == 1 and log.stats["buffered_bytes"] == 0
    with RawLog(d, fsync_interval_s=1e-9, budget_bytes=None) as log:
        log.append(*W.record_for(16, now))
        log.maybe_sync()
        assert log.stats["fsyncs"] == 1


def test_appends_and_syncs_from_two_threads(d, now):
    log = RawLog(d, segment_bytes=64 * 1024, budget_bytes=None)
    done = threading.Event()
    syncs = 0

    def syncer() -> None:
        nonlocal syncs
        while not done.is_set():
            log.sync()
            syncs += 1

    t = threading.Thread(target=syncer)
    t.start()
    try:
        for s in range(3000):
            log.append(*W.record_for(s, now))
    finally:
        done.set()
        t.join()
    assert syncs > 0
    assert as_tuples(log.read()) == exp_tuples(range(3000), now)
    log.close()


def test_bad_settings_and_inputs_are_rawlog_errors(d, now):
    with pytest.raises(RawLogError, match="segment_bytes"):
        RawLog(d, segment_bytes=10)
    with pytest.raises(RawLogError, match="budget_bytes"):
        RawLog(d, segment_bytes=4096, budget_bytes=1000)
    with pytest.raises(RawLogError, match="fsync_interval_s"):
        RawLog(d, fsync_interval_s=-1)
    with pytest.raises(RawLogError, match="invalid pipeline name"):
        pipeline_dir(d, "../escape")
    with RawLog(d, budget_bytes=None) as log:
        with pytest.raises(RawLogError, match="payload must be bytes"):
            log.append("t", "text, not bytes", now)  # type: ignore[arg-type]
        with pytest.raises(RawLogError):
            log.append_many([("t", b"ok", now), ("t", None, now)])  # type: ignore[list-item]
        assert log.next_seq == 0  # nothing of the failed calls was archived
        assert log.append("t", b"ok", now) == 0
