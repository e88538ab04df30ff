"""Model delivery end to end: real mosquitto, real daemons (in-process), real BasicMotions
bundles, a live sensor stream running while models are pushed, refused, promoted and rolled
back."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import threading
import time
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import publish_all, write_config

from edgeml.bundle import read_bundle, sha256_hex, write_bundle
from edgeml.cli import main as cli
from edgeml.control.protocol import deploy_topic, plan_push
from edgeml.control.watch import WATCH_MIN_ROWS
from edgeml.errors import BundleIntegrityError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.host.fleet import Fleet, PushResult
from edgeml.keys import generate_keypair, load_private_key

NO_SYNC = "sync = { enabled = false }"


# ---- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    good_priv, good_pub = generate_keypair(d / "fleet")
    other_priv, _ = generate_keypair(d / "other")
    return {"pub": good_pub, "good": load_private_key(good_priv),
            "other": load_private_key(other_priv)}


def rewrite(src: Path, dst: Path, *, sign_key=None, **changes) -> Path:
    """The same model under another manifest (version, description, self-test...)."""
    b = read_bundle(src)
    return write_bundle(dst, dataclasses.replace(b.manifest, **changes), b.model_bytes,
                        sign_key=sign_key)


@pytest.fixture(scope="module")
def rotated_bundle(tmp_path_factory) -> Path:
    """A deliberately bad model: trained on BasicMotions with every label shifted to the next
    class. Its self-test passes (it reproduces itself), but on live data it disagrees with
    any sane canary on nearly every window."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from converters import WindowFeatures, convert_estimator

    train, test = load_basicmotions("TRAIN"), load_basicmotions("TEST")
    classes = sorted(set(train.y))
    shift = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    model = Pipeline([("features", WindowFeatures(n_channels=6)), ("scale", StandardScaler()),
                      ("classify", LogisticRegression(max_iter=2000, random_state=0))])
    model.fit(train.flat(), np.asarray([shift[y] for y in train.y]))
    out = tmp_path_factory.mktemp("bad") / "activity-3.edgeml"
    return convert_estimator(model, test.flat(), name="activity", version="3",
                             features=BASICMOTIONS_CHANNELS, window=100, out=out).path


@pytest.fixture(scope="module")
def fixed_batch_bundle(tmp_path_factory, activity_bundle) -> Path:
    """A model that fails at scoring time: activity v1 re-exported as version 3 with a fixed
    batch size in the graph (input ``[8, 600]``, the size of its self-test), while the manifest
    declares ``[None, 600]`` like any other version. It installs, loads and passes its
    self-test (8 rows in one run); on a device that scores at most 4 rows per batch
    onnxruntime refuses every live batch ("Got invalid dimensions for input")."""
    import onnx

    b = read_bundle(activity_bundle)
    graph = onnx.load_from_string(b.model_bytes)
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    batch.ClearField("dim_param")
    batch.dim_value = len(b.manifest.self_test.inputs)
    data = graph.SerializeToString()
    manifest = dataclasses.replace(b.manifest, version="3", sha256=sha256_hex(data),
                                   size=len(data))
    return write_bundle(tmp_path_factory.mktemp("fixed") / "activity-3.edgeml", manifest, data)


class Stream:
    """Publishes one BasicMotions window (one message of 100 samples) every ``interval``
    seconds from its own thread, until stopped; remembers every id it sent."""

    def __init__(self, broker, test_set, *, topic: str = "sensors/w1/imu",
                 interval: float = 0.02) -> None:
        self.topic, self.interval = topic, interval
        self.windows = [[dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
                         for row in series] for series in test_set.X]
        self.sent: list[str] = []
        self._stop = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            wid = f"w{n}"
            body = {"id": wid, "samples": self.windows[n % len(self.windows)]}
            self.client.publish(self.topic, json.dumps(body), qos=1).wait_for_publish(10)
            self.sent.append(f"{wid}:99")
            n += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[str]:
        self._stop.set()
        self.thread.join(10)
        self.client.loop_stop()
        self.client.disconnect()
        return list(self.sent)


def answers(collector) -> list[dict]:
    return [msgpack.unpackb(m.payload) for m in list(collector.messages)]


def wait_answers(out, n: int, timeout: float = 30) -> list[dict]:
    out.wait_for(lambda msgs: len(msgs) >= n, timeout)
    return answers(out)


