"""Staged rollouts end to end: three real daemons on a private mosquitto, a real collector
(`edgeml collect` in its own process) filling a SQLite fleet database, real BasicMotions
samples streaming, signed bundles and signed commands.

* a version trained on shuffled labels halts at the first wave and is retired there; no other
  device ever gets it;
* a good version reaches every device; the rollout process is killed with SIGKILL mid-way and
  the same command started again carries on (same rollout, earlier waves not redone).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from conftest import write_config

from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.host.fleet import Fleet
from edgeml.host.rollout.db import Database
from edgeml.host.rollout.plan import Thresholds
from edgeml.host.rollout.runner import RolloutRunner, RolloutSettings
from edgeml.host.rollout.store import RolloutStore

DEVICES = ("dev-a", "dev-b", "dev-c")
GROUP = "fleet"
MODEL = "motion"
REPO = Path(__file__).resolve().parents[2]


# ---- per-sample models on the real data -----------------------------------------------------
def _samples(split: str):
    s = load_basicmotions(split)
    return s.X.reshape(-1, 6), np.repeat(np.asarray(s.y), s.X.shape[1])


def _bundle(out: Path, version: str, seed: int, key, *, shuffled: bool = False) -> Path:
    """A small random forest on single samples (label: the series' activity); ``shuffled``
    trains it on permuted labels (a broken training run that converts and loads fine)."""
    from sklearn.ensemble import RandomForestClassifier

    from converters import convert_estimator

    X, y = _samples("TRAIN")
    if shuffled:
        y = np.random.default_rng(seed).permutation(y)
    model = RandomForestClassifier(n_estimators=10, max_depth=8, random_state=seed).fit(X, y)
    Xt, _ = _samples("TEST")
    return convert_estimator(model, Xt[::20], name=MODEL, version=version,
                             features=BASICMOTIONS_CHANNELS, training_data=X, sign_key=key,
                             out=out / f"{MODEL}-{version}.edgeml").path


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A release key and three signed bundles: v1 (champion), v2 good, v3 shuffled labels."""
    from edgeml.keys import generate_keypair, load_private_key

    d = tmp_path_factory.mktemp("rollout-bundles")
    priv, pub = generate_keypair(d / "release")
    key = load_private_key(priv)
    return {"priv": priv, "pub": pub, "v1": _bundle(d, "1", 0, key),
            "v2": _bundle(d, "2", 1, key), "v3": _bundle(d, "3", 2, key, shuffled=True)}


# ---- the fleet ------------------------------------------------------------------------------
class Streamer:
    """Every device gets batches of 50 real samples on its own topic until stopped."""

    def __init__(self, broker, per_s: float = 8.0) -> None:
        X, _ = _samples("TEST")
        self.X = X
        self.stop = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.per_s = per_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(1.0 / self.per_s):
            for dev in DEVICES:
                rows = [dict(zip(BASICMOTIONS_CHANNELS, map(float, self.X[(i + k) % len(self.X)]),
                                 strict=True)) for k in range(50)]
                self.client.publish(f"sensors/{dev}/imu", json.dumps({"samples": rows}), qos=0)
            i += 50

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.disconnect()  # loop_stop alone waits for unacknowledged QoS 1
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def fleet(request, tmp_path, broker, daemon_factory, signed):
    """Three daemons (group "fleet", v1 champion, trusting the release key), a collector
    process, a stream of samples; yields the db URL. An indirect parameter adds config text
    to every daemon."""
    param = getattr(request, "param", "")
    more = param if isinstance(param, str) else ""
    daemons = {}
    for dev in DEVICES:
        cfg = write_config(
            tmp_path / f"{dev}.toml", broker=broker, data_dir=tmp_path / dev, device_id=dev,
            pipeline={"name": MODEL, "topics": [f"sensors/{dev}/imu"], "window": None},
            models=[{"name": MODEL, "version": "1", "role": "champion",
                     "bundle": str(signed["v1"])}],
            extra=(f'groups = ["{GROUP}"]\ntrusted_keys = ["{signed["pub"]}"]\n'
                   "[sync]\nbatch_max_wait_s = 0.1\n[metrics]\nlisten = \"\"\n" + more))
        daemons[dev] = daemon_factory(cfg)
    if param == {"db": "postgresql"}:  # the collector and the rollout on a private PostgreSQL
        db = request.getfixturevalue("postgres").create_database("rollout_fleet")
    else:
        db = f"sqlite:///{tmp_path / 'fleet.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    collector = subprocess.Popen(
        [sys.executable, "-m", "edgeml", "collect", "--source", broker.url, "--db", db,
         "--status-interval", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env)
    try:
        for line in collector.stdout:  # an event: the collector says it is subscribed
            if "collect: ready" in line:
                break
        else:
            raise AssertionError("the collector did not start")
        streamer = Streamer(broker)
        try:
            yield {"db": db, "daemons": daemons, "broker": broker, "env": env}
        finally:
            streamer.close()
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)


