"""The one module that owns paho-mqtt and the bridge between its network thread and asyncio.

Nothing else in edgeml imports paho (except test helpers and the plain-script baseline). The
client runs paho's own network thread (``loop_start``), which reconnects with backoff by itself;
incoming messages cross into the event loop through a deque that is drained in bursts, so a
flood of small messages costs one loop wake-up per burst, not one per message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Sequence

import paho.mqtt.client as paho

from edgeml.errors import TransportError

log = logging.getLogger("edgeml.transport.mqtt")


from edgeml.transport.base import Message, Publication  # noqa: E402
from edgeml.transport.settings import BrokerSettings, parse_broker_url  # noqa: E402,F401


class MqttClient:
    """``async with MqttClient(settings) as c``, then ``subscribe``, ``messages()``, ``publish``.

    - ``will``: the last will (retained ``offline`` status for the daemon).
    - ``birth``: called on every (re)connect; the publications it returns go out first.
    - ``manual_ack``: QoS 1 messages are acknowledged only when ``ack(message)`` is called.
    - ``require_connection=False``: enter at once and keep trying in the background (an
      upstream that is away at start must not stop the device).
    Subscriptions are remembered and renewed on every reconnect.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        will: Publication | None = None,
        manual_ack: bool = False,
        require_connection: bool = True,
    ) -> None:
        self.settings = settings
        self._require_connection = require_connection
        self._birth: tuple[Publication, ...] = ()
        self._manual_ack = manual_ack
        self._subscriptions: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Message] = collections.deque()
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None
        self._connected = threading.Event()
        self._first_connect: asyncio.Future[None] | None = None
        self._connect_error: str | None = None
        self._closing = False
        self.connects = 0
        self.disconnects = 0
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._acks_lock = threading.Lock()
        self._early_acks: collections.OrderedDict[int, bool] = collections.OrderedDict()

        proto = paho.MQTTv5 if settings.protocol == "5" else paho.MQTTv311
        kwargs: dict = {"client_id": settings.client_id, "protocol": proto}
        if proto == paho.MQTTv311:
            kwargs["clean_session"] = settings.clean_start
        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, **kwargs)
        paho_log = logging.getLogger("edgeml.transport.mqtt.paho")
        if not paho_log.filters:
            paho_log.addFilter(_QueuedWhileOffline())
        self._client.enable_logger(paho_log)
        # paho rescans its in-flight messages on every PUBACK, so a large window costs
        # O(window) per acknowledged publish; a small one is enough on a LAN.
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        if manual_ack:
            self._client.manual_ack_set(True)
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                self._client.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise TransportError(f"TLS setup failed: {exc}") from exc
            if settings.tls_insecure:
                self._client.tls_insecure_set(True)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = self._on_socket_open

    # ---- paho thread side -------------------------------------------------------------------
    @staticmethod
    def _on_socket_open(client, userdata, sock) -> None:
        # paho does not set TCP_NODELAY; without it small publishes wait for delayed ACKs.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._connect_error = f"broker refused the connection: {reason_code}"
            log.warning("connect to %s refused: %s", self.settings.url, reason_code)
            self._resolve_first(TransportError(self._connect_error))
            return
        self.connects += 1
        log.info("connected to %s (session present: %s)", self.settings.url,
                 getattr(flags, "session_present", None))
        if self._subscriptions:
            client.subscribe(list(self._subscriptions.items()))
        for pub in self._birth:
            client.publish(pub.topic, pub.payload, pub.qos, pub.retain)
        self._connected.set()
        self._resolve_first(None)

    def _on_connect_fail(self, client, userdata) -> None:
        self._connect_error = f"cannot connect to {self.settings.url}"
        log.debug("connect to %s failed; paho retries with backoff", self.settings.url)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._connected.clear()
        if not self._closing:
            self.disconnects += 1
            log.warning("disconnected from %s (%s); reconnecting", self.settings.url, reason_code)

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        self._inbox.append(
            Message(msg.topic, msg.payload, msg.qos, bool(msg.retain), msg.mid, time.time())
        )
        if not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._wake)

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        with self._acks_lock:
            fut = self._acks.pop(mid, None)
            if fut is None:
                self._early_acks[mid] = True
                if len(self._early_acks) > 10_000:  # acks of publish_nowait messages
                    self._early_acks.popitem(last=False)
        if fut is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_set_result, fut)

    def _resolve_first(self, error: Exception | None) -> None:
        fut, loop = self._first_connect, self._loop
        if fut is None or loop is None:
            return
        def settle() -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
        loop.call_soon_threadsafe(settle)

    # ---- event loop side --------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def __aenter__(self) -> MqttClient:
        self._loop = asyncio.get_running_loop()
        self._first_connect = self._loop.create_future()
        s = self.settings
        kwargs: dict = {}
        if s.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            # MQTT 5 ends a session at disconnect unless an expiry is asked for
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if s.clean_start else 0xFFFFFFFF
            kwargs = {"clean_start": s.clean_start, "properties": props}
        try:
            self._client.connect_async(s.host, s.port, keepalive=s.keepalive, **kwargs)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {s.url}: {exc}") from exc
        self._client.loop_start()
        if not self._require_connection:
            return self  # paho keeps retrying in its thread; publishes queue meanwhile
        try:
            await asyncio.wait_for(self._first_connect, s.connect_timeout_s)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            self._closing = True
            self._client.loop_stop()
            raise TransportError(
                f"cannot connect to {s.url} within {s.connect_timeout_s:g} s"
                + (f" ({self._connect_error})" if self._connect_error else "")
            ) from exc
        except TransportError:
            self._closing = True
            self._client.loop_stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued for sending (bounded by ``timeout``), then disconnect cleanly."""
        if self._closing:
            return
        deadline = time.monotonic() + timeout
        while self._acks and self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._closing = True
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)

    def set_birth(self, publications: Sequence[Publication]) -> None:
        self._birth = tuple(publications)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, self._connected.wait, timeout)
        if not ok:
            raise TransportError(f"not connected to {self.settings.url}")

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe now and on every reconnect."""
        for topic, qos in filters:
            self._subscriptions[topic] = qos
        if self.connected and filters:
            rc, _ = self._client.subscribe(list(filters))
            if rc != paho.MQTT_ERR_SUCCESS:
                log.warning("subscribe failed now (%s); renewed on reconnect", rc)

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Queue a publish without waiting; paho keeps it across a reconnect (QoS 1)."""
        info = self._client.publish(topic, payload, qos, retain)
        return info.mid

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        if qos == 0:
            self._client.publish(topic, payload, 0, retain)
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        # Never hold _acks_lock while calling paho: paho calls on_publish under its own
        # message mutex, so holding ours here would deadlock against the network thread.
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        with self._acks_lock:
            if self._early_acks.pop(info.mid, None) is not None:
                return  # the PUBACK beat us here
            self._acks[info.mid] = fut
        await asyncio.wait_for(fut, timeout)

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack``."""
        if self._manual_ack and message.qos > 0:
            self._client.ack(message.mid, message.qos)

    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, in arrival order, until the client closes."""
        while not self._closing:
            while self._inbox:
                yield self._inbox.popleft()
            await self._wait_inbox()

    async def batches(self, max_items: int = 1024) -> AsyncIterator[list[Message]]:
        """Received messages in bursts: whatever arrived since the last wake-up."""
        while not self._closing:
            if self._inbox:
                out = []
                inbox = self._inbox
                while inbox and len(out) < max_items:
                    out.append(inbox.popleft())
                yield out
            else:
                await self._wait_inbox()

    async def _wait_inbox(self) -> None:
        assert self._loop is not None
        if self._inbox:
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


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


MqttTransport = MqttClient
