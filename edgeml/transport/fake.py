"""An in-memory broker for stage tests: no sockets, no threads, no paho.

``broker = FakeBroker()``; hand ``broker.connector`` to whatever takes a
:class:`~edgeml.transport.base.Connector`, or make a transport with ``broker.client(settings)``.
Everything runs on the test's event loop and is delivered at once (a publish is routed before
``publish`` returns), so tests need no sleeps: ``await asyncio.sleep(0)`` lets iterators run.

What it models, and how a test drives it:

- subscriptions with MQTT wildcards (``edgeml.topics.matches``; ``$share/group/`` stripped),
  retained messages (delivered on subscribe, an empty retained payload clears), QoS 0/1
  (a message is delivered with the lower of publish and subscription QoS);
- manual acks: ``broker.unacked(client_id)`` lists QoS 1 messages delivered and not acked;
  they are redelivered after a reconnect, as a persistent session would;
- births (:meth:`FakeTransport.set_birth`) published on every connect, before anything else;
- ``broker.drop(client)``: abrupt disconnect, the last will is published; the client
  reconnects on ``broker.reconnect(client)`` (or ``restart()``);
- ``broker.disconnect_all()`` / ``broker.restart()``: an outage and its end; while offline a
  client's QoS 1 publishes are queued and sent on reconnect (an awaited QoS 1 ``publish``
  waits for that), QoS 0 ones are dropped and counted, subscriptions are renewed; QoS 1
  messages for a subscriber that is away (dropped, not closed) are kept by its session and
  delivered when it reconnects, as with a persistent session;
- ``broker.published``: every publish the broker accepted, as ``(topic, payload, qos, retain)``;
- ``broker.fail_publish(topic_filter, error)``: publishes to matching topics raise ``error``
  (a :class:`PublishError` by default) until ``broker.fail_publish(topic_filter, None)``;
  ``broker.deny_subscribe(topic_filter)``: subscribing to it raises :class:`SubscribeError`;
  ``broker.hold_acks = True``: QoS 1 publishes are routed but not acknowledged (so
  ``publish(timeout=)`` raises :class:`PublishTimeoutError`) until ``release_acks()``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Sequence

from edgeml.errors import (
    NotConnectedError,
    PublishError,
    PublishTimeoutError,
    SubscribeError,
    TransportError,
)
from edgeml.topics import matches
from edgeml.transport.base import Message, Publication, validate_filter


class FakeBroker:
    """One in-memory broker shared by any number of :class:`FakeTransport` clients."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.senders: list[str] = []  # client id of each entry of ``published``
        self.retained: dict[str, Publication] = {}
        self.online = True
        self.hold_acks = False
        self._clients: dict[str, FakeTransport] = {}
        self._failing: dict[str, BaseException] = {}
        self._denied: set[str] = set()
        self._held: list[asyncio.Future[None]] = []
        self._anon = 0

    # ---- making clients ---------------------------------------------------------------------
    def connector(self, settings: object = None, *, will: Publication | None = None,
                  manual_ack: bool = False, require_connection: bool = True) -> FakeTransport:
        """The :class:`~edgeml.transport.base.Connector` the device takes."""
        client_id = getattr(settings, "client_id", "") or ""
        if not client_id:
            self._anon += 1
            client_id = f"fake-{self._anon}"
        return FakeTransport(self, client_id, will=will, manual_ack=manual_ack,
                             require_connection=require_connection)

    client = connector

    def clients(self) -> dict[str, FakeTransport]:
        return dict(self._clients)

    # ---- what a test inspects ---------------------------------------------------------------
    def unacked(self, client_id: str) -> list[Message]:
        """QoS 1 messages delivered to ``client_id`` with manual ack and not acked yet."""
        c = self._clients.get(client_id)
        return [] if c is None else list(c._unacked.values())

    def payloads(self, topic_filter: str = "#") -> list[bytes]:
        """Payloads published to topics matching ``topic_filter``, in order."""
        return [p[1] for p in self.published if matches(topic_filter, p[0])]

    # ---- what a test breaks -----------------------------------------------------------------
    def fail_publish(self, topic_filter: str, error: BaseException | str | None = "default"
                     ) -> None:
        """Publishes to topics matching ``topic_filter`` raise ``error`` (a PublishError if
        not given); ``error=None`` heals it."""
        if error == "default":
            error = PublishError(f"publish to {topic_filter!r} refused by the fake broker")
        if error is None:
            self._failing.pop(topic_filter, None)
        else:
            assert isinstance(error, BaseException)
            self._failing[topic_filter] = error

    def deny_subscribe(self, topic_filter: str) -> None:
        self._denied.add(topic_filter)

    def release_acks(self) -> None:
        self.hold_acks = False
        held, self._held = self._held, []
        for fut in held:
            if not fut.done():
                fut.set_result(None)

    def drop(self, client: FakeTransport | str) -> None:
        """An abrupt disconnect of one client: its last will is published."""
        c = self._clients.get(client if isinstance(client, str) else client.client_id)
        if c is not None and c.connected:
            c._lose_connection()
            if c._will is not None:
                self._route(c._will, c.client_id)

    def reconnect(self, client: FakeTransport | str) -> None:
        c = self._clients.get(client if isinstance(client, str) else client.client_id)
        if c is not None and self.online and not c._closed:
            c._connect()

    def disconnect_all(self) -> None:
        """The broker goes away (no wills: a broker that dies cannot send them)."""
        self.online = False
        for c in list(self._clients.values()):
            if c.connected:
                c._lose_connection()

    def restart(self) -> None:
        """The broker comes back; every open client reconnects, renews its subscriptions and
        sends its births and what it queued while offline."""
        self.online = True
        for c in list(self._clients.values()):
            if not c._closed and not c.connected:
                c._connect()

    # ---- routing ----------------------------------------------------------------------------
    def _accept(self, pub: Publication, client_id: str) -> None:
        for f, err in self._failing.items():
            if matches(f, pub.topic):
                raise err
        self._route(pub, client_id)

    def _route(self, pub: Publication, client_id: str) -> None:
        self.published.append((pub.topic, pub.payload, pub.qos, pub.retain))
        self.senders.append(client_id)
        if pub.retain:
            if pub.payload:
                self.retained[pub.topic] = pub
            else:
                self.retained.pop(pub.topic, None)
        for c in self._clients.values():
            c._offer(pub, retained=False)

    def _ack_future(self) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        if self.hold_acks:
            self._held.append(fut)
        else:
            fut.set_result(None)
        return fut


