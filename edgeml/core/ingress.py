"""The ingress stage: route -> decode -> dead-letter -> archive -> assemble -> enqueue -> ack.

Everything a message needs before scoring happens here, in that order, and nothing here
looks back: rejected input leaves as a dead letter, accepted input is archived in the
pipeline's raw-input log *before* its QoS 1 acknowledgement, and rows go on to the pipeline's
scoring queue. Messages on control topics are handed to control untouched.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeml.config import PipelineConfig
from edgeml.core.assemble import Assembler, Row
from edgeml.errors import DecodeError, TransportError
from edgeml.topics import matches as topic_matches
from edgeml.transport.base import Message, Transport

log = logging.getLogger("edgeml.core.ingress")

DLQ_PAYLOAD_COPY = 1024  # bytes of a rejected payload copied into its dead-letter record
ROUTE_CACHE_MAX = 50_000


@dataclass
class Inlet:
    """One pipeline's front half: its decoder/assembler, archive and scoring queue."""

    config: PipelineConfig
    assembler: Assembler
    rawlog: Any
    enqueue: Callable[[Sequence[Row]], int]
    stats: Any  # the pipeline's PipelineStats: received / accepted / rejected counters


def dead_letter(device: str, pipeline: str, m: Message, exc: DecodeError) -> bytes:
    """The dead-letter record for a rejected message (docs/topics.md)."""
    copy = m.payload[:DLQ_PAYLOAD_COPY]
    rec = {
        "device": device, "pipeline": pipeline, "topic": m.topic,
        "reason": exc.reason, "detail": exc.detail, "ts": m.received,
        "payload_bytes": len(m.payload), "truncated": len(m.payload) > len(copy),
        "payload_b64": base64.b64encode(copy).decode(),
    }
    return json.dumps(rec, separators=(",", ":"), default=str).encode()


class Ingress:
    """Turns bursts of received messages into archived, queued rows."""

    def __init__(self, inlets: Sequence[Inlet], *, device: str, dlq_topic: str,
                 control: Any = None) -> None:
        self.inlets = list(inlets)
        self.device = device
        self.dlq_topic = dlq_topic
        self.control = control  # .handles(topic) / .submit(message)
        self._routes: dict[str, list[Inlet]] = {}
        self.dead_letters = 0
        self.dead_letters_lost = 0

    def route(self, topic: str) -> list[Inlet]:
        hit = self._routes.get(topic)
        if hit is None:
            hit = [i for i in self.inlets
                   if any(topic_matches(f, topic) for f in i.config.topics)]
            if len(self._routes) > ROUTE_CACHE_MAX:
                self._routes.clear()
            self._routes[topic] = hit
        return hit

    async def run(self, transport: Transport) -> None:
        async for msgs in transport.batches(1024):
            try:
                self.handle(transport, msgs)
            except Exception:  # never let one burst take the daemon down
                log.exception("dispatch failed for a burst of %d message(s)", len(msgs))
                for m in msgs:
                    transport.ack(m)

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
                    st.rejected += 1
                    st.rejected_by_reason[exc.reason] += 1
                    try:
                        transport.publish_nowait(
                            self.dlq_topic, dead_letter(self.device, inlet.config.name, m, exc),
                            qos=1)
                        self.dead_letters += 1
                    except TransportError as pub_exc:
                        self.dead_letters_lost += 1
                        log.warning("dead letter from %s not published: %s", m.topic, pub_exc)
                    log.info("dead letter from %s: %s", m.topic, exc)
                    continue
                per_inlet.setdefault(id(inlet), (inlet, []))[1].append((m, decoded))
        for inlet, items in per_inlet.values():
            seqs = inlet.rawlog.append_many([(m.topic, m.payload, m.received)
                                             for m, _ in items])
            rows: list[Row] = []
            for (m, decoded), seq in zip(items, seqs, strict=True):
                rows += inlet.assembler.feed_decoded(m.topic, decoded, seq, m.received)
            inlet.stats.accepted += len(items)
            if rows:
                inlet.enqueue(rows)
        for m in msgs:  # acknowledged only now: accepted input is in the raw-input log
            transport.ack(m)
