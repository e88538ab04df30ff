"""The ingress stage: route -> decode -> dead-letter -> archive -> assemble -> enqueue -> ack.

Everything a message needs before scoring happens here, in that order, and nothing here
looks back: rejected input leaves as a dead letter, accepted input is archived in the
pipeline's raw-input log *before* its QoS 1 acknowledgement, and rows go on to the pipeline's
scoring queue. Messages on control topics are handed to control untouched.

A fault costs exactly the message that caused it: anything that goes wrong while decoding or
assembling one message dead-letters that message alone. When the archive cannot write (disk
full, I/O error) the stage holds what it received, unacknowledged, in a bounded buffer and
stops acknowledging sensor input: the broker keeps further QoS 1 messages in the device's
persistent session (within its own limits). It retries on its own and carries on where it
stopped once the archive writes again; control messages are handled throughout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeml.config import PipelineConfig
from edgeml.core.assemble import Assembler, Row
from edgeml.errors import DecodeError, RawLogError, TransportError
from edgeml.topics import matches as topic_matches
from edgeml.transport.base import Message, Transport

log = logging.getLogger("edgeml.core.ingress")

DLQ_PAYLOAD_COPY = 1024  # bytes of a rejected payload copied into its dead-letter record
ROUTE_CACHE_MAX = 50_000
HOLD_MAX_MESSAGES = 10_000  # received while the archive cannot write; beyond: oldest dropped
HOLD_MAX_BYTES = 32 * 2**20
ARCHIVE_RETRY_S = 1.0


@dataclass
class Inlet:
    """One pipeline's front half: its decoder/assembler, archive and scoring queue."""

    config: PipelineConfig
    assembler: Assembler
    rawlog: Any
    enqueue: Callable[..., int]
    stats: Any  # the pipeline's PipelineStats: received / accepted / rejected counters
    #: the scoring queue's fill (``.full``, ``await .wait_room()``): QoS 1 input is not shed
    #: when it is full, its acknowledgements wait instead (None: always shed by policy)
    backlog: Any = None


def dead_letter(device: str, pipeline: str, m: Message, reason: str, detail: str,
                seq: int | None = None) -> bytes:
    """The dead-letter record for a rejected message (docs/topics.md)."""
    copy = m.payload[:DLQ_PAYLOAD_COPY]
    rec = {
        "device": device, "pipeline": pipeline, "topic": m.topic,
        "reason": reason, "detail": detail, "ts": m.received,
        "payload_bytes": len(m.payload), "truncated": len(m.payload) > len(copy),
        "payload_b64": base64.b64encode(copy).decode(),
    }
    if seq is not None:
        rec["input_seq"] = seq  # archived before it failed: replayable
    return json.dumps(rec, separators=(",", ":"), default=str).encode()


