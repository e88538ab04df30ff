"""Drift and sensor health on a device (in-memory broker, the real BasicMotions bundle with a
reference profile from TRAIN), and the pure figures on Daphnet."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest
from test_device_stages import DEVICE, Rig, _until, sync

from edgeml.config import DriftConfig
from edgeml.core.drift import DriftMonitor, make_reference
from edgeml.host.commands.status import render, summarize
from edgeml.host.datasets import (
    BASICMOTIONS_CHANNELS,
    DAPHNET_CHANNELS,
    load_basicmotions,
    load_daphnet,
)

DRIFT = '[drift]\nwindow = 2000\nconsecutive = 2\n[metrics]\nlisten = "127.0.0.1:0"\n'
TOPIC = "sensors/a/imu"


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


def stream(test, order, *, scale=None, stuck=None) -> list[tuple[str, bytes]]:
    """Every TEST series in ``order`` on one topic; optionally one channel scaled or stuck."""
    out = []
    for w in order:
        x = test.X[w].astype(np.float64).copy()
        if scale:
            x[:, BASICMOTIONS_CHANNELS.index(scale[0])] *= scale[1]
        if stuck:
            x[:, BASICMOTIONS_CHANNELS.index(stuck)] = 0.25
        for i, sample in enumerate(x):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, sample), strict=True))
            body["id"] = f"w{w}-{i}"
            out.append((TOPIC, json.dumps(body).encode()))
    return out


def alerts(rig) -> list[dict]:
    return [json.loads(p) for p in rig.broker.payloads(f"edgeml/{DEVICE}/alerts")]


@sync
async def test_scaled_channel_raises_input_drift_then_clears(tmp_path, activity_bundle,
                                                             test_set):
    order = np.random.default_rng(7).permutation(len(test_set.X))
    normal = stream(test_set, order)  # 4,000 samples: two drift windows
    scaled = stream(test_set, order, scale=("ax", 3.0))
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}], extra=DRIFT) as rig:
        mon = rig.device.monitors["activity"]
        assert mon.ref_version == "activity:1"
        rig.send(normal * 2)
        await _until(lambda: mon.windows == 4, "4 normal windows", timeout=60)
        assert alerts(rig) == []
        assert max(mon.current["psi"].values()) < 0.1
        rig.send(scaled * 2)
        await _until(lambda: mon.windows == 8, "4 scaled windows", timeout=60)
        raised = [a for a in alerts(rig) if a["kind"] == "input_drift"]
        assert len(raised) == 1 and raised[0]["state"] == "raised"
        assert raised[0]["window"] <= 6  # within two windows of the change
        assert raised[0]["channel"] == "ax" and raised[0]["psi"]["ax"] > 0.25
        assert raised[0]["reference"] == "activity:1"
        # edgeml status shows the drift and the raised alert from the retained status
        rig.device.publish_status_soon()
        await _until(lambda: rig.status()["pipelines"]["activity"]["drift"]["windows"] == 8,
                     "a status with the scaled windows")
        row = summarize(DEVICE, rig.status(), time.time(), 60.0)
        drift = row["pipelines"]["activity"]["drift"]
        assert drift["level"] == "significant" and drift["channel"] == "ax"
        assert drift["max_psi"] > 0.25 and drift["alerts"] == ["input_drift", "out_of_range"]
        table = render([row])
        assert "DRIFT" in table.splitlines()[0]
        assert f"significant ax {drift['max_psi']:.2f} ALERT input_drift,out_of_range" in table
        rig.send(normal * 2)
        await _until(lambda: mon.windows == 12, "4 normal windows again", timeout=60)
        kinds = [(a["kind"], a["state"]) for a in alerts(rig)]
        assert ("input_drift", "cleared") in kinds
        assert not mon.active_alerts()
        assert not any(k == "sensor_stuck" for k, _ in kinds)
        rig.device.publish_status_soon()
        drift = rig.status()["pipelines"]["activity"]["drift"]
        assert drift["windows"] == 12 and drift["reference"] == "activity:1"
        assert drift["level"] == "stable" and drift["alerts"] == []
        assert set(drift["psi"]) == set(BASICMOTIONS_CHANNELS)
        row = summarize(DEVICE, rig.status(), time.time(), 60.0)
        assert row["pipelines"]["activity"]["drift"]["alerts"] == []
        assert "stable " in render([row]) and "ALERT" not in render([row])


@sync
async def test_a_stuck_channel_raises_sensor_stuck(tmp_path, activity_bundle, test_set):
    order = np.random.default_rng(7).permutation(len(test_set.X))
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}], extra=DRIFT) as rig:
        mon = rig.device.monitors["activity"]
        rig.send(stream(test_set, order))
        await _until(lambda: mon.windows == 2, "2 normal windows", timeout=60)
        rig.send(stream(test_set, order, stuck="gx"))
        await _until(lambda: mon.windows == 4, "2 stuck windows", timeout=60)
        stuck = [a for a in alerts(rig) if a["kind"] == "sensor_stuck"]
        assert [(a["state"], a["source"], a["channel"]) for a in stuck] == \
            [("raised", TOPIC, "gx")]
        assert stuck[0]["value"] == 0.25

        def synced() -> list[dict]:  # the per-window figures go upstream on sync/drift
            return [r for p in rig.broker.payloads(f"edgeml/{DEVICE}/sync/drift")
                    for r in msgpack.unpackb(p, raw=False)["records"]]
        await _until(lambda: len(synced()) >= 4, "4 drift records upstream")
        recs = sorted(synced(), key=lambda r: r["window"])
        assert [r["window"] for r in recs] == [1, 2, 3, 4]
        assert recs[0]["kind"] == "input" and recs[0]["reference"] == "activity:1"
        assert recs[0]["rejected"] == 0.0 and recs[3]["stuck"][0]["channel"] == "gx"


def _daphnet_run(ref, X, window=2000):
    raised = []
    mon = DriftMonitor("gait", DriftConfig(window=window), features=DAPHNET_CHANNELS,
                       window=None, hop=None, record=lambda d: None, clock=lambda: 0.0,
                       alert=lambda k, d: raised.append((k, d["state"], d.get("channel"))))
    mon.set_reference(ref, "gait:1")
    psis = []
    for j in range(0, len(X), 16):
        mon.observe_rows(["g"] * len(X[j:j + 16]), X[j:j + 16])
        if mon.current and (not psis or mon.windows > len(psis)):
            psis.append(max(mon.current["psi"].values()))
    return raised, psis


def test_daphnet_time_split_and_shift():
    """Reference from the first half (in time). Measured: the second half is not the first
    half's distribution (the recording starts with a long standing segment): its max channel
    PSI is 0.56-0.76 per 2,000-sample window, so it does alert; a random split does not, and
    a +1 std shift of one channel alerts on that channel (docs/operations.md)."""
    data = load_daphnet()
    X = data.X.astype(np.float64)
    half = len(X) // 2
    ref = make_reference(X[:half], DAPHNET_CHANNELS, None, kind="anomaly")
    second = np.concatenate([X[half:]] * 2)  # two passes: enough windows for k = 2
    _raised, psis = _daphnet_run(ref, second)
    assert min(psis) > 0.25  # the honest figure: a time split drifts
    perm = np.random.default_rng(0).permutation(len(X))
    ref_iid = make_reference(X[perm[:half]], DAPHNET_CHANNELS, None, kind="anomaly")
    raised_iid, psis_iid = _daphnet_run(ref_iid, np.concatenate([X[perm[half:]]] * 2))
    assert raised_iid == [] and max(psis_iid) < 0.1
    shifted = X[perm[half:]].copy()
    shifted[:, 0] += ref_iid["inputs"][DAPHNET_CHANNELS[0]]["std"]
    raised_shift, _ = _daphnet_run(ref_iid, np.concatenate([shifted] * 2))
    assert ("input_drift", "raised", DAPHNET_CHANNELS[0]) in raised_shift
