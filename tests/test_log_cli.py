"""``edgeml log``: ls, cat, snapshot, verify and export through edgeml.cli.main."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np
import pytest
import rawlog_writer as W

from edgeml.cli import build_parser, main
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import RawLog, pipeline_dir


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def data_dir(tmp_path: Path, now: float) -> Path:
    """Two pipelines: 'activity' (BasicMotions JSON samples, several segments) and 'packed'
    (the same samples as msgpack, plus one array-field batch)."""
    dd = tmp_path / "data"
    with RawLog(pipeline_dir(dd, "activity"), segment_bytes=8192, budget_bytes=None) as log:
        log.append_many([W.record_for(s, now) for s in range(150)])
    with RawLog(pipeline_dir(dd, "packed"), budget_bytes=None) as log:
        for s in range(5):
            topic, payload, received = W.record_for(s, now)
            log.append(topic, msgpack.packb(json.loads(payload)), received)
    return dd


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["log", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_flag_has_help():
    parser = build_parser()
    log_parser = parser._subparsers._group_actions[0].choices["log"]  # type: ignore[union-attr]
    subs = log_parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subs) == {"ls", "cat", "snapshot", "verify", "export"}
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"edgeml log {name} {action.option_strings or action.dest}"


def test_ls_json_and_table(capsys, data_dir, now):
    code, out, _ = run(capsys, "ls", "--data-dir", str(data_dir), "--json")
    assert code == 0
    doc = json.loads(out)
    by_name = {p["pipeline"]: p for p in doc["pipelines"]}
    assert set(by_name) == {"activity", "packed"}
    act = by_name["activity"]
    assert act["records"] == 150 and act["first_seq"] == 0 and act["last_seq"] == 149
    assert len(act["segments"]) > 3
    assert all(s["sealed"] and len(s["sha256"]) == 64 for s in act["segments"][:-1])
    assert act["first_received"] == pytest.approx(now)
    assert act["last_received"] == W.record_for(149, now)[2]
    assert sum(s["bytes"] for s in act["segments"]) == act["bytes"]

    code, out, _ = run(capsys, "ls", "--data-dir", str(data_dir), "--pipeline", "activity")
    assert code == 0
    assert "activity: " in out and "150 records" in out and "seq 0-149" in out
    assert "packed" not in out
    first = act["segments"][0]
    line = next(ln for ln in out.splitlines() if first["file"] in ln)
    assert f"{first['first_seq']}-{first['last_seq']}" in line and "sealed" in line
    assert first["sha256"][:16] in line
    assert "open" in next(ln for ln in out.splitlines() if act["segments"][-1]["file"] in ln)


def test_ls_errors_name_what_is_missing(capsys, data_dir, tmp_path):
    code, _, err = run(capsys, "ls", "--data-dir", str(data_dir), "--pipeline", "nope")
    assert code == 1 and "'nope'" in err and "activity, packed" in err
    code, _, err = run(capsys, "ls", "--data-dir", str(tmp_path / "empty"))
    assert code == 1 and "no raw-input logs" in err


def test_cat_json_lines_with_filters(capsys, data_dir, now):
    code, out, _ = run(capsys, "cat", "--data-dir", str(data_dir), "--pipeline", "activity",
                       "--from-seq", "10", "--to-seq", "20", "--topic", "sensors/watch-02/imu")
    assert code == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert [d["seq"] for d in lines] == [10, 13, 16, 19]
    for d in lines:
        topic, payload, received = W.record_for(d["seq"], now)
        assert d["topic"] == topic and d["payload_encoding"] == "utf-8"
        assert d["payload"].encode() == payload  # the exact bytes, as text
        assert d["received_epoch"] == received
        assert datetime.fromisoformat(d["received"].replace("Z", "+00:00")).timestamp() == \
            pytest.approx(received, abs=1e-6)
        assert d["segment"].startswith("seg-")
    # time range: ISO for since, epoch for until, and --limit
    since = datetime.fromtimestamp(W.record_for(40, now)[2], timezone.utc).isoformat()
    code, out, _ = run(capsys, "cat", "--data-dir", str(data_dir), "--pipeline", "activity",
                       "--since", since, "--until", repr(W.record_for(60, now)[2]),
                       "--limit", "5")
    seqs = [json.loads(ln)["seq"] for ln in out.splitlines()]
    assert code == 0 and len(seqs) == 5 and 39 <= seqs[0] <= 41
    assert seqs == list(range(seqs[0], seqs[0] + 5))


def test_cat_binary_payload_is_base64(capsys, data_dir, now):
    code, out, _ = run(capsys, "cat", "--data-dir", str(data_dir), "--pipeline", "packed")
    assert code == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert len(lines) == 5
    for d in lines:
        assert d["payload_encoding"] == "base64"
        raw = base64.b64decode(d["payload"])
        assert msgpack.unpackb(raw) == json.loads(W.record_for(d["seq"], now)[1])


def test_cat_bad_time_is_a_usage_error(capsys, data_dir):
    with pytest.raises(SystemExit) as exc:
        main(["log", "cat", "--data-dir", str(data_dir), "--pipeline", "activity",
              "--since", "yesterday"])
    assert exc.value.code == 2
    assert "not an ISO 8601 time or epoch seconds: 'yesterday'" in capsys.readouterr().err


def test_snapshot_verify_and_tamper(capsys, data_dir, tmp_path):
    snap = tmp_path / "week42.json"
    code, out, err = run(capsys, "snapshot", "--data-dir", str(data_dir), "--pipeline",
                         "activity", "-o", str(snap))
    assert code == 0 and out == ""
    m = json.loads(snap.read_text())
    assert m["records"] == 150 and m["open_segment_excluded"] is None  # no daemon: sealed
    assert f"snapshot {m['id'][:16]}" in err and "seqs 0-149" in err

    code, out, _ = run(capsys, "verify", "--data-dir", str(data_dir), str(snap))
    assert code == 0 and out.startswith(f"ok: snapshot {m['id'][:16]}")
    assert f"{len(m['segments'])} segment(s), 150 records" in out

    target = pipeline_dir(data_dir, "activity") / m["segments"][1]["file"]
    data = bytearray(target.read_bytes())
    data[200] ^= 0x01
    target.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", "--data-dir", str(data_dir), str(snap))
    assert code == 1
    assert f"FAILED {target.name}: changed" in out
    assert "0 missing, 1 changed" in err

    # a range snapshot on stdout
    code, out, _ = run(capsys, "snapshot", "--data-dir", str(data_dir), "--pipeline",
                       "activity", "--from-seq", "0", "--to-seq", "3")
    part = json.loads(out)
    assert code == 0 and len(part["segments"]) == 1 and part["range"]["end_seq"] == 3


def test_snapshot_while_the_daemon_writes(capsys, data_dir, now, tmp_path):
    d = pipeline_dir(data_dir, "activity")
    with RawLog(d, segment_bytes=8192, budget_bytes=None) as log:  # stands for the daemon
        log.append_many([W.record_for(s, now) for s in range(150, 160)])
        snap = tmp_path / "live.json"
        code, _, err = run(capsys, "snapshot", "--data-dir", str(data_dir), "--pipeline",
                           "activity", "-o", str(snap))
        assert code == 0 and "open by a running daemon" in err
        m = json.loads(snap.read_text())
        assert m["open_segment_excluded"]["file"] == log.segments()[-1].name
        assert m["last_seq"] < 159
        code, out, _ = run(capsys, "verify", "--data-dir", str(data_dir), str(snap))
        assert code == 0 and out.startswith("ok: ")


def test_verify_rejects_a_broken_manifest(capsys, data_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "verify", "--data-dir", str(data_dir), str(bad))
    assert code == 1 and str(bad) in err and "not valid JSON" in err
    bad.write_text(json.dumps({"format": "edgeml-rawlog-snapshot", "version": 1,
                               "pipeline": "activity", "segments": []}))
    code, _, err = run(capsys, "verify", "--data-dir", str(data_dir), str(bad))
    assert code == 1 and "segments: must be a non-empty list" in err
    code, _, err = run(capsys, "verify", "--data-dir", str(data_dir), str(tmp_path / "no.json"))
    assert code == 1 and "cannot read" in err


def _config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "edgeml.toml"
    cfg.write_text(f"""
