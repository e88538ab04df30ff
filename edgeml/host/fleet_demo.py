"""``edgeml demo --fleet N``: a small fleet on one machine, judged by its own evidence.

N real daemons (group ``demo-fleet``, each with its own watch stream of BasicMotions TEST
samples carrying their true labels), one collector (MQTT source, an embedded SQLite fleet
database), the fleet report, then two staged rollouts: a version trained on shuffled labels,
which halts at the first wave and is rolled back with a signed command, and a good version,
which reaches every device. Every figure printed comes from the collector's database.

Everything lands in one folder: ``keys/``, ``bundles/``, ``devices/<id>/`` (config, data),
``fleet.db``, ``daemon.log``, ``summary.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeml import __version__
from edgeml.errors import ConfigError, DemoError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.host.demo import (
    Console,
    DemoDevice,
    DemoSettings,
    _forget_sessions,
    _need_host_extra,
    daemon_log,
    start_broker,
)

GROUP = "demo-fleet"
MODEL = "motion"
PREFIX = "edgeml"
BATCH = 50  # samples per message
#: version -> (seed, labels shuffled?, how it arrives)
VERSIONS = {"1": (0, False, "champion in every config"),
            "2": (1, False, "rolled out as a canary (good)"),
            "3": (2, True, "rolled out as a canary (trained on shuffled labels)")}


@dataclass(frozen=True, kw_only=True)
class FleetDemoSettings:
    out_dir: Path
    devices: int = 3
    broker_url: str | None = None
    embedded: bool = False
    hold_rows: int = 400
    max_disagreement: float = 0.25
    rate_per_s: float = 10.0  # messages of BATCH samples per device per second

    def __post_init__(self) -> None:
        if not 2 <= self.devices <= 20:
            raise ConfigError(f"must be 2..20 devices, not {self.devices}", key="--fleet")
        DemoSettings(out_dir=self.out_dir, broker_url=self.broker_url, embedded=self.embedded)


def device_ids(n: int) -> list[str]:
    return [f"edge-{i:02d}" for i in range(1, n + 1)]


def _samples(split: str) -> tuple[np.ndarray, np.ndarray]:
    s = load_basicmotions(split)
    return s.X.reshape(-1, s.X.shape[2]), np.repeat(np.asarray(s.y), s.X.shape[1])


def train_sample_model(seed: int, shuffled: bool) -> Any:
    """A small random forest on single samples (label: the series' activity); ``shuffled``
    permutes the labels first: a broken training run that still converts, loads and passes
    its self-test, and only the evidence can catch."""
    from sklearn.ensemble import RandomForestClassifier

    X, y = _samples("TRAIN")
    if shuffled:
        y = np.random.default_rng(seed).permutation(y)
    return RandomForestClassifier(n_estimators=10, max_depth=8, random_state=seed).fit(X, y)


def build_bundles(out: Path, key_path: Path, say: Console) -> dict[str, dict]:
    from converters import convert_estimator
    from edgeml.keys import load_private_key

    key = load_private_key(key_path)
    X, _ = _samples("TRAIN")
    Xt, yt = _samples("TEST")
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    made = {}
    for version, (seed, shuffled, how) in VERSIONS.items():
        model = train_sample_model(seed, shuffled)
        acc = float(np.mean(model.predict(Xt) == yt))
        path = convert_estimator(model, Xt[::20], name=MODEL, version=version,
                                 features=BASICMOTIONS_CHANNELS, training_data=X, sign_key=key,
                                 metrics={"test_accuracy": acc},
                                 out=out / "bundles" / f"{MODEL}-{version}.edgeml",
                                 description="BasicMotions activity per sample, fleet demo"
                                 ).path
        made[version] = {"bundle": path, "sklearn_accuracy": acc, "shuffled": shuffled,
                         "how": how}
        say(f"trained {MODEL} {version}: random forest on single samples"
            + (" with SHUFFLED labels" if shuffled else "")
            + f", scikit-learn TEST accuracy {acc:.1%}; {path.relative_to(out)} (signed)")
    return made


def write_device_config(path: Path, device: str, broker_url: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# Written by `edgeml demo --fleet` (edgeml {__version__})
device_id = "{device}"
profile = "x86-gateway"
data_dir = "data"
topic_prefix = "{PREFIX}"
groups = ["{GROUP}"]
trusted_keys = ["../../keys/demo.pub"]
status_interval_s = 0.5

[broker]
url = "{broker_url}"
client_id = "edgeml-demo-{device}"

[sync]
batch_max_wait_s = 0.2

[metrics]
listen = ""

[[pipelines]]
name = "{MODEL}"
topics = ["sensors/{device}/imu"]
features = {json.dumps(list(BASICMOTIONS_CHANNELS))}
policy = "champion"
deadline_ms = 1000

[[pipelines.models]]
name = "{MODEL}"
version = "1"
role = "champion"
bundle = "../../bundles/{MODEL}-1.edgeml"
""", encoding="utf-8")
    return path


