"""The daemon end to end: real mosquitto, real ONNX bundles, the real BasicMotions stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
from conftest import Collector, publish_all, write_config

from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

OUT = "edgeml/watch-01/out/activity"


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


@pytest.fixture(scope="module")
def sklearn_labels(test_set):
    """What scikit-learn itself predicts for every TEST window (the host-side truth)."""
    from models import train_activity_model

    lr = train_activity_model("logreg").predict(test_set.flat())
    rf = train_activity_model("forest").predict(test_set.flat())
    return {"1": list(lr), "2": list(rf)}


def stream(test_set, series=range(40), topic="sensors/w1/imu", fmt="json"):
    """One message per 6-channel sample, series after series, as a watch would send them."""
    items = []
    for s in series:
        for i, row in enumerate(test_set.X[s]):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
            body["id"] = f"s{s}-{i}"
            payload = json.dumps(body).encode() if fmt == "json" else msgpack.packb(body)
            items.append((topic, payload))
    return items


def answers(msgs):
    return [msgpack.unpackb(m.payload) for m in msgs if m.topic == OUT]


def test_stream_labels_equal_sklearn(broker, collector, daemon_factory, tmp_path, test_set,
                                     sklearn_labels, activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = collector(OUT)
    d = daemon_factory(cfg)
    publish_all(broker, stream(test_set))
    recs = answers(out.wait_count(40, timeout=60))
    assert [r["output"]["label"] for r in recs] == sklearn_labels["1"]
    assert [r["id"] for r in recs] == [f"s{s}-99" for s in range(40)]
    first = recs[0]
    assert set(first) >= {"id", "topic", "pipeline", "model", "version", "output", "policy",
                          "fallback", "latency_ms", "ts", "input_seq"}
    assert (first["model"], first["version"], first["policy"], first["fallback"]) == \
        ("activity", "1", "champion", False)
    assert first["topic"] == "sensors/w1/imu" and first["input_seq"] == 99
    assert [r["input_seq"] for r in recs] == [100 * s + 99 for s in range(40)]
    st = d.status()["pipelines"]["activity"]
    assert st["received"] == 4000 and st["accepted"] == 4000 and st["scored"] == 40
    assert st["rejected"] == 0 and st["dropped"] == 0


def test_champion_and_challenger_both_recorded(broker, collector, daemon_factory, tmp_path,
                                               test_set, sklearn_labels, activity_bundle,
                                               activity_bundle_v2):
    cfg = write_config(
        tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
        models=[{"name": "activity", "version": "1", "bundle": activity_bundle},
                {"name": "activity", "version": "2", "role": "challenger",
                 "bundle": activity_bundle_v2}],
        pipeline={"topics": ["sensors/+/imu"]})
    out = collector(OUT)
    sync = collector("edgeml/watch-01/sync/#")
    d = daemon_factory(cfg)
    # two watches interleaved: windows are assembled per source topic
    a, b = stream(test_set, range(0, 20), "sensors/w1/imu"), stream(test_set, range(20, 40),
                                                                    "sensors/w2/imu")
    publish_all(broker, [x for pair in zip(a, b, strict=True) for x in pair])
    recs = answers(out.wait_count(40, timeout=60))
    by_topic = {t: [r["output"]["label"] for r in recs if r["topic"] == t]
                for t in ("sensors/w1/imu", "sensors/w2/imu")}
    assert by_topic["sensors/w1/imu"] == sklearn_labels["1"][:20]
    assert by_topic["sensors/w2/imu"] == sklearn_labels["1"][20:]
    assert all(r["version"] == "1" and not r["fallback"] for r in recs)
    # every version's result for every window reaches the upstream sync topic
    def results(msgs):
        got = {}
        for m in msgs:
            if m.topic.endswith("/sync/results"):
                for rec in msgpack.unpackb(m.payload)["records"]:
                    got[(rec["version"], rec["topic"], rec["input_seq"])] = rec
        return got
    sync.wait_for(lambda msgs: len(results(msgs)) >= 80, timeout=60)
    got = results(sync.messages)
    for version in ("1", "2"):
        mine = sorted((k, r) for k, r in got.items() if k[0] == version)
        labels = [r["output"]["label"] for k, r in mine if k[1] == "sensors/w1/imu"]
        assert labels == sklearn_labels[version][:20]
    vs = {v["version"]: v for v in d.status()["pipelines"]["activity"]["versions"]}
    assert vs["1"]["rows"] == 40 and vs["2"]["rows"] == 40 and vs["2"]["role"] == "challenger"


def test_bad_input_goes_to_dlq_and_stream_goes_on(broker, collector, daemon_factory, tmp_path,
                                                  test_set, sklearn_labels, activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       pipeline={"format": "auto", "max_payload_bytes": 65536})
    out = collector(OUT)
    dlq = collector("edgeml/watch-01/dlq")
    d = daemon_factory(cfg)
    good = stream(test_set, range(3))
    t = "sensors/w1/imu"
    bad = [
        (t, b"\x00\xff\xfegarbage"),
        (t, json.dumps({"bx": 1.0, "by": 2.0}).encode()),
        (t, json.dumps({"ax": 1.0, "ay": 2.0}).encode()),
        (t, b'{"ax": NaN, "ay": 0, "az": 0, "gx": 0, "gy": 0, "gz": 0}'),
        (t, b'{"ax": Infinity, "ay": 0, "az": 0, "gx": 0, "gy": 0, "gz": 0}'),
        # over max_payload_bytes, under the MQTT 5 Maximum Packet Size the device declares
        (t, b"x" * (200 * 2**10)),
        (t, json.dumps({"ax": "high", "ay": 0, "az": 0, "gx": 0, "gy": 0, "gz": 0}).encode()),
    ]
    mixed = good[:150] + bad + good[150:]
    publish_all(broker, mixed)
    recs = answers(out.wait_count(3, timeout=60))
    assert [r["output"]["label"] for r in recs] == sklearn_labels["1"][:3]
    letters = [json.loads(m.payload) for m in dlq.wait_count(len(bad), timeout=30)]
    assert [x["reason"] for x in letters] == ["malformed", "missing_field", "missing_field",
                                              "non_finite", "non_finite", "too_large",
                                              "bad_value"]
    assert all(x["topic"] == t and x["detail"] for x in letters)
    assert letters[5]["payload_bytes"] == 200 * 2**10 and letters[5]["truncated"]
    assert len(letters[5]["payload_b64"]) <= 1400
    st = d.status()["pipelines"]["activity"]
    assert st["rejected"] == len(bad) and st["accepted"] == 300
    assert st["rejected_by_reason"]["non_finite"] == 2


def test_msgpack_only_pipeline_rejects_json(broker, collector, daemon_factory, tmp_path,
                                            test_set, sklearn_labels, activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       pipeline={"format": "msgpack"})
    out = collector(OUT)
    dlq = collector("edgeml/watch-01/dlq")
    daemon_factory(cfg)
    publish_all(broker, stream(test_set, range(1), fmt="msgpack") + stream(test_set, range(1)))
    assert answers(out.wait_count(1))[0]["output"]["label"] == sklearn_labels["1"][0]
    letters = dlq.wait_count(100, timeout=30)
    assert all("looks like JSON" in json.loads(m.payload)["detail"] for m in letters)


def test_broker_restart_mid_stream(broker, daemon_factory, tmp_path, test_set, sklearn_labels,
                                   activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = Collector(broker, OUT, client_id="restart-watcher", clean=False)
    try:
        d = daemon_factory(cfg)
        publish_all(broker, stream(test_set, range(10)))
        out.wait_count(10)
        broker.restart()
        # published while the daemon is still reconnecting: queued in its persistent session
        publish_all(broker, stream(test_set, range(10, 40)))
        recs = answers(out.wait_count(40, timeout=60))
        assert [r["output"]["label"] for r in recs] == sklearn_labels["1"]
        assert d.status()["mqtt"]["connects"] >= 2
    finally:
        out.close()


def test_status_retained_and_last_will(broker, collector, tmp_path, activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if "ready" in line:
                break
        st = collector("edgeml/watch-01/status")
        # the retained status may still be the connect-time "starting" one: the "online" one
        # goes out on the publishing connection as the daemon logs "ready"
        online = json.loads(st.wait_for(
            lambda m: bool(m) and json.loads(m[-1].payload)["state"] == "online", 30)[-1].payload)
        assert online["state"] == "online" and online["device"] == "watch-01"
        assert online["pipelines"]["activity"]["versions"][0]["version"] == "1"
        proc.kill()  # no clean goodbye: the broker publishes the last will
        proc.wait(10)
        last = st.wait_for(lambda m: json.loads(m[-1].payload)["state"] == "offline", 30)
        assert json.loads(last[-1].payload)["state"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_sigterm_drains_and_exits_zero(broker, collector, tmp_path, test_set, activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = collector(OUT)
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "ready" in line:
                break
        publish_all(broker, stream(test_set, range(5)))
        out.wait_count(5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    status = collector("edgeml/watch-01/status")
    assert json.loads(status.wait_count(1)[0].payload)["state"] == "offline"


def test_raw_input_log_is_byte_identical(broker, collector, daemon_factory, tmp_path, test_set,
                                         activity_bundle):
    from edgeml.storage.rawlog import RawLogReader, pipeline_dir

    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = collector(OUT)
    d = daemon_factory(cfg)
    a = stream(test_set, range(3), "sensors/w1/imu")
    b = stream(test_set, range(3, 6), "sensors/w2/imu", fmt="msgpack")
    sent = [x for pair in zip(a, b, strict=True) for x in pair]
    t0 = time.time()
    publish_all(broker, sent)
    recs = answers(out.wait_count(6))
    t1 = time.time()
    d.stop()
    log = list(RawLogReader(pipeline_dir(tmp_path / "data", "activity")).read())
    assert [(r.topic, r.payload) for r in log] == sent  # exactly what arrived, in order
    assert [r.seq for r in log] == list(range(len(sent)))
    assert all(t0 - 1 <= r.received <= t1 for r in log)
    by_seq = {r.seq: r for r in log}
    for rec in recs:  # every answer traces back to the message that completed its window
        src = by_seq[rec["input_seq"]]
        assert src.topic == rec["topic"] and rec["ts"] == src.received


def test_sighup_reloads_models_and_policy_without_restart(broker, collector, tmp_path, test_set,
                                                          activity_bundle, activity_bundle_v2):
    path = tmp_path / "edgeml.toml"
    write_config(path, broker=broker, data_dir=tmp_path / "data",
                 models=[{"name": "activity", "version": "1", "bundle": activity_bundle}])
    out = collector(OUT)
    status = collector("edgeml/watch-01/status")
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "ready" in line:
                break
        publish_all(broker, stream(test_set, range(2)))
        first = answers(out.wait_count(2))
        assert {r["policy"] for r in first} == {"champion"}
        write_config(path, broker=broker, data_dir=tmp_path / "data",
                     pipeline={"policy": "vote", "topics": ["sensors/+/imu", "more/#"]},
                     models=[{"name": "activity", "version": "1", "bundle": activity_bundle},
                             {"name": "activity", "version": "2", "role": "challenger",
                              "bundle": activity_bundle_v2}])
        proc.send_signal(signal.SIGHUP)

        def reloaded(msgs):
            st = json.loads(msgs[-1].payload)
            return st.get("reloads") == 1 and len(
                st["pipelines"]["activity"]["versions"]) == 2
        st = json.loads(status.wait_for(reloaded, timeout=30)[-1].payload)
        assert st["pid"] == proc.pid  # the same process: no restart
        publish_all(broker, stream(test_set, range(2, 4)))
        later = answers(out.wait_count(4))[2:]
        assert {r["policy"] for r in later} == {"vote"}
        assert all("votes" in r["output"] for r in later)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        err = proc.stderr.read()
        proc.stderr.close()
    assert "need a restart" in err and "topics" in err  # what was not applied is said
