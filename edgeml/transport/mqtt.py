"""The one module that owns paho-mqtt: :class:`MqttTransport`, the real :class:`Transport`.

Nothing else in edgeml imports paho (except test helpers and the plain-script baseline).

Design: paho without its network thread. The socket is driven by the event loop
(``add_reader``, plus ``add_writer`` only while the kernel's send buffer is full, and
``loop_misc`` once a second for keep-alives), the way aiomqtt 2.x drives paho, so a message
goes from the socket to scoring and its answer back to the socket on one thread: no wake-up of
another thread, no GIL hand-off and no lock shared with a network thread per message. Publishes
and acknowledgements are written at once by the caller (paho writes directly when it owns no
thread). Only the TCP connect (and a TLS handshake) runs in an executor; paho's ``reconnect``
then takes that ready socket on the loop, so nothing else ever touches the client concurrently.

Reading: paho reads a packet with several small ``recv`` calls (type, length, body). The socket
is wrapped in :class:`_BufferedSocket`, which fills its buffer with one ``recv`` per burst and
answers paho's small reads from it; a burst of hundreds of messages costs one system call,
not three per message. Reading pauses while more than ``INBOX_MAX`` received messages wait for
the loop (the broker then holds the rest: QoS 1 in its session, QoS 0 in its queue, where its
own limits apply), so memory stays bounded however fast the broker sends.

Measured with ``benchmarks/bench_e2e.py`` against paho's own network thread (the previous
design, kept runnable in ``benchmarks/bench_transport.py``); see benchmarks/README.md.

Error mapping (no paho return code or exception crosses this module):

- ``publish_nowait``/``publish``: a refused publish (``MQTT_ERR_QUEUE_SIZE``,
  ``MQTT_ERR_PAYLOAD_SIZE``, an invalid topic, a payload over 256 MB, any other non-success
  code) raises :class:`PublishError` and counts ``publish_errors``. QoS 1/2 while offline is
  not an error: paho keeps the message and sends it on reconnect (store-and-forward).
  QoS 0 while offline: ``publish_nowait`` drops it and counts ``dropped_qos0_offline``
  (QoS 0 is fire-and-forget by contract; the device only uses it where a loss is acceptable);
  ``publish`` (awaited, so the caller cares) raises :class:`NotConnectedError`.
- ``publish(..., timeout=)``: no PUBACK in time raises :class:`PublishTimeoutError`; the
  message stays queued in paho and may still be delivered later (at-least-once). An MQTT 5
  PUBACK with a failure reason code (e.g. not authorised) raises :class:`PublishError`.
- ``subscribe``/``unsubscribe``: an invalid filter, a refused request, a SUBACK/UNSUBACK with a
  failure reason code (>= 0x80) or no answer within ``settings.subscribe_timeout_s`` raises
  :class:`SubscribeError`; a connection lost while waiting raises :class:`NotConnectedError`
  (the filter stays registered and is renewed on reconnect).
- a connection that cannot be made at start (``require_connection=True``) raises
  :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeml.errors import (
    NotConnectedError,
    PublishError,
    PublishTimeoutError,
    SubscribeError,
    TransportError,
)
from edgeml.transport.base import Message, Publication, validate_filter
from edgeml.transport.settings import DEFAULT_MAX_INFLIGHT, BrokerSettings, parse_broker_url

__all__ = ["BrokerSettings", "Message", "MqttTransport", "Publication",
           "parse_broker_url", "validate_filter"]

#: Linux's TCP_QUICKACK (not in every Python build's socket module; None elsewhere)
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK",
                                    12 if sys.platform.startswith("linux") else None)

log = logging.getLogger("edgeml.transport.mqtt")

_PUBACK = struct.Struct("!BBH").pack  # fixed header, remaining length 2, packet id

_FAILURE = 0x80  # SUBACK / UNSUBACK / PUBACK reason codes from here up are failures
_UNSUPPORTED_PROTOCOL = 0x84  # CONNACK: a 3.1.1 broker's "unacceptable protocol version"
_CONNACK_WAIT_S = 1.5  # "auto": no CONNACK to an MQTT 5 CONNECT this long -> try 3.1.1
READ_SIZE = 256 * 1024  # bytes asked of the kernel per read
READ_PACKETS_MAX = 2048  # packets handled per loop turn before other tasks get a go
# Received messages waiting for the loop beyond which reading pauses, or their payload bytes.
# The count matches the MQTT 5 Receive Maximum: mosquitto drops any packet, in-flight QoS 1
# messages included, for a client whose unsent-packet queue holds max_queued_messages (1000
# by default), so a device that stops reading while a QoS 1 burst is in flight loses part of
# it until it reconnects. The bytes bound the memory.
INBOX_MAX = 65535
INBOX_MAX_BYTES = 16 * 1024 * 1024
MISC_INTERVAL_S = 1.0  # keep-alive pings and timeouts
CLOSE_FLUSH_S = 1.0  # at close, the longest wait for the kernel to take gathered bytes


class _BufferedSocket:
    """The connected socket as paho sees it: reads come from a buffer filled by one large
    ``recv`` per burst. ``pending()`` tells paho (and the reader) that buffered bytes are left,
    as an SSL socket's does.

    Writes, once ``on_buffered`` is set, are gathered rather than sent one packet at a time:
    ``send`` takes every byte into a buffer (calling ``on_buffered`` when the buffer was
    empty) and :meth:`flush`, called once per loop turn, hands the lot to the kernel in one
    ``send``. A scored batch's answers, a burst's acknowledgements and a sync batch then cost
    one system call and a few TCP segments instead of one of each per packet. Everything
    else goes to the socket itself."""

    __slots__ = ("_buf", "_out", "_pos", "on_buffered", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0
        self._out = bytearray()  # written by paho, not yet taken by the kernel
        self.on_buffered: Callable[[], None] | None = None

    def recv(self, bufsize: int) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            data = self.sock.recv(max(bufsize, READ_SIZE))  # BlockingIOError passes through
            if len(data) <= bufsize:
                self._buf, self._pos = b"", 0
                return data
            self._buf, pos = data, 0
        out = self._buf[pos:pos + bufsize]
        self._pos = pos + len(out)
        return out

    def pending(self) -> int:
        ssl_pending = getattr(self.sock, "pending", None)
        return len(self._buf) - self._pos + (ssl_pending() if ssl_pending else 0)

    def fill(self) -> int:
        """One ``recv`` into the (used up) buffer; the bytes read, 0 at end of stream.
        BlockingIOError (or SSLWantReadError) when nothing waits."""
        data = self.sock.recv(READ_SIZE)
        self._buf, self._pos = data, 0
        return len(data)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        on_buffered = self.on_buffered
        if on_buffered is None:
            return self.sock.send(data)
        out = self._out
        if not out:
            on_buffered()
        out += data
        return len(data)

    @property
    def out_pending(self) -> int:
        """Bytes written by paho that the kernel has not taken yet."""
        return len(self._out)

    def flush(self) -> bool:
        """Hand the gathered bytes to the kernel; True when none are left. A full send
        buffer leaves the rest for the next call; a broken connection raises OSError."""
        out = self._out
        while out:
            try:
                n = self.sock.send(out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                    ssl.SSLWantReadError):
                return False
            if n <= 0:
                return False
            del out[:n]
        return True

    def discard(self) -> None:
        self._out.clear()

    def close(self) -> None:
        """Close, after a last try to send what is gathered (paho closes right after it
        writes DISCONNECT, which is gathered too)."""
        self.on_buffered = None
        if self._out:
            with contextlib.suppress(OSError, ValueError):
                self.sock.settimeout(CLOSE_FLUSH_S)
                self.sock.sendall(self._out)
            self._out.clear()
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
# The PUBACK reason codes that mean success (MQTT 5): 0x00, and 0x10 "no matching
# subscribers", which a broker sends for every publish nobody subscribed to (an answer topic
# no one reads yet). paho is handed the same objects each time.
_PUBACK_OK = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}


class _MessageInfo(paho.MQTTMessageInfo):
    """paho's publish handle without a ``threading.Condition`` of its own: nothing here
    blocks on ``wait_for_publish`` (publishes are awaited on the loop), and making a
    Condition per publish was a tenth of the cost of a QoS 1 answer. They share one."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = _SHARED_CONDITION
        self.rc = paho.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        with self._condition:  # shared: wake every waiter, each checks its own flag
            self._published = True
            self._condition.notify_all()


