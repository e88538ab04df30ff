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
    daphnet_walking_start,
    load_basicmotions,
    load_daphnet,
)

# windows by count (min_window_s 0): the stream is published faster than one window a second
DRIFT = ('[drift]\nwindow = 2000\nconsecutive = 2\nmin_window_s = 0\n'
         '[metrics]\nlisten = "127.0.0.1:0"\n')
TOPIC = "sensors/a/imu"
# [drift] at its defaults but for min_window_s (0: windows by count, as the stream is fast)
NO_METRICS = '[metrics]\nlisten = ""\n[drift]\nmin_window_s = 0\n'


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


@sync
async def test_a_stream_faster_than_a_window_a_second_makes_larger_windows_not_more(
        tmp_path, activity_bundle, test_set):
    """``[drift] min_window_s`` at its default (1 s): 4,000 samples sent at once against
    windows of 500 make a few large windows (by count alone: eight in well under a second),
    every sample counted, and each closed window's record goes upstream."""
    order = np.random.default_rng(11).permutation(len(test_set.X))
    extra = '[metrics]\nlisten = ""\n[drift]\nwindow = 500\nrate_interval_s = 0.5\n'
    async with Rig(tmp_path, [{"name": "activity", "version": "1",
                               "bundle": str(activity_bundle)}], extra=extra) as rig:
        mon = rig.device.monitors["activity"]
        assert mon.s.min_window_s == 1.0
        start = time.monotonic()
        rig.send(stream(test_set, order))

        def synced() -> list[dict]:
            return [r for p in rig.broker.payloads(f"edgeml/{DEVICE}/sync/drift")
                    for r in msgpack.unpackb(p, raw=False)["records"] if r["kind"] == "input"]

        def counted() -> int:  # closed windows upstream, and the open one
            return sum(r["samples"] for r in synced()) + mon.status()["window_fill"]
        # every sample is counted once: in a window's record or the window still open
        await _until(lambda: mon.windows >= 1 and len(synced()) == mon.windows
                     and counted() == 4000, "every sample counted, a window closed",
                     timeout=60)
        elapsed = time.monotonic() - start
        assert mon.windows <= elapsed / mon.s.min_window_s + 1  # at most one a second
        assert all(r["samples"] >= 500 for r in synced())


@pytest.fixture(scope="module")
def walking(tmp_path_factory):
    """The walking part of the recording (from :func:`daphnet_walking_start`) split in time:
    an IsolationForest and its reference from the first half (converted for older devices:
    the reference sits in provenance), the second half to stream."""
    from sklearn.ensemble import IsolationForest

    from converters import convert_estimator

    X = load_daphnet().X.astype(np.float64)
    start = daphnet_walking_start(X)
    half = start + (len(X) - start) // 2
    ref_x, rest = X[start:half], X[half:]
    est = IsolationForest(n_estimators=25, random_state=0).fit(ref_x)
    bundle = convert_estimator(est, ref_x[::10], name="gait", version="1",
                               features=DAPHNET_CHANNELS, training_data=ref_x, portable=True,
                               out=tmp_path_factory.mktemp("walk") / "gait-1.edgeml").path
    return start, ref_x, rest, bundle


def gait_stream(X: np.ndarray, tag: str) -> list[tuple[str, bytes]]:
    out = []
    for i, row in enumerate(X):
        body = dict(zip(DAPHNET_CHANNELS, map(float, row), strict=True))
        body["id"] = f"{tag}{i}"
        out.append(("sensors/p1/gait", json.dumps(body).encode()))
    return out


