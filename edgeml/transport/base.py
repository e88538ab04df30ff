"""The transport seam: what the device needs from a message broker, and nothing more.

The device core talks to a :class:`Transport`; :class:`edgeml.transport.mqtt.MqttTransport`
is the real one (paho-mqtt behind it), :class:`edgeml.transport.fake.FakeBroker` an in-memory
one for stage tests. Every failure crosses this seam as an
:class:`~edgeml.errors.TransportError` subclass; no paho type or return code leaks past it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgeml.errors import SubscribeError


@dataclass(frozen=True, slots=True)
class Publication:
    """A message to publish (also the last will and the birth messages)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """One received message. ``received`` is wall-clock time at arrival (``time.time()``);
    ``mid`` and ``session`` are what :meth:`Transport.ack` needs: the packet id, and which
    connection it arrived on (a packet id is only meaningful on the connection that used it:
    after a reconnect the broker redelivers the message, and an ack of the old id is skipped
    rather than acknowledging whatever now carries that id)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    received: float
    session: int = 0


class Transport(Protocol):
    """One connection to one broker, used from the event loop only.

    Enter with ``async with``; subscriptions are remembered and renewed on every reconnect;
    the birth messages (:meth:`set_birth`) go out first on every (re)connect, as bytes the
    caller made on its own loop; the last will is fixed when the transport is built."""

    @property
    def connected(self) -> bool: ...

    @property
    def connects(self) -> int: ...

    @property
    def disconnects(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

    async def __aenter__(self) -> Transport: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def close(self, timeout: float = 2.0) -> None: ...

    def set_birth(self, publications: Sequence[Publication]) -> None: ...

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None: ...

    async def unsubscribe(self, filters: Sequence[str]) -> None: ...

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0,
                       retain: bool = False) -> None: ...

    def flush(self) -> None:
        """Send what was published this loop turn now rather than at the turn's end."""

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float | None = None) -> None: ...

    def ack(self, message: Message) -> None: ...

    def ack_many(self, messages: Sequence[Message]) -> None: ...

    def batches(self, max_items: int = 1024) -> AsyncIterator[list[Message]]: ...

    def messages(self) -> AsyncIterator[Message]: ...


class Connector(Protocol):
    """Builds a transport for one connection: ``connector(settings, will=..., manual_ack=...,
    require_connection=...)``. The device takes one, so tests can hand it the fake."""

    def __call__(self, settings: object, *, will: Publication | None = None,
                 manual_ack: bool = False, require_connection: bool = True) -> Transport: ...


def validate_filter(topic_filter: str) -> None:
    """Raise :class:`SubscribeError` for a filter no broker would accept (mosquitto answers
    those by dropping the connection, which would look like an outage, not a bad filter)."""
    if not topic_filter or "\0" in topic_filter or len(topic_filter.encode()) > 65535:
        raise SubscribeError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    if topic_filter.startswith("$share/"):
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            raise SubscribeError(f"invalid shared subscription {topic_filter!r}")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or \
                ("+" in level and level != "+"):
            raise SubscribeError(f"invalid topic filter {topic_filter!r}: a wildcard must be a "
                                 "whole level, and '#' the last one")
