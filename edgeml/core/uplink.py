"""The uplink: drains the outbox to the upstream broker, one batch per QoS 1 message.

A record leaves the outbox only after the broker acknowledged (PUBACK) the message that
carried it, so delivery is at-least-once: a crash between the PUBACK and the local delete sends
the batch again, with the same record ids, and upstream drops the duplicates by id.

One batch is in flight at a time, so memory stays bounded however long the broker is away.
While the link is down paho reconnects on its own (with the ``BrokerSettings`` backoff) and
resends the batch in flight; the uplink only checks the connection flag every ``retry_min_s``.
Errors (a refused publish, the outbox failing) back off exponentially from ``retry_min_s`` to
``retry_max_s``. Streams are served strictly by priority; within a stream, in insertion order.

Failover: given several :class:`BrokerSettings` (``[upstream] urls``), the uplink connects to
the first; when the link has been down for ``failover_after_s`` (or never came up) it closes
that client and tries the next, in order, wrapping around. The batch in flight is simply sent
again on the new connection (its records stay in the outbox until a PUBACK), so a switch can
duplicate a batch upstream but never lose one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from edgeml.errors import OutboxError, TransportError
from edgeml.storage.outbox import Outbox, OutboxChunk
from edgeml.transport.base import Transport
from edgeml.transport.settings import BrokerSettings
from edgeml.validate import Table

log = logging.getLogger("edgeml.core.uplink")

SCHEMA = 1
FORMATS = ("msgpack", "json")
_TOPIC_LEVEL = re.compile(r"[^/+#]+")
_TOPIC_PREFIX = re.compile(r"[^+#]+")



def _json_default(obj: object) -> object:
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _records_of(chunk: OutboxChunk) -> list[dict[str, Any]]:
    try:
        records = chunk.records()
    except (ValueError, msgpack.UnpackException) as exc:  # a damaged row: say so, go on
        return [{"record_id": chunk.chunk_id, "error": f"undecodable chunk: {exc}"}]
    return [r if isinstance(r, dict) else {"value": r} for r in records]


class Uplink:
    """``await Uplink(outbox, client_or_settings, topic_prefix=..., device_id=...).run()``.

    ``client``: an entered :class:`Transport` the caller owns (enter it with
    ``require_connection=False`` so an upstream that is away at start does not stop the device),
    or :class:`BrokerSettings` (or several, tried in order: failover), in which case the uplink
    makes, enters and closes its own clients with ``connector`` (default: MQTT).
    Publishes to ``{topic_prefix}/{device_id}/sync/{stream}``.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: Transport | BrokerSettings | Sequence[BrokerSettings],
        *,
        topic_prefix: str,
        device_id: str,
        batch_max_records: int = 500,
        batch_max_bytes: int = 256 * 1024,
        batch_max_wait_s: float = 0.5,
        bandwidth_bytes_per_s: float | None = None,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        ack_timeout_s: float = 30.0,
        alert_interval_s: float = 10.0,
        format: str = "msgpack",
        failover_after_s: float = 10.0,
        connector: Callable[..., Transport] | None = None,
    ) -> None:
        # the same checks (and messages) as a config file's [sync] table gets
        args = Table({"batch_max_records": batch_max_records, "batch_max_bytes": batch_max_bytes,
                      "batch_max_wait_s": batch_max_wait_s,
                      "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
                      "retry_min_s": retry_min_s, "retry_max_s": retry_max_s,
                      "ack_timeout_s": ack_timeout_s, "alert_interval_s": alert_interval_s,
                      "format": format, "failover_after_s": failover_after_s}, "sync")
        args.int("batch_max_records", min=1)
        for key in ("batch_max_bytes", "batch_max_wait_s", "retry_min_s", "ack_timeout_s",
                    "alert_interval_s", "failover_after_s"):
            args.number(key, min=0, min_open=True)
        args.number("bandwidth_bytes_per_s", None, min=0, min_open=True)
        args.number("retry_max_s", min=retry_min_s)
        args.choice("format", FORMATS)
        Table({"device_id": device_id}).str("device_id", pattern=_TOPIC_LEVEL,
                                            what="one MQTT topic level")
        Table({"topic_prefix": topic_prefix}).str("topic_prefix", pattern=_TOPIC_PREFIX,
                                                  what="a topic without wildcards")
        self.outbox = outbox
        if isinstance(client, BrokerSettings):
            client = [client]
        if isinstance(client, Sequence):
            if not client:
                raise ValueError("no upstream to connect to")
            self._given: Transport | None = None
            self._upstreams: tuple[BrokerSettings, ...] = tuple(client)
        else:
            self._given = client
            self._upstreams = ()
        self._connector = connector
        self.failover_after_s = float(failover_after_s)
        self._current = 0  # index into _upstreams
        self.failovers = 0
        self.topic_prefix = topic_prefix
        self.device_id = device_id
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = int(batch_max_bytes)
        self.batch_max_wait_s = float(batch_max_wait_s)
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.retry_min_s = float(retry_min_s)
        self.retry_max_s = float(retry_max_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self.alert_interval_s = float(alert_interval_s)
        self.format = format

        self._client: Transport | None = self._given
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._wake_scheduled = False
        self._executor: ThreadPoolExecutor | None = None
        self._next_send_at = 0.0
        self._next_alert_at = 0.0
        self._batch_seq = 0
        # a stored chunk always fits in one message (unless written under larger limits)
        outbox.limit_chunks(batch_max_records, int(batch_max_bytes))
        # status
        self.batches_sent = 0
        self.records_sent = 0
        self.bytes_sent = 0
        self.alerts_sent = 0
        self.errors = 0
        self.last_error: str | None = None
        self._last_ack: float | None = None
        self._in_flight = 0

    def topic(self, stream: str) -> str:
        return f"{self.topic_prefix}/{self.device_id}/sync/{stream}"

    # ---- waking -----------------------------------------------------------------------------
    def notify(self) -> None:
        """New records are in the outbox: wake the uplink now (callable from any thread)."""
        loop = self._loop
        if loop is None or self._wake_scheduled:
            return
        self._wake_scheduled = True
        if threading.get_ident() == self._loop_thread:
            self._do_wake()
        else:
            try:
                loop.call_soon_threadsafe(self._do_wake)
            except RuntimeError:  # the loop is closed: nothing to wake
                self._wake_scheduled = False

    def _do_wake(self) -> None:
        self._wake_scheduled = False
        if self._wake is not None:
            self._wake.set()

    async def _wait_for_work(self, timeout: float) -> None:
        assert self._wake is not None
        if timeout > 0:
            # asyncio.wait, not wait_for: before Python 3.12 wait_for swallows a cancellation
            # that lands as the event fires, and the uplink then never stopped
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
        self._wake.clear()

    # ---- running ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Send batches until cancelled. Never returns on its own; errors are counted, logged
        and retried, so it can be one task of the daemon's TaskGroup."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeml-uplink")
        try:
            if self._given is not None:
                await self._serve(self._given)
            else:
                await self._run_owned()
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._loop = None

    def _connect(self, settings: BrokerSettings) -> Transport:
        if self._connector is not None:
            return self._connector(settings, require_connection=False)
        from edgeml.transport.mqtt import MqttTransport

        return MqttTransport(settings, require_connection=False)

    async def _run_owned(self) -> None:
        backoff = self.retry_min_s
        while True:
            settings = self._upstreams[self._current]
            try:
                # Enter at once even if the upstream is away: paho keeps trying with the
                # settings' reconnect backoff, and the outbox holds the records meanwhile.
                async with self._connect(settings) as client:
                    self._client = client
                    backoff = self.retry_min_s
                    if len(self._upstreams) == 1:
                        await self._serve(client)
                    else:
                        await self._serve_until_lost(client)
                        self._fail_over(f"{settings.url} unreachable for "
                                        f"{self.failover_after_s:g} s")
                        continue
            except TransportError as exc:
                self._error(f"upstream {settings.url}: {exc}")
                if len(self._upstreams) > 1:
                    self._fail_over(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
            finally:
                self._client = None

    async def _serve_until_lost(self, client: Transport) -> None:
        """Serve until the link has been down ``failover_after_s`` (or never came up). A
        batch in flight is abandoned with the client: it stays in the outbox and goes again
        on the next connection."""
        serving = asyncio.ensure_future(self._serve(client))
        try:
            down_since: float | None = time.monotonic()
            while not serving.done():
                now = time.monotonic()
                if client.connected:
                    down_since = None
                elif down_since is None:
                    down_since = now
                elif now - down_since >= self.failover_after_s:
                    return
                await asyncio.wait({serving}, timeout=min(0.2, self.failover_after_s / 4))
            serving.result()  # _serve never returns; an exception surfaces here
        finally:
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    def _fail_over(self, reason: str) -> None:
        old = self._upstreams[self._current].url
        self._current = (self._current + 1) % len(self._upstreams)
        self.failovers += 1
        log.warning("uplink: %s; switching from %s to %s", reason, old,
                    self._upstreams[self._current].url)

    async def _serve(self, client: Transport) -> None:
        backoff = self.retry_min_s
        while True:
            if not client.connected:
                # paho reconnects by itself; checking a flag now and then is all we need.
                await asyncio.sleep(self.retry_min_s)
                continue
            try:
                wait = await self._step(client)
            except (TransportError, OutboxError) as exc:
                self._error(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            except Exception as exc:  # the uplink must outlive any one failure (months uptime)
                log.exception("uplink: unexpected error; retrying")
                self._error(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            backoff = self.retry_min_s
            if wait is not None:
                await self._wait_for_work(wait)

    def _error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.warning("uplink: %s", message)

    async def _call(self, fn, *args):
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def _step(self, client: Transport) -> float | None:
        """Send one message if one is due. Returns None after sending, else how long to wait."""
        ob = self.outbox
        mono = time.monotonic()
        if ob.has_unreported_drops:
            if mono >= self._next_alert_at:
                report = await self._call(ob.take_drop_report)
                if report is not None:
                    await self._send_alert(client, report)
                    return None
            alert_wait: float | None = self._next_alert_at - mono
        else:
            alert_wait = None
        stream, wait = self._ready_stream(time.time())
        if stream is None:
            return min(w for w in (wait, alert_wait) if w is not None)
        if self.bandwidth_bytes_per_s is not None:
            delay = self._next_send_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        seq = self._batch_seq + 1
        batch, records, payload = await self._call(self._take, stream, seq)
        if not batch:  # the figures said otherwise: look again later, never spin
            return self.batch_max_wait_s
        topic = self.topic(stream)
        self._in_flight = records
        try:
            await self._publish(client, topic, payload)
        finally:
            self._in_flight = 0
        self._batch_seq = seq
        self._sent(records, len(payload) + len(topic))  # the broker has it
        await self._call(ob.ack, batch)
        return None

    def _ready_stream(self, now: float) -> tuple[str | None, float]:
        """The stream to send now, or None and how long until a batch is due.

        A batch is due when some stream holds a full batch or its oldest record has waited
        ``batch_max_wait_s``; then the highest-priority stream holding anything goes first."""
        first = None
        due = self.batch_max_wait_s
        for stream in self.outbox.by_priority:
            n, nbytes, oldest = self.outbox.pending(stream)
            if n <= 0:
                continue
            if first is None:
                first = stream
            if n >= self.batch_max_records or nbytes >= self.batch_max_bytes or oldest is None:
                return first, 0.0
            left = oldest + self.batch_max_wait_s - now
            if left <= 0:
                return first, 0.0
            due = min(due, left)
        return None, due

    def _sent(self, records: int, nbytes: int) -> None:
        self.batches_sent += 1
        self.records_sent += records
        self.bytes_sent += nbytes
        self._last_ack = time.time()
        if self.bandwidth_bytes_per_s is not None:
            start = max(self._next_send_at, time.monotonic())
            self._next_send_at = start + nbytes / self.bandwidth_bytes_per_s

    # ---- messages ---------------------------------------------------------------------------
    def _take(self, stream: str, seq: int) -> tuple[list[OutboxChunk], int, bytes]:
        """In the executor thread: lease the next batch of whole chunks and encode its
        message; ``(chunks, records, payload)``."""
        batch = self.outbox.next_batch(stream, max_records=self.batch_max_records,
                                       max_bytes=self.batch_max_bytes)
        if not batch:
            return batch, 0, b""
        records = sum(c.count for c in batch)
        if self.format == "msgpack":
            return batch, records, self._splice_message(stream, seq, batch, records)
        return batch, records, self.encode_message(
            stream, seq, [r for c in batch for r in _records_of(c)])

    def _envelope(self, stream: str, seq: int) -> dict[str, Any]:
        return {"schema": SCHEMA, "device": self.device_id, "stream": stream, "batch_seq": seq,
                "sent": time.time()}

    def encode_message(self, stream: str, seq: int, records: list[dict[str, Any]]) -> bytes:
        msg = {**self._envelope(stream, seq), "records": records}
        if self.format == "json":
            return json.dumps(msg, separators=(",", ":"), default=_json_default).encode()
        return msgpack.packb(msg, use_bin_type=True)

    def _splice_message(self, stream: str, seq: int, batch: list[OutboxChunk],
                        records: int) -> bytes:
        """The msgpack message built from the stored bytes: a chunk's payload is its records,
        each already the map that goes on the wire (``record_id`` first), back to back, so the
        message is the envelope, an array header and the chunks joined: no record is decoded."""
        packer = msgpack.Packer(use_bin_type=True)
        envelope = self._envelope(stream, seq)
        parts = [packer.pack_map_header(len(envelope) + 1)]
        for key, value in envelope.items():
            parts += (packer.pack(key), packer.pack(value))
        parts += (packer.pack("records"), packer.pack_array_header(records))
        parts += [c.payload for c in batch]
        return b"".join(parts)

    async def _publish(self, client: Transport, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK however long the link is down: paho keeps
        the message and resends it on reconnect. Only if the broker stays connected and silent
        for ``ack_timeout_s`` do we give up on this copy (the caller retries the batch)."""
        task = asyncio.ensure_future(client.publish(topic, payload, qos=1))
        stalled_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(1.0, self.ack_timeout_s))
                if done:
                    task.result()
                    return
                if not client.connected:
                    stalled_since = None
                    continue
                now = time.monotonic()
                if stalled_since is None:
                    stalled_since = now
                elif now - stalled_since >= self.ack_timeout_s:
                    raise TransportError(f"no PUBACK for {topic} within "
                                         f"{self.ack_timeout_s:g} s while connected")
        finally:
            if not task.done():
                task.cancel()

    async def _send_alert(self, client: Transport, report: dict[str, Any]) -> None:
        """Drop counts go straight to ``sync/alerts`` (not through the outbox, which may be
        full); they are marked reported only after the PUBACK."""
        now = time.time()
        record = {"record_id": f"{self.device_id}/outbox/drops/{report['total']}",
                  "kind": report["kind"], "device": self.device_id, "ts": now,
                  "streams": report["streams"]}
        seq = self._batch_seq + 1
        payload = self.encode_message("alerts", seq, [record])
        topic = self.topic("alerts")
        self._in_flight = 1
        try:
            await self._publish(client, topic, payload)
        finally:
            self._in_flight = 0
        self._batch_seq = seq
        self.alerts_sent += 1
        self._next_alert_at = time.monotonic() + self.alert_interval_s
        self._sent(0, len(payload) + len(topic))
        await self._call(self.outbox.ack_drop_report, report)

    # ---- status -----------------------------------------------------------------------------
    def _upstream_url(self, client: Transport | None) -> str | None:
        """The broker in use as ``scheme://host:port`` (never a user or password in status)."""
        settings = (self._upstreams[self._current] if self._upstreams
                    else getattr(client, "settings", None))
        if not isinstance(settings, BrokerSettings):
            return None
        return f"{'mqtts' if settings.tls else 'mqtt'}://{settings.host}:{settings.port}"

    @property
    def stats(self) -> dict[str, Any]:
        """For the status topic: what was sent, when the last PUBACK came, errors, link state."""
        client = self._client
        return {
            "connected": bool(client is not None and client.connected),
            "batches_sent": self.batches_sent,
            "records_sent": self.records_sent,
            "bytes_sent": self.bytes_sent,
            "alerts_sent": self.alerts_sent,
            "in_flight": self._in_flight,
            "last_ack_age_s": (round(time.time() - self._last_ack, 3)
                               if self._last_ack is not None else None),
            "errors": self.errors,
            "last_error": self.last_error,
            "upstream": self._upstream_url(client),
            "failovers": self.failovers,
        }
