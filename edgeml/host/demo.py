"""``edgeml demo``: the whole story on one machine, with real sensor data, in under a minute.

Trains model versions on the BasicMotions smart-watch TRAIN set that ships with edgeml,
converts and signs them, starts a broker (the one given, else a private mosquitto, else an
embedded amqtt broker) and a real :class:`~edgeml.core.device.Device`, replays the TEST set as a
live watch stream (one MQTT message per sample), pushes a third version over MQTT mid-stream as a
challenger, promotes it, and ends with a summary built only from what came back over MQTT
(answers, upstream sync batches, status) plus an offline replay of the archive.

Everything it writes lives in one folder (``edgeml.toml``, ``keys/``, ``bundles/``, ``data/``,
``daemon.log``, ``summary.json``); everything it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import msgpack
import numpy as np

from edgeml import __version__
from edgeml.errors import ConfigError, DemoError, EdgemlError, TransportError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, BASICMOTIONS_WINDOW, load_basicmotions

log = logging.getLogger("edgeml.host.demo")

DEVICE = "edge-demo"
PREFIX = "edgeml"
PIPELINE = "activity"
MODEL = "activity"
WATCH_TOPIC = "sensors/watch-01/imu"
SAMPLE_HZ = 10.0  # BasicMotions was recorded at 10 Hz
DEFAULT_SPEED = 20.0
#: the third version is pushed before this window (series) of the TEST set, and promoted
#: before the second one
PUSH_AT = 14
PROMOTE_AT = 27
ESTIMATORS = {"forest": "RandomForestClassifier", "mlp": "MLPClassifier",
              "logreg": "LogisticRegression"}



@dataclass(frozen=True)
class DemoVersion:
    """One model version of the demo: what it is and how it reaches the device."""

    version: str
    kind: str  # forest | mlp | logreg
    role: str  # its role when it arrives
    pushed: bool  # delivered over MQTT mid-stream (else listed in the config)


VERSIONS: tuple[DemoVersion, ...] = (
    DemoVersion("1", "forest", "champion", False),
    DemoVersion("2", "mlp", "shadow", False),
    DemoVersion("3", "logreg", "challenger", True),
)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What ``edgeml demo`` was asked to do; validated when built."""

    out_dir: Path
    broker_url: str | None = None
    embedded: bool = False
    speed: float = DEFAULT_SPEED
    pacing: bool = True
    keep: bool = False
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not (isinstance(self.speed, (int, float)) and 0 < self.speed <= 10_000):
            raise ConfigError(f"must be a number in (0, 10000], not {self.speed!r}",
                              key="--speed")
        if self.broker_url is not None:
            from edgeml.transport.settings import parse_broker_url

            parse_broker_url(self.broker_url)
        if self.broker_url is not None and self.embedded:
            raise ConfigError("give either --broker or --embedded, not both", key="--embedded")