def runs(seq: list) -> list:
    """[1, 1, 2, 2, 1] -> [1, 2, 1]"""
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


def push(broker, bundle, **kw) -> PushResult:
    async def go() -> PushResult:
        async with Fleet(broker.url) as fleet:
            return await fleet.push(bundle, **kw)
    return asyncio.run(go())


def command(broker, device: str, cmd: str, **kw) -> dict:
    async def go() -> dict:
        async with Fleet(broker.url) as fleet:
            return await fleet.command(device, cmd, **kw)
    return asyncio.run(go())


def active(d, pipeline: str = "activity") -> dict[str, str]:
    """version -> role of the running pipeline, read on the daemon's own loop."""
    return d.call(lambda: {s.version: s.role for s in d.daemon.pipelines[pipeline].members})


def raw_push(broker, status, data: bytes, base: str, *, drop_last: int = 0, **kw) -> dict:
    """Publish deploy messages straight from :func:`plan_push` (no host-side checks), the last
    ``drop_last`` of them lost; returns the device's final report for the transfer."""
    plan = plan_push(data, base=base, name="activity", version="2", **kw)
    publish_all(broker, plan.messages[:len(plan.messages) - drop_last])

    def final(msgs):
        docs = [json.loads(x.payload) for x in msgs]
        return [d for d in docs if d.get("transfer") == plan.header.transfer
                and d["stage"] in ("active", "failed", "noop")]
    status.wait_for(lambda msgs: bool(final(msgs)), 20)
    return final(status.messages)[-1]


def retained(broker, filter_: str) -> list[str]:
    """Topics with a retained message under ``filter_`` (complete: a broker round trip)."""
    async def go() -> list[str]:
        async with Fleet(broker.url) as fleet, fleet.listen(filter_) as q:
            await fleet.sync()
            return sorted(q.get_nowait().topic for _ in range(q.qsize()))
    return asyncio.run(go())


def config(tmp_path: Path, broker, name: str, models: list[dict], extra: str = "",
           deploy: str = "", sync: bool = False) -> Path:
    """``sync``: keep the outbox and its uplink (to the same broker, ``{p}/{d}/sync/...``)."""
    tail = f"\n[deploy]\n{deploy}" if deploy else ""
    text = f"{extra}\n[sync]\nbatch_max_wait_s = 0.05{tail}" if sync else \
        f"{NO_SYNC}\n{extra}{tail}"
    return write_config(tmp_path / f"{name}.toml", broker=broker, data_dir=tmp_path / name,
                        models=models, device_id=name, extra=text)


def check_answered_once(ids: list[str], recs: list[dict]) -> None:
    got = [r["id"] for r in recs]
    assert sorted(got) == sorted(ids), "every window answered exactly once"
    assert not [r for r in recs if r.get("error")], "no answer carries an error"


# ---- tests ---------------------------------------------------------------------------------
def test_group_push_reaches_every_member_and_a_late_one(broker, collector, daemon_factory,
                                                        tmp_path, activity_bundle,
                                                        activity_bundle_v2):
    v1 = [{"name": "activity", "version": "1", "bundle": activity_bundle}]
    group = 'groups = ["hall-3"]'
    a = daemon_factory(config(tmp_path, broker, "dev-a", v1, group))
    b = daemon_factory(config(tmp_path, broker, "dev-b", v1, group))
    reports: list[dict] = []
    res = push(broker, activity_bundle_v2, group="hall-3", chunk_size=8192, timeout=30,
               on_report=reports.append)
    assert res.plan.header.chunks > 1  # it really went out in chunks
    assert res.exit_code == 0 and res.expected == ("dev-a", "dev-b")
    assert {d: r["stage"] for d, r in res.final.items()} == {"dev-a": "active",
                                                              "dev-b": "active"}
    stages = [r["stage"] for r in reports if r["device"] == "dev-a"]
    assert stages == ["received", "verified", "installed", "loaded", "active"]
    assert active(a) == active(b) == {"1": "champion", "2": "challenger"}

    # a device that was offline during the push gets it from the retained deployment
    late = collector("edgeml/dev-c/deploy/status")
    c = daemon_factory(config(tmp_path, broker, "dev-c", v1, group))
    late.wait_for(lambda ms: any(json.loads(m.payload)["stage"] == "active" for m in ms), 30)
    assert active(c) == {"1": "champion", "2": "challenger"}

    # the same name and version again: a no-op on every member, reported as such
    again = push(broker, activity_bundle_v2, group="hall-3", timeout=30)
    assert again.exit_code == 0 and set(again.final) == {"dev-a", "dev-b", "dev-c"}
    assert {r["stage"] for r in again.final.values()} == {"noop"}
    assert "already active" in again.final["dev-a"]["reason"]
    # the retained group deployment is now the small one-message push; the chunks of the
    # first push were cleared
    assert retained(broker, deploy_topic("edgeml", group="hall-3") + "/#") == [
        "edgeml/group/hall-3/deploy"]


