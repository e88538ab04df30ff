"""MqttTransport against a private mosquitto: error mapping, unsubscribe, births, protocols."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as paho
import pytest
from conftest import Collector, publish_all

from edgeml.errors import (
    NotConnectedError,
    PublishError,
    PublishTimeoutError,
    SubscribeError,
)
from edgeml.transport.base import Publication
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings


def settings(broker, cid: str, **kw) -> BrokerSettings:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.2)
    kw.setdefault("connect_timeout_s", 5)
    return BrokerSettings(url=broker.url, client_id=cid, **kw)


async def until(pred, timeout: float = 15.0) -> None:
    """Wait for a condition of the transport's own state (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def first(it, timeout: float = 10.0):
    return await asyncio.wait_for(anext(it), timeout)


def test_publish_timeout_offline_store_and_forward_and_qos0_drop(broker):
    async def main():
        async with MqttTransport(settings(broker, "pt")) as t:
            await t.publish("t/ok", b"1", timeout=5)
            broker.stop()
            await until(lambda: not t.connected)
            with pytest.raises(PublishTimeoutError) as err:
                await t.publish("t/later", b"queued", qos=1, timeout=0.3)
            assert err.value.kind == "publish_timeout"
            t.publish_nowait("t/q0", b"lost", qos=0)
            with pytest.raises(NotConnectedError):
                await t.publish("t/q0", b"lost", qos=0)
            awaited = asyncio.ensure_future(t.publish("t/later2", b"awaited", qos=1))
            broker.start()
            await asyncio.wait_for(awaited, 15)  # sent on reconnect, PUBACK awaited
            st = t.stats()
            assert st["publish_timeouts"] == 1
            assert st["dropped_qos0_offline"] == 1
            assert st["disconnects"] == 1 and st["connects"] == 2
    asyncio.run(main())


