"""The shipped mosquitto ACL (deploy/mosquitto/edgeml.acl) on a real mosquitto: a real daemon
works under it (sensors in, status, sync, commands), the collector stores its records, and
another device's credentials can neither sync records nor publish a status in its name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import paho.mqtt.client as paho
from conftest import gait_messages, gait_pipeline, write_config

from edgeml.host.collect.evidence import FleetDB
from edgeml.host.fleet import Fleet
from edgeml.transport.settings import BrokerSettings

REPO = Path(__file__).resolve().parents[2]
USERS = ("dev-a", "dev-b", "collector", "ops", "sensors")


def _client(broker, user: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{user}")
    c.username_pw_set(user, f"pw-{user}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _batch(device: str, records: list[dict]) -> bytes:
    return msgpack.packb({"schema": 1, "device": device, "stream": "results", "batch_seq": 1,
                          "sent": time.time(), "records": records})


def _wait_rows(db_url: str, sql: str, want, timeout: float = 30.0):
    """Poll the collector's database until ``want(rows)`` holds (the collector commits on
    its own schedule: the database is the only place to observe it)."""
    deadline = time.monotonic() + timeout
    while True:
        with FleetDB(db_url) as db:
            rows = db.query(sql)
        if want(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_one_device_cannot_write_another_devices_topics(tmp_path, broker_factory,
                                                        daemon_factory, gait_bundle):
    pw = tmp_path / "passwd"
    for i, u in enumerate(USERS):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) +
                       [str(pw), u, f"pw-{u}"], check=True)
    acl = REPO / "deploy/mosquitto/edgeml.acl"  # the shipped file, as it is
    broker = broker_factory("acl", listener_config=(
        f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}")).start()
    for u in USERS:
        (tmp_path / f"{u}.pw").write_text(f"pw-{u}\n")

    cfg = write_config(
        tmp_path / "dev-a.toml", broker=broker, data_dir=tmp_path / "dev-a", device_id="dev-a",
        pipeline=gait_pipeline(topics=["sensors/dev-a/gait"]),
        models=[{"name": "gait", "version": "1", "role": "champion",
                 "bundle": str(gait_bundle)}],
        extra='[sync]\nbatch_max_wait_s = 0.1\n[metrics]\nlisten = ""')
    text = cfg.read_text().replace(
        f'url = "{broker.url}"',
        f'url = "{broker.url}"\nusername = "dev-a"\npassword_file = "{tmp_path / "dev-a.pw"}"')
    cfg.write_text(text)
    daemon_factory(cfg)

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = subprocess.Popen(
        [sys.executable, "-m", "edgeml", "collect", "--source", broker.url, "--db", db,
         "--username", "collector", "--password-file", str(tmp_path / "collector.pw"),
         "--status-interval", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in collector.stdout:
            if "collect: ready" in line:
                break
        feeder = _client(broker, "sensors")
        for t, p in gait_messages(20, topic="sensors/dev-a/gait"):
            feeder.publish(t, p, qos=1).wait_for_publish(10)
        # dev-b's credentials: a forged batch and a forged status in dev-a's name, then one
        # record of its own (same connection, so it arrives after the forged ones would)
        evil = _client(broker, "dev-b")
        forged = {"record_id": "dev-a/gait/999999/gait/1/results", "pipeline": "gait",
                  "model": "gait", "version": "1", "role": "champion", "ts": time.time(),
                  "input_seq": 999999, "output": {"label": -1}}
        evil.publish("edgeml/dev-a/sync/results", _batch("dev-a", [forged]), qos=1
                     ).wait_for_publish(10)
        evil.publish("edgeml/dev-a/status", json.dumps(
            {"device": "dev-a", "state": "offline", "ts": time.time()}), qos=1, retain=True
                     ).wait_for_publish(10)
        own = {**forged, "record_id": "dev-b/gait/1/gait/1/results"}
        evil.publish("edgeml/dev-b/sync/results", _batch("dev-b", [own]), qos=1
                     ).wait_for_publish(10)

        rows = _wait_rows(db, "SELECT device, record_id, stream FROM records",
                          lambda rs: any(r[0] == "dev-b" for r in rs) and
                          sum(r[0] == "dev-a" and r[2] == "outputs" for r in rs) >= 20)
        ids = {r[1] for r in rows}
        assert "dev-b/gait/1/gait/1/results" in ids  # dev-b may write its own topics
        assert forged["record_id"] not in ids       # ... but not dev-a's
        assert sum(r[0] == "dev-a" and r[2] == "outputs" for r in rows) == 20
        assert {r[0] for r in rows} == {"dev-a", "dev-b"}

        async def operator():
            settings = BrokerSettings(url=broker.url, client_id="test-ops",
                                      clean_start=True, username="ops", password="pw-ops")
            async with Fleet(settings) as fleet:
                statuses = await fleet.statuses()
                reply = await fleet.command("dev-a", "set_policy", policy="first")
            return statuses, reply
        statuses, reply = asyncio.run(operator())
        assert statuses["dev-a"]["state"] == "online"  # the forged "offline" never landed
        assert reply["ok"], reply
        for c in (evil, feeder):  # disconnect first: loop_stop alone waits for unacked QoS 1
            c.disconnect()
            c.loop_stop()
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
