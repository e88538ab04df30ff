"""The device's stages end to end on the in-memory transport: no broker process, real ONNX
models trained on BasicMotions, real raw log and outbox on disk. (The same paths run against a
real mosquitto in tests/test_daemon.py and friends.)"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import basicmotions_window, write_config

from edgeml.config import load_config
from edgeml.core.device import Device
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import open_reader
from edgeml.transport.fake import FakeBroker
from edgeml.transport.settings import BrokerSettings

DEVICE = "watch-01"


def sync(fn):
    """Run an async test body on a fresh event loop (the suite has no async plugin)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return run


class _Url:
    url = "mqtt://127.0.0.1:1"  # never dialled: the fake connector is used


def window_messages(test, w: int, topic: str) -> list[tuple[str, bytes]]:
    return basicmotions_window(test.X[w], topic, f"w{w}")


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


@pytest.fixture(scope="module")
def sklearn_labels(test_set):
    from models import train_activity_model

    return train_activity_model("logreg").predict(test_set.flat())


async def _until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll the device's own state on its loop (no thread, no sleep-as-sync on the fake)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, tmp_path: Path, bundles: list[dict], **cfg) -> None:
        self.broker = FakeBroker()
        path = write_config(tmp_path / "edgeml.toml", broker=_Url, data_dir=tmp_path / "data",
                            models=bundles, device_id=DEVICE, **cfg)
        self.config = load_config(path)
        self.device = Device(self.config, connector=self.broker.connector)
        self.sensor = self.broker.client(BrokerSettings(client_id="sensor", clean_start=True))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Rig:
        await self.sensor.__aenter__()
        await self.device.__aenter__()
        self.task = asyncio.create_task(self.device.run())
        await _until(self.device.ready.is_set, "the device to be ready")
        return self

    async def __aexit__(self, *exc) -> None:
        self.device.request_stop()
        await asyncio.wait_for(self.task, 30)
        await self.device.__aexit__(*exc)
        await self.sensor.close()

    def send(self, items) -> None:
        for topic, payload in items:
            self.sensor.publish_nowait(topic, payload, qos=1)

    def answers(self) -> list[dict]:
        return [msgpack.unpackb(p, raw=False)
                for p in self.broker.payloads(f"edgeml/{DEVICE}/out/activity")]

    def status(self) -> dict:
        return json.loads(self.broker.retained[f"edgeml/{DEVICE}/status"].payload)


@sync
async def test_windows_are_archived_acked_and_answered_like_sklearn(
        tmp_path, activity_bundle, test_set, sklearn_labels):
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}]) as rig:
        for w in range(4):
            rig.send(window_messages(test_set, w, f"sensors/w{w}/imu"))
        await _until(lambda: len(rig.answers()) == 4, "4 answers")
        assert rig.broker.unacked(rig.device.config.broker.client_id) == []
        got = {a["id"]: a["output"]["label"] for a in rig.answers()}
        assert got == {f"w{w}-99": sklearn_labels[w] for w in range(4)}
        assert sorted(a["input_seq"] for a in rig.answers()) == [99, 199, 299, 399]
    records = list(open_reader(tmp_path / "data" / "rawlog" / "activity").read())
    assert [r.seq for r in records] == list(range(400))
    assert records[0].payload == window_messages(test_set, 0, "x")[0][1]


@sync
async def test_a_bad_message_is_dead_lettered_alone(tmp_path, activity_bundle, test_set,
                                                     sklearn_labels):
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}]) as rig:
        good = window_messages(test_set, 2, "sensors/a/imu")
        rig.send([*good[:50], ("sensors/b/imu", b'{"ax": 1'), *good[50:]])
        await _until(lambda: len(rig.answers()) == 1, "the good window's answer")
        assert rig.answers()[0]["output"]["label"] == sklearn_labels[2]
        dlq = [json.loads(p) for p in rig.broker.payloads(f"edgeml/{DEVICE}/dlq")]
        assert [(d["topic"], d["reason"]) for d in dlq] == [("sensors/b/imu", "malformed")]
        rig.device.publish_status_soon()
        st = rig.status()["pipelines"]["activity"]
        assert (st["received"], st["accepted"], st["rejected"]) == (101, 100, 1)


