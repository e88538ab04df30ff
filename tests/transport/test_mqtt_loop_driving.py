"""MqttTransport drives paho's socket from the event loop: buffered reads, paused reading,
large writes, no network thread. Against a private mosquitto over TCP."""

from __future__ import annotations

import asyncio
import threading

import paho.mqtt.client as paho
import pytest
from conftest import publish_all

from edgeml.errors import PublishError
from edgeml.transport import mqtt
from edgeml.transport.base import Publication
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings


def settings(broker, cid: str, **kw) -> BrokerSettings:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.2)
    return BrokerSettings(url=broker.url, client_id=cid, **kw)


async def until(pred, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def take(t: MqttTransport, n: int, *, ack: bool = False, timeout: float = 30.0) -> list:
    got: list = []
    batches = t.batches(1024)

    async def collect() -> None:
        while len(got) < n:
            burst = await anext(batches)
            if ack:
                t.ack_many(burst)
            got.extend(burst)
    await asyncio.wait_for(collect(), timeout)
    return got


def test_no_network_thread_and_a_burst_split_across_reads_arrives_whole(broker):
    """Small messages around ones larger than one read of the socket: every packet that
    straddles a buffer boundary is put together again, in order."""
    big = bytes(range(256)) * (3 * mqtt.READ_SIZE // 256 + 7)
    items = []
    for i in range(3000):
        items.append(("burst/t", f"{i:05d}".encode() * (1 + i % 37)))
        if i % 1000 == 500:
            items.append(("burst/t", big))

    async def main():
        async with MqttTransport(settings(broker, "burst", protocol="5")) as t:
            assert not [th for th in threading.enumerate()
                        if th.name.startswith("paho-mqtt-client")]
            await t.subscribe([("burst/#", 1)])
            await asyncio.get_running_loop().run_in_executor(None, publish_all, broker, items)
            got = await take(t, len(items))
            assert [m.payload for m in got] == [p for _, p in items]
    asyncio.run(main())


def test_reading_pauses_while_the_loop_is_behind_and_nothing_is_lost(broker, monkeypatch):
    """With more than INBOX_MAX messages waiting for the loop the transport stops reading
    (the broker holds the QoS 1 rest in its session); taking them resumes reading."""
    monkeypatch.setattr(mqtt, "INBOX_MAX", 50)
    items = [("paused/t", f"{i}".encode()) for i in range(2000)]

    async def main():
        async with MqttTransport(settings(broker, "paused", protocol="5"),
                                 manual_ack=True) as t:
            await t.subscribe([("paused/#", 1)])
            await asyncio.get_running_loop().run_in_executor(None, publish_all, broker, items)
            await until(lambda: t.stats()["inbox"] >= 50)
            # the broker has all 2,000 and keeps sending; the transport does not read on
            await asyncio.sleep(0.3)
            assert 50 <= t.stats()["inbox"] <= 55
            assert t._read_paused
            got = await take(t, len(items), ack=True)
            assert [m.payload for m in got] == [p for _, p in items]
            assert not t._read_paused
    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_publish_larger_than_the_socket_buffer_is_written_in_full(broker, collector,
                                                                    protocol):
    payload = bytes(range(256)) * (24 * 1024 * 1024 // 256)  # 24 MB: many send buffers
    coll = collector("large/#", qos=1)

    async def main():
        async with MqttTransport(settings(broker, f"large-{protocol}", protocol=protocol)) as t:
            await t.publish("large/one", payload, qos=1, timeout=60)
            t.publish_nowait("large/two", b"after", qos=1)
            await t.publish("large/three", b"end", qos=1, timeout=30)
    asyncio.run(main())
    msgs = coll.wait_count(3, timeout=60)
    assert [m.topic for m in msgs] == ["large/one", "large/two", "large/three"]
    assert msgs[0].payload == payload


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_received_messages_are_what_was_published_on_either_path(broker, protocol):
    """QoS 0 and 1, retained or not, empty and binary payloads, non-ASCII topics, and (MQTT 5)
    messages with properties, which take paho's own decoding: every field arrives intact."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    sent = []
    for i in range(40):
        topic = f"parity/{'ä' if i % 3 == 0 else 'a'}/{i}"
        payload = bytes([i % 256]) * (i * 7) if i % 5 else b""
        sent.append((topic, payload, i % 2, i % 4 == 0, i % 6 == 0))

    async def main():
        async with MqttTransport(settings(broker, f"parity-{protocol}", protocol=protocol),
                                 manual_ack=True) as t:
            await t.subscribe([("parity/#", 1)])

            def publish() -> None:
                pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
                pub.connect(broker.host, broker.port)
                pub.loop_start()
                for topic, payload, qos, retain, with_props in sent:
                    props = None
                    if with_props:
                        props = Properties(PacketTypes.PUBLISH)
                        props.UserProperty = ("k", "v")
                        props.ContentType = "application/x-test"
                    pub.publish(topic, payload, qos, retain, properties=props)\
                        .wait_for_publish(10)
                pub.disconnect()
                pub.loop_stop()
            await asyncio.get_running_loop().run_in_executor(None, publish)
            got = await take(t, len(sent), ack=True)
            return got
    got = asyncio.run(main())
    assert [(m.topic, m.payload, m.qos) for m in got] == [(t, p, q) for t, p, q, _, _ in sent]
    assert all(isinstance(m.payload, bytes) and not m.retain for m in got)  # live, not stored
    assert all((m.mid > 0) == (m.qos == 1) for m in got)
    kept = [(t, p) for t, p, _, retain, _ in sent if retain and p]  # empty: clears instead

    async def late():
        async with MqttTransport(settings(broker, f"late-{protocol}", protocol=protocol)) as t:
            await t.subscribe([("parity/#", 1)])
            return await take(t, len(kept))
    stored = asyncio.run(late())
    assert sorted((m.topic, m.payload) for m in stored) == sorted(kept)
    assert all(m.retain for m in stored)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_many_qos1_publishes_beyond_the_in_flight_window_all_arrive_in_order(
        broker, collector, protocol):
    """PUBACKs settle the window (max_inflight 20) as they come, and each releases the next
    queued publish: 2,000 answers arrive, in order, and the awaited last one resolves."""
    coll = collector("window/#", qos=1)

    async def main():
        async with MqttTransport(settings(broker, f"window-{protocol}", protocol=protocol,
                                          max_inflight=20)) as t:
            for i in range(1999):
                t.publish_nowait("window/t", str(i).encode(), qos=1)
            await t.publish("window/t", b"1999", qos=1, timeout=30)
            assert t.stats()["publish_errors"] == 0
    asyncio.run(main())
    msgs = coll.wait_count(2000, timeout=60)
    assert [int(m.payload) for m in msgs] == list(range(2000))


def test_publishes_of_one_loop_turn_leave_together_in_order(broker, collector):
    """What paho writes during one loop turn is gathered and handed to the kernel at the
    turn's end in one go: nothing has left while the turn runs, everything has after it, each
    QoS in order (QoS 1 beyond the in-flight window waits for acknowledgements)."""
    coll = collector("gather/#", qos=1)

    async def main():
        async with MqttTransport(settings(broker, "gather")) as t:
            sock = t._attached
            for i in range(600):
                t.publish_nowait("gather/t", str(i).encode(), qos=i % 2)
            assert sock.out_pending > 600 * 10  # all 600 gathered, none sent yet
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert sock.out_pending == 0
            t.publish_nowait("gather/t", b"600", qos=0)
            assert sock.out_pending > 0
            t.flush()  # now, not at the turn's end (the egress does so after a batch's answers)
            assert sock.out_pending == 0
            await until(lambda: not t._client._out_messages)  # every QoS 1 one acknowledged
            assert t.stats()["publish_errors"] == 0
    asyncio.run(main())
    got = [int(m.payload) for m in coll.wait_count(601, timeout=30)]
    assert [i for i in got if i % 2 == 0] == list(range(0, 601, 2))
    assert [i for i in got if i % 2] == list(range(1, 600, 2))


def test_closing_sends_what_was_gathered_and_disconnects_cleanly(broker, collector):
    """Publishes made right before close are gathered with the DISCONNECT; closing sends them
    first, so they arrive and the broker sees a clean disconnect (no last will)."""
    coll = collector("close/#", qos=1)
    from edgeml.transport.base import Publication

    async def main():
        will = Publication("close/will", b"gone", qos=1, retain=False)
        async with MqttTransport(settings(broker, "closing"), will=will) as t:
            for i in range(50):
                t.publish_nowait("close/t", str(i).encode(), qos=0)
            assert t._attached.out_pending > 0
    asyncio.run(main())
    publish_all(broker, [("close/marker", b"m")])  # after anything the close caused
    msgs = coll.wait_for(lambda ms: any(m.topic == "close/marker" for m in ms), timeout=20)
    assert [int(m.payload) for m in msgs if m.topic == "close/t"] == list(range(50))
    assert all(m.topic != "close/will" for m in msgs)


def test_a_write_that_fails_is_a_lost_connection_and_qos1_is_sent_again(broker, collector):
    """The connection breaks while gathered bytes wait: the failed send is handled as paho
    handles a failed write (closed, reconnected) and the QoS 1 publishes among the lost
    bytes are sent again after reconnecting."""
    import socket as socket_mod

    coll = collector("broken/#", qos=1)

    async def main():
        async with MqttTransport(settings(broker, "broken")) as t:
            for i in range(100):
                t.publish_nowait("broken/t", str(i).encode(), qos=1)
            t._attached.sock.shutdown(socket_mod.SHUT_WR)  # the next send fails (EPIPE)
            await until(lambda: t.stats()["disconnects"] >= 1 and t.connected)
            await until(lambda: not t._client._out_messages)
    asyncio.run(main())
    msgs = coll.wait_count(100, timeout=30)
    assert sorted({int(m.payload) for m in msgs}) == list(range(100))


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_the_buffered_packet_reader_never_raises_and_stops_where_paho_must_take_over(protocol):
    """Fuzz: random bytes, truncated and corrupted real packets. ``read_buffered`` takes only
    whole QoS 0/1 PUBLISH packets without properties and plain PUBACKs, never raises, never
    reads past the buffer, and leaves the buffer at the first packet it does not take."""
    import random

    rng = random.Random(7)
    got: list = []
    client = mqtt._PahoClient(paho.CallbackAPIVersion.VERSION2, client_id="fuzz",
                              protocol=protocol)
    client.manual_ack_set(True)
    client.deliver = lambda *a: got.append(a) or False

    def publish(topic: bytes, payload: bytes, qos: int, mid: int = 1) -> bytes:
        body = len(topic).to_bytes(2, "big") + topic
        if qos:
            body += mid.to_bytes(2, "big")
        if protocol == paho.MQTTv5:
            body += b"\x00"
        body += payload
        n, rl = len(body), b""
        while True:
            b, n = n % 128, n // 128
            rl += bytes([b | (0x80 if n else 0)])
            if not n:
                break
        return bytes([0x30 | (qos << 1)]) + rl + body

    good = [publish(b"s/%d" % i, bytes(rng.randrange(256) for _ in range(rng.randrange(300))),
                    i % 2, i + 1) for i in range(50)]
    stream = b"".join(good)
    sock = mqtt._BufferedSocket(None)
    sock._buf, sock._pos = stream, 0
    assert client.read_buffered(sock, 10_000) == 50 and sock._pos == len(stream)
    assert [g[0] for g in got] == [f"s/{i}" for i in range(50)]
    ends = [0]
    for g in good:
        ends.append(ends[-1] + len(g))
    for trial in range(3000):
        got.clear()
        cut = rng.randrange(len(stream))
        data = bytearray(stream[:cut])
        if trial % 2:  # corrupt a few bytes, or use pure noise
            for _ in range(rng.randrange(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            if trial % 5 == 0:
                data = bytearray(rng.randrange(256) for _ in range(rng.randrange(64)))
        sock._buf, sock._pos = bytes(data), 0
        n = client.read_buffered(sock, 10_000)
        assert 0 <= sock._pos <= len(data) and n >= len(got)
        if trial % 2 == 0:  # a clean cut: every whole packet taken, the partial one left
            whole = max(k for k, e in enumerate(ends) if e <= cut)
            assert n == len(got) == whole and sock._pos == ends[whole]
        for topic, payload, qos, _retain, _mid in got:
            assert isinstance(topic, str) and topic and "+" not in topic and "#" not in topic
            assert isinstance(payload, bytes) and qos in (0, 1)


def test_light_publish_handles_still_wait_for_their_own_acknowledgement():
    """The publish handles share one Condition: a thread blocked in ``wait_for_publish`` on
    one of them wakes when that one is acknowledged, whichever others are acknowledged first."""
    a, b = mqtt._MessageInfo(1), mqtt._MessageInfo(2)
    a.rc = b.rc = paho.MQTT_ERR_SUCCESS
    woke = threading.Event()

    def wait_b():
        b.wait_for_publish(timeout=5)
        woke.set()

    t = threading.Thread(target=wait_b)
    t.start()
    a._set_as_published()
    assert not woke.wait(0.05) and a.is_published() and not b.is_published()
    b._set_as_published()
    assert woke.wait(5) and b.is_published()
    t.join()


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_a_puback_that_says_success_is_settled_in_the_buffer_and_a_refusal_goes_to_paho(
        protocol):
    """Plain PUBACKs, and in MQTT 5 those with reason 0x10 ("no matching subscribers": every
    publish on a topic nobody reads yet) and no properties, settle their publish in the
    buffered pass; a refusal (0x87) stops the pass for paho to decode, and a three-byte
    PUBACK is malformed in MQTT 3.1.1, so paho gets that too."""
    client = mqtt._PahoClient(paho.CallbackAPIVersion.VERSION2, client_id="acks",
                              protocol=protocol)
    settled: list = []
    client.on_publish = lambda c, u, mid, rc, props: settled.append((mid, rc.value))
    for mid in (1, 2, 3, 4):
        m = paho.MQTTMessage(mid, b"t")
        m.qos, m.state = 1, paho.mqtt_ms_wait_for_puback
        client._out_messages[mid] = m
        client._inflight_messages += 1
    sock = mqtt._BufferedSocket(None)
    packets = [b"\x40\x02\x00\x01", b"\x40\x03\x00\x02\x10", b"\x40\x04\x00\x03\x00\x00",
               b"\x40\x03\x00\x04\x87"]
    sock._buf, sock._pos = b"".join(packets), 0
    n = client.read_buffered(sock, 100)
    if protocol == paho.MQTTv5:
        assert n == 3 and settled == [(1, 0x00), (2, 0x10), (3, 0x00)]
        assert list(client._out_messages) == [4]  # the refusal is paho's to decode
    else:
        assert n == 1 and settled == [(1, 0x00)]
    assert sock._pos == sum(len(p) for p in packets[:n])


def test_publishes_nobody_subscribed_to_settle_without_paho_decoding_their_pubacks(
        broker, monkeypatch):
    """On a real mosquitto over MQTT 5, QoS 1 publishes on a topic without subscribers come
    back with reason 0x10; they settle without an error, and none needs paho's decoder."""
    decoded: list = []
    original = paho.Client._handle_pubackcomp
    monkeypatch.setattr(paho.Client, "_handle_pubackcomp",
                        lambda self, cmd: decoded.append(cmd) or original(self, cmd))

    async def main():
        async with MqttTransport(settings(broker, "nobody", protocol="5")) as t:
            for i in range(300):
                t.publish_nowait("nobody/reads/this", str(i).encode(), qos=1)
            await t.publish("nobody/reads/this", b"last", qos=1, timeout=20)
            await until(lambda: not t._client._out_messages)
            assert t.stats()["publish_errors"] == 0
    asyncio.run(main())
    assert decoded == []


def test_the_window_releases_the_oldest_waiting_publish_and_follows_a_reconnect_reset():
    """Publishes beyond the in-flight window wait in order; each acknowledgement sends the
    oldest waiting one (found without walking the window). A reconnect's reset decides
    anew which wait, and the queue of waiting ones follows it."""
    client = mqtt._PahoClient(paho.CallbackAPIVersion.VERSION2, client_id="window")
    client.max_inflight_messages_set(3)
    client.max_queued_messages_set(0)
    sent: list[int] = []
    client._send_publish = lambda mid, *a, **k: sent.append(mid) or paho.MQTT_ERR_SUCCESS
    client._topics["w/t"] = b"w/t"
    mids = [client.publish("w/t", str(i).encode(), qos=1).mid for i in range(8)]
    assert sent == mids[:3] and list(client._queued) == mids[3:]
    client._do_on_publish(mids[1], paho.ReasonCode(paho.PacketTypes.PUBACK), None)
    assert sent == mids[:4]  # the oldest waiting one, and only it
    # a reconnect: paho's reset marks every held message to be resent on CONNACK, so none
    # waits for the window any more, and none is sent twice
    client._messages_reconnect_reset_out()
    assert not client._queued
    assert {m.state for m in client._out_messages.values()} == {paho.mqtt_ms_publish}
    client._update_inflight()
    assert sent == mids[:4]


def test_a_publish_refused_for_want_of_packet_ids_says_so(broker):
    """When every packet id is held by a QoS 1 message the broker has not acknowledged yet
    (a flood it cannot keep up with), a further publish is refused with an error that says
    so, counted, and the connection carries on."""
    async def main():
        async with MqttTransport(settings(broker, "ids")) as t:
            client = t._client
            real = client._mid_generate
            t.publish_nowait("ids/t", b"first", qos=1)  # waits for its PUBACK until we yield
            client._mid_generate = lambda: next(iter(client._out_messages))  # ids all taken
            with pytest.raises(PublishError, match="wait for the broker's acknowledgement"):
                t.publish_nowait("ids/t", b"second", qos=1)
            assert t.stats()["publish_errors"] == 1
            client._mid_generate = real
            await t.publish("ids/t", b"third", qos=1, timeout=10)
    asyncio.run(main())


@pytest.mark.parametrize(("protocol", "in_flight"), [("5", 5), ("3.1.1", 60)])
def test_the_brokers_receive_maximum_caps_the_in_flight_window(broker_factory, collector,
                                                              protocol, in_flight):
    """An MQTT 5 broker announces how many QoS 1 publishes it takes unacknowledged (mosquitto:
    its max_inflight_messages); the client sends no more than that at a time, whatever its
    own window, and queues the rest. MQTT 3.1.1 has no such limit. Everything arrives."""
    b = broker_factory("receive-max", extra_config="max_inflight_messages 5\n")
    b.start()
    coll = collector("rm/#", qos=1, broker=b)

    async def main():
        async with MqttTransport(settings(b, f"rm-{protocol}", protocol=protocol,
                                          max_inflight=100)) as t:
            assert t.receive_maximum == (5 if protocol == "5" else None)
            for i in range(60):
                t.publish_nowait("rm/t", str(i).encode(), qos=1)
            assert t._client._inflight_messages == in_flight  # before any PUBACK is read
            await t.publish("rm/t", b"60", qos=1, timeout=30)
            assert t.stats()["publish_errors"] == 0
    asyncio.run(main())
    assert [int(m.payload) for m in coll.wait_count(61, timeout=30)] == list(range(61))


def test_what_waited_offline_goes_out_within_the_brokers_receive_maximum(broker_factory,
                                                                         collector):
    """QoS 1 messages kept while the broker was away are sent again after the reconnect at
    most a Receive Maximum at a time (paho alone marks every one of them for sending at
    once, which a strict MQTT 5 broker answers with a disconnect), the birth first, then
    the rest in order as acknowledgements come back."""
    b = broker_factory("rm-reconnect", extra_config="max_inflight_messages 5\n")
    b.start()
    coll = collector("rm/#", qos=1, broker=b, client_id="rm-collector", clean=False)

    async def main():
        t = MqttTransport(settings(b, "rm-offline", protocol="5", max_inflight=100))
        t.set_birth([Publication("rm/birth", b"online", qos=1)])
        async with t:
            b.stop()
            await until(lambda: not t.connected)
            for i in range(60):
                t.publish_nowait("rm/t", str(i).encode(), qos=1)
            b.start()
            seen = 0
            while t._client._out_messages or not t.connected:
                if t.connected:  # paho has sent what it sends on the CONNACK by now
                    seen = max(seen, t._client._inflight_messages)
                await asyncio.sleep(0.001)
            assert t.receive_maximum == 5
            assert 0 < seen <= 5
            assert t.stats()["publish_errors"] == 0
    asyncio.run(main())
    got = coll.wait_for(lambda ms: sum(m.topic == "rm/t" for m in ms) >= 60)
    assert [int(m.payload) for m in got if m.topic == "rm/t"] == list(range(60))
    assert [m.topic for m in got].index("rm/birth") < [m.topic for m in got].index("rm/t")