class FleetDemo:
    def __init__(self, settings: FleetDemoSettings, console: Console | None = None) -> None:
        self.s = settings
        self.say = console or Console()
        self.out = settings.out_dir.resolve()
        self.db_url = f"sqlite:///{self.out / 'fleet.db'}"
        self.devices = device_ids(settings.devices)
        self.sent = 0

    async def run(self) -> dict:
        _need_host_extra()
        if self.out.exists() and any(self.out.iterdir()):
            raise DemoError(f"--out {self.out}: the folder is not empty; give a new one")
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"edgeml demo --fleet {len(self.devices)}: everything goes into {self.out}")
        from edgeml.keys import generate_keypair

        (self.out / "keys").mkdir()
        key, _ = generate_keypair(self.out / "keys" / "demo")
        bundles = await asyncio.to_thread(build_bundles, self.out, key, self.say)
        broker = start_broker(DemoSettings(out_dir=self.out, broker_url=self.s.broker_url,
                                           embedded=self.s.embedded), self.out, self.say)
        try:
            with daemon_log(self.out / "daemon.log"):
                return await self._with_broker(broker.url, bundles, key)
        finally:
            broker.stop()
            if broker.kind != "external":
                self.say(f"stopped the {broker.kind} broker")

    async def _with_broker(self, url: str, bundles: dict, key: Path) -> dict:
        from edgeml.host.collect.mqtt_source import MqttSource
        from edgeml.host.collect.service import Collector
        from edgeml.host.collect.sink import Sink

        await _forget_sessions(url, ["edgeml-demo-collector"] + [
            f"edgeml-demo-{d}" for d in self.devices])
        async with contextlib.AsyncExitStack() as stack:
            sink = Sink(self.db_url, prefix=PREFIX)
            stack.callback(sink.close)
            collector = Collector([MqttSource(url, prefix=PREFIX,
                                              client_id="edgeml-demo-collector")],
                                  sink, status_interval_s=3600.0)
            ctask = asyncio.create_task(collector.run(), name="collector")

            async def stop_collector() -> None:
                collector.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ctask, 30)
            stack.push_async_callback(stop_collector)
            await asyncio.wait({ctask, asyncio.create_task(collector.ready.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if ctask.done():
                raise DemoError(f"the collector did not start: {ctask.exception()}")
            self.say(f"collector: {url} {PREFIX}/+/sync/# -> fleet.db (SQLite)")
            daemons = []
            for d in self.devices:
                cfg = write_device_config(self.out / "devices" / d / "edgeml.toml", d, url)
                dev = DemoDevice(cfg)
                await dev.start()
                daemons.append(dev)
                stack.push_async_callback(dev.stop)
            self.say(f"daemons: {', '.join(self.devices)} (group {GROUP}, {MODEL} 1 "
                     "champion, trusting keys/demo.pub)")
            stream = asyncio.create_task(self._stream(url), name="sensors")

            async def stop_stream() -> None:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream
            stack.push_async_callback(stop_stream)
            await self._wait_for_records(len(self.devices) * self.s.hold_rows)
            report = self._report()
            from edgeml.host.commands.fleet import render_table

            self.say("fleet report (from fleet.db):")
            print(render_table(report), flush=True)
            bad = await self._rollout(url, bundles["3"]["bundle"], key)
            good = await self._rollout(url, bundles["2"]["bundle"], key)
            final = self._report()
            self.say("fleet report after the rollouts:")
            print(render_table(final), flush=True)
            summary = {"edgeml": __version__, "devices": self.devices, "group": GROUP,
                       "db": self.db_url, "messages_sent": self.sent,
                       "samples_sent": self.sent * BATCH,
                       "bundles": {v: {k: str(x) for k, x in b.items()}
                                   for v, b in bundles.items()},
                       "report_before": report, "report_after": final,
                       "rollouts": {"bad": bad, "good": good},
                       "active_at_end": {d.device.config.device_id: sorted(
                           f"{s.version}:{s.role}" for s in d.device.pipelines.members(MODEL))
                           for d in daemons}}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str),
                                               encoding="utf-8")
        return summary

    async def _stream(self, url: str) -> None:
        """Each device's watch: batches of real TEST samples with their true labels."""
        from edgeml.transport.mqtt import MqttTransport
        from edgeml.transport.settings import BrokerSettings

        X, y = _samples("TEST")
        i = 0
        async with MqttTransport(BrokerSettings(url=url, client_id="edgeml-demo-sensors",
                                                clean_start=True)) as t:
            while True:
                for k, d in enumerate(self.devices):
                    start = (i + k * 1000) % (len(X) - BATCH)
                    samples = [{**dict(zip(BASICMOTIONS_CHANNELS, map(float, X[j]),
                                           strict=True)), "label": str(y[j])}
                               for j in range(start, start + BATCH)]
                    await t.publish(f"sensors/{d}/imu", json.dumps({"samples": samples}
                                                                  ).encode(), qos=0)
                    self.sent += 1
                i += BATCH
                await asyncio.sleep(1.0 / self.s.rate_per_s)

    async def _wait_for_records(self, n: int, timeout: float = 60.0) -> None:
        from edgeml.host.collect.evidence import FleetDB

        deadline = time.monotonic() + timeout
        while True:
            with FleetDB(self.db_url) as db:
                got = db.query("SELECT COUNT(*) FROM records WHERE stream = 'results'")[0][0]
            if got >= n:
                self.say(f"fleet.db: {got} result records from the fleet")
                return
            if time.monotonic() > deadline:
                raise DemoError(f"only {got} result records reached fleet.db in {timeout:g} s")
            await asyncio.sleep(0.5)

    def _report(self) -> dict:
        from edgeml.host.commands.fleet import build_report

        return build_report(self.db_url)

    async def _rollout(self, url: str, bundle: Path, key: Path) -> dict:
        from edgeml.host.fleet import Fleet
        from edgeml.host.rollout.db import Database
        from edgeml.host.rollout.plan import Thresholds
        from edgeml.host.rollout.runner import RolloutRunner, RolloutSettings
        from edgeml.host.rollout.store import RolloutStore
        from edgeml.host.rollout.view import rollout_doc
        from edgeml.keys import load_private_key

        waves = "1,50%,100%"
        settings = RolloutSettings(
            bundle=bundle, group=GROUP, waves=waves, hold=f"{self.s.hold_rows}rows",
            thresholds=Thresholds(max_disagreement=self.s.max_disagreement,
                                  max_error_rate=0.01),
            role="canary", hold_timeout_s=60.0, poll_s=0.5, push_timeout_s=30.0,
            sign_key=load_private_key(key))
        rel = bundle.relative_to(self.out)
        self.say(f"$ edgeml rollout {rel} --group {GROUP} --db sqlite:///fleet.db --waves "
                 f"{waves} --hold {self.s.hold_rows}rows --max-disagreement "
                 f"{self.s.max_disagreement:.0%} --role canary --sign-key keys/demo.key")
        async with Fleet(url, topic_prefix=PREFIX) as fleet:
            with Database(self.db_url) as db:
                r = await RolloutRunner(settings, fleet, db,
                                        say=lambda t: self.say(f"  {t}")).run()
                return rollout_doc(RolloutStore(db), r)


def format_summary(summary: dict) -> str:
    lines = []
    for name in ("bad", "good"):
        r = summary["rollouts"][name]
        waves = [w for w in r["waves_detail"]]
        lines.append(f"rollout of {r['model']} {r['version']}: {r['state']} after "
                     f"{len(waves)} wave(s): {r['reason']}")
    lines.append("active at the end: " + "; ".join(
        f"{d} [{', '.join(v)}]" for d, v in summary["active_at_end"].items()))
    return "\n".join(lines)


def run_fleet_demo(settings: FleetDemoSettings, console: Console | None = None) -> dict:
    return asyncio.run(FleetDemo(settings, console).run())
