"""The trust issue end to end: real mosquitto, real daemons, real BasicMotions bundles.

Every attack of the issue is made against a running daemon and must be refused with its
reason on the right topic (cmd/reply, deploy/status, alerts), the champion answering
throughout, and the upstream records (outbox streams ``alerts`` and ``deploy``) telling the
story."""
# ruff: noqa: F811  (the fixtures imported from test_control are parameters here)

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from conftest import publish_all
from test_control import (  # noqa: F401  (fixtures)
    Stream,
    active,
    check_answered_once,
    config,
    keys,
    push,
    rewrite,
    test_set,
    wait_answers,
)

from edgeml.bundle import read_bundle
from edgeml.cli import main as cli
from edgeml.control.identity import TwinDeviceError
from edgeml.control.signing import sign_command
from edgeml.host.datasets import BASICMOTIONS_CHANNELS
from edgeml.host.fleet import Fleet


# ---- helpers -------------------------------------------------------------------------------
def docs(collector) -> list[dict]:
    return [json.loads(m.payload) for m in list(collector.messages)]


def synced(collector) -> list[dict]:
    return [r for m in list(collector.messages) for r in msgpack.unpackb(m.payload)["records"]]


def send(broker, replies, device: str, doc: dict | bytes, rid: str | None) -> dict:
    """Publish one command as is (no host-side help) and return the device's reply."""
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    n = len(replies.messages)
    publish_all(broker, [(f"edgeml/{device}/cmd", payload)])

    def mine(ms) -> list[dict]:
        return [json.loads(m.payload) for m in ms[n:] if json.loads(m.payload).get("id") == rid]
    replies.wait_for(lambda ms: bool(mine(ms)), 15)
    return mine(replies.messages)[0]


def signed_command(broker, device: str, cmd: str, key, **kw) -> dict:
    import asyncio

    async def go() -> dict:
        async with Fleet(broker.url) as fleet:
            return await fleet.command(device, cmd, sign_key=key, **kw)
    return asyncio.run(go())


def windows(test_set, prefix: str, n: int, topic: str = "sensors/w1/imu") -> list:
    out = []
    for i in range(n):
        series = test_set.X[i % len(test_set.X)]
        samples = [dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
                   for row in series]
        out.append((topic, json.dumps({"id": f"{prefix}{i}", "samples": samples}).encode()))
    return out


