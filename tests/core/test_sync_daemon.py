"""Store-and-forward through the real daemon: upstream outages, kill -9, the outbox budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config


def upstream_ids(msgs, stream=None):
    ids = []
    for m in msgs:
        if stream is None or m.topic.endswith(f"/sync/{stream}"):
            ids += [r["record_id"] for r in msgpack.unpackb(m.payload)["records"]]
    return ids


def config(tmp_path, broker, upstream, gait_bundle, extra=""):
    up = f'[upstream]\nurl = "{upstream.url}"\n' if upstream is not None else ""
    return write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                        models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                        pipeline=gait_pipeline(), device_id="gw-01",
                        extra=extra + "\n[sync]\nbatch_max_wait_s = 0.05\n" + up)


def test_upstream_outage_loses_nothing(broker, broker_factory, daemon_factory, tmp_path,
                                       gait_bundle):
    upstream = broker_factory("upstream").start()
    cfg = config(tmp_path, broker, upstream, gait_bundle)
    sink = Collector(upstream, "edgeml/gw-01/sync/#", client_id="cloud", clean=False)
    d = daemon_factory(cfg)
    publish_all(broker, gait_messages(200))
    sink.wait_for(lambda m: len(set(upstream_ids(m, "outputs"))) >= 200)
    upstream.stop()  # the cable is pulled
    publish_all(broker, gait_messages(500, start=200))
    d.call(lambda: None)
    out = Collector(broker, "edgeml/gw-01/out/gait", client_id="late-out", clean=False)
    # the daemon keeps answering while the upstream is away; the outbox holds the results
    publish_all(broker, gait_messages(10, start=700))
    out.wait_count(10, timeout=60)
    backlog = d.status()["outbox"]["streams"]["outputs"]["backlog"]
    assert backlog > 0
    upstream.start()
    want = {f"gw-01/gait/{seq}/gait/1/outputs" for seq in range(710)}
    sink.wait_for(lambda m: want <= set(upstream_ids(m, "outputs")), timeout=60)
    sink.wait_for(lambda m: len(set(upstream_ids(m, "results"))) >= 710, timeout=60)
    ids = upstream_ids(sink.messages, "outputs")
    assert set(ids) == want  # every record, none foreign; duplicates allowed on the wire
    sink.close()
    out.close()


def test_sigkill_mid_flight_then_restart(broker, broker_factory, tmp_path, gait_bundle):
    upstream = broker_factory("upstream").start()
    cfg = config(tmp_path, broker, upstream, gait_bundle)
    sink = Collector(upstream, "edgeml/gw-01/sync/#", client_id="cloud2", clean=False)

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stderr:
            if "ready" in line:
                return proc
        raise RuntimeError("daemon did not start")

    proc = start()
    try:
        publish_all(broker, gait_messages(3000))
        sink.wait_for(lambda m: len(upstream_ids(m)) > 200, timeout=60)  # batches in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    proc = start()
    want = {f"g{i}" for i in range(3010)}  # every input the stream sent

    def answered(msgs):
        return {r["id"] for m in msgs if m.topic.endswith("/sync/outputs")
                for r in msgpack.unpackb(m.payload)["records"]}
    try:
        publish_all(broker, gait_messages(10, start=3000))  # and the stream goes on
        sink.wait_for(lambda m: want <= answered(m), timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        proc.stderr.close()
        sink.close()
    assert answered(sink.messages) == want  # nothing missing upstream, nothing made up
    # duplicates are possible (a message archived but not yet acknowledged at the kill is
    # delivered again; a batch sent but not acknowledged is sent again): each carries the
    # same stable record id for the same input, so upstream can drop it
    by_record: dict[str, set] = {}
    for m in sink.messages:
        if m.topic.endswith("/sync/outputs"):
            for r in msgpack.unpackb(m.payload)["records"]:
                by_record.setdefault(r["record_id"], set()).add(r["id"])
    assert all(len(inputs) == 1 for inputs in by_record.values())


def test_outbox_budget_with_upstream_away(broker, broker_factory, daemon_factory, tmp_path,
                                          gait_bundle):
    upstream = broker_factory("upstream")  # never started: the upstream is away
    extra = "[profile_overrides]\ndisk = { outbox_budget_mb = 1 }\n"
    cfg = config(tmp_path, broker, upstream, gait_bundle, extra=extra)
    (tmp_path / "bystander.bin").write_bytes(b"keep me" * 1000)
    out = Collector(broker, "edgeml/gw-01/out/gait")
    d = daemon_factory(cfg)
    n = 6000
    publish_all(broker, gait_messages(n))
    out.wait_count(n, timeout=120)  # the daemon keeps scoring and answering
    def made(ob: dict) -> int:  # outputs + results (the drift stream adds its own records)
        return sum(v["backlog"] + v["dropped"] + v["refused"]
                   for k, v in ob["streams"].items() if k in ("outputs", "results"))
    for _ in range(200):
        st = d.status()
        ob = st.get("outbox")
        if ob and made(ob) >= 2 * n:
            break
        time.sleep(0.05)
    ob = d.status()["outbox"]
    assert st["pipelines"]["gait"]["scored"] == n
    assert ob["bytes_used"] <= ob["budget_bytes"] == 2**20
    # exact accounting: every record made is either still queued or counted as dropped/refused
    assert made(ob) == 2 * n
    assert ob["dropped"] + ob["refused"] > 0
    assert (tmp_path / "bystander.bin").read_bytes() == b"keep me" * 1000
    out.close()