def test_refusals_leave_the_champion_answering(broker, collector, daemon_factory, tmp_path,
                                               test_set, keys, activity_bundle,
                                               activity_bundle_v2):
    good = keys["good"]
    signed_v1 = rewrite(activity_bundle, tmp_path / "s1.edgeml", sign_key=good)
    signed_v2 = rewrite(activity_bundle_v2, tmp_path / "s2.edgeml", sign_key=good)
    cfg = config(tmp_path, broker, "dev-r",
                 [{"name": "activity", "version": "1", "bundle": signed_v1}],
                 f'trusted_keys = ["{keys["pub"]}"]', deploy="max_bundle_bytes = 100000")
    d = daemon_factory(cfg)
    out = collector("edgeml/dev-r/out/activity")
    status = collector("edgeml/dev-r/deploy/status")

    # the bad bundles
    raw = signed_v2.read_bytes()
    zin = zipfile.ZipFile(io.BytesIO(raw))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])  # one byte flipped
            zout.writestr(info, data)
    tampered = buf.getvalue()
    wrong_key = rewrite(activity_bundle_v2, tmp_path / "wk.edgeml", sign_key=keys["other"])
    unsigned = activity_bundle_v2
    m = read_bundle(activity_bundle_v2).manifest
    cls = list(m.outputs.classes)
    wrong = tuple(cls[(cls.index(x) + 1) % len(cls)] for x in m.self_test.expected_labels)
    bad_test = rewrite(activity_bundle_v2, tmp_path / "st.edgeml", sign_key=good,
                       self_test=dataclasses.replace(m.self_test, expected_labels=wrong))
    padding = "".join(random.Random(7).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=150_000))
    too_big = rewrite(activity_bundle_v2, tmp_path / "big.edgeml", sign_key=good,
                      description=padding)
    assert too_big.stat().st_size > 100_000

    cases = [
        (wrong_key, "signature: bundle is signed by key"),
        (unsigned, "signature: bundle is unsigned"),
        (bad_test, "self-test: activity 2: self-test row"),
        (too_big, "over the device's limit of 100000 bytes"),
    ]
    with Stream(broker, test_set) as stream:
        wait_answers(out, 5)
        # `edgeml push` itself refuses a tampered file; a hostile or broken sender does not
        with pytest.raises(BundleIntegrityError):
            push(broker, tampered, device="dev-r")
        doc = raw_push(broker, status, tampered, "edgeml/dev-r/deploy", chunk_size=16384)
        assert doc["stage"] == "failed" and "integrity: model.onnx sha256" in doc["reason"]
        for bundle, why in cases:
            res = push(broker, bundle, device="dev-r", chunk_size=16384, timeout=30)
            assert res.exit_code == 1, (why, res.final)
            assert why in res.final["dev-r"]["reason"], res.final
        # a chunk stream that breaks off: header and all but the last two chunks
        doc = raw_push(broker, status, signed_v2.read_bytes(), "edgeml/dev-r/deploy",
                       chunk_size=4096, timeout_s=1.0, drop_last=2)
        assert doc["stage"] == "failed" and "timed out" in doc["reason"]
        assert "received 7 of 9 chunks (missing 7-8)" in doc["reason"], doc
        n = len(out.messages)
        wait_answers(out, n + 5)  # still answering after all of it
    sent = stream.sent
    recs = wait_answers(out, len(sent))
    check_answered_once(sent, recs)
    assert {r["version"] for r in recs} == {"1"}
    # nothing was left installed: not the self-test failure, not the broken transfer
    assert d.call(lambda: d.daemon.store.versions("activity")) == ["1"]
    assert active(d) == {"1": "champion"}
    # and the good signed bundle still goes through afterwards
    ok = push(broker, signed_v2, device="dev-r", chunk_size=16384, timeout=30)
    assert ok.exit_code == 0 and active(d) == {"1": "champion", "2": "challenger"}