# ---- signed commands, no downgrades, retained pushes ---------------------------------------
def test_signed_commands_and_no_downgrade(broker, collector, daemon_factory, tmp_path, test_set,
                                          keys, activity_bundle, activity_bundle_v2):
    good, other = keys["good"], keys["other"]
    v1 = rewrite(activity_bundle, tmp_path / "v1.edgeml", sign_key=good, release=1)
    v3 = rewrite(activity_bundle_v2, tmp_path / "v3.edgeml", sign_key=good, version="3",
                 release=3)
    assert read_bundle(v1).manifest.release == 1
    cfg = config(tmp_path, broker, "dev-k",
                 [{"name": "activity", "version": "3", "bundle": v3}],
                 f'trusted_keys = ["{keys["pub"]}"]\ngroups = ["hall"]', sync=True)
    d = daemon_factory(cfg)
    out = collector("edgeml/dev-k/out/activity")
    replies = collector("edgeml/dev-k/cmd/reply")
    alerts = collector("edgeml/dev-k/alerts")
    up_alerts = collector("edgeml/dev-k/sync/alerts")
    up_deploy = collector("edgeml/dev-k/sync/deploy")
    status = collector("edgeml/dev-k/deploy/status")
    policy = {"cmd": "set_policy", "policy": "first"}

    with Stream(broker, test_set) as stream:
        wait_answers(out, 5)
        # 1. unsigned: anyone the broker lets publish on cmd
        r = send(broker, replies, "dev-k", {"id": "u1", "cmd": "promote", "model": "activity",
                                            "version": "1"}, "u1")
        assert not r["ok"] and r["refused"] == "unsigned" and "unsigned" in r["message"]
        # 2. signed, but by a key the device does not trust
        r = send(broker, replies, "dev-k",
                 sign_command({"id": "k1", "device": "dev-k", **policy}, other), "k1")
        assert not r["ok"] and r["refused"] == "unknown key", r
        # 3. a good signature over other arguments
        doc = sign_command({"id": "t1", "device": "dev-k", **policy}, good)
        doc["policy"] = "vote"
        r = send(broker, replies, "dev-k", doc, "t1")
        assert not r["ok"] and r["refused"] == "bad signature", r
        # 4. signed for another device, published on this one's topic
        r = send(broker, replies, "dev-k",
                 sign_command({"id": "w1", "device": "dev-other", **policy}, good), "w1")
        assert not r["ok"] and r["refused"] == "wrong device" and "dev-other" in r["message"]
        # 5. expired (the device clock is trusted: it is not 1970)
        r = send(broker, replies, "dev-k",
                 sign_command({"id": "e1", "device": "dev-k", **policy}, good,
                              expires_in_s=-30), "e1")
        assert not r["ok"] and r["refused"] == "expired", r
        # 6. a good one is obeyed ... and a captured copy of it is not obeyed again
        captured = sign_command({"id": "g1", "device": "dev-k", "cmd": "set_policy",
                                 "policy": "champion"}, good)
        r = send(broker, replies, "dev-k", captured, "g1")
        assert r["ok"] and r["policy"] == "champion", r
        r = send(broker, replies, "dev-k", captured, "g1")
        assert not r["ok"] and r["refused"] == "replay", r
        # 7. an integer too long for Python to read: a reply that says why
        huge = b'{"id": "h1", "cmd": "promote", "counter": ' + b"9" * 5000 + b"}"
        n = len(replies.messages)
        publish_all(broker, [("edgeml/dev-k/cmd", huge)])
        replies.wait_for(lambda ms: len(ms) > n, 10)
        r = json.loads(replies.messages[n].payload)
        assert not r["ok"] and "too large" in r["message"], r
        # huge integer in a deploy header: refused with the reason on deploy/status
        n = len(status.messages)
        publish_all(broker, [("edgeml/dev-k/deploy", b'{"kind": "bundle", "priority": '
                              + b"1" * 5000 + b"}\n")])
        status.wait_for(lambda ms: len(ms) > n, 10)
        assert "too large" in json.loads(status.messages[n].payload)["reason"]

        # 8. an old signed release pushed as champion with --force: refused (device and group)
        res = push(broker, v1, device="dev-k", role="champion", force=True, timeout=30)
        assert res.exit_code == 1 and "downgrade: activity 1 is release 1" in \
            res.final["dev-k"]["reason"], res.final
        res = push(broker, v1, group="hall", role="champion", force=True, timeout=30)
        assert res.exit_code == 1 and "downgrade" in res.final["dev-k"]["reason"]
        group_transfer = res.plan.header.transfer
        # older releases may come in beside it (here: as a challenger)
        res = push(broker, v1, device="dev-k", role="challenger", timeout=30)
        assert res.exit_code == 0, res.final
        assert active(d) == {"3": "champion", "1": "challenger"}
        wait_answers(out, len(out.messages) + 5)
    check_answered_once(stream.sent, wait_answers(out, len(stream.sent)))
    assert {r["version"] for r in wait_answers(out, len(stream.sent))} == {"3"}

    # the story upstream: every refusal is an alert in the outbox's alerts stream
    want = {"unsigned", "unknown key", "bad signature", "wrong device", "expired", "replay"}
    up_alerts.wait_for(lambda ms: want <= {r.get("refused") for r in synced(up_alerts)}, 15)
    refusals = [r for r in synced(up_alerts) if r.get("refused")]
    assert refusals and all(r["kind"] == "command_refused" for r in refusals)
    assert want <= {a.get("refused") for a in docs(alerts)}
    up_deploy.wait_for(lambda ms: sum("downgrade" in (r.get("reason") or "")
                                      for r in synced(up_deploy)) >= 2, 15)

    # a restart: the retained group push is not applied again, the replay stays refused
    d.stop()
    n_status = len(status.messages)
    d = daemon_factory(cfg)
    assert active(d) == {"3": "champion", "1": "challenger"}
    assert d.call(lambda: d.daemon.pipelines["activity"].policy) == "champion"
    r = send(broker, replies, "dev-k", captured, "g1")
    assert not r["ok"] and r["refused"] == "replay", r
    assert not [x for x in docs(status)[n_status:] if x.get("transfer") == group_transfer]
    # the way back to an old release is a signed command
    r = signed_command(broker, "dev-k", "promote", good, model="activity", version="1")
    assert r["ok"], r
    assert active(d) == {"1": "champion", "3": "challenger"}
    # the CLI signs with --sign-key; without it the device refuses (exit 1)
    url = ["--broker", broker.url, "--device", "dev-k"]
    assert cli(["rollback", *url]) == 1
    key_file = keys["pub"].with_name("fleet.key")
    assert cli(["rollback", *url, "--sign-key", str(key_file)]) == 0
    assert active(d) == {"3": "champion", "1": "challenger"}


