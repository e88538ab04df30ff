"""Where synced batches come from: the seam between the collector and a message system.

A :class:`Source` yields :class:`Delivery` objects; the collector stores a delivery's records
and commits, and only then awaits ``delivery.ack()``. A source must therefore redeliver
anything not acknowledged (after a crash, a reconnect or a timeout); the collector is
idempotent by ``record_id``, so redelivery never duplicates a row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Delivery:
    """One synced batch message.

    ``topic`` is always in MQTT form, ``{p}/{d}/sync/{stream}``, whatever the source (a NATS
    source turns the subject ``{p}.{d}.sync.{stream}`` back into it), so the collector parses
    one form. ``ack`` tells the source the batch is committed; it must be safe to call once.
    ``source`` names where it came from (for logs and the quarantine table)."""

    topic: str
    payload: bytes
    ack: Callable[[], Awaitable[None]]
    source: str = ""


class Source(Protocol):
    """An async context manager that connects on enter and yields deliveries until closed."""

    name: str

    async def __aenter__(self) -> Source: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def deliveries(self) -> AsyncIterator[Delivery]: ...
