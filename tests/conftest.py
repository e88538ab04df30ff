"""Shared fixtures: a private mosquitto per test, and bundles trained on the real data sets."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edgeml.host.broker import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private mosquitto on a free loopback port; ``broker.restart()`` keeps the port."""
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator:
    """Make more brokers (upstream, bridges, TLS): ``broker_factory(name, **kwargs)``."""
    made: list[MosquittoBroker] = []

    def make(name: str, **kwargs) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path / name, **kwargs)
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.stop()


class Collector:
    """A paho client in its own network thread that records every message it receives."""

    def __init__(self, broker: MosquittoBroker, *topics: str, qos: int = 1,
                 client_id: str = "", clean: bool = True):
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean
        )
        self._subscribed = threading.Event()
        self.topics = topics
        self.qos = qos

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(t, qos) for t in topics])

        def on_subscribe(client, userdata, mid, rcs, props=None):
            self._subscribed.set()

        def on_message(client, userdata, msg):
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector did not get SUBACK")

    def wait_for(self, predicate, timeout: float = 30.0) -> list[paho.MQTTMessage]:
        """Block until ``predicate(messages)`` is true (a condition, not a sleep)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.messages), timeout)
            if not ok:
                raise TimeoutError(f"condition not met; {len(self.messages)} messages received")
            return list(self.messages)

    def wait_count(self, n: int, timeout: float = 30.0, topic: str | None = None):
        def enough(msgs):
            return sum(1 for m in msgs if topic is None or m.topic == topic) >= n
        return self.wait_for(enough, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def collector(broker: MosquittoBroker) -> Iterator:
    """``collector(*topics)`` subscribes (QoS 1) and records; all closed at teardown."""
    made: list[Collector] = []

    def make(*topics: str, **kwargs) -> Collector:
        c = Collector(kwargs.pop("broker", broker), *topics, **kwargs)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A private PostgreSQL cluster on a free loopback port for the whole session (run as the
    ``postgres`` user when we are root); ``postgres.create_database(name)`` gives a fresh
    database's URL, ``postgres.restart()`` restarts the server on the same port."""
    from edgeml.errors import CollectError
    from edgeml.host.collect.postgres import PostgresCluster

    pytest.importorskip("psycopg")
    try:
        pg = PostgresCluster().start()
    except CollectError as exc:
        pytest.skip(f"no private PostgreSQL: {exc}")
    try:
        yield pg
    finally:
        pg.destroy()