def test_promote_and_rollback_during_a_live_stream(broker, collector, daemon_factory,
                                                   tmp_path, test_set, activity_bundle,
                                                   activity_bundle_v2):
    cfg = config(tmp_path, broker, "dev-p", [
        {"name": "activity", "version": "1", "bundle": activity_bundle},
        {"name": "activity", "version": "2", "role": "challenger",
         "bundle": activity_bundle_v2}])
    d = daemon_factory(cfg)
    out = collector("edgeml/dev-p/out/activity")
    with Stream(broker, test_set) as stream:
        wait_answers(out, 20)
        reply = command(broker, "dev-p", "promote", model="activity")
        assert reply["ok"], reply
        assert {(s["version"], s["role"]) for s in reply["active"]} == {
            ("2", "champion"), ("1", "challenger")}
        wait_answers(out, len(out.messages) + 20)
        # the CLI: rollback restores version 1, exit status 0
        assert cli(["rollback", "--device", "dev-p", "--broker", broker.url]) == 0
        wait_answers(out, len(out.messages) + 20)
    recs = wait_answers(out, len(stream.sent))
    check_answered_once(stream.sent, recs)
    in_order = sorted(recs, key=lambda r: int(r["id"][1:].split(":")[0]))
    assert runs([r["version"] for r in in_order]) == ["1", "2", "1"]
    assert active(d) == {"1": "champion", "2": "challenger"}
    # error replies: the champion cannot be retired; nothing to roll back to any more
    assert cli(["retire", "--device", "dev-p", "--broker", broker.url, "--model", "activity",
                "--version", "1"]) == 1
    bad = command(broker, "dev-p", "rollback")
    assert not bad["ok"] and "no previous champion" in bad["message"]
    bad = command(broker, "dev-p", "set_policy", policy="loudest")
    assert not bad["ok"] and "'policy' must be one of" in bad["message"]
    # a command that comes long after its sender gave up is not carried out
    replies = collector("edgeml/dev-p/cmd/reply")
    stale = {"id": "old", "cmd": "promote", "model": "activity", "version": "2",
             "deadline": time.time() - 3600}
    publish_all(broker, [("edgeml/dev-p/cmd", json.dumps(stale).encode())])
    replies.wait_for(lambda ms: any(json.loads(m.payload)["id"] == "old" for m in ms), 10)
    reply = next(json.loads(m.payload) for m in replies.messages
                 if json.loads(m.payload)["id"] == "old")
    assert not reply["ok"] and "after its deadline" in reply["message"]
    assert active(d) == {"1": "champion", "2": "challenger"}
    # no device: the CLI times out with status 2
    assert cli(["promote", "--device", "nobody", "--broker", broker.url, "--model", "x",
                "--timeout", "0.5"]) == 2


def test_automatic_rollback_when_the_canary_disagrees(broker, collector, daemon_factory,
                                                      tmp_path, test_set, activity_bundle,
                                                      activity_bundle_v2, rotated_bundle):
    cfg = config(tmp_path, broker, "dev-w", [
        {"name": "activity", "version": "1", "bundle": activity_bundle},
        {"name": "activity", "version": "2", "role": "canary", "bundle": activity_bundle_v2}],
        deploy="watch_window_s = 60\nmin_canary_agreement = 0.5")
    d = daemon_factory(cfg)
    out = collector("edgeml/dev-w/out/activity")
    alerts = collector("edgeml/dev-w/alerts")
    with Stream(broker, test_set) as stream:
        wait_answers(out, 10)
        # pushed straight in as champion: v1 steps down to challenger, the watch starts
        res = push(broker, rotated_bundle, device="dev-w", role="champion", timeout=30)
        assert res.exit_code == 0, res.final
        alerts.wait_for(lambda ms: any(json.loads(m.payload)["kind"] == "auto_rollback"
                                       for m in ms), 30)
        wait_answers(out, len(out.messages) + 10)
    recs = wait_answers(out, len(stream.sent))
    check_answered_once(stream.sent, recs)
    in_order = sorted(recs, key=lambda r: int(r["id"][1:].split(":")[0]))
    assert runs([r["version"] for r in in_order]) == ["1", "3", "1"]
    alert = next(json.loads(m.payload) for m in alerts.messages
                 if json.loads(m.payload)["kind"] == "auto_rollback")
    assert alert["version"] == "3" and alert["previous"] == "activity:1"
    assert "canary agreement" in alert["reason"] and "below min_canary_agreement 0.5" in \
        alert["reason"]
    # the bad champion is out of the active set; the old one and the canary run on
    assert active(d) == {"1": "champion", "2": "canary"}
    deploy = d.status()["deploy"]
    assert deploy["recent"][-1]["stage"] == "rolled_back"
    assert deploy["recent"][-1]["version"] == "3"
    canary = deploy["pipelines"]["activity"]["canary"]
    assert canary["canary"] == "activity:2" and canary["window"] > 0