def default_out_dir(now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(f"edgeml-demo-{stamp}")


# ---- console ---------------------------------------------------------------------------------
class Console:
    """Plain progress lines on stderr, each with the seconds since the demo started."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, text: str) -> None:
        print(f"{self.elapsed():6.1f}s  {text}", file=self.stream, flush=True)


# ---- models -----------------------------------------------------------------------------------
def train_model(kind: str, seed: int = 0) -> Any:
    """WindowFeatures(6) -> StandardScaler -> classifier on the BasicMotions TRAIN windows, fed
    flat ``[n, 100 * 6]`` sample-major as the device assembles them (the same recipe as the
    test suite's ``train_activity_model``, so the figures can be checked independently)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from converters import WindowFeatures

    classifiers: dict[str, Callable[[], Any]] = {
        "logreg": lambda: LogisticRegression(max_iter=2000, random_state=seed),
        "forest": lambda: RandomForestClassifier(n_estimators=50, random_state=seed),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=2000,
                                     random_state=seed),
    }
    train = load_basicmotions("TRAIN")
    model = Pipeline([
        ("features", WindowFeatures(n_channels=len(BASICMOTIONS_CHANNELS))),
        ("scale", StandardScaler()),
        ("classify", classifiers[kind]()),
    ])
    return model.fit(train.flat(), np.asarray(train.y))


def _need_host_extra() -> None:
    try:
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401

        import converters  # noqa: F401
    except ImportError as exc:
        raise DemoError(f"the demo trains models and needs the host extra ({exc.name} is "
                        "missing): pip install 'edgeml[host,broker]'") from exc


def build_bundles(out: Path, key_path: Path, say: Console) -> dict[str, dict]:
    """Train, convert (parity-checked on the whole TEST set) and sign every demo version."""
    from converters import convert_estimator
    from edgeml.keys import load_private_key

    sign_key = load_private_key(key_path)
    train, test = load_basicmotions("TRAIN"), load_basicmotions("TEST")
    truth = np.asarray(test.y)
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    made: dict[str, dict] = {}
    for v in VERSIONS:
        model = train_model(v.kind)
        predicted = model.predict(test.flat())
        accuracy = float(np.mean(predicted == truth))
        report = convert_estimator(
            model, test.flat(), name=MODEL, version=v.version, features=BASICMOTIONS_CHANNELS,
            window=BASICMOTIONS_WINDOW, training_data=train.flat(), labels=truth,
            metrics={"test_accuracy": accuracy}, sign_key=sign_key,
            out=out / "bundles" / f"{MODEL}-{v.version}.edgeml",
            description=f"BasicMotions activity ({ESTIMATORS[v.kind]}), edgeml demo",
        )
        made[v.version] = {
            "bundle": report.path, "estimator": ESTIMATORS[v.kind], "kind": v.kind,
            "sklearn_accuracy": accuracy, "sklearn_labels": [str(x) for x in predicted],
            "sha256": report.manifest.sha256, "bytes": report.path.stat().st_size,
        }
        say(f"trained {MODEL} {v.version}: {ESTIMATORS[v.kind]} on {len(train.y)} TRAIN "
            f"windows, scikit-learn TEST accuracy {accuracy:.1%}; bundle "
            f"{report.path.relative_to(out)} (signed, {report.path.stat().st_size // 1024} kB, "
            f"parity: {report.parity.rows} rows, max |score diff| "
            f"{report.parity.max_abs_score_diff:.1e})")
    return made


# ---- the broker -------------------------------------------------------------------------------
@dataclass
class BrokerHandle:
    kind: str  # external | mosquitto | embedded
    url: str
    stop: Callable[[], None] = lambda: None
    pid: int | None = None


def start_broker(settings: DemoSettings, workdir: Path, say: Console) -> BrokerHandle:
    """``--broker``, else a private mosquitto on a free loopback port, else amqtt in-process."""
    if settings.broker_url:
        say(f"broker: using {settings.broker_url}")
        return BrokerHandle("external", settings.broker_url)
    from edgeml.host.broker import MosquittoBroker, mosquitto_path
    from edgeml.host.embedded_broker import INSTALL_HINT, EmbeddedBroker, embedded_available

    exe = None if settings.embedded else mosquitto_path()
    if exe:
        try:
            b = MosquittoBroker(workdir / "broker", executable=exe).start()
        except TransportError as exc:
            say(f"broker: mosquitto ({exe}) did not start ({exc}); trying the embedded one")
        else:
            say(f"broker: private mosquitto ({exe}) on {b.url}, files in broker/")
            pid = b.process.pid if b.process else None
            return BrokerHandle("mosquitto", b.url, b.stop, pid)
    if not embedded_available():
        raise DemoError("no MQTT broker: mosquitto is not installed and neither is the "
                        f"embedded one ({INSTALL_HINT}); or pass --broker URL")
    eb = EmbeddedBroker().start()
    why = "--embedded" if settings.embedded else "mosquitto not found"
    say(f"broker: embedded amqtt broker in this process on {eb.url} ({why})")
    return BrokerHandle("embedded", eb.url, eb.stop, os.getpid())


# ---- the daemon -------------------------------------------------------------------------------
def write_config(path: Path, broker_url: str, client_id: str, *,
                 protocol: str | None = None) -> Path:
    """The device config the demo runs (paths relative to it, so the folder can move).

    ``protocol`` pins the MQTT version where the broker is known to speak only one (the
    embedded amqtt broker: 3.1.1), so the device does not first try MQTT 5 and wait."""
    models = []
    for v in VERSIONS:
        if v.pushed:
            continue
        models.append(f"""
[[pipelines.models]]
name = "{MODEL}"
version = "{v.version}"
role = "{v.role}"
bundle = "bundles/{MODEL}-{v.version}.edgeml"
""")
    protocol_line = f'\nprotocol = "{protocol}"' if protocol else ""
    text = f"""# Written by `edgeml demo` (edgeml {__version__}). Run it again with:
#   edgeml run --config {path.name}
# (the demo's broker must be running: see summary.json for its URL)
device_id = "{DEVICE}"
profile = "x86-gateway"
data_dir = "data"
topic_prefix = "{PREFIX}"
trusted_keys = ["keys/demo.pub"]
status_interval_s = 0.5

[broker]
url = "{broker_url}"
client_id = "{client_id}"{protocol_line}

[sync]
batch_max_wait_s = 0.2

[[pipelines]]
name = "{PIPELINE}"
topics = ["sensors/+/imu"]
format = "auto"
features = {json.dumps(list(BASICMOTIONS_CHANNELS))}
window = {{ size = {BASICMOTIONS_WINDOW}, hop = {BASICMOTIONS_WINDOW} }}
policy = "champion"
deadline_ms = 1000
{''.join(models)}"""
    path.write_text(text, encoding="utf-8")
    return path


class DemoDevice:
    """A real :class:`~edgeml.core.device.Device` as a task on the demo's own event loop."""

    def __init__(self, config_path: Path) -> None:
        from edgeml.config import load_config
        from edgeml.core.device import Device

        self.device = Device(load_config(config_path))
        self.task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, timeout: float = 60.0) -> None:
        self.task = asyncio.create_task(self.device.run(), name="edgeml-device")
        ready = asyncio.create_task(self.device.ready.wait())
        done, _ = await asyncio.wait([self.task, ready], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.task in done:
            exc = self.task.exception()
            raise DemoError(f"the daemon did not start: {exc}") from exc
        if not done:
            raise DemoError(f"the daemon did not become ready within {timeout:g} s")

    async def stop(self, timeout: float = 30.0) -> None:
        if self.task is None:
            return
        self.device.request_stop()
        done, _ = await asyncio.wait([self.task], timeout=timeout)
        if not done:
            log.warning("the daemon did not stop within %g s", timeout)


@contextlib.contextmanager
def daemon_log(path: Path):
    """The daemon's INFO log goes to a file in the demo folder; stderr keeps the live view and
    warnings only."""
    logger = logging.getLogger("edgeml")
    saved = (logger.level, logger.propagate)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.addFilter(_not_paho_close_noise)
    err.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(fh)
    logger.addHandler(err)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(fh)
        logger.removeHandler(err)
        fh.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _not_paho_close_noise(record: logging.LogRecord) -> bool:
    """paho 2.2 logs an ERROR "Client is not connected" on every clean disconnect; it is
    kept in daemon.log but not shown in the live view."""
    return not (record.name.startswith("edgeml.transport.mqtt.paho")
                and "Client is not connected" in record.getMessage())


# ---- what comes back over MQTT ------------------------------------------------------------------
@dataclass
class Observed:
    """Everything the observer client saw, and conditions to wait on."""

    answers: list[dict] = field(default_factory=list)
    results: dict[tuple[str, int], dict] = field(default_factory=dict)  # (version, seq)
    sync_messages: Counter = field(default_factory=Counter)
    sync_records: Counter = field(default_factory=Counter)
    status: dict | None = None
    status_seen: int = 0
    deploy: list[dict] = field(default_factory=list)
    replies: dict[str, dict] = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)
    dlq: list[dict] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout)
            except TimeoutError as exc:
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}") from exc