def publish_all(broker: MosquittoBroker, items, qos: int = 1) -> None:
    """Publish ``(topic, payload)`` pairs and wait until every QoS 1 publish is acknowledged."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=qos) for t, p in items]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()


# ---- daemons ------------------------------------------------------------------------------
class DaemonThread:
    """A real :class:`edgeml.core.device.Device` on its own event loop in a background thread
    (tests drive it from the test's thread; ``daemon`` is the Device)."""

    def __init__(self, config_path: Path, **overrides) -> None:
        import asyncio

        from edgeml.config import load_config
        from edgeml.core.device import Device

        self.config = load_config(config_path, **overrides)
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.daemon: Device | None = None
        self.loop = asyncio.new_event_loop()

        async def main() -> None:
            self.daemon = Device(self.config)
            task = asyncio.create_task(self.daemon.run())
            ready = asyncio.create_task(self.daemon.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                self._ready.set()
            await task

        def target() -> None:
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:  # surfaced to the test
                self.error = exc
            finally:
                self._ready.set()

        self.thread = threading.Thread(target=target, name="daemon", daemon=True)

    def start(self, timeout: float = 30.0) -> DaemonThread:
        self.thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("daemon did not become ready")
        if self.error:
            raise self.error
        return self

    def call(self, fn, timeout: float = 10.0):
        """Run ``fn()`` on the daemon's loop thread and return its result."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def status(self) -> dict:
        return self.call(lambda: self.daemon.status())

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive() and self.daemon is not None:
            self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("daemon did not stop")
        if self.error:
            raise self.error


@pytest.fixture
def daemon_factory():
    """``daemon_factory(config_path, **overrides)`` -> a started DaemonThread; stopped at exit."""
    made: list[DaemonThread] = []

    def make(config_path: Path, **overrides) -> DaemonThread:
        d = DaemonThread(config_path, **overrides)
        made.append(d)
        return d.start()

    try:
        yield make
    finally:
        for d in made:
            with contextlib.suppress(Exception):
                d.stop()


def write_config(path: Path, *, broker: MosquittoBroker, data_dir: Path, models: list[dict],
                 device_id: str = "watch-01", pipeline: dict | None = None,
                 extra: str = "") -> Path:
    """A daemon config for one BasicMotions-style pipeline; ``models`` are slot tables."""
    p = {
        "name": "activity", "topics": ["sensors/+/imu"], "format": "auto",
        "features": ["ax", "ay", "az", "gx", "gy", "gz"], "window": {"size": 100, "hop": 100},
        "policy": "champion", "deadline_ms": 2000,
    }
    p.update(pipeline or {})
    p = {k: v for k, v in p.items() if v is not None}
    lines = [
        f'device_id = "{device_id}"', f'data_dir = "{data_dir}"', 'profile = "x86-gateway"',
        "status_interval_s = 0.5", extra, "[broker]", f'url = "{broker.url}"', "",
        "[[pipelines]]",
    ]
    for k, v in p.items():
        lines.append(f"{k} = {_toml(v)}")
    for m in models:
        lines.append("[[pipelines.models]]")
        for k, v in m.items():
            lines.append(f"{k} = {_toml(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    import json

    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Path):
        return json.dumps(str(v))
    return json.dumps(v)


# ---- bundles trained on the real data sets ------------------------------------------------
@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def activity_bundle(bundle_dir) -> Path:
    """Logistic regression on BasicMotions windows (WindowFeatures in the graph), v1."""
    from models import build_activity_bundle

    return build_activity_bundle(bundle_dir / "lr1", kind="logreg", name="activity", version="1")


@pytest.fixture(scope="session")
def activity_bundle_v2(bundle_dir) -> Path:
    """A random forest on the same data, version 2 of the same model name."""
    from models import build_activity_bundle

    return build_activity_bundle(bundle_dir / "rf2", kind="forest", name="activity", version="2")


@pytest.fixture(scope="session")
def gait_bundle(bundle_dir) -> Path:
    """IsolationForest on single Daphnet samples (9 channels, no window), v1."""
    from models import build_gait_anomaly_bundle

    return build_gait_anomaly_bundle(bundle_dir / "gait1", version="1")


def gait_pipeline(**extra) -> dict:
    """Pipeline table for single Daphnet samples (every message gets an answer)."""
    from edgeml.host.datasets import DAPHNET_CHANNELS

    return {"name": "gait", "topics": ["sensors/+/gait"], "features": list(DAPHNET_CHANNELS),
            "window": None, **extra}


def basicmotions_window(series, topic: str, prefix: str) -> list[tuple[str, bytes]]:
    """One BasicMotions series (100 samples x 6 channels) as JSON messages on ``topic``, ids
    ``<prefix>-0`` .. ``<prefix>-99`` (the window's answer carries ``<prefix>-99``)."""
    import json

    from edgeml.host.datasets import BASICMOTIONS_CHANNELS

    out = []
    for i, s in enumerate(series):
        body = dict(zip(BASICMOTIONS_CHANNELS, map(float, s), strict=True))
        body["id"] = f"{prefix}-{i}"
        out.append((topic, json.dumps(body).encode()))
    return out


def gait_messages(n: int, topic: str = "sensors/p1/gait", start: int = 0) -> list:
    """``n`` real Daphnet samples as JSON messages, ids ``g<i>``."""
    import json

    from edgeml.host.datasets import DAPHNET_CHANNELS, load_daphnet

    X = load_daphnet().X
    out = []
    for i in range(start, start + n):
        body = dict(zip(DAPHNET_CHANNELS, map(float, X[i % len(X)]), strict=True))
        body["id"] = f"g{i}"
        out.append((topic, json.dumps(body).encode()))
    return out


# ---- NATS (JetStream + MQTT listener) -----------------------------------------------------
@pytest.fixture
def nats_server(tmp_path: Path):
    """A private nats-server with JetStream and an MQTT listener on free loopback ports."""
    from nats_servers import NatsServer, nats_server_path

    if nats_server_path() is None:
        pytest.skip("nats-server is not installed")
    s = NatsServer(tmp_path / "nats")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path):
    """Three routed nats-servers (JetStream, MQTT on each); ``nodes[i].kill()``/``.start()``."""
    from nats_servers import NatsCluster, nats_server_path

    if nats_server_path() is None:
        pytest.skip("nats-server is not installed")
    c = NatsCluster(tmp_path / "nats-cluster")
    c.start()
    try:
        yield c
    finally:
        c.stop()