@sync
async def test_daphnet_walking_time_split_no_alert_and_a_shifted_copy_alerts(tmp_path, walking):
    """Default [drift] settings (window 2,000, PSI 0.25, k = 2; windows by count, as the
    stream comes faster than a window a second). Stream order: the second
    half of the walking part in time order, twice (5,632 samples, 2 full windows), then the
    same with leg_vert + 0.5 of its reference std, twice."""
    from conftest import gait_pipeline

    start, ref_x, rest, bundle = walking
    assert start == 1408  # 22 s: what the split is measured from (docs/operations.md)
    async with Rig(tmp_path, [{"name": "gait", "version": "1", "bundle": str(bundle)}],
                   pipeline=gait_pipeline(), extra=NO_METRICS) as rig:
        mon = rig.device.monitors["gait"]
        assert mon.ref_version == "gait:1"  # the portable layout's reference is in use
        assert mon.s.window == 2000 and mon.s.psi_alert == 0.25 and mon.s.consecutive == 2
        normal = gait_stream(rest, "n")
        rig.send(normal * 2)
        await _until(lambda: mon.windows == 2 and rig.device.pipelines["gait"].stats.scored
                     == 2 * len(rest), "the second half, twice", timeout=60)
        assert alerts(rig) == []
        assert max(mon.current["psi"].values()) < 0.1
        assert mon.output_current and max(v for d in mon.output_current.values()
                                          for k, v in d.items() if k.endswith("psi")) < 0.25
        shifted = rest.copy()
        ch = DAPHNET_CHANNELS.index("leg_vert")
        shifted[:, ch] += 0.5 * ref_x[:, ch].std()
        rig.send(gait_stream(shifted, "s") * 2)
        await _until(lambda: mon.windows == 5, "3 more windows", timeout=60)
        raised = [a for a in alerts(rig) if a["kind"] == "input_drift"]
        assert raised and raised[0]["state"] == "raised" and raised[0]["channel"] == "leg_vert"
        assert raised[0]["psi"]["leg_vert"] > 0.25 and raised[0]["reference"] == "gait:1"


def _daphnet_run(ref, X, window=2000):
    raised = []
    mon = DriftMonitor("gait", DriftConfig(window=window, min_window_s=0),
                       features=DAPHNET_CHANNELS,
                       window=None, hop=None, record=lambda d: None, clock=lambda: 0.0,
                       alert=lambda k, d: raised.append((k, d["state"], d.get("channel"))))
    mon.set_reference(ref, "gait:1")
    psis = []
    for j in range(0, len(X), 16):
        mon.observe_rows(["g"] * len(X[j:j + 16]), X[j:j + 16])
        if mon.current and (not psis or mon.windows > len(psis)):
            psis.append(max(mon.current["psi"].values()))
    return raised, psis


def test_daphnet_whole_recording_time_split_is_a_real_change():
    """The literal reading: the reference from the first half of the whole recording (the data
    set holds one recording, so "the first half of every recording" is the same split). That
    half holds the ~20 s of standing the second half does not have: max channel PSI 0.52-0.76
    per window, and input_drift is raised at the defaults. Split where walking starts (any
    point from 20 to 32 s) and the second half reads 0.03-0.08; a random split 0.01
    (docs/operations.md)."""
    X = load_daphnet().X.astype(np.float64)
    half = len(X) // 2
    ref = make_reference(X[:half], DAPHNET_CHANNELS, None, kind="anomaly")
    raised, psis = _daphnet_run(ref, np.concatenate([X[half:]] * 2))  # two passes: k = 2
    assert min(psis) > 0.25 and [k for k, state, _ in raised] == ["input_drift"]
    for t0 in (20, 24, 28, 32):
        s0 = t0 * 64
        mid = s0 + (len(X) - s0) // 2
        ref_w = make_reference(X[s0:mid], DAPHNET_CHANNELS, None, kind="anomaly")
        raised_w, psis_w = _daphnet_run(ref_w, np.concatenate([X[mid:]] * 2))
        assert raised_w == [] and max(psis_w) < 0.1, (t0, psis_w)
    perm = np.random.default_rng(0).permutation(len(X))
    ref_iid = make_reference(X[perm[:half]], DAPHNET_CHANNELS, None, kind="anomaly")
    raised_iid, psis_iid = _daphnet_run(ref_iid, np.concatenate([X[perm[half:]]] * 2))
    assert raised_iid == [] and max(psis_iid) < 0.1
