"""The uplink against real mosquitto brokers: outages, priorities, bounds, kill -9, bridging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
from test_outbox import output_record, simulate, size_of

from edgeml.core.uplink import Uplink
from edgeml.errors import ConfigError
from edgeml.storage.outbox import DEFAULT_STREAMS, Outbox, StreamPolicy, record_id
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings

HERE = Path(__file__).resolve().parent  # this directory: child processes import its modules

DEVICE = "watch-01"
SYNC = "edgeml/+/sync/#"


def records_for(seq: int) -> list[tuple[str, str, dict]]:
    """What the daemon stores for one scored input: the selected answer and every version's."""
    out = []
    for stream, versions in (("outputs", ("2",)), ("results", ("1", "2"))):
        for v in versions:
            rid = record_id(DEVICE, "activity", seq, "activity", v, stream)
            out.append((stream, rid, output_record(seq, v)))
    return out


def inputs(start: int, stop: int) -> list[tuple[str, str, dict]]:
    return [r for i in range(start, stop) for r in records_for(i)]


def decode(msg) -> dict:
    try:
        return msgpack.unpackb(msg.payload, raw=False)
    except ValueError:
        return json.loads(msg.payload)


def received(msgs) -> list[tuple[str, dict]]:
    """(stream, record) in arrival order, duplicates included."""
    out = []
    for m in msgs:
        body = decode(m)
        assert m.topic == f"edgeml/{DEVICE}/sync/{body['stream']}"
        out += [(body["stream"], r) for r in body["records"]]
    return out


def ids_of(msgs) -> set[str]:
    return {r["record_id"] for _, r in received(msgs)}


def has_ids(wanted: set[str]) -> Callable:
    return lambda msgs: wanted <= ids_of(msgs)


def sync_collector(collector, **kwargs):
    """A persistent QoS 1 subscriber: what arrives while it reconnects is queued for it."""
    c = collector(SYNC, client_id="cloud-sub", clean=False, **kwargs)
    c.client.reconnect_delay_set(0.05, 0.5)
    return c


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a condition on in-process state."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def settings(url: str, **kwargs) -> BrokerSettings:
    return BrokerSettings(url=url, client_id=f"{DEVICE}-uplink", clean_start=False,
                          reconnect_min_s=0.05, reconnect_max_s=0.5, **kwargs)


@contextlib.asynccontextmanager
async def running_uplink(outbox: Outbox, url: str, **kwargs) -> AsyncIterator[Uplink]:
    async with MqttTransport(settings(url)) as client:
        kwargs.setdefault("batch_max_wait_s", 0.05)
        up = Uplink(outbox, client, topic_prefix="edgeml", device_id=DEVICE, retry_min_s=0.05,
                    **kwargs)
        task = asyncio.create_task(up.run())
        try:
            yield up
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def put(outbox: Outbox, up: Uplink | None, items, chunk: int = 30) -> None:
    for i in range(0, len(items), chunk):
        await asyncio.to_thread(outbox.put_many, items[i:i + chunk])
        if up is not None:
            up.notify()


def assert_order_kept(got: list[tuple[str, dict]], sent: list[tuple[str, str, dict]]) -> None:
    """Within each stream, first arrivals follow insertion order."""
    for stream in {s for s, _, _ in sent}:
        first: list[str] = []
        seen: set[str] = set()
        for s, r in got:
            if s == stream and r["record_id"] not in seen:
                seen.add(r["record_id"])
                first.append(r["record_id"])
        assert first == [rid for s, rid, _ in sent if s == stream]


def test_upstream_outage_every_record_arrives_once_by_id(tmp_path: Path, broker, collector):
    sub = sync_collector(collector)
    stream = inputs(0, 600)  # 1,800 records, produced steadily while the broker goes away

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            async with running_uplink(ob, broker.url) as up:
                away = None
                for n, i in enumerate(range(0, len(stream), 15)):
                    if n == 20:
                        await asyncio.to_thread(broker.stop)  # pull the cable mid-stream
                    if n == 100:
                        await until(lambda: not up.stats["connected"], "uplink saw it")
                        away = ob.stats()
                        await asyncio.to_thread(broker.start)  # plug it back
                    await put(ob, up, stream[i:i + 15])
                    await asyncio.sleep(0.005)  # a steady producer, not a burst
                msgs = await asyncio.to_thread(sub.wait_for, has_ids({r[1] for r in stream}), 60)
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained")
                return away, msgs, up.stats

    away, msgs, up_stats = asyncio.run(main())
    # status told the backlog while the upstream was away
    assert away["backlog"] >= 80 * 15 - 500
    assert away["streams"]["results"]["backlog"] > 0
    assert away["streams"]["outputs"]["oldest_unsynced_age_s"] > 0
    got = received(msgs)
    assert {r["record_id"] for _, r in got} == {rid for _, rid, _ in stream}
    assert_order_kept(got, stream)
    # records arrive tagged with the model version that made them, fields intact
    by_id = {r["record_id"]: r for _, r in got}
    for _, rid, rec in stream:
        assert by_id[rid] == {"record_id": rid, **rec}
    assert up_stats["records_sent"] >= len(stream)
    assert up_stats["connected"] and up_stats["last_ack_age_s"] is not None