def test_paho_refusals_become_publish_errors(broker, monkeypatch):
    async def main():
        async with MqttTransport(settings(broker, "pe")) as t:
            with pytest.raises(PublishError):
                t.publish_nowait("bad/+", b"x", qos=1)  # wildcard in a topic
            with pytest.raises(PublishError):
                await t.publish("", b"x")

            def full(*a, **k):
                info = paho.MQTTMessageInfo(1)
                info.rc = paho.MQTT_ERR_QUEUE_SIZE
                return info
            monkeypatch.setattr(t._client, "publish", full)
            with pytest.raises(PublishError, match="queue"):
                t.publish_nowait("ok/topic", b"x", qos=1)
            assert t.stats()["publish_errors"] == 3
    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_denied_and_invalid_subscriptions(broker_factory, tmp_path, protocol):
    """mosquitto 2.0.11 with an acl_file grants every subscription and filters at delivery
    (checked: ``topic deny`` does not change the SUBACK either), so the refusal is made by
    rewriting the reason codes of the broker's real SUBACK before the transport sees them."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    acl = tmp_path / "acl.txt"
    acl.write_text("topic readwrite open/#\n")
    b = broker_factory("acl", listener_config=f"allow_anonymous true\nacl_file {acl}")
    b.start()

    async def main():
        async with MqttTransport(settings(b, "acl-" + protocol, protocol=protocol)) as t:
            with pytest.raises(SubscribeError):
                await t.subscribe([("a/#/b", 1)])  # refused before it is sent
            with pytest.raises(SubscribeError):
                await t.subscribe([("$share//x", 1)])
            real = t._client.on_subscribe

            def refuse(client, userdata, mid, codes, props=None):
                real(client, userdata, mid, [ReasonCode(PacketTypes.SUBACK, identifier=0x87
                                                        if protocol == "5" else 0x80)], props)
            t._client.on_subscribe = refuse
            with pytest.raises(SubscribeError, match="secret") as err:
                await t.subscribe([("secret/#", 1)])
            assert err.value.kind == "subscribe"
            assert "secret/#" not in t._subscriptions  # not renewed on reconnect
            t._client.on_subscribe = real
            await t.subscribe([("open/#", 1)])  # the connection is still fine
            await t.publish("open/x", b"hello", timeout=5)
            got = await first(t.messages())
            assert got.payload == b"hello"
            assert t.stats()["subscribe_errors"] == 1
    asyncio.run(main())


def test_unsubscribe_stops_delivery_and_session_keeps_queued_qos1(broker):
    s = settings(broker, "pause", clean_start=False)

    async def main():
        async with MqttTransport(s, manual_ack=True) as t:
            await t.subscribe([("in/#", 1), ("ctl/#", 1)])
            publish_all(broker, [("in/a", b"1")])
            m = await first(t.messages())
            assert m.payload == b"1"
            t.ack(m)
            await t.unsubscribe(["in/#"])
            # in order from one publisher: if in/# were still subscribed, "2" would come first
            publish_all(broker, [("in/a", b"2"), ("ctl/x", b"marker")])
            m = await first(t.messages())
            assert (m.topic, m.payload) == ("ctl/x", b"marker")
            t.ack(m)
            # MQTT semantics: what was published while unsubscribed is gone for good
            await t.subscribe([("in/#", 1)])
            publish_all(broker, [("in/a", b"3")])
            m = await first(t.messages())
            assert m.payload == b"3"
            t.ack(m)
        # away with a persistent session: QoS 1 is queued by the broker
        publish_all(broker, [("in/a", b"4"), ("in/a", b"5"), ("ctl/x", b"6")])
        async with MqttTransport(s, manual_ack=True) as t:
            await t.subscribe([("in/#", 1), ("ctl/#", 1)])
            got = []
            async for batch in t.batches():
                got += batch
                if len(got) >= 3:
                    break
            assert [m.payload for m in got] == [b"4", b"5", b"6"]

    asyncio.run(main())


def test_unsubscribe_while_offline_is_sent_on_reconnect(broker):
    s = settings(broker, "unsub-offline", clean_start=False)

    async def main():
        async with MqttTransport(s) as t:
            await t.subscribe([("in/#", 1), ("ctl/#", 1)])
            broker.stop()
            await until(lambda: not t.connected)
            await t.unsubscribe(["in/#"])  # remembered; the session still has it
            broker.start()
            await until(lambda: t.connected)
            # a SUBACK on the same connection: the broker has handled the UNSUBSCRIBE sent
            # before it on reconnect
            await t.subscribe([("other/#", 1)])
            publish_all(broker, [("in/a", b"x"), ("ctl/x", b"marker")])
            m = await first(t.messages())
            assert m.topic == "ctl/x"
    asyncio.run(main())


def test_birth_bytes_go_out_on_reconnect_after_broker_restart(broker):
    watcher = Collector(broker, "dev/status", client_id="watcher", clean=False)
    try:
        async def main():
            t = MqttTransport(settings(broker, "dev"),
                              will=Publication("dev/status", b"offline", 1, True))
            t.set_birth([Publication("dev/status", b"born-1", 1, True)])
            async with t:
                await asyncio.get_running_loop().run_in_executor(None, lambda: watcher.wait_for(
                    lambda ms: any(m.payload == b"born-1" for m in ms)))
                t.set_birth([Publication("dev/status", b"born-2", 1, True)])
                broker.restart()
                await asyncio.get_running_loop().run_in_executor(None, lambda: watcher.wait_for(
                    lambda ms: any(m.payload == b"born-2" for m in ms)))
                assert t.connects == 2
        asyncio.run(main())
        payloads = [m.payload for m in watcher.messages]
        assert payloads.index(b"born-2") > payloads.index(b"born-1")
    finally:
        watcher.close()


def test_protocol_is_per_connection(broker, tmp_path):
    from edgeml.config import parse_config

    cfg = parse_config({"device_id": "d1", "data_dir": str(tmp_path),
                        "broker": {"url": broker.url, "protocol": "5"},
                        "upstream": {"url": broker.url, "protocol": "3.1.1"}})
    assert cfg.broker.protocol == "5"
    assert cfg.upstream is not None and cfg.upstream.protocol == "3.1.1"

    async def main():
        async with MqttTransport(settings(broker, "dev-v5", protocol="5")) as a, \
                MqttTransport(settings(broker, "up-v311", protocol="3.1.1")) as b:
            assert a.connected and b.connected
    asyncio.run(main())
    log = (broker.log_path).read_text()
    # mosquitto logs each connection's protocol: p5 = MQTT 5, p2 = 3.1.1
    assert any("dev-v5" in line and "(p5," in line for line in log.splitlines()), log
    assert any("up-v311" in line and "(p2," in line for line in log.splitlines()), log


def test_ack_many_acknowledges_a_burst_in_one_write_and_leaves_the_rest_queued(broker):
    """Acked in bulk: not redelivered after a reconnect; never acked: redelivered."""
    s = settings(broker, "bulk", clean_start=False)
    n = 300

    async def main():
        async with MqttTransport(s, manual_ack=True) as t:
            await t.subscribe([("bulk/#", 1)])
            publish_all(broker, [("bulk/a", str(i).encode()) for i in range(n)])
            got = []
            async for batch in t.batches():
                got += batch
                if len(got) >= n:
                    break
            assert [int(m.payload) for m in got] == list(range(n))
            t.ack_many(got[:-10])  # the last ten stay unacknowledged
            await t.publish("bulk/marker", b"m", qos=1, timeout=5)  # PUBACKs went out before
        async with MqttTransport(s, manual_ack=True) as t:
            await t.subscribe([("bulk/#", 1)])
            again = []
            async for batch in t.batches():
                again += batch
                if any(m.topic == "bulk/marker" for m in again) and len(again) >= 11:
                    break
            assert sorted(int(m.payload) for m in again if m.topic == "bulk/a") == \
                list(range(n - 10, n))
            t.ack_many(again)
            assert t.stats()["acks_skipped"] == 0
    asyncio.run(main())


def test_auto_protocol_is_mqtt5_on_mosquitto_and_311_on_a_311_only_broker(broker):
    """``protocol = "auto"``: MQTT 5 where the broker speaks it (the Receive Maximum then
    applies), 3.1.1 on a broker that refuses 5 (amqtt), on the same transport."""
    from edgeml.host.embedded_broker import EmbeddedBroker

    async def roundtrip(t: MqttTransport) -> None:
        await t.subscribe([("auto/#", 1)])
        await t.publish("auto/x", b"hi", qos=1, timeout=5)
        m = await first(t.messages())
        assert m.payload == b"hi"
        t.ack(m)

    async def main(b, expect: str) -> None:
        s = BrokerSettings(url=b.url, client_id=f"auto-{expect}", protocol="auto",
                           receive_maximum=500, reconnect_min_s=0.05, reconnect_max_s=0.2,
                           connect_timeout_s=10)
        async with MqttTransport(s, manual_ack=True) as t:
            assert t.protocol == expect
            await roundtrip(t)
            assert t.stats()["connects"] == 1

    asyncio.run(main(broker, "5"))
    with EmbeddedBroker() as amqtt:
        asyncio.run(main(amqtt, "3.1.1"))
