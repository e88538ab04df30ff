"""edgeml collect end to end: real daemons scoring real data, syncing through a real mosquitto
into the collector (a subprocess), with the collector killed and the database restarted
mid-stream; every record the devices synced must be in ``records``, none missing."""

from __future__ import annotations

import sqlite3
import threading
import time

import msgpack
import pytest
from collect_helpers import CollectProcess, db_ids, kill_leftovers, wait_db
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config


@pytest.fixture(autouse=True)
def _no_leftover_collectors():
    yield
    kill_leftovers()


def _ids_of(m) -> set[str]:
    try:
        doc = msgpack.unpackb(m.payload)
    except Exception:
        return set()  # the garbage the test itself publishes
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        return set()
    return {r["record_id"] for r in doc["records"] if isinstance(r, dict)
            and str(r.get("record_id", "")).startswith("gw-01/")}


class SyncedIds:
    """Every record id the devices synced, as a plain subscriber saw the batches (decoded
    incrementally: the predicate runs on every message)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.seen = 0

    def __call__(self, msgs) -> set[str]:
        for m in msgs[self.seen:]:
            self.ids |= _ids_of(m)
        self.seen = len(msgs)
        return self.ids


def paced_publisher(broker, msgs, per_burst: int = 100, pause_s: float = 0.03):
    """Feed the daemon at a steady rate in the background (so the stream lasts a while)."""
    import paho.mqtt.client as paho

    done = threading.Event()

    def run() -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            for i in range(0, len(msgs), per_burst):
                infos = [client.publish(t, p, qos=1) for t, p in msgs[i:i + per_burst]]
                for info in infos:
                    info.wait_for_publish(30)
                time.sleep(pause_s)  # pacing the load, not synchronising
        finally:
            client.disconnect()
            client.loop_stop()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def daemon_config(tmp_path, broker, gait_bundle):
    return write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                        models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                        pipeline=gait_pipeline(), device_id="gw-01",
                        extra='\n[metrics]\nlisten = ""\n[sync]\nbatch_max_wait_s = 0.05\n'
                              'batch_max_records = 200\n')


def only_what_was_synced(witness, have: set[str]) -> None:
    """Nothing in the database that the devices did not sync. A record synced late (a drift
    window closing at the end) may reach the collector before the witness: wait for it."""
    synced = SyncedIds()
    witness.wait_for(lambda m: have <= synced(m), timeout=30)


def wait_synced(daemon, witness, n_inputs: int) -> set[str]:
    want_out = {f"gw-01/gait/{i}/gait/1/outputs" for i in range(n_inputs)}
    want_res = {f"gw-01/gait/{i}/gait/1/results" for i in range(n_inputs)}
    want = want_out | want_res
    synced = SyncedIds()
    witness.wait_for(lambda m: want <= synced(m), timeout=60)
    return set(synced(witness.messages))


def test_collector_killed_mid_stream_loses_nothing(broker, daemon_factory, tmp_path,
                                                   gait_bundle):
    db = f"sqlite:///{tmp_path}/fleet.db"
    witness = Collector(broker, "edgeml/+/sync/#")
    args = ("--source", broker.url, "--db", db, "--client-id", "collect-kill-test")
    col = CollectProcess(*args)
    d = daemon_factory(daemon_config(tmp_path, broker, gait_bundle))
    n = 3000
    done = paced_publisher(broker, gait_messages(n))
    col.wait_status(lambda s: s["stored"] >= 400)
    col.kill()  # kill -9 mid-stream: no drain, no acks for what was in hand
    at_kill = len(db_ids(db))
    # garbage and foreign batches while it is down: queued for it by the broker
    evil = {"schema": 1, "device": "gw-01", "stream": "results", "sent": 1.0,
            "records": [{"record_id": "other/p/1/m/1/results"}]}
    publish_all(broker, [("edgeml/gw-01/sync/results", b"\xc1 not a batch"),
                         ("edgeml/gw-01/sync/results", msgpack.packb(evil)),
                         ("edgeml/gw-01/sync/outputs", b'{"schema": 1, "device": "x"}')])
    col = CollectProcess(*args)
    assert done.wait(60)
    want = wait_synced(d, witness, n)
    have = wait_db(db, want)
    missing = want - have
    assert not missing, f"{len(missing)} synced records missing, e.g. {sorted(missing)[:5]}"
    only_what_was_synced(witness, have)  # and nothing else made it in
    assert 400 <= at_kill < len(want) / 2  # it was mid-stream
    assert col.proc.poll() is None  # the garbage did not stop it
    assert col.terminate() == 0
    conn = sqlite3.connect(db[len("sqlite:///"):])
    reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM quarantine"))
    assert len(reasons) == 3, reasons
    assert any("neither msgpack nor JSON" in r for r in reasons)
    assert any("is not of device 'gw-01'" in r for r in reasons)
    assert any("envelope says device 'x'" in r for r in reasons)
    total, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT record_id) FROM records"
                                   ).fetchone()
    assert total == distinct  # no duplicates
    final = db_ids(db)  # a drift window synced at the end may have landed since
    assert want <= final
    only_what_was_synced(witness, final)
    assert conn.execute("SELECT batches FROM devices WHERE device = 'gw-01'").fetchone()[0] > 0
    witness.close()


def test_database_restarted_mid_stream_loses_nothing(broker, daemon_factory, tmp_path,
                                                     gait_bundle, postgres):
    db = postgres.create_database("collect_restart")
    witness = Collector(broker, "edgeml/+/sync/#")
    col = CollectProcess("--source", broker.url, "--db", db, "--client-id", "collect-pg-test")
    d = daemon_factory(daemon_config(tmp_path, broker, gait_bundle))
    n = 3000
    done = paced_publisher(broker, gait_messages(n))
    col.wait_status(lambda s: s["stored"] >= 400)
    postgres.restart()  # the database goes away under the collector and comes back
    at_restart = len(db_ids(db))
    assert done.wait(60)
    want = wait_synced(d, witness, n)
    have = wait_db(db, want)
    missing = want - have
    assert not missing, f"{len(missing)} synced records missing, e.g. {sorted(missing)[:5]}"
    only_what_was_synced(witness, have)
    assert at_restart < len(want) / 2  # mid-stream
    last = col.wait_status(lambda s: s["db"] == "up" and s["db_errors"] > 0)
    assert last["db_errors"] > 0  # it did see the outage
    assert col.terminate() == 0
    witness.close()


def test_sigterm_drains_and_exits_zero(broker, tmp_path):
    """SIGTERM: what was received is stored, committed and acknowledged; exit 0."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    col = CollectProcess("--source", broker.url, "--db", db, "--client-id", "collect-term")
    msgs = []
    for k in range(200):
        recs = [{"record_id": f"d9/p/{k * 10 + i}/m/1/outputs", "pipeline": "p", "model": "m",
                 "version": "1", "ts": 1.0} for i in range(10)]
        msgs.append(("edgeml/d9/sync/outputs", msgpack.packb(
            {"schema": 1, "device": "d9", "stream": "outputs", "sent": 1.0, "records": recs})))
    publish_all(broker, msgs)
    col.wait_status(lambda s: s["stored"] > 0)
    assert col.terminate() == 0
    stopped = next(line for line in col.stderr if line.startswith("collect: stopped"))
    stored = int(stopped.split("; ")[1].split(" records")[0].replace(",", ""))
    assert len(db_ids(db)) == stored > 0  # what it had received is committed
    # a new collector with the same session gets whatever was not acknowledged, and no more
    col = CollectProcess("--source", broker.url, "--db", db, "--client-id", "collect-term")
    have = wait_db(db, {f"d9/p/{i}/m/1/outputs" for i in range(2000)}, timeout=30)
    assert len(have) == 2000
    assert col.terminate() == 0


