"""The NATS JetStream source against real nats-server processes (single and a 3-node cluster):
devices publish QoS 1 through NATS's MQTT listener, the source delivers every batch with its
MQTT topic, acknowledges only when asked, and redelivers what was not acknowledged."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as paho
import pytest

pytest.importorskip("nats")

from edgeml.errors import ConfigError
from edgeml.host.collect.nats_source import (
    NatsSource,
    parse_nats_url,
    subject_to_topic,
    topic_to_subject,
)


def mqtt_publish(host: str, port: int, items: list[tuple[str, bytes]],
                 client_id: str = "dev") -> None:
    """Publish at QoS 1 as a device does (MQTT 3.1.1) and wait for every PUBACK."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=False, protocol=paho.MQTTv311)
    c.connect(host, port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1) for t, p in items]
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()
    finally:
        c.disconnect()  # loop_stop alone waits for unacknowledged QoS 1
        c.loop_stop()
        c.disconnect()


async def take(src: NatsSource, n: int, *, ack: bool = True, timeout: float = 20.0) -> list:
    out = []

    async def run() -> None:
        async for d in src.deliveries():
            out.append(d)
            if ack:
                await d.ack()
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


def test_subjects_map_back_to_mqtt_topics() -> None:
    for topic in ("edgeml/watch-01/sync/outputs", "edgeml/watch.01/sync/results",
                  "site/a/edgeml/d.e.f/sync/alerts"):
        assert subject_to_topic(topic_to_subject(topic)) == topic
    assert topic_to_subject("edgeml/watch.01/sync/results") == "edgeml.watch//01.sync.results"


def test_bad_urls_name_the_option() -> None:
    with pytest.raises(ConfigError) as e:
        parse_nats_url("nats://127.0.0.1:4222?form=mqtt")
    assert e.value.key == "--source" and "form" in str(e.value)
    with pytest.raises(ConfigError) as e:
        NatsSource("nats://127.0.0.1:4222?from=disk")
    assert "mqtt or stream" in str(e.value)
    servers, opts = parse_nats_url("nats://u:p@127.0.0.1:1,127.0.0.1:2?from=stream")
    assert servers == ["nats://u:p@127.0.0.1:1", "nats://u:p@127.0.0.1:2"]
    assert opts == {"from": "stream"}


def test_mqtt_layer_stream_delivers_every_acknowledged_publish(nats_server) -> None:
    """from=mqtt: the source creates the MQTT layer's stream before any device connected; its
    durable consumer gets what devices published, topics in MQTT form; what is acknowledged
    is not delivered again, and what is not is redelivered."""
    s = nats_server  # no MQTT client yet: the source makes $MQTT_msgs, the MQTT layer uses it

    async def main() -> None:
        src = NatsSource(s.url, ack_wait_s=1.0)
        async with src:
            # (nats-server 2.9 refuses a '.' inside a topic level; 2.10 maps it to '//')
            items = [(f"edgeml/d{i % 3}-x/sync/outputs", f"m{i}".encode()) for i in range(30)]
            items.append(("edgeml/d1/cmd/ping", b"not a sync topic"))
            await asyncio.to_thread(mqtt_publish, s.host, s.mqtt_port, items)
            got = await take(src, 30)
            assert sorted(d.payload for d in got) == sorted(p for _, p in items[:30])
            assert {d.topic for d in got} == {f"edgeml/d{i}-x/sync/outputs" for i in range(3)}
            assert src.stats()["received"] == 30
            # not acknowledged: comes again after ack_wait
            await asyncio.to_thread(mqtt_publish, s.host, s.mqtt_port,
                                    [("edgeml/d9/sync/alerts", b"once more")])
            first = await take(src, 1, ack=False)
            again = await take(src, 1, timeout=10)
            assert first[0].payload == again[0].payload == b"once more"
        # a new source on the same durable: nothing left over
        async with NatsSource(s.url) as src2:
            with pytest.raises(TimeoutError):
                await take(src2, 1, timeout=1.5)

    asyncio.run(main())


def test_own_stream_is_created_and_shared_by_two_collectors(nats_server) -> None:
    s = nats_server

    async def main() -> None:
        a = NatsSource(f"{s.url}?from=stream", group="g1", max_batch=5)
        b = NatsSource(f"{s.url}?from=stream", group="g1", max_batch=5)
        async with a, b:
            info = await a._nc.jetstream().stream_info("EDGEML_SYNC")
            assert info.config.subjects == ["edgeml.*.sync.>"]
            assert info.config.num_replicas == 1
            items = [("edgeml/d1/sync/results", f"r{i}".encode()) for i in range(200)]
            await asyncio.to_thread(mqtt_publish, s.host, s.mqtt_port, items)
            got_a: list = []
            got_b: list = []

            async def drain(src, into) -> None:
                async for d in src.deliveries():
                    into.append(d.payload)
                    await d.ack()
                    await asyncio.sleep(0)  # let the other collector take its share
                    if len(got_a) + len(got_b) >= 200:
                        return

            _, pending = await asyncio.wait(
                [asyncio.create_task(drain(a, got_a)), asyncio.create_task(drain(b, got_b))],
                timeout=20, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            assert sorted(got_a + got_b) == sorted(p for _, p in items)  # none missing, once
            assert got_a and got_b  # both did work

    asyncio.run(main())


def test_own_stream_has_three_replicas_in_a_cluster(nats_cluster) -> None:
    async def main() -> None:
        url = "nats://" + ",".join(u.removeprefix("nats://") for u in nats_cluster.urls)
        async with NatsSource(url + "?from=stream") as src:
            info = await src._nc.jetstream().stream_info("EDGEML_SYNC")
            assert info.config.num_replicas == 3
            assert len(info.cluster.replicas or []) == 2

    asyncio.run(main())