def window_index(record_id: Any) -> int | None:
    """``s12-99`` (the id of the sample that completed the window) -> 12."""
    if isinstance(record_id, str) and record_id.startswith("s") and "-" in record_id:
        with contextlib.suppress(ValueError):
            return int(record_id[1:].split("-", 1)[0])
    return None


class Observer:
    """A plain MQTT client that watches the device like an operator would."""

    def __init__(self, client: Any, obs: Observed, truth: list[str], say: Console,
                 t_start: float) -> None:
        self.client = client
        self.obs = obs
        self.truth = truth
        self.say = say
        self.t_start = t_start
        self.correct = 0

    @staticmethod
    def topics() -> list[tuple[str, int]]:
        base = f"{PREFIX}/{DEVICE}"
        return [(f"{base}/out/{PIPELINE}", 1), (f"{base}/sync/#", 1), (f"{base}/status", 1),
                (f"{base}/deploy/status", 1), (f"{base}/cmd/reply", 1), (f"{base}/alerts", 1),
                (f"{base}/dlq", 1)]

    async def run(self) -> None:
        async for batch in self.client.batches(256):
            for m in batch:
                try:
                    self.handle(m.topic, m.payload)
                except Exception:  # a strange message must not stop the live view
                    log.exception("observer: cannot handle a message on %s", m.topic)
            async with self.obs.changed:
                self.obs.changed.notify_all()

    def handle(self, topic: str, payload: bytes) -> None:
        obs = self.obs
        leaf = topic.split("/", 2)[2]
        if leaf == f"out/{PIPELINE}":
            rec = msgpack.unpackb(payload, raw=False)
            obs.answers.append(rec)
            self.live_line(rec)
        elif leaf.startswith("sync/"):
            doc = msgpack.unpackb(payload, raw=False)
            stream = doc.get("stream", leaf[5:])
            obs.sync_messages[stream] += 1
            obs.sync_records[stream] += len(doc.get("records", ()))
            if stream == "results":
                for r in doc["records"]:
                    obs.results[(str(r["version"]), int(r["input_seq"]))] = r
        elif leaf == "status":
            doc = json.loads(payload)
            if doc.get("ts", 0) >= self.t_start:  # not a retained one from an earlier run
                obs.status = doc
                obs.status_seen += 1
        elif leaf == "deploy/status":
            doc = json.loads(payload)
            obs.deploy.append(doc)
            extra = ""
            if doc.get("stage") == "verified" and doc.get("signer"):
                extra = f" (signed by key {doc['signer']})"
            elif doc.get("stage") == "loaded" and doc.get("load_ms") is not None:
                extra = f" (loaded and self-tested in {doc['load_ms']:.0f} ms)"
            elif doc.get("stage") == "active":
                extra = " as " + str(doc.get("role"))
            elif doc.get("reason"):
                extra = f": {doc['reason']}"
            self.say(f"  deploy {doc.get('name')} {doc.get('version')}: "
                     f"{doc.get('stage')}{extra}")
        elif leaf == "cmd/reply":
            doc = json.loads(payload)
            obs.replies[str(doc.get("id"))] = doc
            self.say(f"  {doc.get('cmd')} -> {'ok' if doc.get('ok') else 'FAILED'}: "
                     f"{doc.get('message')}")
        elif leaf == "alerts":
            doc = json.loads(payload)
            obs.alerts.append(doc)
            self.say(f"  alert {doc.get('kind')}: {doc}")
        elif leaf == "dlq":
            obs.dlq.append(json.loads(payload))

    def live_line(self, rec: dict) -> None:
        idx = window_index(rec.get("id"))
        label = (rec.get("output") or {}).get("label")
        truth = self.truth[idx] if idx is not None and idx < len(self.truth) else None
        ok = truth is not None and label == truth
        self.correct += ok
        n = len(self.obs.answers)
        who = f"{rec.get('model')}:{rec.get('version')}" + (" (fallback)"
                                                             if rec.get("fallback") else "")
        self.say(f"window {n:2d}/{len(self.truth)}  true {truth or '?':<9} answer "
                 f"{label or '-':<9} {'ok ' if ok else 'MISS'} by {who:<14} "
                 f"running accuracy {self.correct}/{n} = {self.correct / n:.1%}")


