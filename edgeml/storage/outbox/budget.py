"""The byte budget: stream policies (priority, ``drop_oldest`` / ``refuse_new``), the drop and
refusal counters, and :class:`_Evictor`, which makes room for a new chunk inside one
``put_many`` transaction."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeml.errors import ConfigError, OutboxError

ON_FULL_POLICIES = ("drop_oldest", "refuse_new")


@dataclass(frozen=True)
class StreamPolicy:
    """One named stream: ``priority`` (lower is sent first) and what a full budget does.

    ``on_full="drop_oldest"``: the stream is a ring buffer; its oldest records may be evicted to
    make room for its own new records and for those of higher-priority streams.
    ``on_full="refuse_new"``: what the stream holds is never evicted; a new record that does not
    fit (after room is taken from lower-priority ``drop_oldest`` streams) is refused.
    """

    name: str
    priority: int
    on_full: str = "drop_oldest"

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/+#\0"):
            raise ConfigError(f"invalid stream name {self.name!r} (one MQTT topic level)",
                              key="outbox.streams")
        if not isinstance(self.priority, int) or self.priority < 0:
            raise ConfigError(f"priority must be an integer >= 0, not {self.priority!r}",
                              key=f"outbox.streams.{self.name}.priority")
        if self.on_full not in ON_FULL_POLICIES:
            raise ConfigError(f"must be one of {', '.join(ON_FULL_POLICIES)}, not {self.on_full!r}",
                              key=f"outbox.streams.{self.name}.on_full")


DEFAULT_STREAMS: Mapping[str, StreamPolicy] = {
    # Alerts and deployment events are rare and small; they must never be silently evicted.
    "alerts": StreamPolicy("alerts", 0, "refuse_new"),
    # The selected answers: what users act on, sent before the bulk of all-version results.
    "outputs": StreamPolicy("outputs", 1, "drop_oldest"),
    "deploy": StreamPolicy("deploy", 1, "refuse_new"),
    # Every version's result: the bulk; the first thing given up when the disk budget is full.
    "results": StreamPolicy("results", 2, "drop_oldest"),
}


class _Counter:
    __slots__ = ("dropped", "refused", "reported_dropped", "reported_refused")

    def __init__(self, dropped: int = 0, refused: int = 0, rd: int = 0, rr: int = 0) -> None:
        self.dropped, self.refused = dropped, refused
        self.reported_dropped, self.reported_refused = rd, rr

    @property
    def unreported(self) -> bool:
        return self.dropped > self.reported_dropped or self.refused > self.reported_refused


class _Evictor:
    """Makes room inside one ``put_many`` transaction.

    Victims are the ``drop_oldest`` streams whose priority is the writer's or lower, lowest
    priority first, oldest chunk first (a chunk goes whole; all its records count as dropped).
    Chunks leased by ``next_batch`` (in flight) are never evicted. Candidates are read 256 at
    a time and deleted once per stream at the end, so a full outbox costs about as much per
    record as an empty one.
    """

    def __init__(self, outbox: Any, touched: set[str]) -> None:
        # outbox: the Outbox (edgeml.storage.outbox.store) whose state it edits; not
        # imported here, the store imports this module
        self.ob = outbox
        self.touched = touched
        self.evicted = 0
        self.removed: list[tuple[str, int]] = []  # (stream, seq) of evicted chunks
        self._cands: dict[str, collections.deque[tuple[int, int, int]]] = {}
        self._fetched: dict[str, int] = {}
        self._cutoff: dict[str, int] = {}

    def victims(self, writer: str) -> list[str]:
        ob = self.ob
        prio = ob.streams[writer].priority
        return [s for s in reversed(ob.by_priority)
                if ob.streams[s].priority >= prio and ob.streams[s].on_full == "drop_oldest"]

    def room(self, writer: str) -> int:
        """Bytes a new chunk of ``writer`` can take once everything it may evict is gone."""
        ob = self.ob
        evictable = sum(ob._bytes[v] - ob._lease_bytes.get(v, 0) for v in self.victims(writer))
        return ob.budget_bytes - ob._used + evictable

    def can_fit(self, writer: str, size: int) -> bool:
        return size <= self.room(writer)

    def make_room(self, writer: str, size: int, new_seq: int) -> None:
        ob = self.ob
        for victim in self.victims(writer):
            while ob._used + size > ob.budget_bytes and ob._count[victim] > 0:
                cands = self._cands.setdefault(victim, collections.deque())
                if not cands:
                    start = max(ob._lease.get(victim, 0), self._fetched.get(victim, 0))
                    cands.extend(ob._db.execute(
                        "SELECT seq, size, count FROM chunks WHERE stream=? AND seq>? AND seq<? "
                        "ORDER BY seq LIMIT 256", (victim, start, new_seq)).fetchall())
                    if not cands:
                        break
                    self._fetched[victim] = cands[-1][0]
                seq, vsize, n = cands.popleft()
                self._cutoff[victim] = seq
                self.removed.append((victim, seq))
                ob._count[victim] -= n
                ob._bytes[victim] -= vsize
                ob._used -= vsize
                ob._counters[victim].dropped += n
                self.touched.add(victim)
                self.evicted += n
            if ob._used + size <= ob.budget_bytes:
                return
        raise OutboxError("internal: could not make room although can_fit said so")

    def apply(self) -> None:
        ob = self.ob
        for victim, cutoff in self._cutoff.items():
            lease = ob._lease.get(victim, 0)
            ob._db.execute("DELETE FROM chunks WHERE stream=? AND seq>? AND seq<=?",
                           (victim, lease, cutoff))
            if lease == 0:  # the head went; find the new oldest
                ob._oldest[victim] = ob._query_oldest(victim)