# ---- caps without keys, the output contract -------------------------------------------------
def test_caps_and_output_contract_without_keys(broker, collector, daemon_factory, tmp_path,
                                                test_set, activity_bundle, activity_bundle_v2,
                                                caplog):
    v4 = rewrite(activity_bundle, tmp_path / "a4.edgeml", version="4")
    v5 = rewrite(activity_bundle, tmp_path / "a5.edgeml", version="5")
    other = rewrite(activity_bundle, tmp_path / "o1.edgeml", name="other")
    m = read_bundle(activity_bundle_v2).manifest
    # outputs that do not match the manifest: one class more than the model scores
    lying = rewrite(activity_bundle_v2, tmp_path / "a6.edgeml", version="6", outputs=(
        dataclasses.replace(m.outputs, classes=(*m.outputs.classes, "swimming"))))
    padding = "".join(random.Random(3).choices("abcdefghijklmnopqrstuvwxyz0123456789",
                                               k=2_000_000))
    big = rewrite(activity_bundle, tmp_path / "a7.edgeml", version="7", description=padding)
    assert big.stat().st_size > 2**20
    caps = ("[profile_overrides]\nmodels = { max_active_versions = 3, max_model_names = 1, "
            "store_budget_mb = 1 }")
    cfg = config(tmp_path, broker, "dev-c",
                 [{"name": "activity", "version": "1", "bundle": activity_bundle}], caps,
                 sync=True)
    with caplog.at_level("WARNING", logger="edgeml"):
        d = daemon_factory(cfg)
    assert "trusted_keys is empty: commands on edgeml/dev-c/cmd" in caplog.text
    out = collector("edgeml/dev-c/out/activity")
    up_deploy = collector("edgeml/dev-c/sync/deploy")
    with Stream(broker, test_set) as stream:
        wait_answers(out, 5)
        assert push(broker, activity_bundle_v2, device="dev-c", timeout=30).exit_code == 0
        res = push(broker, other, device="dev-c", role="shadow", timeout=30)
        assert res.exit_code == 1 and "models.max_model_names = 1" in \
            res.final["dev-c"]["reason"], res.final
        assert push(broker, v4, device="dev-c", role="shadow", timeout=30).exit_code == 0
        res = push(broker, v5, device="dev-c", role="canary", timeout=30)
        assert res.exit_code == 1, res.final
        assert "would have 4 active versions, over the firmware profile's " \
               "models.max_active_versions = 3" in res.final["dev-c"]["reason"]
        # the model store's disk budget: refused, nothing evicted
        res = push(broker, big, device="dev-c", role="shadow", timeout=30)
        assert res.exit_code == 1 and "would pass models.store_budget_mb = 1 MB" in \
            res.final["dev-c"]["reason"], res.final
        assert active(d) == {"1": "champion", "2": "challenger", "4": "shadow"}
        # the lying bundle: refused before activation, at the load stage
        res = push(broker, lying, device="dev-c", role="champion", timeout=30)
        assert res.exit_code == 1 and res.final["dev-c"]["at"] == "loaded", res.final
        assert "output contract: scores have 4 column(s), expected 5 class(es)" in \
            res.final["dev-c"]["reason"]
        wait_answers(out, len(out.messages) + 5)
    recs = wait_answers(out, len(stream.sent))
    check_answered_once(stream.sent, recs)
    assert {r["version"] for r in recs} == {"1"}
    up_deploy.wait_for(lambda ms: sum(r["stage"] == "failed" for r in synced(up_deploy)) >= 3,
                       15)
    reasons = [r["reason"] for r in synced(up_deploy) if r["stage"] == "failed"]
    assert any("capacity" in x for x in reasons) and any("output contract" in x
                                                         for x in reasons)