# ---- the demo ---------------------------------------------------------------------------------
def sample_messages(test: Any) -> list[list[tuple[str, bytes]]]:
    """The TEST set as the watch sends it: per window, 100 JSON messages of one sample each,
    with an id (``s<window>-<i>``) and the true activity as ``label``."""
    out = []
    for s in range(len(test.y)):
        msgs = []
        for i, row in enumerate(test.X[s]):
            # str() of a float32 is its shortest exact spelling: the device parses back the
            # very float32 values scikit-learn saw, in compact JSON
            body: dict[str, Any] = dict(zip(BASICMOTIONS_CHANNELS,
                                            (float(str(v)) for v in row), strict=True))
            body["id"] = f"s{s}-{i}"
            body["label"] = test.y[s]
            msgs.append((WATCH_TOPIC, json.dumps(body, separators=(",", ":")).encode()))
        out.append(msgs)
    return out


async def _forget_sessions(url: str, client_ids: list[str]) -> None:
    """Connect once with a clean session per id: the broker drops any persistent session (and
    queued messages) a previous run left under it."""
    from edgeml.transport.mqtt import MqttTransport
    from edgeml.transport.settings import BrokerSettings

    for cid in client_ids:
        with contextlib.suppress(EdgemlError, OSError):
            async with MqttTransport(BrokerSettings(url=url, client_id=cid, clean_start=True)):
                pass