def test_higher_priority_streams_go_first(tmp_path: Path, broker, collector):
    sub = sync_collector(collector)
    results = [r for r in inputs(0, 150) if r[0] == "results"]
    outputs = [r for r in inputs(0, 150) if r[0] == "outputs"]
    # wide records (more than 15 fields: a msgpack map16) travel intact too
    alerts = [("alerts", f"{DEVICE}/canary/{i}", {"kind": "canary_agreement", "ts": 1.0,
                                                 **{f"agreement_v{k}": k / 20 for k in range(18)}})
              for i in range(2)]

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            await put(ob, None, results, chunk=20)  # stored first, but lowest priority
            await put(ob, None, outputs, chunk=20)
            await put(ob, None, alerts)
            async with running_uplink(ob, broker.url, batch_max_records=40):
                return await asyncio.to_thread(
                    sub.wait_for, has_ids({r[1] for r in results + outputs + alerts}))

    msgs = asyncio.run(main())
    streams = [decode(m)["stream"] for m in msgs]
    rank = {s: p.priority for s, p in DEFAULT_STREAMS.items()}
    assert [rank[s] for s in streams] == sorted(rank[s] for s in streams)
    assert streams[0] == "alerts" and streams[-1] == "results"
    # whole chunks (one per write of 20) up to batch_max_records
    assert max(len(decode(m)["records"]) for m in msgs) == 40
    assert_order_kept(received(msgs), results + outputs + alerts)
    by_id = {r["record_id"]: r for _, r in received(msgs)}
    for _, rid, rec in alerts + outputs[:3]:
        assert by_id[rid] == {"record_id": rid, **rec}


@pytest.mark.parametrize("policy", ["drop_oldest", "refuse_new"])
def test_budget_with_upstream_away_counts_and_reports_drops(tmp_path: Path, broker, collector,
                                                             policy: str):
    sub = sync_collector(collector)
    streams = {**DEFAULT_STREAMS, "results": StreamPolicy("results", 2, policy)}
    items = [r for r in inputs(0, 200) if r[0] == "results"]
    budget = 60 * size_of(items[0])
    kept, lost = simulate([items[i:i + 20] for i in range(0, len(items), 20)], budget, policy)
    data_dir = tmp_path / "data"
    (data_dir / "rawlog").mkdir(parents=True)
    (data_dir / "rawlog" / "segment-0001").write_bytes(b"raw" * 100)

    async def main():
        with Outbox(data_dir / "outbox", budget_bytes=budget, streams=streams) as ob:
            async with running_uplink(ob, broker.url) as up:
                await asyncio.to_thread(broker.stop)
                await until(lambda: not up.stats["connected"], "uplink saw the outage")
                for i in range(0, len(items), 20):  # the daemon keeps scoring
                    await put(ob, up, items[i:i + 20])
                    assert ob.stats()["bytes_used"] <= budget
                full = ob.stats()
                await asyncio.to_thread(broker.start)
                msgs = await asyncio.to_thread(
                    sub.wait_for, lambda m: any(decode(x)["stream"] == "alerts" for x in m)
                    and has_ids(set(kept))(m))
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained")
                return full, msgs, ob.stats()

    full, msgs, after = asyncio.run(main())
    key = "dropped" if policy == "drop_oldest" else "refused"
    assert full["streams"]["results"][key] == lost
    assert full["streams"]["results"]["backlog"] == len(kept)
    got = received(msgs)
    data_ids = {r["record_id"] for s, r in got if s != "alerts"}
    assert data_ids == set(kept)  # exactly the kept ones, none of the lost
    alerts = [r for s, r in got if s == "alerts"]
    assert alerts[0]["kind"] == "outbox_drops"
    assert alerts[0]["streams"]["results"][key] == lost
    assert alerts[0]["streams"]["results"][f"{key}_total"] == lost
    assert after["streams"]["results"][f"unreported_{key}"] == 0
    # nothing but the outbox's own files was written
    files = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()}
    assert files - {"rawlog/segment-0001"} <= {"outbox/outbox.db", "outbox/outbox.db-wal",
                                                "outbox/outbox.db-shm", "outbox/outbox.lock"}
    assert (data_dir / "rawlog" / "segment-0001").read_bytes() == b"raw" * 100


