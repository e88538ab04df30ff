"""The deploy wire format and reassembly, without a broker: chunking, reassembly, refusals."""

from __future__ import annotations

import json
import os
import random

import pytest

from edgeml.control.protocol import (
    MIN_CHUNK_SIZE,
    Delivery,
    DeployHeader,
    Ignored,
    Reassembler,
    Refused,
    chunk_topic,
    deploy_topic,
    frame,
    plan_push,
    sha256_hex,
    unframe,
)
from edgeml.errors import DeployError

BASE = "edgeml/dev1/deploy"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def feed_all(r: Reassembler, messages, **kw) -> list:
    out = []
    for topic, payload in messages:
        out += r.feed(BASE, topic, payload, **kw)
    return out


def test_topics() -> None:
    assert deploy_topic("edgeml", device="d1") == "edgeml/d1/deploy"
    assert deploy_topic("edgeml", group="g") == "edgeml/group/g/deploy"
    assert chunk_topic("edgeml/d1/deploy", "ab", 3) == "edgeml/d1/deploy/chunk/ab/3"
    with pytest.raises(ValueError):
        deploy_topic("edgeml", device="d", group="g")


def test_small_bundle_is_one_message() -> None:
    data = blob(5000)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=8192)
    assert len(plan.messages) == 1 and plan.messages[0][0] == BASE
    meta, body = unframe(plan.messages[0][1])
    assert meta["kind"] == "bundle" and body == data and meta["sha256"] == sha256_hex(data)
    events = Reassembler(max_bundle_bytes=10_000).feed(BASE, BASE, plan.messages[0][1])
    assert len(events) == 1 and isinstance(events[0], Delivery)
    assert events[0].data == data
    events[0].check()


def test_chunked_round_trip_in_any_order_with_duplicates() -> None:
    data = blob(10 * 1024 + 17)
    plan = plan_push(data, base=BASE, name="m", version="2", chunk_size=MIN_CHUNK_SIZE * 2,
                     role="shadow", pipeline="p")
    assert plan.header.chunks == 6 and len(plan.messages) == 7
    assert plan.chunk_topics[0] == f"{BASE}/chunk/{plan.header.transfer}/0"
    header, chunks = plan.messages[0], list(plan.messages[1:])
    random.Random(3).shuffle(chunks)
    r = Reassembler(max_bundle_bytes=1 << 20)
    events = feed_all(r, [header, *chunks[:3], *chunks[:2], *chunks[3:]])  # QoS 1 duplicates
    assert len(events) == 1 and isinstance(events[0], Delivery)
    d = events[0]
    assert d.data == data and d.header.role == "shadow" and d.header.pipeline == "p"
    d.check()
    assert r.pending() == []
    # a late redelivered chunk of the finished transfer is dropped, not kept as an orphan
    assert feed_all(r, chunks[:1]) == [] and r._orphan_bytes == 0


def test_chunks_before_header_are_adopted() -> None:
    """Retained chunks may reach a device that comes online before the retained header."""
    data = blob(4 * 1024)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    r = Reassembler(max_bundle_bytes=1 << 20)
    assert feed_all(r, plan.messages[1:], retained=True) == []
    events = feed_all(r, plan.messages[:1], retained=True)
    assert len(events) == 1 and isinstance(events[0], Delivery) and events[0].data == data
    assert events[0].retained


def test_header_over_the_size_limit_is_refused_before_any_chunk() -> None:
    data = blob(8 * 1024)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    r = Reassembler(max_bundle_bytes=4096)
    events = feed_all(r, plan.messages)
    assert len(events) == 1 and isinstance(events[0], Refused)
    assert "over the device's limit of 4096 bytes" in events[0].reason
    assert r.pending() == [] and r._orphan_bytes == 0  # the chunks were not kept
    # and a single-message bundle over the limit too, from its declared size
    small = plan_push(data, base=BASE, name="m", version="1", chunk_size=16 * 1024)
    events = feed_all(r, small.messages)
    assert isinstance(events[0], Refused) and "over the device's limit" in events[0].reason


def test_corrupt_chunk_refuses_the_transfer() -> None:
    data = blob(4 * 1024)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    msgs = list(plan.messages)
    meta, body = unframe(msgs[2][1])
    msgs[2] = (msgs[2][0], frame(meta, bytes([body[0] ^ 1]) + body[1:]))
    r = Reassembler(max_bundle_bytes=1 << 20)
    events = feed_all(r, msgs)
    assert len(events) == 1 and isinstance(events[0], Refused)
    assert "chunk 1 sha256 does not match" in events[0].reason
    assert r.pending() == []


def test_truncated_chunk_is_refused() -> None:
    data = blob(4 * 1024)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    topic, payload = plan.messages[1]
    events = feed_all(Reassembler(max_bundle_bytes=1 << 20),
                      [plan.messages[0], (topic, payload[:-100])])
    assert isinstance(events[0], Refused) and "carries 924 bytes, expected 1024" in \
        events[0].reason


def test_missing_chunk_times_out_with_what_is_missing() -> None:
    clock = Clock()
    data = blob(5 * 1024)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE,
                     timeout_s=2)
    r = Reassembler(max_bundle_bytes=1 << 20, clock=clock)
    msgs = [m for i, m in enumerate(plan.messages) if i not in (3, 4)]  # chunks 2 and 3 lost
    assert feed_all(r, msgs) == []
    assert r.pending()[0]["received"] == 3
    clock.now += 1.5
    assert r.expire() == []
    clock.now += 1.0
    events = r.expire()
    assert len(events) == 1 and isinstance(events[0], Refused)
    assert "timed out" in events[0].reason and "received 3 of 5 chunks (missing 2-3)" in \
        events[0].reason
    assert r.pending() == []


