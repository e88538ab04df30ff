"""Shared fixtures: a private mosquitto per test, and bundles trained on the real data sets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edgeml.broker import MosquittoBroker

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


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