def active_versions(daemon) -> dict[str, str]:
    return daemon.call(lambda: {s.version: s.role for s in
                                daemon.daemon.pipelines.members(MODEL)})


@pytest.mark.parametrize("fleet", ["", {"db": "postgresql"}], indirect=True,
                         ids=["sqlite", "postgresql"])
def test_a_bad_version_halts_at_the_first_wave_and_is_rolled_back(fleet, signed):
    from edgeml.keys import load_private_key

    said: list[str] = []
    # a long time hold: the breach is caught early, once 300 rows are in
    settings = RolloutSettings(
        bundle=signed["v3"], group=GROUP, waves="1,50%,100%", hold="10m",
        thresholds=Thresholds(max_disagreement=0.25, max_error_rate=0.01, max_p99_ms=200.0),
        role="canary", poll_s=0.2, push_timeout_s=30.0, early_halt_rows=300,
        early_every_s=0.5, sign_key=load_private_key(signed["priv"]))
    t0 = time.monotonic()

    async def go():
        async with Fleet(fleet["broker"].url) as fl:
            with Database(fleet["db"]) as db:
                return await RolloutRunner(settings, fl, db, say=said.append).run()

    r = asyncio.run(go())
    text = "\n".join(said)
    assert r.state == "halted", text
    assert time.monotonic() - t0 < 60 and "halting early, during the hold" in text
    assert r.reason.startswith("wave 1 (1): disagreement with the champion"), r.reason
    with Database(fleet["db"]) as db:
        store = RolloutStore(db)
        (wave,) = store.waves(r.id)  # no second wave was ever planned
        devices = store.devices(r.id)
    (first,) = wave.devices
    assert wave.state == "failed" and devices[first].state == "rolled_back"
    verdict = wave.verdict
    (breach,) = verdict["breaches"]
    assert breach["figure"] == "disagreement" and breach["devices"] == [first]
    assert breach["value"] > 0.5  # shuffled labels: most answers differ from the champion
    ev = verdict["evidence"]["devices"][first]
    assert ev["rows"] >= 300 and ev["compared"] >= 300 and ev["errors"] == 0
    assert ev["first_ts"] <= ev["last_ts"]
    assert verdict["hold"]["early"] and verdict["hold"]["kind"] == "time"
    assert verdict["hold"]["rows"] == verdict["evidence"]["total"]["rows"] >= 300
    assert f"{first} (this wave): " in text and "rows, disagreement" in text
    # the device no longer runs v3 (signed retire); nobody else ever got it
    for dev, d in fleet["daemons"].items():
        assert active_versions(d) == {"1": "champion"}, dev
        if dev != first:
            assert d.call(lambda d=d: d.daemon.registry.installed(MODEL, "3")) is None
    assert first in text and "rolled back" in text