device_id = "watch-gw"
data_dir = "{data_dir}"

[[pipelines]]
name = "activity"
topics = ["sensors/+/imu"]
features = ["ax", "ay", "az", "gx", "gy", "gz"]

[[pipelines]]
name = "arrays"
topics = ["arrays/+"]
field = "values"
""")
    return cfg


def test_export_csv_and_jsonl_of_decoded_features(capsys, data_dir, tmp_path, now):
    cfg = _config(tmp_path, data_dir)
    ds = load_basicmotions("TRAIN")
    out_csv = tmp_path / "act.csv"
    code, _, err = run(capsys, "export", "--data-dir", str(data_dir), "--pipeline", "activity",
                       "--config", str(cfg), "-o", str(out_csv), "--to-seq", "119")
    assert code == 0 and "exported 120 sample(s)" in err
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert len(rows) == 120
    for r in rows:
        seq = int(r["seq"])
        sample = ds.X[seq // 100, seq % 100]  # rawlog_writer's payload for this seq
        got = np.array([float(r[c]) for c in ds.channels], dtype=np.float32)
        np.testing.assert_array_equal(got, sample)
        assert r["label"] == ds.y[seq // 100] and r["id"] == str(seq)
        assert r["topic"] == W.record_for(seq, now)[0] and r["sample"] == "0"

    code, out, _ = run(capsys, "export", "--pipeline", "activity", "--config", str(cfg),
                       "--format", "jsonl", "--from-seq", "149")  # data dir from the config
    (doc,) = [json.loads(ln) for ln in out.splitlines()]
    assert code == 0 and doc["seq"] == 149
    assert np.float32(doc["features"]["gz"]) == ds.X[1, 49, 5]


def test_export_array_field_batches_and_undecodable_records(capsys, tmp_path, now):
    dd = tmp_path / "data"
    ds = load_basicmotions("TEST")
    with RawLog(pipeline_dir(dd, "arrays"), budget_bytes=None) as log:
        batch = {"values": ds.X[3, :4].tolist(), "id": "b1", "label": ds.y[3]}
        log.append("arrays/w1", json.dumps(batch).encode(), now)
        log.append("arrays/w1", b"\x00garbage", now + 1)
    cfg = _config(tmp_path, dd)
    code, out, err = run(capsys, "export", "--data-dir", str(dd), "--pipeline", "arrays",
                         "--config", str(cfg))
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][-6:] == [f"values[{i}]" for i in range(6)]
    assert len(rows) == 5 and [r[4] for r in rows[1:]] == ["0", "1", "2", "3"]
    assert [r[5] for r in rows[1:]] == ["b1:0", "b1:1", "b1:2", "b1:3"]
    np.testing.assert_array_equal(
        np.array([[float(v) for v in r[-6:]] for r in rows[1:]], dtype=np.float32),
        ds.X[3, :4])
    assert "1 record(s) skipped" in err and "exported 4 sample(s)" in err

    code, _, err = run(capsys, "export", "--data-dir", str(dd), "--pipeline", "nope",
                       "--config", str(cfg))
    assert code == 1 and "nope" in err
