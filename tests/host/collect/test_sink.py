"""The fleet database: parsing batches, idempotent storage, quarantine, schema, retention,
on SQLite and on a private PostgreSQL."""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from edgeml.errors import CollectError, ConfigError
from edgeml.host.collect.batch import parse_delivery, split_topic
from edgeml.host.collect.schema import SCHEMA_VERSION
from edgeml.host.collect.sink import Incoming, Sink, parse_db_url


def batch(device="d1", stream="results", n=5, start=0, fmt="msgpack", **extra):
    recs = [{"record_id": f"{device}/p/{start + i}/m/1/{stream}", "pipeline": "p",
             "model": "m", "version": "1", "role": "champion",
             "output": {"label": "A", "scores": [0.5, float("nan")]}, "ts": 1000.0 + i,
             "input_seq": start + i, "raw": b"\x00\x01", **extra} for i in range(n)]
    doc = {"schema": 1, "device": device, "stream": stream, "batch_seq": 1,
           "sent": time.time(), "records": recs}
    if fmt == "json":
        for r in recs:
            r.pop("raw")
            r["output"]["scores"] = [0.5]
        return json.dumps(doc).encode()
    return msgpack.packb(doc, use_bin_type=True)


def test_topic_and_envelope_checks():
    assert split_topic("edgeml/d1/sync/results", "edgeml") == ("d1", "results")
    assert split_topic("site/a/d1/sync/alerts", "site/a") == ("d1", "alerts")
    assert split_topic("edgeml/d1/out/results", "edgeml") is None
    assert split_topic("other/d1/sync/results", "edgeml") is None

    p = parse_delivery("edgeml/d1/sync/results", batch(n=3))
    assert [r.record_id for r in p.rows] == [f"d1/p/{i}/m/1/results" for i in range(3)]
    assert p.rows[0].input_key == "d1/p/0" and p.rows[0].label == "A"
    assert json.loads(p.rows[0].record)["output"]["scores"] == [0.5, None]  # NaN -> null
    assert parse_delivery("edgeml/d1/sync/results", batch(n=2, fmt="json")).rows[1].ts == 1001.0

    reasons = {
        "foreign topic": parse_delivery("x/d1/sync/results", batch()),
        "neither msgpack nor JSON": parse_delivery("edgeml/d1/sync/results", b"\xc1garbage"),
        "envelope says device": parse_delivery("edgeml/d2/sync/results", batch()),
        "unknown batch schema": parse_delivery(
            "edgeml/d1/sync/results", msgpack.packb({"schema": 9, "device": "d1"})),
    }
    for why, parsed in reasons.items():
        assert not parsed.rows and len(parsed.rejects) == 1
        assert why in parsed.rejects[0].reason

    # whatever the payload, parsing never raises (nesting deeper than Python recurses)
    deep = b'{"schema": 1, "records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    p = parse_delivery("edgeml/d1/sync/results", deep)
    assert not p.rows and len(p.rejects) == 1 and p.rejects[0].payload == deep

    # inside a good batch, one bad record is quarantined alone
    doc = msgpack.unpackb(batch(n=3))
    doc["records"][1] = {"no": "id"}
    doc["records"].append({"record_id": "d2/p/9/m/1/results"})  # another device's id
    p = parse_delivery("edgeml/d1/sync/results", msgpack.packb(doc))
    assert len(p.rows) == 2
    assert [r.reason for r in p.rejects] == [
        "record 1 has no record_id",
        "record 3: record_id 'd2/p/9/m/1/results' is not of device 'd1'"]


def test_db_urls():
    assert parse_db_url("sqlite:///rel/f.db") == ("sqlite", "rel/f.db")
    assert parse_db_url("sqlite:////abs/f.db") == ("sqlite", "/abs/f.db")
    assert parse_db_url("postgresql://u@h:5/db")[0] == "postgresql"
    for bad in ("mysql://x", "sqlite://host/f.db", "f.db"):
        with pytest.raises(ConfigError):
            parse_db_url(bad)