def test_a_good_version_reaches_every_device_and_a_killed_rollout_resumes(fleet, signed):
    cmd = [sys.executable, "-m", "edgeml", "rollout", str(signed["v2"]), "--group", GROUP,
           "--db", fleet["db"], "--broker", fleet["broker"].url, "--waves", "1,2,100%",
           "--hold", "300rows", "--hold-timeout", "60", "--poll", "0.2",
           "--max-disagreement", "25%", "--max-error-rate", "0.01", "--role", "canary",
           "--sign-key", str(signed["priv"]), "--timeout", "30"]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             env=fleet["env"])
    seen = []
    for line in first.stderr:  # kill it when the second wave holds: wave 1 passed before
        seen.append(line)
        if line.startswith("wave 2: holding"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(10)
    assert first.returncode == -signal.SIGKILL, "".join(seen)
    assert any(line.startswith("wave 1 (1) passed") for line in seen), "".join(seen)
    with Database(fleet["db"]) as db:
        store = RolloutStore(db)
        (r,) = store.find_running(group=GROUP)
        before = {w.wave: (w.devices, w.started, w.state) for w in store.waves(r.id)}
    assert r.current_wave == 1 and before[0][2] == "passed" and before[1][2] == "holding"
    shown = subprocess.run(  # edgeml status shows the interrupted rollout as running
        [sys.executable, "-m", "edgeml", "status", "--once", "--broker", fleet["broker"].url,
         "--db", fleet["db"]], capture_output=True, text=True, timeout=60, env=fleet["env"])
    line = next(x for x in shown.stdout.splitlines() if x.startswith(r.id))
    assert line.split()[1:7] == ["running", f"{MODEL}:2", GROUP, "canary", "2/3", "holding"]

    again = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120,
                           env=fleet["env"])
    assert again.returncode == 0, again.stderr
    assert f"resuming rollout {r.id} of {MODEL} 2 to group {GROUP} at wave 2 of 3" \
        in again.stderr
    doc = json.loads(again.stdout)
    assert doc["id"] == r.id and doc["state"] == "done"
    waves = {w["wave"]: w for w in doc["waves_detail"]}
    assert sorted(waves) == [0, 1, 2]
    for i in (0, 1):  # the waves from before the kill are the same rows, not redone
        assert (waves[i]["devices"], waves[i]["started"]) == tuple(before[i][:2])
    assert all(w["state"] == "passed" for w in waves.values())
    assert sorted(d for w in waves.values() for d in w["devices"]) == sorted(DEVICES)
    for w in waves.values():
        assert w["verdict"]["passed"] and w["verdict"]["evidence"]["total"]["rows"] >= 300
        assert w["verdict"]["evidence"]["total"]["disagreement"] < 0.25
    for dev, d in fleet["daemons"].items():
        assert active_versions(d) == {"1": "champion", "2": "canary"}, dev
    status = subprocess.run(
        [sys.executable, "-m", "edgeml", "status", "--once", "--broker", fleet["broker"].url,
         "--db", fleet["db"]], capture_output=True, text=True, timeout=60, env=fleet["env"])
    assert status.returncode == 0 and "no running rollout" in status.stdout, status.stdout


@pytest.mark.parametrize("fleet", ["[profile_overrides]\nmodels = { max_active_versions = 1 }\n"],
                         indirect=True)
def test_a_full_pipeline_refuses_the_install_and_nothing_is_evicted(fleet, signed):
    said: list[str] = []
    settings = RolloutSettings(bundle=signed["v2"], group=GROUP, waves="1,100%",
                               hold="100rows", role="canary", poll_s=0.2, push_timeout_s=30.0)

    async def go():
        async with Fleet(fleet["broker"].url) as fl:
            with Database(fleet["db"]) as db:
                return await RolloutRunner(settings, fl, db, say=said.append).run()

    r = asyncio.run(go())
    assert r.state == "halted", said
    assert "refused the install (failed: capacity: pipeline motion would have 2 active " \
           "versions, over the firmware profile's models.max_active_versions = 1" in r.reason
    with Database(fleet["db"]) as db:
        store = RolloutStore(db)
        (wave,) = store.waves(r.id)
        (first,) = wave.devices
        assert store.devices(r.id)[first].state == "failed"
        assert "nothing was evicted" in store.devices(r.id)[first].detail
    for dev, d in fleet["daemons"].items():
        assert active_versions(d) == {"1": "champion"}, dev


def test_abort_from_another_shell_stops_the_running_rollout_and_rolls_back(fleet, signed):
    from edgeml.keys import load_private_key

    said: list[str] = []
    settings = RolloutSettings(bundle=signed["v2"], group=GROUP, waves="1,100%", hold="120s",
                               role="challenger", poll_s=0.2, push_timeout_s=30.0,
                               sign_key=load_private_key(signed["priv"]))

    async def go():
        holding = asyncio.Event()

        def say(text: str) -> None:
            said.append(text)
            if "holding" in text:
                holding.set()

        async with Fleet(fleet["broker"].url) as fl:
            with Database(fleet["db"]) as db:
                task = asyncio.create_task(RolloutRunner(settings, fl, db, say=say).run())
                await asyncio.wait_for(holding.wait(), 30)
                (running,) = RolloutStore(db).find_running(group=GROUP)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edgeml", "rollout", "--abort", running.id, "--db",
                    fleet["db"], "--broker", fleet["broker"].url, "--sign-key",
                    str(signed["priv"]), env=fleet["env"], stderr=asyncio.subprocess.PIPE)
                _, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
                return await asyncio.wait_for(task, 30), err.decode()

    r, aborted = asyncio.run(go())
    assert r.state == "aborted" and r.reason == "aborted by the operator"
    assert f"rollout {r.id} was aborted elsewhere" in "\n".join(said)
    with Database(fleet["db"]) as db:
        store = RolloutStore(db)
        (wave,) = store.waves(r.id)  # the second wave never started
        (first,) = wave.devices
        assert store.devices(r.id)[first].state == "rolled_back"
    assert f"{first}: rolled back" in aborted
    for dev, d in fleet["daemons"].items():
        assert active_versions(d) == {"1": "champion"}, dev