def test_bandwidth_cap_spaces_batches(tmp_path: Path, broker, collector):
    sub = sync_collector(collector)
    items = inputs(0, 60)
    cap = 40_000.0

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            await put(ob, None, items)
            async with running_uplink(ob, broker.url, batch_max_records=20,
                                      bandwidth_bytes_per_s=cap):
                return await asyncio.to_thread(sub.wait_for, has_ids({r[1] for r in items}))

    msgs = asyncio.run(main())
    assert len(msgs) >= 9
    sizes = [len(m.payload) + len(m.topic) for m in msgs]
    span = msgs[-1].timestamp - msgs[0].timestamp
    # every batch but the last had to wait for its bytes to fit under the cap
    assert span >= 0.9 * sum(sizes[:-1]) / cap


CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[3])
    from test_uplink import inputs, settings
    from edgeml.storage.outbox import Outbox
    from edgeml.core.uplink import Uplink

    async def main():
        ob = Outbox(sys.argv[1])
        up = Uplink(ob, settings(sys.argv[2]), topic_prefix="edgeml", device_id="watch-01",
                    batch_max_records=30, batch_max_wait_s=0.05, bandwidth_bytes_per_s=60000)
        task = asyncio.create_task(up.run())
        for start in range(1000, 1300, 10):  # the daemon keeps producing while it syncs
            await asyncio.to_thread(ob.put_many, inputs(start, start + 10))
            print(start + 10, flush=True)
            up.notify()
            await asyncio.sleep(0.05)
        await task

    asyncio.run(main())