def test_automatic_rollback_when_p99_latency_passes_the_limit(broker, collector,
                                                              daemon_factory, tmp_path,
                                                              test_set, activity_bundle,
                                                              activity_bundle_v2):
    """max_p99_ms far below what any model takes: the promotion cannot survive its watch."""
    cfg = config(tmp_path, broker, "dev-l", [
        {"name": "activity", "version": "1", "bundle": activity_bundle},
        {"name": "activity", "version": "2", "role": "challenger",
         "bundle": activity_bundle_v2}], deploy="watch_window_s = 60\nmax_p99_ms = 0.0001")
    d = daemon_factory(cfg)
    alerts = collector("edgeml/dev-l/alerts")
    with Stream(broker, test_set):
        reply = command(broker, "dev-l", "promote", model="activity", version="2")
        assert reply["ok"] and active(d) == {"2": "champion", "1": "challenger"}
        alerts.wait_for(lambda ms: any(json.loads(m.payload)["kind"] == "auto_rollback"
                                       for m in ms), 30)
    alert = next(json.loads(m.payload) for m in alerts.messages
                 if json.loads(m.payload)["kind"] == "auto_rollback")
    assert "p99 latency" in alert["reason"] and "above max_p99_ms 0.0001" in alert["reason"]
    assert active(d) == {"1": "champion"}  # the slow one is out of the active set


#: the same watch for a failing and a healthy champion; devices score at most 4 rows a batch
ERROR_WATCH = "watch_window_s = 3\nmax_error_rate = 0.05"
SMALL_BATCHES = "[profile_overrides]\nbatching = { max_batch = 4 }"


def kinds(collector, kind: str) -> list[dict]:
    return [doc for doc in (json.loads(m.payload) for m in list(collector.messages))
            if doc["kind"] == kind]


def synced_records(collector) -> list[dict]:
    """Records the uplink delivered from one of the outbox's streams (one sync topic)."""
    return [r for m in list(collector.messages) for r in msgpack.unpackb(m.payload)["records"]]