_SHARED_CONDITION = threading.Condition()
_MAX_PAYLOAD = 268_435_455  # MQTT's largest remaining length
_TOPIC_CACHE_MAX = 1024


class _PahoClient(paho.Client):
    """paho's client, handed a socket connected beforehand (off the loop), wrapped for
    buffered reads. ``open_socket`` is paho's own connect (proxy, TLS handshake and all).

    Received PUBLISH packets of QoS 0 and 1 without MQTT 5 properties (what a broker sends a
    subscriber that asked for no topic aliases, unless the publisher set properties) go
    straight to ``deliver(topic, payload, qos, retain, mid)``: paho would build a
    ``Properties`` object, an ``MQTTMessage`` with its ``threading.Condition`` and a
    topic-matcher walk for each, which at high rates costs more than the rest of
    the message's way through the device. Everything else (QoS 2, properties, an invalid
    topic) takes paho's own path, which also raises on malformed packets."""

    ready_socket: Any = None
    deliver: Callable[[str, bytes, int, bool, int], bool] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._topics: dict[str, bytes] = {}  # publish topics already checked, encoded
        # QoS > 0 publishes waiting for a free slot in the in-flight window, oldest first:
        # each acknowledgement sends the next without walking every message held
        self._queued: collections.deque[int] = collections.deque()

    def _handle_publish(self) -> Any:
        packet = self._in_packet["packet"]
        header = self._in_packet["command"]
        if self._publish_fast(header, packet, 0, len(packet)) is None:
            return super()._handle_publish()
        return paho.MQTT_ERR_SUCCESS

    def _publish_fast(self, header: int, buf: Any, start: int, end: int) -> bool | None:
        """Deliver the PUBLISH whose variable header starts at ``buf[start]``; None when it is
        one for paho's own path (QoS 2, properties, an odd topic: paho also says what is
        wrong with a malformed one). Otherwise whether ``deliver`` asked to stop reading."""
        deliver = self.deliver
        qos = (header & 0x06) >> 1
        if deliver is None or qos == 2 or (qos == 1 and not self._manual_ack):
            return None
        try:
            pos = start + 2 + ((buf[start] << 8) | buf[start + 1])
            topic = bytes(buf[start + 2:pos]).decode("utf-8")
            mid = 0
            if qos:
                mid = (buf[pos] << 8) | buf[pos + 1]
                pos += 2
            if self._protocol == paho.MQTTv5:
                if buf[pos]:  # properties present: paho's path knows them all
                    return None
                pos += 1
        except (IndexError, UnicodeDecodeError):
            return None
        if not topic or pos > end or "+" in topic or "#" in topic:
            return None
        return bool(deliver(topic, bytes(buf[pos:end]), qos, bool(header & 0x01), mid))

    def read_buffered(self, sock: _BufferedSocket, limit: int) -> int:
        """Handle up to ``limit`` whole packets waiting in the socket's buffer, stopping at
        the first one paho must handle (anything but a QoS 0/1 PUBLISH without properties
        or a plain PUBACK), at one not whole yet, or when ``deliver`` asks to stop. Returns
        how many were handled: paho's per-packet reading (a ``recv`` call for the type, each
        length byte and the body, and a dict of state) costs more than the packet's way
        through the device."""
        if self._in_packet["command"] != 0:
            return 0  # paho is in the middle of a packet
        buf, pos = sock._buf, sock._pos
        end = len(buf)
        n = 0
        while n < limit and pos < end:
            header = buf[pos]
            i, length, shift = pos + 1, 0, 0
            while True:  # the remaining length: up to four bytes of seven bits
                if i >= end or shift > 21:
                    break
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    shift = -1
                    break
            if shift != -1 or i + length > end:
                break  # not whole yet (or malformed): paho reads it
            body_end = i + length
            kind = header & 0xF0
            if kind == 0x30:
                stop = self._publish_fast(header, buf, i, body_end)
                if stop is None:
                    break
            elif kind == 0x40 and self._settle_puback(buf, i, length) is not None:
                stop = False
            else:
                break
            pos = body_end
            n += 1
            if stop:
                break
        if n:
            sock._pos = pos
            self._last_bytes_received = paho.time_func()  # for keep-alive
        return n

    def read_one(self) -> Any:
        """One packet paho's own way, or as much of it as has arrived (``MQTT_ERR_AGAIN``:
        the rest has not). A lost connection is handled (closed, reported) as in
        ``loop_read``."""
        if self._sock is None:
            return paho.MQTT_ERR_NO_CONN
        rc = self._packet_read()
        if rc > 0:
            return self._loop_rc_handle(rc)
        return rc

    def _handle_pubackcomp(self, cmd: Any) -> Any:
        packet = self._in_packet["packet"]
        rc = self._settle_puback(packet, 0, len(packet)) if cmd == "PUBACK" else None
        return super()._handle_pubackcomp(cmd) if rc is None else rc

    def _settle_puback(self, buf: Any, start: int, length: int) -> Any:
        """Settle a PUBACK that says success without properties (every PUBACK in MQTT 3.1.1;
        in MQTT 5 a reason code of 0x00 or 0x10 and no properties) without paho decoding a
        reason code and a properties object for it; paho's result code, or None for any
        other PUBACK, which paho's own path decodes (refusals, properties, malformed ones)."""
        if length == 2:
            code = _PUBACK_OK[0]
        elif length in (3, 4) and self._protocol == paho.MQTTv5 and (
                length == 3 or buf[start + 3] == 0):
            code = _PUBACK_OK.get(buf[start + 2])
            if code is None:
                return None
        else:
            return None
        mid = (buf[start] << 8) | buf[start + 1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, code, _NO_PROPERTIES)
        return paho.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                properties: Any = None) -> paho.MQTTMessageInfo:
        """paho's ``publish`` for the common case (bytes, QoS 0 or 1, no properties, a
        topic seen before), with the topic checked once and a light publish handle;
        anything else is paho's own."""
        topic_bytes = self._topics.get(topic)
        if (topic_bytes is None or properties is not None or type(payload) is not bytes
                or qos not in (0, 1)):
            if topic_bytes is None and properties is None and type(topic) is str and topic \
                    and len(self._topics) < _TOPIC_CACHE_MAX:
                encoded = topic.encode("utf-8")
                self._raise_for_invalid_topic(encoded)
                self._topics[topic] = encoded
            info = super().publish(topic, payload, qos, retain, properties)
            with self._out_message_mutex:
                m = self._out_messages.get(info.mid)
                if m is not None and m.state == paho.mqtt_ms_queued:
                    self._queued.append(info.mid)
            return info
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError("Payload too large.")
        mid = self._mid_generate()
        if qos == 0:
            info = _MessageInfo(mid)
            info.rc = self._send_publish(mid, topic_bytes, payload, 0, retain, False, info)
            return info
        message = paho.MQTTMessage.__new__(paho.MQTTMessage)
        message.mid = mid
        message._topic = topic_bytes
        message.timestamp = paho.time_func()
        message.payload = payload
        message.qos = 1
        message.retain = retain
        message.dup = False
        message.properties = None
        message.info = info = _MessageInfo(mid)
        with self._out_message_mutex:
            out = self._out_messages
            if mid in out or 0 < self._max_queued_messages <= len(out):
                info.rc = paho.MQTT_ERR_QUEUE_SIZE
                return info
            out[mid] = message
            if self._max_inflight_messages == 0 or \
                    self._inflight_messages < self._max_inflight_messages:
                self._inflight_messages += 1
                message.state = paho.mqtt_ms_wait_for_puback
                rc = self._send_publish(mid, topic_bytes, payload, 1, retain, False, info)
                if rc == paho.MQTT_ERR_NO_CONN:  # sent after the reconnect
                    self._inflight_messages -= 1
                    message.state = paho.mqtt_ms_publish
                info.rc = rc
            else:
                message.state = paho.mqtt_ms_queued
                self._queued.append(mid)
        return info

    def _update_inflight(self) -> Any:
        """Send the oldest publishes waiting for a free slot in the in-flight window. paho
        walks every message it holds, in flight ones first, on each acknowledgement to find
        them: with a full window of 100 that walk cost more than the rest of the PUBACK."""
        queued, out = self._queued, self._out_messages
        limit = self._max_inflight_messages
        while queued and (limit == 0 or self._inflight_messages < limit):
            m = out.get(queued.popleft())
            if m is None or m.state != paho.mqtt_ms_queued:
                continue  # acknowledged meanwhile (a reconnect resent it), or not waiting
            self._inflight_messages += 1
            m.state = (paho.mqtt_ms_wait_for_puback if m.qos == 1
                       else paho.mqtt_ms_wait_for_pubrec)
            rc = self._send_publish(m.mid, m._topic, m.payload, m.qos, m.retain, m.dup,
                                    properties=m.properties)
            if rc != paho.MQTT_ERR_SUCCESS:
                return rc
        return paho.MQTT_ERR_SUCCESS

    def set_window(self, inflight: int, *, reserve: int = 0) -> None:
        """The in-flight window of a new session, set from ``on_connect``, before paho sends
        again what the last session left unacknowledged (paho's setter refuses while
        connected). :meth:`publish` and :meth:`_update_inflight` apply it, and both are ours.

        paho's reconnect reset means to resend at most a window of messages, but counts none
        of them, so it marks every unacknowledged one for resending: a device that kept
        hundreds of QoS 1 messages while offline would send them all at once, beyond the
        broker's Receive Maximum (a strict broker disconnects for that, and the reconnect
        would do it again). Here the oldest are marked, as many as the window has room for
        beside ``reserve`` (QoS 1 births published before them) and any publish already sent
        on this connection; the rest wait for acknowledgements, in order."""
        with self._out_message_mutex:
            self._max_inflight_messages = inflight
            room = (max(inflight - reserve - self._inflight_messages, 0) if inflight
                    else None)  # None: no window
            for m in self._out_messages.values():
                if m.qos == 0 or m.state not in (paho.mqtt_ms_publish, paho.mqtt_ms_queued):
                    continue
                if room is None or room > 0:
                    if room is not None:
                        room -= 1
                    m.state = paho.mqtt_ms_publish
                else:
                    m.state = paho.mqtt_ms_queued
            self._queued = collections.deque(
                mid for mid, m in self._out_messages.items() if m.state == paho.mqtt_ms_queued)

    def _messages_reconnect_reset_out(self) -> None:
        """paho's reset on reconnect decides anew which messages wait for the window: the
        queue of them follows (:meth:`set_window` decides again once the broker's CONNACK
        has said how many it takes)."""
        super()._messages_reconnect_reset_out()
        with self._out_message_mutex:
            self._queued = collections.deque(
                mid for mid, m in self._out_messages.items() if m.state == paho.mqtt_ms_queued)

    def flush_out(self) -> bool:
        """Send the bytes the socket gathered this loop turn; True when all are sent. A
        broken connection is handled as paho handles a failed write (closed, reported)."""
        sock = self._sock
        if sock is None:
            return True
        try:
            return sock.flush()
        except OSError as exc:
            sock.discard()  # QoS 1 publishes among them are sent again after reconnecting
            self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", exc)
            self._loop_rc_handle(paho.MQTT_ERR_CONN_LOST)
            return True

    def open_socket(self) -> Any:
        return super()._create_socket()

    def _create_socket(self) -> Any:
        sock, self.ready_socket = self.ready_socket, None
        if sock is None:  # not through the transport: paho's blocking connect
            sock = super()._create_socket()
        return _BufferedSocket(sock)


