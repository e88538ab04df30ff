"""The in-memory broker behaves like the real one where stage tests rely on it."""

from __future__ import annotations

import asyncio

import pytest

from edgeml.errors import (
    NotConnectedError,
    PublishError,
    PublishTimeoutError,
    SubscribeError,
    TransportError,
)
from edgeml.transport.base import Publication
from edgeml.transport.fake import FakeBroker
from edgeml.transport.settings import BrokerSettings


def settings(cid: str) -> BrokerSettings:
    return BrokerSettings(url="mqtt://fake:1883", client_id=cid)


async def take(it, n: int) -> list:
    out = []
    async for batch in it:
        out += batch
        if len(out) >= n:
            return out
    return out


def test_wildcards_share_and_retained():
    async def main():
        b = FakeBroker()
        async with b.connector(settings("pub")) as pub, b.connector(settings("sub")) as sub:
            pub.publish_nowait("cfg/a", b"retained-a", qos=1, retain=True)
            await sub.subscribe([("sensors/+/imu", 1), ("$share/g/cfg/#", 0), ("cfg/#", 1)])
            assert [m.payload for m in sub._inbox] == [b"retained-a"]  # not via $share
            pub.publish_nowait("sensors/x/imu", b"1", qos=1)
            pub.publish_nowait("sensors/x/y/imu", b"no", qos=1)
            pub.publish_nowait("cfg/b", b"2", qos=0)
            got = await take(sub.batches(), 3)
            assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
                ("cfg/a", b"retained-a", 1, True), ("sensors/x/imu", b"1", 1, False),
                ("cfg/b", b"2", 0, False)]
            pub.publish_nowait("cfg/a", b"", qos=1, retain=True)  # clears
            assert "cfg/a" not in b.retained
    asyncio.run(main())


def test_batches_bounded_by_max_items_and_unsubscribe_stops_delivery():
    async def main():
        b = FakeBroker()
        async with b.client(settings("c")) as c:
            await c.subscribe([("t/#", 0)])
            for i in range(10):
                c.publish_nowait(f"t/{i}", b"x")
            it = c.batches(4)
            sizes = [len(await anext(it)) for _ in range(3)]
            assert sizes == [4, 4, 2]
            await c.unsubscribe(["t/#"])
            c.publish_nowait("t/late", b"x")
            assert c.stats()["inbox"] == 0
    asyncio.run(main())


def test_manual_ack_tracking_and_redelivery_after_outage():
    async def main():
        b = FakeBroker()
        async with b.client(settings("dev"), manual_ack=True) as dev, \
                b.client(settings("src")) as src:
            await dev.subscribe([("in/#", 1)])
            src.publish_nowait("in/1", b"a", qos=1)
            src.publish_nowait("in/2", b"b", qos=1)
            got = await take(dev.batches(), 2)
            dev.ack(got[0])
            assert [m.payload for m in b.unacked("dev")] == [b"b"]
            b.disconnect_all()
            dev.ack(got[1])  # too late: that connection is gone
            assert dev.stats()["acks_skipped"] == 1
            b.restart()
            again = await take(dev.batches(), 1)
            assert [m.payload for m in again] == [b"b"]
            dev.ack(again[0])
            assert b.unacked("dev") == []
    asyncio.run(main())


def test_birth_on_every_connect_and_will_on_drop():
    async def main():
        b = FakeBroker()
        will = Publication("dev/status", b"offline", 1, True)
        c = b.connector(settings("dev"), will=will)
        c.set_birth([Publication("dev/status", b"online-1", 1, True)])
        async with c:
            assert b.published[-1] == ("dev/status", b"online-1", 1, True)
            c.set_birth([Publication("dev/status", b"online-2", 1, True)])
            b.drop(c)
            assert b.published[-1] == ("dev/status", b"offline", 1, True)
            assert not c.connected and c.disconnects == 1
            b.reconnect(c)
            assert b.published[-1] == ("dev/status", b"online-2", 1, True)
            assert c.connects == 2
    asyncio.run(main())


def test_outage_queues_qos1_drops_qos0_and_renews_subscriptions():
    async def main():
        b = FakeBroker()
        async with b.client(settings("up")) as up, b.client(settings("sink")) as sink:
            await sink.subscribe([("sync/#", 1)])
            b.disconnect_all()
            up.publish_nowait("sync/a", b"q1", qos=1)
            up.publish_nowait("sync/b", b"q0", qos=0)
            waiting = asyncio.ensure_future(up.publish("sync/c", b"awaited", qos=1))
            await asyncio.sleep(0)
            assert not waiting.done()
            with pytest.raises(NotConnectedError):
                await up.publish("sync/d", b"x", qos=0)
            assert up.stats()["dropped_qos0_offline"] == 1
            b.restart()
            await asyncio.wait_for(waiting, 1)
            got = await take(sink.batches(), 2)
            assert [m.payload for m in got] == [b"q1", b"awaited"]
    asyncio.run(main())


def test_error_mapping():
    async def main():
        b = FakeBroker()
        async with b.client(settings("c")) as c:
            b.fail_publish("bad/#")
            with pytest.raises(PublishError):
                c.publish_nowait("bad/x", b"1", qos=1)
            with pytest.raises(PublishError):
                await c.publish("bad/x", b"1")
            b.fail_publish("bad/#", None)
            await c.publish("bad/x", b"1")
            with pytest.raises(PublishError):
                c.publish_nowait("a/+", b"1")
            b.hold_acks = True
            with pytest.raises(PublishTimeoutError):
                await c.publish("slow", b"1", timeout=0.01)
            b.release_acks()
            b.deny_subscribe("secret/#")
            with pytest.raises(SubscribeError):
                await c.subscribe([("secret/#", 1)])
            with pytest.raises(SubscribeError):
                await c.subscribe([("a/#/b", 1)])
            assert c.stats()["publish_errors"] == 3
        b.disconnect_all()
        with pytest.raises(TransportError):
            async with b.client(settings("late")):
                pass
        async with b.client(settings("late"), require_connection=False) as late:
            assert not late.connected
    asyncio.run(main())


def test_iterators_end_on_close():
    async def main():
        b = FakeBroker()
        c = b.client(settings("c"))
        await c.__aenter__()
        task = asyncio.ensure_future(take(c.batches(), 1))
        await asyncio.sleep(0)
        await c.close()
        assert await asyncio.wait_for(task, 1) == []
    asyncio.run(main())