def test_new_header_interrupts_a_transfer_in_flight() -> None:
    a = plan_push(blob(4096, 1), base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    b = plan_push(blob(4096, 2), base=BASE, name="m", version="2", chunk_size=MIN_CHUNK_SIZE)
    r = Reassembler(max_bundle_bytes=1 << 20)
    assert feed_all(r, a.messages[:3]) == []
    events = feed_all(r, b.messages)
    assert isinstance(events[0], Refused) and "interrupted after 2 of 4 chunks" in \
        events[0].reason and events[0].header.version == "1"
    assert isinstance(events[1], Delivery) and events[1].header.version == "2"
    # chunks of the interrupted transfer that arrive late change nothing
    assert feed_all(r, a.messages[3:]) == []


def test_check_hook_can_ignore_or_refuse() -> None:
    plan = plan_push(blob(4096), base=BASE, name="m", version="1", chunk_size=MIN_CHUNK_SIZE)
    r = Reassembler(max_bundle_bytes=1 << 20)
    events = feed_all(r, plan.messages, check=lambda h: f"{h.name} {h.version} is active")
    assert len(events) == 1 and isinstance(events[0], Ignored)
    assert events[0].reason == "m 1 is active" and r._orphan_bytes == 0

    def refuse(h: DeployHeader) -> None:
        raise DeployError("verified", "no pipeline 'x'")
    plan2 = plan_push(blob(4096, 5), base=BASE, name="m", version="2", chunk_size=1024)
    events = feed_all(r, plan2.messages, check=refuse)
    assert len(events) == 1 and isinstance(events[0], Refused)
    assert events[0].stage == "verified" and "no pipeline" in events[0].reason


def test_whole_bundle_hash_is_checked() -> None:
    data = blob(3000)
    plan = plan_push(data, base=BASE, name="m", version="1", chunk_size=8192)
    meta, body = unframe(plan.messages[0][1])
    meta["sha256"] = sha256_hex(b"something else")
    events = Reassembler(max_bundle_bytes=1 << 20).feed(BASE, BASE, frame(meta, body))
    with pytest.raises(DeployError, match="does not match the header"):
        events[0].check()


def test_bare_zip_is_accepted_and_garbage_is_refused() -> None:
    zipped = b"PK\x03\x04" + blob(100)
    events = Reassembler(max_bundle_bytes=1000).feed(BASE, BASE, zipped)
    assert isinstance(events[0], Delivery) and events[0].header.name is None
    assert events[0].header.sha256 == sha256_hex(zipped)
    events = Reassembler(max_bundle_bytes=50).feed(BASE, BASE, zipped)
    assert isinstance(events[0], Refused) and "over the device's limit" in events[0].reason
    for payload, why in [(b"\x00\x01binary", "JSON line"), (b'{"kind": "zip"}\n', "kind"),
                         (b"[1, 2]\n", "JSON object"),
                         (frame({"kind": "bundle", "transfer": "t", "size": 10,
                                 "sha256": "0" * 64}, b"12345"), "truncated")]:
        events = Reassembler(max_bundle_bytes=1000).feed(BASE, BASE, payload)
        assert isinstance(events[0], Refused) and why in events[0].reason, events
    assert Reassembler(max_bundle_bytes=1000).feed(BASE, BASE, b"") == []  # cleared retained


@pytest.mark.parametrize("bad,why", [
    ({"transfer": "../x"}, "transfer"), ({"sha256": "XYZ"}, "sha256"), ({"size": 0}, "size"),
    ({"role": "boss"}, "role"), ({"chunks": 2}, "cannot hold"), ({"name": "a/b"}, "name"),
    ({"v": 2}, "protocol version"), ({"chunk_size": 10}, "chunk_size"),
    ({"timeout_s": -1}, "timeout_s"),
])
def test_header_validation_names_the_key(bad: dict, why: str) -> None:
    good = {"v": 1, "kind": "header", "transfer": "abc", "size": 5000, "sha256": "a" * 64,
            "chunks": 5, "chunk_size": 1024, "name": "m", "version": "1"}
    with pytest.raises(DeployError, match=why):
        DeployHeader.from_dict({**good, **bad})
    assert DeployHeader.from_dict(good).chunk_len(4) == 5000 - 4 * 1024


def test_orphans_are_bounded_and_expire() -> None:
    clock = Clock()
    r = Reassembler(max_bundle_bytes=3000, clock=clock)
    for i in range(10):
        meta = {"kind": "chunk", "transfer": f"t{i}", "index": 0, "sha256": "x"}
        r.feed(BASE, f"{BASE}/chunk/t{i}/0", frame(meta, os.urandom(1000)))
    assert r._orphan_bytes <= 3000
    clock.now += 31
    r.expire()
    assert r._orphan_bytes == 0 and not r._orphans


def test_header_json_is_one_line() -> None:
    plan = plan_push(blob(3000), base=BASE, name="m", version="1", chunk_size=1024,
                     priority=5, force=True)
    line = plan.messages[0][1].split(b"\n", 1)[0]
    meta = json.loads(line)
    assert meta["priority"] == 5 and meta["force"] is True and meta["kind"] == "header"
    h = DeployHeader.from_dict(meta)
    assert h.priority == 5 and h.force and h.chunks == 3