class FakeTransport:
    """A :class:`~edgeml.transport.base.Transport` on a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker, client_id: str, *, will: Publication | None,
                 manual_ack: bool, require_connection: bool) -> None:
        self.broker = broker
        self.client_id = client_id
        self._will = will
        self._manual_ack = manual_ack
        self._require_connection = require_connection
        self._birth: tuple[Publication, ...] = ()
        self._subscriptions: dict[str, int] = {}
        self._inbox: collections.deque[Message] = collections.deque()
        self._unacked: dict[int, Message] = {}
        self._session_queue: list[tuple[Publication, int]] = []
        self._queued: list[tuple[Publication, asyncio.Future[None] | None]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._connected = False
        self._closed = False
        self._session = 0
        self._mid = 0
        self._stats = collections.Counter({
            "connects": 0, "disconnects": 0, "received": 0, "publish_errors": 0,
            "publish_timeouts": 0, "dropped_qos0_offline": 0, "subscribe_errors": 0,
            "acks_skipped": 0,
        })

    # ---- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> FakeTransport:
        old = self.broker._clients.get(self.client_id)
        if old is not None and old is not self and not old._closed:
            old._lose_connection()  # a second client with the same id takes over, as in MQTT
        self.broker._clients[self.client_id] = self
        if self.broker.online:
            self._connect()
        elif self._require_connection:
            raise TransportError("cannot connect to the fake broker (it is down)")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, timeout: float = 2.0) -> None:
        self._closed = True
        self._connected = False
        if self.broker._clients.get(self.client_id) is self:
            del self.broker._clients[self.client_id]
        self._wake()

    def _connect(self) -> None:
        self._connected = True
        self._session += 1
        self._stats["connects"] += 1
        for pub in self._birth:
            self.broker._route(pub, self.client_id)
        # a persistent session redelivers what was delivered and never acked
        redeliver = sorted(self._unacked.values(), key=lambda m: m.mid)
        self._unacked.clear()
        for m in redeliver:
            self._deliver(Publication(m.topic, m.payload, m.qos, m.retain), m.qos, m.retain)
        for f, q in self._subscriptions.items():
            self._send_retained(f, q)
        kept, self._session_queue = self._session_queue, []
        for pub, qos in kept:
            self._deliver(pub, qos, retain=False)
        queued, self._queued = self._queued, []
        for pub, fut in queued:
            try:
                self.broker._accept(pub, self.client_id)
            except Exception as exc:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                continue
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _lose_connection(self) -> None:
        if self._connected:
            self._connected = False
            self._stats["disconnects"] += 1

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connects(self) -> int:
        return self._stats["connects"]

    @property
    def disconnects(self) -> int:
        return self._stats["disconnects"]

    def stats(self) -> dict[str, int]:
        return {**self._stats, "inbox": len(self._inbox), "awaiting_puback": 0}

    def set_birth(self, publications: Sequence[Publication]) -> None:
        self._birth = tuple(publications)

    # ---- subscriptions ----------------------------------------------------------------------
    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        filters = [(f, int(q)) for f, q in filters]
        for f, _ in filters:
            validate_filter(f)
            if f in self.broker._denied:
                self._stats["subscribe_errors"] += 1
                raise SubscribeError(f"broker refused {f!r} (reason code 0x87)")
        for f, q in filters:
            self._subscriptions[f] = q
        if self._connected:
            for f, q in filters:
                self._send_retained(f, q)

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        for f in filters:
            validate_filter(f)
            self._subscriptions.pop(f, None)

    def _send_retained(self, topic_filter: str, qos: int) -> None:
        if topic_filter.startswith("$share/"):
            return  # MQTT 5: no retained messages for shared subscriptions
        for pub in list(self.broker.retained.values()):
            if matches(topic_filter, pub.topic):
                self._deliver(pub, min(qos, pub.qos), retain=True)

    def _offer(self, pub: Publication, retained: bool) -> None:
        best = -1
        for f, q in self._subscriptions.items():
            if matches(f, pub.topic):
                best = max(best, q)
        if best < 0 or self._closed:
            return
        qos = min(best, pub.qos)
        if self._connected:
            self._deliver(pub, qos, retain=False)
        elif qos > 0:  # the persistent session keeps QoS 1 for a client that is away
            self._session_queue.append((pub, qos))

    def _deliver(self, pub: Publication, qos: int, retain: bool) -> None:
        self._mid = self._mid % 65535 + 1
        m = Message(pub.topic, pub.payload, qos, retain, self._mid if qos else 0, time.time(),
                    self._session)
        if qos > 0 and self._manual_ack:
            self._unacked[m.mid] = m
        self._inbox.append(m)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- publishing -------------------------------------------------------------------------
    def _check(self, topic: str, qos: int) -> None:
        if not topic or "+" in topic or "#" in topic or qos not in (0, 1, 2):
            self._stats["publish_errors"] += 1
            raise PublishError(f"publish to {topic!r} refused: invalid topic or QoS")

    def flush(self) -> None:
        """Publishes are delivered as they are made: nothing waits."""

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0,
                       retain: bool = False) -> None:
        self._check(topic, qos)
        pub = Publication(topic, bytes(payload), qos, retain)
        if not self._connected:
            if qos == 0:
                self._stats["dropped_qos0_offline"] += 1
            else:
                self._queued.append((pub, None))
            return
        try:
            self.broker._accept(pub, self.client_id)
        except PublishError:
            self._stats["publish_errors"] += 1
            raise

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float | None = None) -> None:
        self._check(topic, qos)
        pub = Publication(topic, bytes(payload), qos, retain)
        if not self._connected:
            if qos == 0:
                raise NotConnectedError("not connected to the fake broker")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queued.append((pub, fut))
        else:
            try:
                self.broker._accept(pub, self.client_id)
            except PublishError:
                self._stats["publish_errors"] += 1
                raise
            if qos == 0:
                return
            fut = self.broker._ack_future()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as exc:
            self._stats["publish_timeouts"] += 1
            raise PublishTimeoutError(f"no acknowledgement for {topic!r} within "
                                      f"{timeout:g} s") from exc

    def ack(self, message: Message) -> None:
        if not self._manual_ack or message.qos == 0:
            return
        if message.session != self._session or not self._connected:
            self._stats["acks_skipped"] += 1  # the broker redelivers it
            return
        self._unacked.pop(message.mid, None)

    def ack_many(self, messages: Sequence[Message]) -> None:
        for m in messages:
            self.ack(m)

    # ---- receiving --------------------------------------------------------------------------
    async def messages(self) -> AsyncIterator[Message]:
        while not self._closed:
            while self._inbox:
                self._stats["received"] += 1
                yield self._inbox.popleft()
            await self._wait()

    async def batches(self, max_items: int = 1024) -> AsyncIterator[list[Message]]:
        while not self._closed:
            if self._inbox:
                n = min(len(self._inbox), max_items)
                self._stats["received"] += n
                yield [self._inbox.popleft() for _ in range(n)]
            else:
                await self._wait()

    async def _wait(self) -> None:
        if self._inbox or self._closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