def _check_sink(sink: Sink) -> None:
    assert sink.schema == (0, SCHEMA_VERSION)
    good = Incoming("edgeml/d1/sync/results", batch(n=5), "mqtt://t")
    r = sink.store([good, good, Incoming("edgeml/d1/sync/results", b"\xc1\xc1", "mqtt://t"),
                    Incoming("edgeml/d2/sync/outputs", batch("d2", "outputs", n=3,
                                                             latency_ms=2.5, fallback=False))])
    assert (r.deliveries, r.records, r.stored, r.duplicates, r.quarantined) == (4, 13, 8, 5, 1)
    again = sink.store([good])
    assert (again.stored, again.duplicates) == (0, 5)  # idempotent by record_id
    assert sink.count() == 8
    assert sink.count("quarantine") == 1
    assert sink.count("devices") == 2
    assert sink.count("versions") == 1
    q = sink._execute("SELECT reason, payload, source, topic FROM quarantine").fetchone()
    assert q[0].startswith("neither msgpack nor JSON") and bytes(q[1]) == b"\xc1\xc1"
    assert q[2:] == ("mqtt://t", "edgeml/d1/sync/results")
    lag = sink._execute("SELECT device, stream, batches, records FROM ingest_lag "
                        "ORDER BY device").fetchall()
    assert lag == [("d1", "results", 3, 15), ("d2", "outputs", 1, 3)]
    row = sink._execute("SELECT latency_ms, fallback, role, label FROM records "
                        "WHERE stream = 'outputs' ORDER BY id").fetchone()
    assert row == (2.5, 0, "champion", "A")
    # alerts and deploy events also get their own tables
    alert = {"schema": 1, "device": "d1", "stream": "alerts", "sent": time.time(),
             "records": [{"record_id": "d1/p/alert/canary_agreement_low/5.000000",
                          "kind": "canary_agreement_low", "pipeline": "p", "ts": 5.0}]}
    deploy = {"schema": 1, "device": "d1", "stream": "deploy", "sent": time.time(),
              "records": [{"record_id": "d1/p/active@6.000000/m/2/deploy", "pipeline": "p",
                           "name": "m", "version": "2", "stage": "active", "ts": 6.0}]}
    sink.store([Incoming("edgeml/d1/sync/alerts", msgpack.packb(alert)),
                Incoming("edgeml/d1/sync/deploy", msgpack.packb(deploy))])
    assert sink._execute("SELECT kind FROM alerts").fetchall() == [("canary_agreement_low",)]
    assert sink._execute("SELECT name, version, stage FROM deploy_events").fetchall() == [
        ("m", "2", "active")]
    # the readers a rollout uses, on either database
    from edgeml.host.collect.evidence import deploy_events, version_evidence

    ev = deploy_events(sink.url, devices=["d1"], version="2")
    assert [(e["device"], e["name"], e["stage"], e["ts"]) for e in ev] == [
        ("d1", "m", "active", 6.0)]
    assert deploy_events(sink.url, devices=["d2"]) == []
    (fig,) = version_evidence(sink.url, pipeline="p")
    assert (fig.key, fig.rows, fig.answers, fig.answer_share, fig.latency_p50_ms) == (
        "m:1", 5, 3, 1.0, 2.5)
    assert fig.devices == 2 and fig.agreement == 1.0 and fig.fallback_rate == 0.0
    # retention: records older than the setting go
    sink.retention_days = 1.0
    # ts 1000-1002 of d1 and d2, the alert (5) and the deploy event (6)
    assert sink.expire(now=1000.0 + 86400.0 + 2.5) == 8
    assert sink.count() == 2 and sink.count("alerts") == 0


def test_sqlite_sink(tmp_path):
    url = f"sqlite:///{tmp_path}/fleet.db"
    with Sink(url) as sink:
        _check_sink(sink)
    with Sink(url) as sink:  # reopened: no migration to do
        assert sink.schema == (SCHEMA_VERSION, SCHEMA_VERSION)
        sink._execute("INSERT INTO schema_version (version, applied) VALUES (99, 0)")
    with pytest.raises(CollectError, match="schema version 99, newer"):
        Sink(url)


def test_postgres_sink(postgres):
    with Sink(postgres.create_database("sink_unit")) as sink:
        _check_sink(sink)
        # jsonb refuses NaN/inf and NUL characters: they are stored as null / U+FFFD
        doc = msgpack.unpackb(batch(n=2, start=50))
        doc["records"][0]["ts"] = float("inf")
        doc["records"][0]["note"] = "a\x00b"
        r = sink.store([Incoming("edgeml/d1/sync/results", msgpack.packb(doc))])
        assert r.stored == 2 and r.quarantined == 0
        ts, rec = sink._execute("SELECT ts, record FROM records "
                                "WHERE record_id = 'd1/p/50/m/1/results'").fetchone()
        assert ts is None and rec["note"] == "a\ufffdb"