def test_two_collectors_share_the_work(broker, tmp_path):
    """--group: $share/<group>/...; the broker splits the batches, both write one database,
    every record lands once."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    cols = [CollectProcess("--source", broker.url, "--db", db, "--group", "g",
                           "--client-id", f"collect-share-{i}") for i in range(2)]
    msgs = []
    for k in range(300):
        recs = [{"record_id": f"d{k % 3}/p/{k * 10 + i}/m/1/outputs", "pipeline": "p",
                 "model": "m", "version": "1", "ts": 1.0} for i in range(10)]
        msgs.append((f"edgeml/d{k % 3}/sync/outputs", msgpack.packb(
            {"schema": 1, "device": f"d{k % 3}", "stream": "outputs", "sent": 1.0,
             "records": recs})))
    publish_all(broker, msgs)
    want = {f"d{k % 3}/p/{k * 10 + i}/m/1/outputs" for k in range(300) for i in range(10)}
    assert wait_db(db, want, timeout=30) == want
    stats = [c.wait_status(lambda s: s["deliveries"] > 0) for c in cols]
    for c in cols:
        assert c.terminate() == 0
    final = [c.statuses[-1] for c in cols]
    assert sum(s["deliveries"] for s in final) == 300  # each batch went to one member
    assert all(s["deliveries"] > 0 for s in stats)


def test_a_dead_group_member_keeps_its_share_until_it_returns(broker, tmp_path):
    """mosquitto queues a killed member's share of a $share group for its session: the live
    member does not get it; a replacement with the same client id does."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    live = CollectProcess("--source", broker.url, "--db", db, "--group", "g",
                          "--client-id", "member-live")
    dead = CollectProcess("--source", broker.url, "--db", db, "--group", "g",
                          "--client-id", "member-dead")
    dead.kill()
    msgs = [("edgeml/d1/sync/outputs", msgpack.packb(
        {"schema": 1, "device": "d1", "stream": "outputs", "sent": 1.0,
         "records": [{"record_id": f"d1/p/{k}/m/1/outputs", "ts": 1.0}]})) for k in range(100)]
    publish_all(broker, msgs)
    want = {f"d1/p/{k}/m/1/outputs" for k in range(100)}
    first = live.wait_status(lambda s: s["deliveries"] > 0 and s["queued"] == 0)
    n = len(live.statuses)
    later = live.wait_status(lambda s: live.statuses.index(s) >= n + 2)  # 0.4 s on
    assert later["deliveries"] == first["deliveries"] < 100  # its share only, no more
    assert len(db_ids(db)) == first["deliveries"]
    back = CollectProcess("--source", broker.url, "--db", db, "--group", "g",
                          "--client-id", "member-dead")
    assert wait_db(db, want, timeout=30) == want
    assert live.terminate() == 0 and back.terminate() == 0