class Demo:
    """One run. ``on_summary`` gets the summary as soon as it exists (before ``--keep``
    waits)."""

    def __init__(self, settings: DemoSettings, console: Console | None = None,
                 on_summary: Callable[[dict], None] | None = None) -> None:
        self.settings = settings
        self.say = console or Console()
        self.on_summary = on_summary
        self.out = settings.out_dir.resolve()
        self.events: list[dict] = []
        self.summary: dict = {}
        self.n_messages = 0

    def event(self, what: str, **extra: Any) -> None:
        self.events.append({"t": round(self.say.elapsed(), 2), "what": what, **extra})

    async def run(self) -> dict:
        s = self.settings
        _need_host_extra()
        # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: every process started is stopped
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        if self.out.exists() and any(self.out.iterdir()):
            raise DemoError(f"--out {self.out}: the folder is not empty; give a new one")
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"edgeml demo: everything goes into {self.out}")
        t_wall = time.time()
        from edgeml.keys import generate_keypair, key_id, load_public_key

        (self.out / "keys").mkdir()
        key, pub = generate_keypair(self.out / "keys" / "demo")
        kid = key_id(load_public_key(pub))
        self.say(f"signing key: keys/demo.key (key id {kid}); devices trust keys/demo.pub")
        bundles = await asyncio.to_thread(build_bundles, self.out, key, self.say)

        broker = start_broker(s, self.out, self.say)
        stack = contextlib.AsyncExitStack()
        try:
            async with stack:
                stack.callback(broker.stop)
                summary = await self._with_broker(stack, broker, bundles, kid, t_wall)
                if s.keep:
                    await self._keep(broker)
                return summary
        finally:
            if broker.kind != "external":
                self.say(f"stopped the {broker.kind} broker")

    async def _with_broker(self, stack: contextlib.AsyncExitStack, broker: BrokerHandle,
                           bundles: dict[str, dict], kid: str, t_wall: float) -> dict:
        from edgeml.transport.mqtt import MqttTransport
        from edgeml.transport.settings import BrokerSettings

        s = self.settings
        run_id = f"{os.getpid()}-{int(t_wall)}"
        client_id = f"edgeml-{DEVICE}"
        stack.enter_context(daemon_log(self.out / "daemon.log"))
        await _forget_sessions(broker.url, [client_id, f"{client_id}-out",
                                            f"{client_id}-uplink"])
        config_path = write_config(self.out / "edgeml.toml", broker.url, client_id,
                                   protocol="3.1.1" if broker.kind == "embedded" else None)
        test = load_basicmotions("TEST")
        truth = [str(y) for y in test.y]

        obs = Observed()
        observer_client = await stack.enter_async_context(MqttTransport(BrokerSettings(
            url=broker.url, client_id=f"edgeml-demo-observer-{run_id}", clean_start=True)))
        await observer_client.subscribe(Observer.topics())
        observer = Observer(observer_client, obs, truth, self.say, t_wall)
        observer_task = asyncio.create_task(observer.run(), name="demo-observer")
        stack.push_async_callback(_cancel, observer_task)
        watch = await stack.enter_async_context(MqttTransport(BrokerSettings(
            url=broker.url, client_id=f"edgeml-demo-watch-{run_id}", clean_start=True)))
        from edgeml.host.fleet import Fleet

        host = await stack.enter_async_context(Fleet(
            broker.url, topic_prefix=PREFIX, client_id=f"edgeml-demo-host-{run_id}"))

        daemon = DemoDevice(config_path)
        stack.push_async_callback(self._stop_daemon, daemon)
        await daemon.start()
        self.say(f"daemon: device {DEVICE} running {MODEL} 1 (champion) and {MODEL} 2 "
                 f"(shadow); config edgeml.toml, log daemon.log")
        self.event("daemon ready")
        await obs.wait(lambda: obs.status is not None and obs.status.get("state") == "online",
                       30, "the daemon's online status")

        t_stream = time.monotonic()
        windows = sample_messages(test)
        self.n_messages = sum(len(w) for w in windows)
        await self._stream(watch, host, obs, windows, bundles)
        stream_s = time.monotonic() - t_stream
        await self._settle(obs, len(truth))
        final_status = obs.status or {}
        if not s.keep:
            await self._stop_daemon(daemon)
        replay = await asyncio.to_thread(self._replay, config_path, bundles)
        self.summary = self._summarise(obs, final_status, bundles, truth, broker, kid,
                                       config_path, stream_s, replay, t_wall)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1,
                                                          default=str) + "\n")
        if self.on_summary is not None:
            self.on_summary(self.summary)
        return self.summary

    async def _stop_daemon(self, daemon: DemoDevice) -> None:
        if daemon.running:
            await daemon.stop()
            self.say("stopped the daemon (drained, archive and outbox closed)")

    async def _stream(self, watch: Any, host: Any, obs: Observed,
                      windows: list[list[tuple[str, bytes]]], bundles: dict[str, dict]) -> None:
        """One message per sample at 10 Hz x speed; the push and the promotion happen
        mid-stream. Without pacing, each step waits until the device has caught up, so the
        switch points are exact."""
        s = self.settings
        interval = 1.0 / (SAMPLE_HZ * s.speed)
        pace = "no pacing" if not s.pacing else f"{SAMPLE_HZ * s.speed:g} msg/s ({s.speed:g}x)"
        n_msgs = sum(len(w) for w in windows)
        self.say(f"streaming the BasicMotions TEST set: {n_msgs} samples in {len(windows)} "
                 f"windows on {WATCH_TOPIC}, {pace}")
        pushed = next(v for v in VERSIONS if v.pushed)
        actions: list[asyncio.Task] = []
        t0 = time.monotonic()
        sent = 0
        for w, msgs in enumerate(windows):
            if w in (PUSH_AT, PROMOTE_AT):
                if not s.pacing:
                    await obs.wait(lambda w=w: len(obs.answers) >= w, s.timeout_s,
                                   f"answers to the first {w} windows")
                if w == PUSH_AT:
                    coro = self._push(host, obs, bundles[pushed.version]["bundle"], pushed)
                else:
                    if actions:
                        await actions[-1]  # promote what has arrived
                    coro = self._promote(host, obs, pushed)
                task = asyncio.create_task(coro)
                actions.append(task)
                if not s.pacing:
                    await task
            for topic, payload in msgs:
                watch.publish_nowait(topic, payload, qos=1)
                sent += 1
                if s.pacing:
                    delay = t0 + sent * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                elif sent % 200 == 0:
                    await asyncio.sleep(0)  # let the observer print
        for t in actions:
            await t
        self.say(f"stream sent: {sent} messages in {time.monotonic() - t0:.1f} s")

    async def _push(self, host: Any, obs: Observed, bundle: Path, v: DemoVersion) -> None:
        """``edgeml push`` from the host: the device reports each stage on deploy/status
        (the observer prints them)."""
        self.say(f"pushing {MODEL} {v.version} ({ESTIMATORS[v.kind]}) over MQTT to "
                 f"{PREFIX}/{DEVICE}/deploy as {v.role}")
        self.event("push", version=v.version, role=v.role)
        result = await host.push(bundle, device=DEVICE, pipeline=PIPELINE, role=v.role,
                                 timeout=self.settings.timeout_s)
        final = result.final.get(DEVICE) or {}
        if final.get("stage") != "active":
            raise DemoError(f"the device did not activate {MODEL} {v.version}: "
                            f"{final.get('stage')} {final.get('reason')}")
        self.event("active", version=v.version, role=v.role)

    async def _promote(self, host: Any, obs: Observed, v: DemoVersion) -> None:
        self.say(f"promoting {MODEL} {v.version} to champion ({PREFIX}/{DEVICE}/cmd, signed "
                 "with keys/demo.key)")
        self.event("promote", version=v.version)
        from edgeml.keys import load_private_key

        # the device trusts keys/demo.pub, so commands are signed like bundles
        sign_key = load_private_key(self.out / "keys" / "demo.key")
        reply = await host.command(DEVICE, "promote", pipeline=PIPELINE, model=MODEL,
                                   version=v.version, timeout=self.settings.timeout_s,
                                   sign_key=sign_key)
        if not reply.get("ok"):
            raise DemoError(f"promote failed: {reply.get('message')}")
        self.event("promoted", version=v.version, message=reply.get("message"))

    async def _settle(self, obs: Observed, n_windows: int) -> None:
        """Wait until every window is answered and the outbox has synced every record."""
        timeout = self.settings.timeout_s
        await obs.wait(lambda: len(obs.answers) >= n_windows, timeout,
                       f"answers to all {n_windows} windows")
        seen = obs.status_seen

        def synced() -> bool:
            st = obs.status or {}
            if obs.status_seen <= seen + 1:  # a heartbeat taken after the last answer
                return False
            pipe = (st.get("pipelines") or {}).get(PIPELINE) or {}
            scored = sum(v.get("rows", 0) for v in pipe.get("versions", ()))
            backlog = (st.get("outbox") or {}).get("backlog", 1)
            return (backlog == 0 and pipe.get("queue_depth", 1) == 0
                    and len(obs.results) >= scored
                    and obs.sync_records["outputs"] >= n_windows)

        await obs.wait(synced, timeout, "the outbox to sync every record upstream")

    def _replay(self, config_path: Path, bundles: dict[str, dict]) -> dict:
        try:
            return replay_archive(self.out, config_path,
                                  [b["bundle"] for b in bundles.values()], self.say)
        except EdgemlError as exc:
            self.say(f"replay failed: {exc}")
            return {"available": False, "reason": str(exc), "versions": {}}

    async def _keep(self, broker: BrokerHandle) -> None:
        self.say(f"--keep: the daemon keeps running. Config: {self.out / 'edgeml.toml'}")
        host, port = broker.url.rsplit("//", 1)[1].rsplit(":", 1)
        self.say(f"  watch it:  mosquitto_sub -h {host} -p {port} -t '{PREFIX}/{DEVICE}/#' -v")
        self.say(f"  feed it:   mosquitto_pub -h {host} -p {port} -t {WATCH_TOPIC} -m "
                 "'{\"ax\":0.1,\"ay\":-0.9,\"az\":0.2,\"gx\":0,\"gy\":0.1,\"gz\":0.3}'")
        self.say("  Ctrl-C stops the daemon and the broker")
        await asyncio.Event().wait()

    # ---- the summary ----------------------------------------------------------------------
    def _summarise(self, obs: Observed, status: dict, bundles: dict[str, dict],
                   truth: list[str], broker: BrokerHandle, kid: str, config_path: Path,
                   stream_s: float, replay: dict, t_wall: float) -> dict:
        s = self.settings
        pipe = (status.get("pipelines") or {}).get(PIPELINE) or {}
        roles_now = {str(v["version"]): v["role"] for v in pipe.get("versions", ())}
        by_version: Counter = Counter()
        correct = 0
        for rec in obs.answers:
            by_version[f"{rec['model']}:{rec['version']}"] += 1
            idx = window_index(rec.get("id"))
            correct += idx is not None and (rec.get("output") or {}).get("label") == truth[idx]
        versions = {}
        for v in VERSIONS:
            mine = {seq: r for (ver, seq), r in obs.results.items() if ver == v.version}
            preds = {}
            errors = late = 0
            for r in mine.values():
                idx = window_index(r.get("id"))
                if r.get("error") or idx is None:
                    errors += 1
                    continue
                late += bool(r.get("late"))
                preds[idx] = (r.get("output") or {}).get("label")
            hits = sum(1 for i, lab in preds.items() if lab == truth[i])
            b = bundles[v.version]
            versions[f"{MODEL}:{v.version}"] = {
                "version": v.version, "estimator": b["estimator"],
                "bundle": str(Path(b["bundle"]).relative_to(self.out)), "sha256": b["sha256"],
                "signed_by": kid, "delivered": "pushed over MQTT" if v.pushed else "config",
                "role_at_start": v.role, "role_at_end": roles_now.get(v.version),
                "sklearn_accuracy": b["sklearn_accuracy"],
                "answers": by_version.get(f"{MODEL}:{v.version}", 0),
                "live": {"windows": len(preds), "correct": hits,
                         "accuracy": hits / len(preds) if preds else None,
                         "late": late, "errors": errors,
                         "predictions": {str(i): preds[i] for i in sorted(preds)}},
                "replay": (replay.get("versions") or {}).get(f"{MODEL}:{v.version}"),
            }
        rawlog = _rawlog_stats(self.out / "data" / "rawlog" / PIPELINE)
        return {
            "edgeml": __version__, "started": datetime.fromtimestamp(
                t_wall, timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(self.say.elapsed(), 2), "out_dir": str(self.out),
            "config": str(config_path),
            "broker": {"kind": broker.kind, "url": broker.url, "pid": broker.pid},
            "device": DEVICE, "pipeline": PIPELINE,
            "stream": {"topic": WATCH_TOPIC, "messages": self.n_messages,
                       "windows": len(truth), "pacing": s.pacing, "speed": s.speed,
                       "seconds": round(stream_s, 2)},
            "answers": {"total": len(obs.answers), "by_version": dict(by_version),
                        "fallbacks": sum(1 for r in obs.answers if r.get("fallback")),
                        "correct": correct,
                        "accuracy": correct / len(obs.answers) if obs.answers else None},
            "versions": versions,
            "events": self.events,
            "archive": rawlog,
            "sync": {"upstream_messages": dict(obs.sync_messages),
                     "upstream_records": dict(obs.sync_records),
                     "outbox": status.get("outbox"),
                     "uplink": _dict_or_none(status.get("uplink"))},
            "daemon": {"received": pipe.get("received"), "accepted": pipe.get("accepted"),
                       "rejected": pipe.get("rejected"), "scored": pipe.get("scored"),
                       "fallbacks": pipe.get("fallbacks"), "dropped": pipe.get("dropped"),
                       "answer_latency": pipe.get("answer_latency"),
                       "dead_letters": len(obs.dlq), "alerts": len(obs.alerts)},
            "replay": replay,
        }


def _dict_or_none(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None


def _rawlog_stats(directory: Path) -> dict | None:
    from edgeml.storage.rawlog import open_reader

    try:
        return open_reader(directory).stats
    except EdgemlError as exc:
        return {"error": str(exc)}


def replay_archive(out: Path, config_path: Path, bundles: list[Path], say: Console) -> dict:
    """Every bundle over the whole archive, offline, with the daemon's own decoding and
    windowing (:mod:`edgeml.host.replay`); writes replay.json and, with matplotlib, replay.png."""
    from edgeml.config import load_config
    from edgeml.core.assemble import Assembler
    from edgeml.core.decode import Decoder
    from edgeml.host.replay import (
        ChartUnavailableError,
        open_slots,
        render_chart,
        replay,
        write_json,
    )
    from edgeml.profiles import load_profile
    from edgeml.storage.rawlog import open_reader, pipeline_dir

    config = load_config(config_path)
    pcfg = config.pipeline(PIPELINE)
    with open_slots(bundles, profile=load_profile(config.profile)) as slots:
        assembler = Assembler(Decoder.from_pipeline(pcfg), pcfg.window)
        reader = open_reader(pipeline_dir(config.data_dir, PIPELINE))
        report = replay(reader.read(), assembler, slots)
    write_json(report, out / "replay.json")
    chart = None
    with contextlib.suppress(ChartUnavailableError):  # matplotlib is optional
        chart = render_chart(report, out / "replay.png")
    versions = {}
    for v in report.versions:
        versions[v.key] = {
            "rows": v.rows, "labelled_rows": v.labelled_rows, "accuracy": v.accuracy,
            "macro_f1": v.macro_f1, "errors": v.errors, "distribution": v.distribution,
            "latency_row_p50_ms": v.latency_row_ms.p50,
        }
    keys = [v.key for v in report.versions]
    agreement = {f"{keys[i]} vs {keys[j]}": report.agreement[i][j]
                 for i in range(len(keys)) for j in range(i + 1, len(keys))}
    say(f"replayed the archive offline: {report.records} records -> {report.rows} windows "
        f"through {len(keys)} bundles in {report.elapsed_s:.2f} s (replay.json"
        + (", replay.png)" if chart else ")"))
    return {"available": True, "records": report.records, "rows": report.rows,
            "labelled_rows": report.labelled_rows, "labels_source": report.labels_source,
            "elapsed_s": round(report.elapsed_s, 3), "versions": versions,
            "agreement": agreement, "json": "replay.json",
            "chart": "replay.png" if chart else None}


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# ---- printing -----------------------------------------------------------------------------------
def format_summary(summary: dict) -> str:
    """The end-of-demo report for people (summary.json has the same and more)."""
    pct = _pct
    a = summary["answers"]
    lines = [
        "",
        f"edgeml demo: done in {summary['wall_s']:.1f} s "
        f"(broker: {summary['broker']['kind']} {summary['broker']['url']})",
        "",
        f"stream    {summary['stream']['messages']} samples = {summary['stream']['windows']} "
        f"windows on {summary['stream']['topic']} in {summary['stream']['seconds']:.1f} s",
        f"answers   {a['total']} on {PREFIX}/{summary['device']}/out/{summary['pipeline']}: "
        + ", ".join(f"{k} x{n}" for k, n in sorted(a["by_version"].items()))
        + f"; {a['fallbacks']} fallback(s); accuracy {a['correct']}/{a['total']} "
        f"= {pct(a['accuracy'])}",
        "",
        f"{'version':<11} {'model':<23} {'role now':<11} {'live: windows':>13} "
        f"{'accuracy':>9} {'replay (all)':>13} {'scikit-learn':>13}",
    ]
    for name, v in summary["versions"].items():
        live, rep = v["live"], v.get("replay") or {}
        lines.append(
            f"{name:<11} {v['estimator']:<23} {v['role_at_end'] or '-':<11} "
            f"{live['windows']:>13} {pct(live['accuracy']):>9} "
            f"{pct(rep.get('accuracy')):>13} {pct(v['sklearn_accuracy']):>13}")
    arc = summary.get("archive") or {}
    sync = summary["sync"]
    outbox = sync.get("outbox") or {}
    lines += [
        "",
        f"archive   {arc.get('records', '?')} raw input records in {arc.get('segments', '?')} "
        f"segment(s), {arc.get('bytes_on_disk', 0) / 1024:.0f} kB "
        f"(data/rawlog/{summary['pipeline']}; read it with: edgeml log cat --data-dir "
        f"{summary['out_dir']}/data --pipeline {summary['pipeline']})",
        "synced    upstream received "
        + ", ".join(f"{n} {k}" for k, n in sorted(sync["upstream_records"].items()))
        + f" in {sum(sync['upstream_messages'].values())} batch message(s); outbox backlog "
        f"{outbox.get('backlog', '?')}, dropped {outbox.get('dropped', '?')}",
    ]
    uplink = sync.get("uplink")
    if uplink:
        lines.append(f"          uplink: {uplink.get('records_sent')} records, "
                     f"{uplink.get('bytes_sent', 0) / 1024:.0f} kB in "
                     f"{uplink.get('batches_sent')} QoS 1 batches, {uplink.get('errors')} "
                     "error(s)")
    rep = summary.get("replay") or {}
    if rep.get("available"):
        lines.append(f"replay    {rep.get('rows', '?')} windows from the archive through "
                     f"{len(rep.get('versions', {}))} bundles: "
                     + "; ".join(f"{k} {pct(v.get('accuracy'))}"
                                 for k, v in rep["versions"].items()))
        if rep.get("agreement"):
            lines.append("          agreement " + ", ".join(
                f"{k} {pct(x)}" for k, x in rep["agreement"].items()))
    else:
        lines.append(f"replay    not run ({rep.get('reason', 'edgeml.host.replay not available')})")
    lines += ["", f"folder    {summary['out_dir']} (edgeml.toml, keys/, bundles/, data/, "
              "daemon.log, replay.json, summary.json)"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def run_demo(settings: DemoSettings, console: Console | None = None,
             on_summary: Callable[[dict], None] | None = None) -> dict:
    """Run the demo to the end (or, with ``keep``, until Ctrl-C); returns the summary."""
    demo = Demo(settings, console, on_summary)
    try:
        return asyncio.run(demo.run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        if demo.summary:
            return demo.summary
        raise KeyboardInterrupt from None