@sync
async def test_promote_command_swaps_the_champion_between_batches(
        tmp_path, activity_bundle, activity_bundle_v2, test_set):
    async with Rig(tmp_path, [
            {"name": "activity", "version": "1", "bundle": str(activity_bundle)},
            {"name": "activity", "version": "2", "bundle": str(activity_bundle_v2),
             "role": "challenger"}]) as rig:
        rig.send(window_messages(test_set, 0, "sensors/a/imu"))
        await _until(lambda: len(rig.answers()) == 1, "the first answer")
        rig.sensor.publish_nowait(f"edgeml/{DEVICE}/cmd", json.dumps(
            {"id": "c1", "cmd": "promote", "model": "activity", "version": "2"}).encode(),
            qos=1)
        replies = lambda: rig.broker.payloads(f"edgeml/{DEVICE}/cmd/reply")  # noqa: E731
        await _until(lambda: replies(), "the command reply")
        reply = json.loads(replies()[0])
        assert reply["ok"] and reply["id"] == "c1"
        assert [(m["version"], m["role"]) for m in reply["active"]] == \
            [("2", "champion"), ("1", "challenger")]
        rig.send(window_messages(test_set, 1, "sensors/a/imu"))
        await _until(lambda: len(rig.answers()) == 2, "the second answer")
        assert [a["version"] for a in rig.answers()] == ["1", "2"]
    state = json.loads((tmp_path / "data" / "state" / "active.json").read_text())
    assert state["pipelines"]["activity"]["previous"] == [["activity", "1"]]


@sync
async def test_reconnect_announces_status_made_on_the_loop_and_will_says_offline(
        tmp_path, activity_bundle, test_set):
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}]) as rig:
        topic = f"edgeml/{DEVICE}/status"
        # the status (last will, birth) belongs to the publishing connection
        client_id = rig.device.config.broker.client_id + "-out"
        rig.send(window_messages(test_set, 0, "sensors/a/imu"))
        await _until(lambda: len(rig.answers()) == 1, "an answer")
        rig.device.publish_status_soon()
        rig.broker.drop(client_id)  # the will, published by the broker
        assert json.loads(rig.broker.retained[topic].payload)["state"] == "offline"
        rig.broker.reconnect(client_id)  # the birth: the newest status, online
        st = rig.status()
        assert st["state"] == "online" and st["pipelines"]["activity"]["scored"] == 1


@sync
async def test_outbox_records_carry_stable_ids_and_reach_the_uplink(
        tmp_path, activity_bundle, test_set):
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}]) as rig:
        rig.send(window_messages(test_set, 0, "sensors/a/imu"))

        def synced() -> list[dict]:
            out = []
            for p in rig.broker.payloads(f"edgeml/{DEVICE}/sync/#"):
                out += msgpack.unpackb(p, raw=False)["records"]
            return out
        await _until(lambda: {r.get("record_id") for r in synced()} >= {
            f"{DEVICE}/activity/99/activity/1/outputs",
            f"{DEVICE}/activity/99/activity/1/results"}, "both records upstream")
        assert np.isfinite(synced()[0].get("latency_ms", 0.0))


@pytest.mark.parametrize(("broker_table", "profile", "window"), [
    ("", "x86-gateway", 512),            # unset: two batches of 256 rows
    ("", "pi-zero-2w", 100),             # never below the transport's default
    ("max_inflight = 30\n", "x86-gateway", 30),  # the config's own value wins
])
@sync
async def test_the_answer_window_holds_two_scored_batches(tmp_path, activity_bundle,
                                                          broker_table, profile, window):
    """The publishing connection's QoS 1 window is sized to the profile's batch, so a scored
    batch's answers leave together instead of one per returning PUBACK."""
    rig = Rig(tmp_path, [{"name": "activity", "version": "1", "bundle": str(activity_bundle)}])
    path = rig.config.source
    path.write_text(path.read_text().replace('profile = "x86-gateway"', f'profile = "{profile}"')
                    .replace("[broker]\n", "[broker]\n" + broker_table))
    rig.config = load_config(path)
    seen: dict[str, object] = {}

    def connector(settings, **kw):
        seen[settings.client_id] = settings
        return rig.broker.connector(settings, **kw)

    rig.device = Device(rig.config, connector=connector)
    async with rig:
        cid = rig.config.broker.client_id
        assert seen[f"{cid}-out"].max_inflight == window
        assert seen[cid].max_inflight == rig.config.broker.max_inflight