def test_a_batch_message_syncs_as_one_record_and_is_collected_per_row(broker, daemon_factory,
                                                                    tmp_path, gait_bundle):
    """Ten real samples in one message: one grouped record per stream on the wire, and in the
    database the ten per-row records it stands for, each with the answer the device gave."""
    import json

    per_msg, n_msgs = 10, 12
    samples = [json.loads(p) for _, p in gait_messages(per_msg * n_msgs)]
    msgs = [("sensors/many/gait", json.dumps({"id": f"b{k}", "samples": [
        {f: v for f, v in s.items() if f != "id"} for s in samples[k * per_msg:(k + 1) * per_msg]
    ]}).encode()) for k in range(n_msgs)]
    db = f"sqlite:///{tmp_path}/fleet.db"
    witness = Collector(broker, "edgeml/gw-01/sync/#")
    out = Collector(broker, "edgeml/gw-01/out/gait")
    col = CollectProcess("--source", broker.url, "--db", db, "--client-id", "collect-rows")
    try:
        daemon_factory(daemon_config(tmp_path, broker, gait_bundle))
        publish_all(broker, msgs)
        answers = [msgpack.unpackb(m.payload) for m in out.wait_count(n_msgs, timeout=60)]
        seqs = sorted({a[0]["input_seq"] for a in answers})
        assert len(seqs) == n_msgs
        want = {f"gw-01/gait/{s}{f'.{r}' if r else ''}/gait/1/{stream}"
                for s in seqs for r in range(per_msg) for stream in ("outputs", "results")}
        have = wait_db(db, want)
        # on the wire: one record per message and stream, never a row's own
        wire = SyncedIds()
        witness.wait_for(lambda m: len([i for i in wire(m) if "/outputs" in i or "/results" in i])
                         >= 2 * n_msgs, timeout=30)
        synced = {i for i in wire.ids if i.endswith(("/outputs", "/results"))}
        assert synced == {f"gw-01/gait/{s}.0-{per_msg - 1}/gait/1/{stream}"
                          for s in seqs for stream in ("outputs", "results")}
        assert not synced & have  # the database holds the rows, not the groups
    finally:
        witness.close()
        out.close()
        assert col.terminate() == 0
    conn = sqlite3.connect(db[len("sqlite:///"):])
    stored = {rid: (label, input_id, json.loads(rec)) for rid, label, input_id, rec in conn.execute(
        "SELECT record_id, label, input_id, record FROM records WHERE stream = 'outputs'")}
    assert len(stored) == per_msg * n_msgs
    for a in answers:  # each row as the device answered it live
        for r in a:
            row = r.get("row", 0)
            rid = f"gw-01/gait/{r['input_seq']}{f'.{row}' if row else ''}/gait/1/outputs"
            label, input_id, rec = stored[rid]
            assert input_id == str(r["id"]) and label == str(r["output"]["label"])
            assert rec["output"] == r["output"] and rec.get("row", 0) == row
            assert {k: rec[k] for k in ("topic", "ts", "input_seq", "policy")} == {
                k: r[k] for k in ("topic", "ts", "input_seq", "policy")}
    results = conn.execute("SELECT COUNT(*), COUNT(DISTINCT input_key) FROM records "
                           "WHERE stream = 'results'").fetchone()
    assert results == (per_msg * n_msgs, per_msg * n_msgs)
