"""The uplink with several upstream brokers: a broker lost mid-stream (or away from the start)
is left for the next one, and every record still arrives."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from test_uplink import DEVICE, SYNC, ids_of, inputs, put, settings, until

from edgeml.core.uplink import Uplink
from edgeml.host.broker import free_port
from edgeml.storage.outbox import Outbox
from edgeml.transport.mqtt import MqttTransport


@contextlib.asynccontextmanager
async def failover_uplink(outbox: Outbox, urls: list[str], **kwargs):
    up = Uplink(outbox, [settings(u) for u in urls], topic_prefix="edgeml", device_id=DEVICE,
                retry_min_s=0.05, batch_max_wait_s=0.05, **kwargs)
    task = asyncio.create_task(up.run())
    try:
        yield up
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_broker_lost_mid_stream_fails_over_and_loses_nothing(tmp_path: Path, broker_factory,
                                                             collector):
    b1, b2 = broker_factory("b1"), broker_factory("b2")
    b1.start()
    b2.start()
    sub1 = collector(SYNC, broker=b1, client_id="cloud-1", clean=False)
    sub2 = collector(SYNC, broker=b2, client_id="cloud-2", clean=False)
    stream = inputs(0, 400)  # 1,200 records, produced steadily

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            async with failover_uplink(ob, [b1.url, b2.url], failover_after_s=0.5) as up:
                for n, i in enumerate(range(0, len(stream), 15)):
                    if n == 20:
                        await until(lambda: up.stats["records_sent"] > 0, "first batches")
                        await asyncio.to_thread(b1.stop)  # the first node dies
                    await put(ob, up, stream[i:i + 15])
                    await asyncio.sleep(0.005)
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained", 30)
                return up.stats

    stats = asyncio.run(main())
    before = ids_of(sub1.messages)
    after = ids_of(sub2.messages)
    want = {rid for _, rid, _ in stream}
    assert before and after, "both brokers carried part of the stream"
    assert want - (before | after) == set()  # nothing missing
    assert stats["failovers"] == 1 and stats["upstream"] == b2.url
    assert stats["connected"]


@pytest.mark.slow  # hung once in a full run (the uplink did not end on cancel); not yet found
@pytest.mark.timeout(60)
def test_first_upstream_away_at_start_goes_to_the_next(tmp_path: Path, broker, collector):
    """Each connection speaks its own MQTT version: the second is MQTT 5."""
    sub = collector(SYNC, client_id="cloud", clean=False)
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    stream = inputs(0, 50)
    used: list[tuple[str, str]] = []

    def connector(s, **kwargs):
        used.append((s.url, s.protocol))
        return MqttTransport(s, **kwargs)

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            up = Uplink(ob, [settings(dead), settings(broker.url, protocol="5")],
                        connector=connector, failover_after_s=0.3, topic_prefix="edgeml",
                        device_id=DEVICE, retry_min_s=0.05, batch_max_wait_s=0.05)
            task = asyncio.create_task(up.run())
            try:
                await put(ob, up, stream)
                await asyncio.to_thread(sub.wait_for,
                                        lambda m: ids_of(m) >= {r[1] for r in stream}, 20)
                return up.stats
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    stats = asyncio.run(main())
    assert stats["upstream"] == broker.url and stats["failovers"] == 1
    assert used[:2] == [(dead, "3.1.1"), (broker.url, "5")]