# ---- identities: tail loss, restored data dir ----------------------------------------------
def test_record_ids_never_collide_after_tail_loss_or_restore(broker, collector, daemon_factory,
                                                             tmp_path, test_set,
                                                             activity_bundle):
    cfg = config(tmp_path, broker, "dev-s",
                 [{"name": "activity", "version": "1", "bundle": activity_bundle}], sync=True)
    data = tmp_path / "dev-s"
    results = collector("edgeml/dev-s/sync/results")
    alerts = collector("edgeml/dev-s/alerts")
    up_alerts = collector("edgeml/dev-s/sync/alerts")
    sink = sqlite3.connect(":memory:")
    sink.execute("CREATE TABLE records (record_id TEXT PRIMARY KEY, input_seq INTEGER)")
    seen: set[int] = set()  # collector messages already loaded into the sink

    def phase(prefix: str, n: int = 4) -> list[int]:
        """Send n windows to a fresh daemon, wait for their results upstream, load every new
        record into the sink with INSERT OR IGNORE; returns the input_seqs, asserting that
        every new record id was inserted (none collided with an earlier one)."""
        d = daemon_factory(cfg)
        publish_all(broker, windows(test_set, prefix, n))
        results.wait_for(lambda ms: sum(str(r["id"]).startswith(prefix)
                                        for r in synced(results)) >= n, 30)
        d.stop()
        inserted, seqs = 0, []
        for i, msg in enumerate(list(results.messages)):
            if i in seen:
                continue
            seen.add(i)
            for r in msgpack.unpackb(msg.payload)["records"]:
                if not str(r["id"]).startswith(prefix):
                    continue  # a redelivery of an earlier phase's record
                cur = sink.execute("INSERT OR IGNORE INTO records VALUES (?, ?)",
                                   (r["record_id"], r["input_seq"]))
                inserted += cur.rowcount
                seqs.append(r["input_seq"])
        assert inserted == len(seqs) == n, (prefix, inserted, seqs)
        return seqs

    a = phase("a")
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)
    b = phase("b")
    assert min(b) > max(a)
    # the data dir comes back from the backup: the fleet saw higher seqs than it holds
    shutil.rmtree(data)
    shutil.copytree(backup, data)
    c = phase("c")
    assert min(c) > max(b)
    restored = [x for x in docs(alerts) if x["kind"] == "data_dir_restored"]
    assert restored and restored[0]["published_seq"] == max(b) + 1, restored
    up_alerts.wait_for(lambda ms: any(r["kind"] == "data_dir_restored"
                                      for r in synced(up_alerts)), 10)
    # the raw log loses its tail (a power cut): the last records of the open segment
    seg = max((data / "rawlog" / "activity").glob("seg-*.log"))
    size = seg.stat().st_size
    with open(seg, "r+b") as fh:
        fh.truncate(size - 100)
    dd = phase("d")
    assert min(dd) > max(c)
    total = sink.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert total == 16


# ---- identities: twins ---------------------------------------------------------------------
def _start(cfg: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "ready" in line:
            return proc
    raise AssertionError(f"daemon exited with {proc.wait(5)} before it was ready")


def test_a_twin_refuses_to_run_and_a_kill9_restart_is_not_a_twin(broker, collector,
                                                                  daemon_factory, tmp_path,
                                                                  activity_bundle):
    models = [{"name": "activity", "version": "1", "bundle": activity_bundle}]
    first = config(tmp_path, broker, "dev-t", models)
    twin = tmp_path / "twin.toml"
    twin.write_text(first.read_text().replace(str(tmp_path / "dev-t"), str(tmp_path / "twin")))
    status = collector("edgeml/dev-t/status")
    alerts = collector("edgeml/dev-t/alerts")
    proc = _start(first)
    try:
        status.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "online"
                                       for m in ms), 15)
        mine = json.loads(status.messages[-1].payload)["identity"]["instance"]
        with pytest.raises(TwinDeviceError, match="another daemon with device_id 'dev-t' is "
                                                   f"online \\(instance {mine}"):
            daemon_factory(twin)
        alerts.wait_for(lambda ms: any(json.loads(m.payload)["kind"] == "twin_device"
                                       for m in ms), 10)
        # the first one was not disturbed: still online, the same instance
        assert proc.poll() is None
        # kill -9 and restart with the same data dir: itself, not a twin
        proc.kill()
        proc.wait(10)
        proc = _start(first)
        n = len(status.messages)
        status.wait_for(lambda ms: any(json.loads(m.payload).get("state") == "online"
                                       and json.loads(m.payload).get("pid") == proc.pid
                                       for m in ms[n:]), 15)
        last = json.loads(status.messages[-1].payload)
        assert last["identity"]["instance"] == mine
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