def _code(rc: Any) -> int:
    """A paho ReasonCode (or a bare int) as an int."""
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else 0


class MqttTransport:
    """``async with MqttTransport(settings) as t``, then ``subscribe``, ``batches()``,
    ``publish``. Use it from the event loop it was entered on, only.

    - ``will``: the last will (the daemon's retained ``offline`` status).
    - :meth:`set_birth`: publications that go out first on every (re)connect (bytes made by
      the caller on its loop; the network thread only sends them).
    - ``manual_ack``: QoS 1 messages are acknowledged only when ``ack(message)`` is called.
    - ``require_connection=False``: enter at once and keep trying in the background (an
      upstream that is away at start must not stop the device).
    Subscriptions are remembered and renewed on every reconnect; unsubscribed filters are
    forgotten (and unsubscribed on the next connect if the link was down when asked).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        will: Publication | None = None,
        manual_ack: bool = False,
        require_connection: bool = True,
    ) -> None:
        self._sock: Any = None  # the connected socket, for quick ACKs
        # the loop's driving of paho's socket
        self._attached: Any = None  # the socket registered with the loop's selector
        self._writing = False  # a writer is registered (the kernel's send buffer was full)
        self._flush_scheduled = False  # gathered bytes are sent at the end of this loop turn
        self._read_paused = False  # too many received messages wait: the broker holds on
        self._conn_task: asyncio.Task | None = None
        self._misc_task: asyncio.Task | None = None
        self.settings = settings
        self._require_connection = require_connection
        self._manual_ack = manual_ack
        # immutable snapshots, replaced by the loop, read by the network thread
        self._birth: tuple[Publication, ...] = ()
        self._subscriptions: dict[str, int] = {}
        self._unsub_pending: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        # network thread -> loop
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_bytes = 0
        self._events: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_pending = False
        self._events_pending = False
        self._waiter: asyncio.Future[None] | None = None
        self._is_connected = False
        self._session = 0  # bumped by the network thread on every CONNACK
        self._first_connect: asyncio.Future[None] | None = None
        self._connect_error: str | None = None
        self._closing = False
        self._closed = False
        # loop-owned
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._awaiting = 0  # awaited publishes in progress (read by the network thread)
        self._requests: dict[int, tuple[str, asyncio.Future[list[int]]]] = {}
        self._drained: asyncio.Event | None = None
        self._stats = collections.Counter({
            "connects": 0, "disconnects": 0, "received": 0, "publish_errors": 0,
            "publish_timeouts": 0, "dropped_qos0_offline": 0, "subscribe_errors": 0,
            "acks_skipped": 0,
        })

        self._will = will
        # "auto": MQTT 5 until a broker answers "unsupported protocol version", then 3.1.1
        # for this connection (amqtt, NATS and older brokers speak 3.1.1 only)
        self.protocol = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self._downgraded = False
        #: the broker's Receive Maximum from the last MQTT 5 CONNACK (None: not announced)
        self.receive_maximum: int | None = None
        self._socket_opened = False
        self._client = self._build_client()

    def _build_client(self) -> paho.Client:
        settings = self.settings
        proto = paho.MQTTv5 if self.protocol == "5" else paho.MQTTv311
        kwargs: dict = {"client_id": settings.client_id, "protocol": proto}
        if proto == paho.MQTTv311:
            kwargs["clean_session"] = settings.clean_start
        c = _PahoClient(paho.CallbackAPIVersion.VERSION2, **kwargs)
        paho_log = logging.getLogger("edgeml.transport.mqtt.paho")
        if not paho_log.filters:
            paho_log.addFilter(_QueuedWhileOffline())
        c.enable_logger(paho_log)
        # A window of 20 (paho's default) made every PUBACK release one queued answer, sent
        # alone; with one that holds a scored batch (the device sizes its publishing
        # connection's to the batch) the answers go out together (see _update_inflight).
        # An MQTT 5 broker's Receive Maximum may narrow it when it accepts the connection.
        c.max_inflight_messages_set(self._own_window)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        if self._manual_ack:
            c.manual_ack_set(True)
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                c.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TransportError(f"TLS setup failed: {exc}") from exc
            if settings.tls_insecure:
                c.tls_insecure_set(True)
        will = self._will
        if will is not None:
            try:
                c.will_set(will.topic, will.payload, will.qos, will.retain)
            except ValueError as exc:
                raise TransportError(f"invalid last will: {exc}") from exc
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.deliver = self._deliver
        return c

    def _connect_kwargs(self) -> dict:
        s = self.settings
        if self.protocol != "5":
            return {}
        # MQTT 5 ends a session at disconnect unless an expiry is asked for
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if s.clean_start else 0xFFFFFFFF
        if s.max_packet_bytes is not None:
            props.MaximumPacketSize = s.max_packet_bytes
        if s.receive_maximum is not None:
            props.ReceiveMaximum = s.receive_maximum
        return {"clean_start": s.clean_start, "properties": props}

    # ---- driving paho's socket from the loop ------------------------------------------------
    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the event loop. paho's callbacks already run there (they come from
        ``loop_read``/``loop_write``/``reconnect`` called by the loop), so this is a call."""
        fn()

    def _start_network(self, connect_kwargs: dict) -> None:
        s = self.settings
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive, **connect_kwargs)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {s.url}: {exc}") from exc
        assert self._loop is not None
        self._conn_task = self._loop.create_task(self._connect(delay=0.0), name="mqtt-connect")

    async def _connect(self, delay: float) -> None:
        """Connect (after ``delay``), retrying with the settings' backoff until it works or
        the transport closes. The TCP connect and TLS handshake run in an executor; paho then
        takes the ready socket on the loop and sends CONNECT."""
        s = self.settings
        loop = asyncio.get_running_loop()
        client = self._client
        while not self._closing:
            if delay:
                await asyncio.sleep(delay)
            delay = min(max(delay * 2, s.reconnect_min_s), s.reconnect_max_s)
            try:
                sock = await loop.run_in_executor(None, client.open_socket)
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS failure
                log.debug("connect to %s failed (%s); retrying with backoff", s.url, exc)
                self._on_connect_fail(client, None)
                continue
            if self._closing or client is not self._client:
                sock.close()
                return
            client.ready_socket = sock
            try:
                rc = client.reconnect()  # takes the socket, sends CONNECT (on this thread)
            except (OSError, ValueError) as exc:
                client.ready_socket = None
                log.debug("connect to %s failed (%s); retrying with backoff", s.url, exc)
                self._on_connect_fail(client, None)
                continue
            if rc != paho.MQTT_ERR_SUCCESS or client.socket() is None:
                self._on_connect_fail(client, None)
                continue
            self._attach(client.socket())
            return

    def _attach(self, sock: Any) -> None:
        assert self._loop is not None
        self._attached = sock
        self._writing = False
        self._read_paused = False
        sock.on_buffered = self._schedule_flush
        self._loop.add_reader(sock, self._read)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = self._loop.create_task(self._misc(), name="mqtt-keepalive")
        self._check_write()
        if sock.pending():
            self._loop.call_soon(self._read)

    def _detach(self) -> None:
        sock, self._attached = self._attached, None
        if sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closing
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
        self._writing = False
        self._sock = None
        if self._misc_task is not None:
            self._misc_task.cancel()
            self._misc_task = None

    def _on_socket_close(self, client, userdata, sock) -> None:
        if client is not self._client:
            return
        self._detach()
        if not self._closing and self._loop is not None and (
                self._conn_task is None or self._conn_task.done()):
            self._conn_task = self._loop.create_task(
                self._connect(delay=self.settings.reconnect_min_s), name="mqtt-reconnect")

    def _read(self) -> None:
        """The socket is readable: handle what has arrived, up to ``READ_PACKETS_MAX``
        packets per loop turn (buffered bytes left over are read on the next turn). Whole
        packets in the buffer are handled in one pass (``read_buffered``); paho reads the
        rest, one packet at a time."""
        sock = self._attached
        if sock is None or self._read_paused:
            return
        client = self._client
        budget = READ_PACKETS_MAX
        last_fill = READ_SIZE
        while budget > 0:
            if sock._pos < len(sock._buf):
                n = client.read_buffered(sock, budget)
                if n == 0:  # a packet for paho, or one not whole yet
                    rc = client.read_one()
                    if self._attached is not sock:
                        return  # the connection went (paho closed the socket and said so)
                    if rc == paho.MQTT_ERR_AGAIN:
                        break
                    n = 1
                budget -= n
            elif client._in_packet["command"] != 0:
                rc = client.read_one()  # the rest of a packet paho has begun
                if self._attached is not sock:
                    return
                if rc == paho.MQTT_ERR_AGAIN:
                    break
                budget -= 1
            else:
                if last_fill < READ_SIZE and not sock.pending():
                    break  # the kernel had no more: the selector says when more comes
                try:
                    last_fill = sock.fill()
                except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                        ssl.SSLWantWriteError):
                    break
                except OSError:
                    last_fill = 0
                if last_fill == 0:  # end of stream or an error: paho finds out and says so
                    client.read_one()
                    return
            if self._read_paused:
                break
        else:
            if sock.pending() and self._loop is not None:
                self._loop.call_soon(self._read)  # buffered: the selector will not say so
        self._quickack()  # after the read: the segments just taken are ACKed now
        self._check_write()

    def _check_write(self) -> None:
        """Send what paho still queues (gathered bytes are sent by :meth:`_flush`)."""
        if not self._writing and self._attached is not None and self._client.want_write():
            self._write()

    def _schedule_flush(self) -> None:
        """The socket gathered its first bytes this loop turn: send them all at the turn's
        end, in one system call."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._writing:
            self._write()

    def _write(self) -> None:
        """Send what is gathered; a writer is registered only while the kernel's send
        buffer is full."""
        sock = self._attached
        if sock is None:
            return
        client = self._client
        if client.want_write():
            client.loop_write()  # paho's own queue, gathered by the socket
        done = client.flush_out()
        if self._attached is not sock:
            return  # the connection went while sending (paho closed it and said so)
        assert self._loop is not None
        if done and not client.want_write():
            if self._writing:
                self._writing = False
                self._loop.remove_writer(sock)
        elif not self._writing:
            self._writing = True
            self._loop.add_writer(sock, self._write)

    def _pause_reading(self) -> None:
        if not self._read_paused and self._attached is not None:
            self._read_paused = True
            assert self._loop is not None
            self._loop.remove_reader(self._attached)

    def _maybe_resume(self) -> None:
        if len(self._inbox) < INBOX_MAX // 2 and self._inbox_bytes < INBOX_MAX_BYTES // 2:
            self._resume_reading()

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            sock = self._attached
            if sock is not None and self._loop is not None:
                self._loop.add_reader(sock, self._read)
                if sock.pending():
                    self._loop.call_soon(self._read)

    async def _misc(self) -> None:
        """Keep-alive pings and their timeout (a broker gone silent is noticed here)."""
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            if self._client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                return
            self._check_write()

    async def _stop_network(self) -> None:
        if self._conn_task is not None:
            self._conn_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._conn_task
            self._conn_task = None
        client = self._client
        sock = self._attached
        client.disconnect()  # DISCONNECT written at once when the socket takes it
        if self._attached is sock and sock is not None:
            # still open: no DISCONNECT could be written (no CONNACK yet, or a full buffer)
            self._write()
            if self._attached is sock:
                self._detach()
                with contextlib.suppress(OSError):
                    sock.close()
        self._detach()

    # ---- paho's callbacks (on the loop, from loop_read / loop_write / reconnect) ------------
    def _on_socket_open(self, client, userdata, sock) -> None:
        # paho does not set TCP_NODELAY; without it small publishes wait for delayed ACKs.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock if _TCP_QUICKACK is not None else None
        self._socket_opened = True

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if (reason_code.is_failure and _code(reason_code) == _UNSUPPORTED_PROTOCOL
                and self._may_downgrade()):
            self._event("downgrade")  # the loop rebuilds the client for MQTT 3.1.1
            return
        if reason_code.is_failure:
            self._event("refused", f"broker refused the connection: {reason_code}")
            return
        self._session += 1
        self._is_connected = True
        self._apply_receive_maximum(client, properties)
        for pub in self._birth:  # bytes made on the loop; nothing else is read here
            client.publish(pub.topic, pub.payload, pub.qos, pub.retain)
        unsub = self._unsub_pending
        if unsub:
            client.unsubscribe(sorted(unsub))
        subs = self._subscriptions
        if subs:
            client.subscribe(list(subs.items()))
        self._event("connected", getattr(flags, "session_present", None))

    def _apply_receive_maximum(self, client: _PahoClient, properties: Any) -> None:
        """The in-flight window of this session: ours, or the broker's Receive Maximum from an
        MQTT 5 CONNACK where that is smaller (a client must not have more QoS 1 publishes
        unacknowledged; paho does not look at it). mosquitto announces its
        ``max_inflight_messages``, 20 by default."""
        window = self._own_window
        server = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if isinstance(server, int) and 0 < server < window:
            if self.receive_maximum != server:
                log.debug("%s: the broker takes at most %d unacknowledged QoS 1 messages "
                          "(its Receive Maximum); sending at most %d at a time instead of %d",
                          self.settings.client_id, server, server, window)
            window = server
        self.receive_maximum = server if isinstance(server, int) else None
        # births go out first, on the window too: the messages paho sends again wait for them
        client.set_window(window, reserve=sum(1 for p in self._birth if p.qos > 0))

    @property
    def _own_window(self) -> int:
        """The in-flight window the settings ask for, before any broker narrows it."""
        return self.settings.max_inflight or DEFAULT_MAX_INFLIGHT

    def _may_downgrade(self) -> bool:
        return self.protocol == "5" and self.settings.protocol == "auto" \
            and not self._downgraded

    def _on_connect_fail(self, client, userdata) -> None:
        self._connect_error = f"cannot connect to {self.settings.url}"
        log.debug("connect to %s failed; retrying with backoff", self.settings.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self._is_connected
        self._is_connected = False
        if not was and self._session == 0 and self._may_downgrade():
            # closed before any CONNACK: brokers that only know 3.1.1 may just hang up on
            # an MQTT 5 CONNECT (amqtt does)
            self._event("downgrade")
            return
        if was:
            self._event("disconnected", str(reason_code))

    def _quickack(self) -> None:
        """Acknowledge TCP segments at once instead of after the kernel's delayed-ACK timer.

        A broker without TCP_NODELAY (mosquitto's default) holds a small packet (the next
        sensor message) while an earlier small one (the PUBACK of our QoS 1 answer) is not yet
        ACKed; with delayed ACKs that costs up to ~40 ms per message. Linux turns quick-ACK
        mode off again by itself, so it is re-armed on every read burst."""
        sock = self._sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except (OSError, AttributeError):
                self._sock = None  # not supported here (or the socket went): stop trying

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        """paho's own path (QoS 2, MQTT 5 properties); the rest comes to :meth:`_deliver`."""
        self._deliver(msg.topic, msg.payload, msg.qos, bool(msg.retain), msg.mid)

    def _deliver(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> bool:
        """Into the inbox; True when reading pauses (the inbox is full)."""
        inbox = self._inbox
        inbox.append(Message(topic, payload, qos, retain, mid, time.time(), self._session))
        self._inbox_bytes += len(payload)
        if not self._wake_pending:
            self._wake_pending = True
            self._post(self._wake)
        if len(inbox) >= INBOX_MAX or self._inbox_bytes >= INBOX_MAX_BYTES:
            self._pause_reading()  # until the loop has taken them: the broker holds the rest
            return True
        return False

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        code = _code(reason_code)
        # only an awaited publish needs its PUBACK on the loop: the answers' PUBACKs would
        # otherwise cost one loop wake-up each (a refusal is still passed on, to be counted)
        if self._awaiting or code >= _FAILURE:
            self._event("puback", mid, code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        self._event("ack", mid, [_code(rc) for rc in reason_codes])

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        self._event("ack", mid, [_code(rc) for rc in (reason_codes or [])])

    def _event(self, *event: Any) -> None:
        self._events.append(event)
        if not self._events_pending:
            self._events_pending = True
            self._post(self._drain_events)

    # ---- event loop side --------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _drain_events(self) -> None:
        self._events_pending = False
        events = self._events
        while events:
            kind, *args = events.popleft()
            if kind == "puback":
                mid, code = args
                fut = self._acks.pop(mid, None)
                if code >= _FAILURE:
                    self._stats["publish_errors"] += 1
                if fut is not None and not fut.done():
                    if code >= _FAILURE:
                        fut.set_exception(PublishError(f"broker refused the publish "
                                                       f"(reason code {code:#x})"))
                    else:
                        fut.set_result(None)
                if not self._acks and self._drained is not None:
                    self._drained.set()
            elif kind == "ack":
                self._on_ack(*args)
            elif kind == "connected":
                self._stats["connects"] += 1
                log.info("connected to %s (session present: %s)", self.settings.url, args[0])
                self._settle_first(None)
            elif kind == "disconnected":
                if not self._closing:
                    self._stats["disconnects"] += 1
                    log.warning("disconnected from %s (%s); reconnecting", self.settings.url,
                                args[0])
                for what, fut in self._requests.values():
                    if not fut.done():
                        fut.set_exception(NotConnectedError(
                            f"connection to {self.settings.url} lost before the {what}"))
                self._requests.clear()
            elif kind == "downgrade":
                if self._loop is not None and not self._downgraded and not self._closing:
                    self._downgraded = True
                    self._loop.create_task(self._downgrade(), name="mqtt-downgrade")
            elif kind == "refused":
                self._connect_error = args[0]
                log.warning("connect to %s refused: %s", self.settings.url, args[0])
                self._settle_first(TransportError(args[0]))

    def _on_ack(self, mid: int, codes: list[int]) -> None:
        pending = self._requests.pop(mid, None)
        if pending is not None:
            if not pending[1].done():
                pending[1].set_result(codes)
            return
        # a renewal made by the network thread on reconnect: nobody waits for it
        failed = [c for c in codes if c >= _FAILURE]
        if failed:
            self._stats["subscribe_errors"] += 1
            log.warning("broker refused renewing a subscription (reason codes %s)",
                        ", ".join(f"{c:#x}" for c in failed))

    def _settle_first(self, error: Exception | None) -> None:
        fut = self._first_connect
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def __aenter__(self) -> MqttTransport:
        self._loop = asyncio.get_running_loop()
        self._first_connect = self._loop.create_future()
        s = self.settings
        self._start_network(self._connect_kwargs())
        if not self._require_connection:
            return self  # paho keeps retrying; QoS 1 publishes queue meanwhile
        try:
            if self._may_downgrade():
                # a broker that takes the TCP connection but never answers an MQTT 5
                # CONNECT gets a 3.1.1 one after a short wait
                first = min(_CONNACK_WAIT_S, s.connect_timeout_s / 2)
                done, _ = await asyncio.wait([self._first_connect], timeout=first)
                if not done and self._socket_opened and self._may_downgrade():
                    self._downgraded = True
                    await self._downgrade()
            await asyncio.wait_for(asyncio.shield(self._first_connect), s.connect_timeout_s)
        except TimeoutError as exc:
            await self._abort()
            raise TransportError(
                f"cannot connect to {s.url} within {s.connect_timeout_s:g} s"
                + (f" ({self._connect_error})" if self._connect_error else "")
            ) from exc
        except TransportError:
            await self._abort()
            raise
        return self

    async def _downgrade(self) -> None:
        """The broker speaks MQTT 3.1.1 only: stop the MQTT 5 client and connect again with a
        3.1.1 one (same client id, will, subscriptions and birth messages). MQTT 5 only
        settings (Receive Maximum, Maximum Packet Size) do not apply on this connection."""
        log.warning("%s does not speak MQTT 5; using MQTT 3.1.1 on this connection",
                    self.settings.url)
        await self._stop_network()
        if self._closing:
            return
        self.protocol = "3.1.1"
        self._client = self._build_client()
        self._start_network(self._connect_kwargs())

    async def _abort(self) -> None:
        self._closing = self._closed = True
        await self._stop_network()
        self._wake()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) for the PUBACKs awaited by :meth:`publish`, then
        disconnect cleanly. Iterators over messages end."""
        if self._closing:
            return
        if self._acks and self.connected:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        self._closing = True
        await self._stop_network()
        self._closed = True
        self._wake()  # iterators see _closing and end

    @property
    def connected(self) -> bool:
        return self._is_connected

    @property
    def connects(self) -> int:
        return self._stats["connects"]

    @property
    def disconnects(self) -> int:
        return self._stats["disconnects"]

    def stats(self) -> dict[str, int]:
        """Counters: connects, disconnects, received, publish_errors, publish_timeouts,
        dropped_qos0_offline, subscribe_errors, acks_skipped; and gauges: inbox and
        inbox_bytes (received, not yet taken), reading_paused (1 while the loop is behind and
        the broker holds on to the rest), awaiting_puback (publishes awaited by ``publish``)."""
        return {**self._stats, "inbox": len(self._inbox), "inbox_bytes": self._inbox_bytes,
                "reading_paused": int(self._read_paused), "awaiting_puback": len(self._acks)}

    def set_birth(self, publications: Sequence[Publication]) -> None:
        """The messages sent first on every (re)connect, replacing the previous ones. Make
        them on the loop (e.g. a status snapshot) and call again whenever they change."""
        self._birth = tuple(publications)

    # ---- subscriptions ----------------------------------------------------------------------
    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe now (awaiting the SUBACK when connected) and on every reconnect."""
        filters = [(f, int(q)) for f, q in filters]
        for f, q in filters:
            validate_filter(f)
            if q not in (0, 1, 2):
                raise SubscribeError(f"invalid QoS {q} for {f!r}")
        if not filters:
            return
        self._subscriptions = {**self._subscriptions, **dict(filters)}
        self._unsub_pending = self._unsub_pending - {f for f, _ in filters}
        if not self.connected:
            return  # renewed by the network thread when the connection comes
        codes = await self._request("SUBACK", lambda: self._client.subscribe(filters))
        if codes is None:
            return
        failed = [(f, c) for (f, _), c in zip(filters, codes, strict=False) if c >= _FAILURE]
        if failed or len(codes) != len(filters):
            self._stats["subscribe_errors"] += 1
            for f, _ in failed:  # not renewed on reconnect: the broker said no
                self._subscriptions = {k: v for k, v in self._subscriptions.items() if k != f}
            raise SubscribeError("broker refused " + ", ".join(
                f"{f!r} (reason code {c:#x})" for f, c in failed) if failed else
                f"SUBACK has {len(codes)} codes for {len(filters)} filters")

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        """Stop receiving ``filters`` (awaiting the UNSUBACK when connected); they are not
        renewed on reconnect. While disconnected the unsubscribe is sent on the next connect
        (a persistent session would otherwise keep the subscription)."""
        filters = list(filters)
        for f in filters:
            validate_filter(f)
        if not filters:
            return
        self._subscriptions = {k: v for k, v in self._subscriptions.items() if k not in filters}
        self._unsub_pending = self._unsub_pending | set(filters)
        if not self.connected:
            return
        codes = await self._request("UNSUBACK", lambda: self._client.unsubscribe(filters))
        if codes is None:
            return
        self._unsub_pending = self._unsub_pending - set(filters)
        failed = [(f, c) for f, c in zip(filters, codes, strict=False) if c >= _FAILURE]
        if failed:
            self._stats["subscribe_errors"] += 1
            raise SubscribeError("broker refused to unsubscribe " + ", ".join(
                f"{f!r} (reason code {c:#x})" for f, c in failed))

    async def _request(self, what: str, send: Callable[[], tuple[Any, int | None]]
                       ) -> list[int] | None:
        """Send a SUBSCRIBE/UNSUBSCRIBE and await its answer; None if the link was down."""
        assert self._loop is not None
        try:
            rc, mid = send()
        except ValueError as exc:
            raise SubscribeError(str(exc)) from exc
        if rc == paho.MQTT_ERR_NO_CONN:
            return None  # raced a disconnect: the network thread sends it on reconnect
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            self._stats["subscribe_errors"] += 1
            raise SubscribeError(f"{what} not sent: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._requests[mid] = (what, fut)
        try:
            return await asyncio.wait_for(fut, self.settings.subscribe_timeout_s)
        except TimeoutError as exc:
            self._stats["subscribe_errors"] += 1
            raise SubscribeError(f"no {what} from {self.settings.url} within "
                                 f"{self.settings.subscribe_timeout_s:g} s") from exc
        finally:
            self._requests.pop(mid, None)

    # ---- publishing -------------------------------------------------------------------------
    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo:
        try:
            info = self._client.publish(topic, payload, qos, retain)
        except (ValueError, TypeError) as exc:  # bad topic, QoS, payload type or size
            self._stats["publish_errors"] += 1
            raise PublishError(f"publish to {topic!r} refused: {exc}") from exc
        if self._writing is False and self._client.want_write():
            self._check_write()  # the socket took only part: write the rest when it can
        rc = info.rc
        # NO_CONN: QoS > 0 is queued by paho until the connection is back; QoS 0 is not,
        # and the caller decides (drop and count, or NotConnectedError)
        if rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return info
        self._stats["publish_errors"] += 1
        if rc == paho.MQTT_ERR_QUEUE_SIZE:  # every packet id is taken by a waiting message
            raise PublishError(
                f"publish to {topic!r} refused: queue full: "
                f"{len(self._client._out_messages)} QoS 1/2 messages wait for the broker's "
                "acknowledgement, as many as MQTT packet ids allow (the broker takes them "
                "slower than they come)")
        raise PublishError(f"publish to {topic!r} refused: {paho.error_string(rc)}")

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0,
                       retain: bool = False) -> None:
        """Hand a publish to paho without waiting. QoS 1/2 while offline is queued and sent
        on reconnect; QoS 0 while offline is dropped and counted (``dropped_qos0_offline``).
        Raises :class:`PublishError` when paho refuses it."""
        info = self._send(topic, payload, qos, retain)
        if info.rc == paho.MQTT_ERR_NO_CONN and qos == 0:
            self._stats["dropped_qos0_offline"] += 1

    def flush(self) -> None:
        """Send what this loop turn gathered now (the answers of a scored batch), not at the
        turn's end: they then leave before the batch's results are packed for the outbox."""
        if self._flush_scheduled and not self._writing:
            self._write()

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and, for QoS > 0, wait for the broker's acknowledgement (a QoS 1/2
        publish made while offline waits for the reconnect). Raises
        :class:`PublishTimeoutError` after ``timeout`` seconds (the message stays queued),
        :class:`NotConnectedError` for QoS 0 while offline, :class:`PublishError` when paho
        or the broker refuses it."""
        if qos == 0:
            info = self._send(topic, payload, qos, retain)
            if info.rc == paho.MQTT_ERR_NO_CONN:
                raise NotConnectedError(f"not connected to {self.settings.url}")
            return
        assert self._loop is not None
        self._awaiting += 1  # before the send: its PUBACK must reach the loop
        try:
            info = self._send(topic, payload, qos, retain)
            fut: asyncio.Future[None] = self._loop.create_future()
            # the PUBACK is handled on this loop, so it cannot be processed before this line
            self._acks[info.mid] = fut
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError as exc:
                self._stats["publish_timeouts"] += 1
                raise PublishTimeoutError(
                    f"no acknowledgement for {topic!r} within {timeout:g} s") from exc
            finally:
                if self._acks.get(info.mid) is fut:
                    del self._acks[info.mid]
        finally:
            self._awaiting -= 1

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack``. A message from an
        earlier connection, or an ack while offline, is skipped and counted (``acks_skipped``):
        the broker redelivers the message."""
        if not self._manual_ack or message.qos == 0:
            return
        if message.session != self._session or \
                self._client.ack(message.mid, message.qos) != paho.MQTT_ERR_SUCCESS:
            self._stats["acks_skipped"] += 1  # connection gone: the broker redelivers it
        self._check_write()

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Acknowledge a burst of QoS 1 messages received with ``manual_ack`` in one write.

        paho's own ``ack`` writes one packet (one ``send``) per message: at a few thousand
        messages per second that costs more than archiving them. Here the PUBACKs of the
        burst go to paho as one buffer: one ``send``. A PUBACK with reason code 0 is the same
        four bytes in MQTT 3.1.1 and 5. Messages from an earlier connection are skipped and
        counted, as in :meth:`ack`."""
        if not self._manual_ack:
            return
        session = self._session
        mids: list[int] = []
        for m in messages:
            if m.qos == 0:
                continue
            if m.qos != 1 or m.session != session:
                self.ack(m)  # QoS 2 (PUBCOMP) or a stale one: the per-message path
                continue
            mids.append(m.mid)
        if not mids:
            return
        queue = getattr(self._client, "_packet_queue", None)
        if len(mids) == 1 or queue is None:  # nothing to gain, or a paho without it
            for mid in mids:
                if self._client.ack(mid, 1) != paho.MQTT_ERR_SUCCESS:
                    self._stats["acks_skipped"] += 1
            return
        packet = b"".join([_PUBACK(0x40, 2, mid) for mid in mids])
        if queue(paho.PUBACK, packet, 0, 0) != paho.MQTT_ERR_SUCCESS:
            self._stats["acks_skipped"] += len(mids)
        self._check_write()

    # ---- receiving --------------------------------------------------------------------------
    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, in arrival order, until the transport closes."""
        while not self._closing:
            while self._inbox:
                self._stats["received"] += 1
                m = self._inbox.popleft()
                self._inbox_bytes -= len(m.payload)
                if self._read_paused:
                    self._maybe_resume()
                yield m
            await self._wait_inbox()

    async def batches(self, max_items: int = 1024) -> AsyncIterator[list[Message]]:
        """Received messages in bursts of up to ``max_items``: whatever arrived since the
        last wake-up. Ends when the transport closes."""
        while not self._closing:
            inbox = self._inbox
            if inbox:
                n = min(len(inbox), max_items)
                out = [inbox.popleft() for _ in range(n)]
                self._stats["received"] += n
                self._inbox_bytes -= sum([len(m.payload) for m in out])
                if self._read_paused:
                    self._maybe_resume()
                yield out
            else:
                await self._wait_inbox()

    async def _wait_inbox(self) -> None:
        assert self._loop is not None
        if self._inbox or self._closing:
            return
        self._waiter = self._loop.create_future()
        if self._inbox:  # raced with the network thread
            self._waiter = None
            return
        try:
            await self._waiter
        finally:
            self._waiter = None




class _QueuedWhileOffline(logging.Filter):
    """paho logs an ERROR for every publish made while offline; for us that is the normal
    store-and-forward case (QoS 1 messages are queued and resent on reconnect)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")