def _grouped_batch(stream: str = "results") -> tuple[dict, list[dict]]:
    """A batch holding the grouped records the device's own egress packs for two messages of
    three real rows each, and the per-row records they stand for."""
    from edgeml.core.egress import _packed_run
    from edgeml.host.datasets import load_daphnet

    X = load_daphnet().X
    per_row = [{"id": f"s{i}", "topic": "sensors/p1/gait", "pipeline": "gait", "model": "m",
                "version": "1", "role": "champion", "ts": 1000.0 + i // 3,
                "input_seq": 7 + i // 3, "late": False,
                "output": {"label": int(X[i, 0] > 0), "score": float(X[i, 1])},
                **({"row": i % 3} if i % 3 else {}), "latency_ms": 0.2} for i in range(6)]
    run = _packed_run("d1", stream, per_row)
    recs = [msgpack.unpackb(p, raw=False) for p in run.parts]
    doc = {"schema": 1, "device": "d1", "stream": stream, "batch_seq": 1, "sent": 1.0,
           "records": recs}
    return doc, per_row


def test_grouped_records_are_stored_as_the_rows_they_stand_for():
    doc, per_row = _grouped_batch()
    assert [r["record_id"] for r in doc["records"]] == ["d1/gait/7.0-2/m/1/results",
                                                         "d1/gait/8.0-2/m/1/results"]
    p = parse_delivery("edgeml/d1/sync/results", msgpack.packb(doc))
    assert not p.rejects
    assert [r.record_id for r in p.rows] == [
        f"d1/gait/{s}{f'.{k}' if k else ''}/m/1/results" for s in (7, 8) for k in range(3)]
    assert [r.input_key for r in p.rows] == [f"d1/gait/{s}{f'.{k}' if k else ''}"
                                             for s in (7, 8) for k in range(3)]
    for row, want in zip(p.rows, per_row, strict=True):
        assert json.loads(row.record) == {"record_id": row.record_id, **want}
        assert row.input_id == want["id"] and row.label == str(want["output"]["label"])
    # another stream's "rows" field (a drift window's row count) is not a group
    drift = {"schema": 1, "device": "d1", "stream": "drift", "sent": 1.0,
             "records": [{"record_id": "d1/gait/drift/output/1.0", "rows": 256}]}
    assert len(parse_delivery("edgeml/d1/sync/drift", msgpack.packb(drift)).rows) == 1


def test_a_hostile_grouped_record_is_quarantined_alone_and_never_stops_the_parse():
    """Mutations of a real grouped record, the way a broken or hostile sender would make
    them: each either stands for rows of its own input, all within the device's ids, or is
    quarantined alone; the good record beside it is always kept."""
    import random

    doc, _ = _grouped_batch()
    good, victim = doc["records"]
    rnd = random.Random(7)
    junk = [None, 0, -1, 2**63, 1.5, "", "x/y", "%2F", "0-2", [], {}, [1], {"row": "a"},
            b"\xff", True, "d2/gait/1/m/1/results", "a" * 10_000]

    def mutate(rec: dict) -> dict:
        rec = json.loads(json.dumps(rec))
        for _ in range(rnd.randint(1, 3)):
            what = rnd.randrange(7)
            rows = rec.get("rows")
            if what == 0:
                rec["rows"] = rnd.choice(junk)
            elif what == 1 and isinstance(rows, list) and rows:
                rows[rnd.randrange(len(rows))] = rnd.choice(junk)
            elif what == 2 and isinstance(rows, list) and rows:
                k = rnd.randrange(len(rows))
                if isinstance(rows[k], dict):
                    rows[k]["row"] = rnd.choice(junk)
            elif what == 3:
                rec["input_seq"] = rnd.choice(junk)
            elif what == 4 and isinstance(rec.get("record_id"), str):
                parts = rec["record_id"].split("/")
                parts[rnd.randrange(len(parts))] = str(rnd.choice(junk))
                rec["record_id"] = "/".join(parts)
            elif what == 5 and isinstance(rows, list):
                rec["rows"] = rows + rows  # duplicated rows
            else:
                rec.pop(rnd.choice(["input_seq", "rows", "record_id"]), None)
        return rec

    outcomes = {"stored": 0, "refused": 0}
    for _ in range(400):
        bad = mutate(victim)
        payload = msgpack.packb({**doc, "records": [good, bad]}, use_bin_type=True)
        p = parse_delivery("edgeml/d1/sync/results", payload)
        ids = [r.record_id for r in p.rows]
        assert ids[:3] == ["d1/gait/7/m/1/results", "d1/gait/7.1/m/1/results",
                           "d1/gait/7.2/m/1/results"]  # the good one, whatever came next
        assert len(ids) == len(set(ids))
        assert all(i.startswith("d1/") and i.count("/") == 5 for i in ids)
        if len(p.rows) > 3:
            outcomes["stored"] += 1
            assert not p.rejects
        else:
            outcomes["refused"] += 1
            assert len(p.rejects) == 1 and p.rejects[0].reason.startswith("record 1")
    assert outcomes["refused"] > 100  # the mutations did reach the checks