def test_automatic_rollback_when_the_new_champion_fails_to_score(
        broker, collector, daemon_factory, tmp_path, test_set, activity_bundle,
        fixed_batch_bundle):
    cfg = config(tmp_path, broker, "dev-e",
                 [{"name": "activity", "version": "1", "bundle": activity_bundle}],
                 SMALL_BATCHES, deploy=ERROR_WATCH, sync=True)
    d = daemon_factory(cfg)
    # batches of at most 4 rows: v3, fixed at 8, can never score a live batch
    assert d.call(lambda: d.daemon.pipelines["activity"].batching.max_batch) == 4
    out = collector("edgeml/dev-e/out/activity")
    alerts = collector("edgeml/dev-e/alerts")
    uplinked = collector("edgeml/dev-e/sync/alerts")
    deploy_events = collector("edgeml/dev-e/sync/deploy")
    with Stream(broker, test_set) as stream:
        wait_answers(out, 10)
        # pushed straight in as champion: it passes its self-test, v1 steps down to challenger
        res = push(broker, fixed_batch_bundle, device="dev-e", role="champion", timeout=30)
        assert res.exit_code == 0 and res.final["dev-e"]["stage"] == "active", res.final
        alerts.wait_for(lambda ms: bool(kinds(alerts, "auto_rollback")), 30)
        wait_answers(out, len(out.messages) + 10)
    recs = wait_answers(out, len(stream.sent))
    check_answered_once(stream.sent, recs)

    # the alert carries the watch's figures: every row v3 was given failed
    [alert] = kinds(alerts, "auto_rollback")
    assert not kinds(alerts, "auto_rollback_failed")
    assert (alert["pipeline"], alert["model"], alert["version"], alert["previous"]) == (
        "activity", "activity", "3", "activity:1")
    watch = alert["watch"]
    assert watch["rows"] == 0 and watch["errors"] >= WATCH_MIN_ROWS, watch
    assert watch["error_rate"] == 1.0 > 0.05
    assert alert["reason"] == (f"error rate 1.000 over {watch['errors']} rows is above "
                               "max_error_rate 0.05")
    assert alert["message"] == "rolled back to activity:1; activity:3 retired"
    # it failed in onnxruntime, not somewhere else
    last_error = d.call(lambda: d.daemon.pipelines["activity"].stats.version(
        "activity", "3").last_error)
    assert "scoring failed" in last_error and "invalid dimensions for input" in last_error

    # v3 never answered: v1 answered throughout, as the champion's fallback while v3 was on
    # probation, and as the champion again afterwards
    in_order = sorted(recs, key=lambda r: int(r["id"][1:].split(":")[0]))
    assert {r["version"] for r in in_order} == {"1"}
    assert runs([r["fallback"] for r in in_order]) == [False, True, False]
    assert sum(r["fallback"] for r in in_order) >= watch["errors"]

    # v1 is champion again, v3 is out of the active set, and that is what a restart restores
    assert active(d) == {"1": "champion"}
    deploy = d.status()["deploy"]
    assert deploy["pipelines"]["activity"]["watch"] is None
    assert deploy["pipelines"]["activity"]["previous_champions"] == []
    assert {k: deploy["recent"][-1][k] for k in ("version", "stage", "reason")} == {
        "version": "3", "stage": "rolled_back", "reason": alert["reason"]}
    state = json.loads((tmp_path / "dev-e" / "state" / "active.json").read_text())
    assert [(m["version"], m["role"]) for m in state["pipelines"]["activity"]["models"]] == [
        ("1", "champion")]
    # the outbox kept the alert and the uplink delivered it, as published
    uplinked.wait_for(lambda ms: any(r["kind"] == "auto_rollback" for r in synced_records(
        uplinked)), 10)
    [kept] = [r for r in synced_records(uplinked) if r["kind"] == "auto_rollback"]
    assert kept["record_id"].startswith("dev-e/activity/alert/auto_rollback/")
    assert {k: v for k, v in kept.items() if k != "record_id"} == alert
    # the deployment history went upstream through the outbox's deploy stream, in order
    deploy_events.wait_for(lambda ms: any(r["stage"] == "rolled_back" for r in synced_records(
        deploy_events)), 10)
    history = [(r["version"], r["stage"]) for r in synced_records(deploy_events)]
    assert history == [("3", "active"), ("3", "rolled_back")], history
    assert all(r["device"] == "dev-e" and r["record_id"].endswith("/activity/3/deploy")
               for r in synced_records(deploy_events))


def test_a_healthy_champion_passes_the_same_watch(broker, collector, daemon_factory, tmp_path,
                                                  test_set, activity_bundle,
                                                  activity_bundle_v2):
    cfg = config(tmp_path, broker, "dev-h",
                 [{"name": "activity", "version": "1", "bundle": activity_bundle}],
                 SMALL_BATCHES, deploy=ERROR_WATCH)
    d = daemon_factory(cfg)
    out = collector("edgeml/dev-h/out/activity")
    alerts = collector("edgeml/dev-h/alerts")
    beats = collector("edgeml/dev-h/status")

    def deploy_status(ms) -> list[dict]:
        return [json.loads(m.payload).get("deploy") or {} for m in ms]

    def judged(ms) -> list[dict]:  # the watch while it has seen enough rows to judge v2
        watches = [((s.get("pipelines") or {}).get("activity") or {}).get("watch") or {}
                   for s in deploy_status(ms)]
        return [w for w in watches if w.get("rows", 0) >= WATCH_MIN_ROWS]

    def passed(ms) -> bool:
        return any(r.get("stage") == "watch_passed" and r.get("version") == "2"
                   for s in deploy_status(ms) for r in s.get("recent") or [])

    with Stream(broker, test_set) as stream:
        wait_answers(out, 10)
        res = push(broker, activity_bundle_v2, device="dev-h", role="champion", timeout=30)
        assert res.exit_code == 0, res.final
        beats.wait_for(lambda ms: bool(judged(ms)), 15)
        beats.wait_for(passed, 15)
    recs = wait_answers(out, len(stream.sent))
    check_answered_once(stream.sent, recs)
    watch = judged(beats.messages)[-1]
    assert watch["champion"] == "activity:2" and watch["previous"] == "activity:1"
    assert watch["errors"] == 0 and watch["error_rate"] == 0.0
    # the watch is over, v2 stays champion, and nothing was rolled back
    assert active(d) == {"2": "champion", "1": "challenger"}
    assert not kinds(alerts, "auto_rollback") and not kinds(alerts, "auto_rollback_failed")
    in_order = sorted(recs, key=lambda r: int(r["id"][1:].split(":")[0]))
    assert runs([r["version"] for r in in_order]) == ["1", "2"]
    assert not any(r["fallback"] for r in in_order)