""")


def test_kill_9_mid_flight_then_restart_loses_nothing(tmp_path: Path, broker, collector):
    sub = sync_collector(collector)
    prefilled = inputs(0, 300)
    with Outbox(tmp_path / "outbox") as ob:
        ob.put_many(prefilled)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "outbox"), broker.url,
         str(HERE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sub.wait_count(8, timeout=60)  # batches are flowing
    finally:
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err
    committed = int(out.split()[-1]) if out.split() else 1000
    expected = {r[1] for r in prefilled + inputs(1000, committed)}
    possible = {r[1] for r in prefilled + inputs(1000, 1300)}
    before_restart = ids_of(sub.messages)
    assert expected - before_restart  # the kill left work to do

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            assert ob.stats()["backlog"] > 0
            async with running_uplink(ob, broker.url):
                msgs = await asyncio.to_thread(sub.wait_for, has_ids(expected), 60)
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained")
                return msgs

    msgs = asyncio.run(main())
    got = received(msgs)
    assert expected <= {r["record_id"] for _, r in got} <= possible
    copies: dict[str, dict] = {}
    for _, r in got:  # a duplicate is the same record under the same id
        assert copies.setdefault(r["record_id"], r) == r


def bridge_config(cloud_port: int) -> str:
    return "\n".join([
        "connection cloud",
        f"address 127.0.0.1:{cloud_port}",
        "topic edgeml/+/sync/# out 1",
        "cleansession false",
        f"remote_clientid {DEVICE}-bridge",
        "restart_timeout 1",
        "notifications false",
    ])


def test_device_broker_bridged_to_a_cloud_broker(tmp_path: Path, broker_factory, collector):
    cloud = broker_factory("cloud").start()
    device = broker_factory("device", extra_config=bridge_config(cloud.port)).start()
    sub = sync_collector(collector, broker=cloud)
    online, offline = inputs(0, 50), inputs(50, 250)

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            async with running_uplink(ob, device.url) as up:
                await put(ob, up, online)
                await asyncio.to_thread(sub.wait_for, has_ids({r[1] for r in online}))
                await asyncio.to_thread(cloud.stop)
                await put(ob, up, offline)
                # the device broker acknowledged everything: it now sits in the bridge queue
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained into device")
                await asyncio.to_thread(cloud.start)
                return await asyncio.to_thread(
                    sub.wait_for, has_ids({r[1] for r in offline}), 60)

    msgs = asyncio.run(main())
    got = received(msgs)
    assert {r["record_id"] for _, r in got} == {r[1] for r in online + offline}
    assert_order_kept(got, online + offline)


def test_upstream_down_at_start_and_json_format(tmp_path: Path, broker, collector):
    sub = sync_collector(collector)
    broker.stop()
    items = inputs(0, 20)

    async def main():
        with Outbox(tmp_path / "outbox") as ob:
            ob.put_many(items)
            up = Uplink(ob, settings(broker.url), topic_prefix="edgeml",
                        device_id=DEVICE, retry_min_s=0.05, retry_max_s=0.2,
                        batch_max_wait_s=0.05, format="json")
            task = asyncio.create_task(up.run())
            try:
                await asyncio.sleep(0.5)  # the upstream stays away for a while
                assert not up.stats["connected"]
                assert ob.stats()["backlog"] == len(items)
                await asyncio.to_thread(broker.start)
                msgs = await asyncio.to_thread(sub.wait_for, has_ids({r[1] for r in items}))
                await until(lambda: ob.stats()["backlog"] == 0, "outbox drained")
                return msgs, up.stats
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    msgs, stats = asyncio.run(main())
    body = json.loads(msgs[0].payload)  # readable JSON, same schema
    assert body["schema"] == 1 and body["device"] == DEVICE
    assert set(body["records"][0]) >= {"record_id", "id", "topic", "pipeline", "model",
                                       "version", "output", "policy", "fallback", "latency_ms",
                                       "ts", "input_seq"}
    assert stats["connected"] and stats["records_sent"] == len(items)


def test_settings_are_validated(tmp_path: Path):
    with Outbox(tmp_path / "outbox") as ob:
        s = settings("mqtt://127.0.0.1:1")
        with pytest.raises(ConfigError, match="batch_max_records"):
            Uplink(ob, s, topic_prefix="edgeml", device_id=DEVICE, batch_max_records=0)
        with pytest.raises(ConfigError, match="bandwidth_bytes_per_s"):
            Uplink(ob, s, topic_prefix="edgeml", device_id=DEVICE, bandwidth_bytes_per_s=-1)
        with pytest.raises(ConfigError, match="format"):
            Uplink(ob, s, topic_prefix="edgeml", device_id=DEVICE, format="xml")
        with pytest.raises(ConfigError, match="device_id"):
            Uplink(ob, s, topic_prefix="edgeml", device_id="a/b")


def test_message_from_chunks_is_the_same_document_byte_for_byte(tmp_path: Path):
    """The wire format did not change with chunked storage: the spliced message equals the
    message built by encoding every record (with ``record_id`` in front) the plain way."""
    wide = ("alerts", f"{DEVICE}/canary/1", {"kind": "canary", "ts": 1.5, "blob": b"\x00\x01",
                                             **{f"v{k}": k / 20 for k in range(18)}})  # map16
    items = inputs(0, 40)
    with Outbox(tmp_path / "outbox") as ob:
        up = Uplink(ob, settings("mqtt://127.0.0.1:1"), topic_prefix="edgeml", device_id=DEVICE,
                    batch_max_records=50)
        assert ob.chunk_max_records == 50  # a chunk always fits one message
        for i in range(0, len(items), 12):  # several writes: several chunks per stream
            ob.put_many(items[i:i + 12])
        ob.put(*wide)
        for stream in ("alerts", "outputs", "results"):
            sent = [(rid, rec) for s, rid, rec in [*items, wide] if s == stream]
            got: list[dict] = []
            while True:
                chunks, n, payload = up._take(stream, 7)
                if not chunks:
                    break
                assert n == sum(c.count for c in chunks) <= 50
                body = msgpack.unpackb(payload, raw=False)
                expected = msgpack.packb(
                    {"schema": 1, "device": DEVICE, "stream": stream, "batch_seq": 7,
                     "sent": body["sent"],
                     "records": [{"record_id": rid, **rec}
                                 for rid, rec in sent[len(got):len(got) + n]]},
                    use_bin_type=True)
                assert payload == expected
                got += body["records"]
                ob.ack(chunks)
            assert got == [{"record_id": rid, **rec} for rid, rec in sent]
        # JSON carries the same records
        ob.put_many(items[:4])
        up.format = "json"
        _, n, payload = up._take("results", 8)
        body = json.loads(payload)
        want = [{"record_id": rid, **rec} for s, rid, rec in items[:4] if s == "results"]
        assert body["records"] == want and n == len(want) == 2