class Ingress:
    """Turns bursts of received messages into archived, queued rows."""

    def __init__(self, inlets: Sequence[Inlet], *, device: str, dlq_topic: str,
                 control: Any = None,
                 alert: Callable[[str, str, dict], None] | None = None) -> None:
        self.inlets = list(inlets)
        self.device = device
        self.dlq_topic = dlq_topic
        self.control = control  # .handles(topic) / .submit(message)
        self._alert = alert
        self._routes: dict[str, list[Inlet]] = {}
        self.dead_letters = 0
        self.dead_letters_lost = 0
        # the archive cannot write: held messages, in arrival order, not acknowledged
        self.paused_since: float | None = None
        self.archive_error: str | None = None
        self._held: collections.deque[tuple[Inlet, Message, Any]] = collections.deque()
        self._held_bytes = 0
        self._waiting: dict[int, list] = {}  # id(message) -> [message, holds outstanding]
        self.held_dropped = 0
        self.pauses = 0
        self._transport: Transport | None = None
        self._out: Transport | None = None  # where dead letters are published
        self._wake = asyncio.Event()
        # archived QoS 1 input whose acks wait for room in a full scoring queue, in order
        self._deferred: list[Message] = []
        self._deferred_for: set[int] = set()  # id() of the inlets they wait for
        self._none_deferred = asyncio.Event()
        self._none_deferred.set()
        self._inlets_by_id: dict[int, Inlet] = {id(i): i for i in self.inlets}
        self._deferred_wake = asyncio.Event()
        self.ack_holds = 0

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def archive_status(self) -> dict:
        return {"paused": self.paused, "paused_s": round(time.time() - self.paused_since, 3)
                if self.paused_since else None, "held": len(self._held),
                "held_bytes": self._held_bytes, "held_dropped": self.held_dropped,
                "pauses": self.pauses, "error": self.archive_error,
                "acks_waiting_for_queue": len(self._deferred), "ack_holds": self.ack_holds}

    def route(self, topic: str) -> list[Inlet]:
        hit = self._routes.get(topic)
        if hit is None:
            hit = [i for i in self.inlets
                   if any(topic_matches(f, topic) for f in i.config.topics)]
            if len(self._routes) > ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[topic] = hit
        return hit

    async def run(self, transport: Transport, out: Transport | None = None) -> None:
        """Take bursts from ``transport`` (and acknowledge them there); dead letters go out
        on ``out`` (the device's publishing connection; ``transport`` when None)."""
        self._transport = transport
        self._out = out
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._retry_archive(transport), name="archive-retry")
            tg.create_task(self._ack_deferred(transport), name="ack-deferred")
            async for msgs in transport.batches(1024):
                try:
                    self.handle(transport, msgs)
                except Exception:  # a bug here: say so loudly, and ack nothing unarchived
                    log.exception("ingress failed for a burst of %d message(s)", len(msgs))
                if self._deferred:
                    # QoS 1 input waits for room in a full scoring queue: take nothing more
                    # meanwhile, so the transport stops reading and the broker holds the rest
                    # (memory stays bounded however large the broker's window is)
                    await self._none_deferred.wait()
                for inlet in self.inlets:
                    backlog = inlet.backlog
                    if backlog is not None and getattr(backlog, "waits", False) and backlog.full:
                        # queue policy "wait": read no further than scoring can take; what
                        # the device cannot score is never read, so never archived and shed
                        inlet.stats.queue_waits += 1
                        await backlog.wait_room()

    # ---- one burst -------------------------------------------------------------------------
    def handle(self, transport: Transport, msgs: list[Message]) -> None:
        per_inlet: dict[int, tuple[Inlet, list[tuple[Message, Any]]]] = {}
        for m in msgs:
            inlets = self.route(m.topic)
            if not inlets:
                if self.control is not None and self.control.handles(m.topic):
                    self.control.submit(m)
                continue
            for inlet in inlets:
                st = inlet.stats
                st.received += 1
                try:
                    decoded = inlet.assembler.decoder.decode(m.payload)
                except DecodeError as exc:
                    self._reject(transport, inlet, m, exc.reason, exc.detail)
                    continue
                except Exception as exc:  # a decoder bug must cost this message only
                    log.exception("decoding a message from %s failed", m.topic)
                    self._reject(transport, inlet, m, "decode_failed",
                                 f"{type(exc).__name__}: {exc}")
                    continue
                per_inlet.setdefault(id(inlet), (inlet, []))[1].append((m, decoded))
        full: list[Inlet] = []
        for inlet, items in per_inlet.values():
            # QoS 1 input is flow-controlled by its acks, so it is never shed here
            hold = inlet.backlog is not None and all(m.qos > 0 for m, _ in items)
            if self.paused or not self._archive(transport, inlet, items, hold=hold):
                self._hold(inlet, items)
            elif hold and inlet.backlog.full:
                full.append(inlet)
        # acknowledged only now, in one write, and only what is archived or rejected
        waiting = self._waiting
        ackable = [m for m in msgs if id(m) not in waiting] if waiting else msgs
        if full or self._deferred:  # a full queue: the broker waits (acks stay in order)
            if not self._deferred:
                self.ack_holds += 1
            self._deferred += [m for m in ackable if m.qos > 0]
            if self._deferred:
                self._none_deferred.clear()
            self._deferred_for.update(id(i) for i in full)
            self._deferred_wake.set()
        else:
            transport.ack_many(ackable)

    def _reject(self, transport: Transport, inlet: Inlet, m: Message, reason: str,
                detail: str, seq: int | None = None) -> None:
        st = inlet.stats
        st.rejected += 1
        st.rejected_by_reason[reason] += 1
        try:
            (self._out or transport).publish_nowait(self.dlq_topic, dead_letter(
                self.device, inlet.config.name, m, reason, detail, seq), qos=1)
            self.dead_letters += 1
        except TransportError as exc:
            self.dead_letters_lost += 1
            log.warning("dead letter from %s not published: %s", m.topic, exc)
        log.info("dead letter from %s: %s: %s", m.topic, reason, detail)

    def _archive(self, transport: Transport, inlet: Inlet,
                 items: list[tuple[Message, Any]], *, hold: bool = False) -> bool:
        """Archive, assemble and queue ``items``; False (nothing archived) when the archive
        cannot write, after pausing."""
        try:
            seqs = inlet.rawlog.append_many([(m.topic, m.payload, m.received)
                                             for m, _ in items])
        except (OSError, RawLogError) as exc:
            self._pause(inlet, exc)
            return False
        rows: list[Row] = []
        for (m, decoded), seq in zip(items, seqs, strict=True):
            inlet.stats.sequence.observe(m.topic, decoded.ids)  # the sender's numbering
            try:
                rows += inlet.assembler.feed_decoded(m.topic, decoded, seq, m.received)
            except Exception as exc:  # archived, but cannot become rows: this one alone
                log.exception("assembling seq %d from %s failed", seq, m.topic)
                self._reject(transport, inlet, m, "assembly_failed",
                             f"{type(exc).__name__}: {exc}", seq)
                continue
            inlet.stats.accepted += 1
        if rows:
            if hold:
                inlet.enqueue(rows, hold=True)
            else:
                inlet.enqueue(rows)
        return True

    async def _ack_deferred(self, transport: Transport) -> None:
        """Acknowledge held QoS 1 input once every scoring queue it waits for has room."""
        while True:
            await self._deferred_wake.wait()
            self._deferred_wake.clear()
            while self._deferred:
                for key in list(self._deferred_for):
                    inlet = self._inlets_by_id.get(key)
                    if inlet is not None and inlet.backlog is not None:
                        await inlet.backlog.wait_room()
                    self._deferred_for.discard(key)
                if self._deferred_for:
                    continue  # a queue filled up again while waiting for another
                batch, self._deferred = self._deferred, []
                transport.ack_many(batch)
            self._none_deferred.set()

    # ---- the archive cannot write ------------------------------------------------------------
    def _pause(self, inlet: Inlet, exc: Exception) -> None:
        self.archive_error = f"{inlet.config.name}: {exc}"
        if self.paused:
            return
        self.paused_since = time.time()
        self.pauses += 1
        log.error("the raw-input log cannot write (%s): holding sensor input unacknowledged "
                  "and retrying every %g s", self.archive_error, ARCHIVE_RETRY_S)
        if self._alert is not None:
            self._alert(inlet.config.name, "archive_paused", {"error": str(exc)})
        self._wake.set()

    def _hold(self, inlet: Inlet, items: list[tuple[Message, Any]]) -> None:
        for m, decoded in items:
            entry = self._waiting.setdefault(id(m), [m, 0])
            entry[1] += 1
            self._held.append((inlet, m, decoded))
            self._held_bytes += len(m.payload)
        while self._held and (len(self._held) > HOLD_MAX_MESSAGES
                              or self._held_bytes > HOLD_MAX_BYTES):
            _, m, _ = self._held.popleft()
            self._held_bytes -= len(m.payload)
            self._release(m, ack=False)  # never acked: a QoS 1 message comes back later
            self.held_dropped += 1

    def _release(self, m: Message, *, ack: bool) -> None:
        entry = self._waiting.get(id(m))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._waiting[id(m)]
            if ack and self._transport is not None:
                self._transport.ack(m)

    def flush_held(self, transport: Transport) -> bool:
        """Try to archive what is held, oldest first; True once nothing is held."""
        while self._held:
            inlet = self._held[0][0]
            batch: list[tuple[Message, Any]] = []
            while self._held and self._held[0][0] is inlet and len(batch) < 1024:
                _, m, decoded = self._held.popleft()
                batch.append((m, decoded))
            if not self._archive(transport, inlet, batch):
                for m, decoded in reversed(batch):
                    self._held.appendleft((inlet, m, decoded))
                return False
            for m, _ in batch:
                self._held_bytes -= len(m.payload)
                self._release(m, ack=True)
        return True

    async def _retry_archive(self, transport: Transport) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.paused:
                await asyncio.sleep(ARCHIVE_RETRY_S)
                if self.flush_held(transport):
                    was = self.paused_since or time.time()
                    self.paused_since = None
                    self.archive_error = None
                    log.warning("the raw-input log writes again after %.1f s; input resumed",
                                time.time() - was)
                    if self._alert is not None:
                        self._alert("*", "archive_resumed", {
                            "paused_s": round(time.time() - was, 3),
                            "held_dropped": self.held_dropped})