def test_active_set_survives_a_restart_and_old_versions_are_pruned(
        broker, collector, daemon_factory, tmp_path, activity_bundle, activity_bundle_v2,
        capsys):
    v3 = rewrite(activity_bundle, tmp_path / "a3.edgeml", version="3")
    v4 = rewrite(activity_bundle, tmp_path / "a4.edgeml", version="4")
    cfg = config(tmp_path, broker, "dev-s",
                 [{"name": "activity", "version": "1", "bundle": activity_bundle}],
                 deploy="keep_versions = 1")
    d = daemon_factory(cfg)
    url = ["--broker", broker.url]
    assert cli(["push", str(activity_bundle_v2), "--device", "dev-s", *url]) == 0
    assert cli(["promote", "--device", "dev-s", "--model", "activity", *url]) == 0
    assert cli(["retire", "--device", "dev-s", "--model", "activity", *url]) == 0  # v1 out
    assert active(d) == {"2": "champion"}
    # rollback to a version that is no longer active: loaded from the store again
    assert command(broker, "dev-s", "rollback")["ok"]
    assert active(d) == {"1": "champion", "2": "challenger"}
    assert command(broker, "dev-s", "set_policy", policy="first")["ok"]
    assert cli(["push", str(v3), "--device", "dev-s", "--role", "shadow", *url]) == 0
    assert cli(["retire", "--device", "dev-s", "--model", "activity", "--version", "3",
                *url]) == 0
    assert cli(["push", str(v4), "--device", "dev-s", "--role", "shadow", *url]) == 0
    # keep_versions = 1: v3 (not the newest, not active, no earlier champion) is gone
    assert d.call(lambda: d.daemon.store.versions("activity")) == ["1", "2", "4"]
    # pushing v3 again is a no-op (it was deployed before), unless forced
    capsys.readouterr()
    assert cli(["push", str(v3), "--device", "dev-s", *url]) == 0
    assert "noop" in capsys.readouterr().out
    before = active(d)
    d.stop()

    d2 = daemon_factory(cfg)
    assert active(d2) == before == {"1": "champion", "2": "challenger", "4": "shadow"}
    assert d2.call(lambda: d2.daemon.pipelines["activity"].policy) == "first"
    state = json.loads((tmp_path / "dev-s" / "state" / "active.json").read_text())
    assert [m["version"] for m in state["pipelines"]["activity"]["models"]] == ["1", "2", "4"]
    # the fleet view shows it (from the next heartbeat: the first status of a daemon goes out
    # before the persisted policy is applied)
    beat = collector("edgeml/dev-s/status")
    beat.wait_for(lambda ms: any(json.loads(m.payload).get("pipelines", {}).get(
        "activity", {}).get("policy") == "first" for m in ms), 10)
    capsys.readouterr()
    assert cli(["status", "--once", "--json", *url]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = rows["dev-s"]
    assert row["online"] and row["pipelines"]["activity"]["policy"] == "first"
    assert {(m["version"], m["role"]) for m in row["pipelines"]["activity"]["models"]} == {
        ("1", "champion"), ("2", "challenger"), ("4", "shadow")}
    assert cli(["status", "--once", *url]) == 0
    table = capsys.readouterr().out
    assert "dev-s" in table and "activity:1 champion" in table and "online" in table
