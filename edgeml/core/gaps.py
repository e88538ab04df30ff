"""Sequence gaps: messages a sender numbered that never arrived, per source topic.

Many senders number their messages (``"id": 17``). When they do, a missing number is the
only evidence on the device that the broker, a bridge or the network lost input: the
device cannot count what it never received. :class:`SequenceGaps` follows the numbers per
source topic and counts, without ever holding more than a fixed amount of memory:

- **numbered**: messages whose id is a non-negative integer (``17``, ``17.0`` or ``"17"``;
  per sample in a batch, or once for a batch numbered as a whole). Other ids (``"s0-17"``,
  none) are counted as ``unnumbered`` and left alone.
- **gaps / missing**: a number above the next expected one opens a gap; the numbers skipped
  are *skipped*, and *missing* until they arrive. ``gaps`` counts such jumps, whatever their
  size; ``skipped = late + lost + open`` only ever grows.
- **late**: a number that arrives after a higher one and fills part of an open gap (the
  broker or a bridge reordered it). It is not missing any more, and never counted lost.
- **lost**: missing numbers that can no longer arrive late: their gap is more than
  :data:`REORDER_WINDOW` numbers behind the newest, the source restarted, the source's
  gap memory was full, or the source was forgotten. ``missing = lost + open``, where
  ``open`` are the numbers still inside the reorder window (they may yet arrive).
- **duplicates**: a number below the next expected one that fills no open gap: seen before
  (a QoS 1 redelivery, a sender retrying), or so late that its gap was already counted lost.
  Not a gap; the message itself is still processed.
- **resets**: the sender started again: a 0 or 1 below the expected number, followed by its
  successor (1 or 2). Counting starts over from there and the numbers still open from before
  are counted lost; a restart is never a gap. A lone 0 or 1 (not followed by its successor)
  was a repeat and counts as a duplicate. A sender restarting at any other number is seen
  as duplicates until it passes its old numbers: number from 0 or 1.

The first number seen from a source (at start, or after it was forgotten) sets where
counting begins: what came before it is unknown, not missing.

Memory: at most :data:`MAX_HOLES` open gaps per source (beyond that the oldest is closed
and counted lost) and at most ``max_sources`` sources (beyond that the least recently seen
one is forgotten, its open numbers counted lost, and ``sources_evicted`` counted; when it
sends again it starts afresh, with no gap).

Pure and synchronous; the ingress stage calls :meth:`SequenceGaps.observe` once per archived
message, in arrival order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: how far (in numbers) behind the newest a missing number may still arrive as "late"
REORDER_WINDOW = 1024
#: open gaps remembered per source
MAX_HOLES = 32
#: sources (topics) followed per pipeline
MAX_SOURCES = 4096
#: numbers a sender starts from after a restart
RESTART_IDS = (0, 1)
_MAX_DIGITS = 19


def sequence_number(v: Any) -> int | None:
    """The id as a sequence number, or None when it is not one (bools, negative numbers,
    fractions and text other than plain digits are not)."""
    t = type(v)
    if t is int:
        return v if v >= 0 else None
    if t is float:
        return int(v) if v >= 0 and v.is_integer() else None
    if t is str and 0 < len(v) <= _MAX_DIGITS and v.isascii() and v.isdigit():
        return int(v)
    return None


def _whole_batch(ids: tuple) -> int | None:
    """The number of a batch whose every id is ``"<number>:<digits>"`` with one number (what
    :meth:`SequenceGaps.observe` counts once), else None (then it looks at each id)."""
    first = ids[0]
    if type(first) is not str:
        return None
    base, sep, sub = first.rpartition(":")
    if not sep or not sub.isdigit():
        return None
    n = sequence_number(base)
    if n is None:
        return None
    prefix = base + ":"
    k = len(prefix)
    for v in ids:
        if type(v) is not str or not v.startswith(prefix) or not v[k:].isdigit():
            return None
    return n


@dataclass
class _Source:
    next: int  # the number expected next: one above the highest seen
    holes: list[list[int]] = field(default_factory=list)  # open [lo, hi), oldest first
    restart: int | None = None  # a 0 or 1 below ``next``, waiting for its successor


class SequenceGaps:
    """Gap, loss, reorder, duplicate and restart counts over numbered messages."""

    def __init__(self, *, max_sources: int = MAX_SOURCES, max_holes: int = MAX_HOLES,
                 reorder_window: int = REORDER_WINDOW) -> None:
        if max_sources < 1 or max_holes < 1 or reorder_window < 1:
            raise ValueError("max_sources, max_holes and reorder_window must be at least 1")
        self.max_sources = max_sources
        self.max_holes = max_holes
        self.reorder_window = reorder_window
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self.numbered = 0
        self.unnumbered = 0
        self.gaps = 0
        self.skipped = 0  # numbers ever jumped over: late + lost + open
        self.late = 0
        self.lost = 0
        self.duplicates = 0
        self.resets = 0
        self.sources_evicted = 0
        self._open = 0  # numbers in open holes, all sources

    # ---- input -----------------------------------------------------------------------------
    def observe(self, source: str, ids: Iterable[Any]) -> None:
        """The ids of one message (one per sample; a batch's samples in order). A batch
        numbered as a whole (``{"id": 7, "samples": [...]}``: sample ids ``"7:0"``,
        ``"7:1"``, ...) counts once, as message 7."""
        if type(ids) is tuple and len(ids) > 1:
            n = _whole_batch(ids)
            if n is not None:  # every id is "<n>:<digits>": the usual numbered batch
                self.observe_number(source, n)
                return
        whole = None
        for v in ids:
            n = sequence_number(v)
            if n is None and type(v) is str:
                base, sep, sub = v.rpartition(":")
                if sep and sub.isdigit():
                    n = sequence_number(base)
                    if n is not None:
                        if n == whole:
                            continue  # another sample of the same numbered batch
                        whole = n
            if n is None:
                self.unnumbered += 1
            else:
                self.observe_number(source, n)

    def observe_number(self, source: str, n: int) -> None:
        self.numbered += 1
        src = self._sources.get(source)
        if src is None:
            self._sources[source] = _Source(n + 1)
            if len(self._sources) > self.max_sources:
                _, old = self._sources.popitem(last=False)
                self._close_all(old)
                self.sources_evicted += 1
            return
        self._sources.move_to_end(source)
        restart = src.restart
        if restart is not None:  # a 0 or 1 came back: a restart if its successor follows
            src.restart = None
            if n == restart + 1:
                self.resets += 1
                self._close_all(src)
                src.next = n + 1
                return
            self.duplicates += 1  # it was a repeat of the first message
        if n == src.next:
            src.next = n + 1
        elif n > src.next:
            self.gaps += 1
            self.skipped += n - src.next
            self._open += n - src.next
            src.holes.append([src.next, n])
            src.next = n + 1
            if len(src.holes) > self.max_holes:
                self._close(src, 0)
        elif self._fill(src, n):
            self.late += 1
        elif n in RESTART_IDS:
            src.restart = n  # decided by the next number
            return
        else:
            self.duplicates += 1
        self._age(src)

    # ---- figures ---------------------------------------------------------------------------
    @property
    def open(self) -> int:
        """Missing numbers that may still arrive (inside the reorder window)."""
        return self._open

    @property
    def missing(self) -> int:
        """Numbers skipped and not (yet) arrived: lost + open."""
        return self.lost + self._open

    @property
    def sources(self) -> int:
        return len(self._sources)

    def status(self) -> dict:
        return {"numbered": self.numbered, "unnumbered": self.unnumbered,
                "sources": self.sources, "gaps": self.gaps, "skipped": self.skipped,
                "missing": self.missing,
                "lost": self.lost, "open": self.open, "late": self.late,
                "duplicates": self.duplicates, "resets": self.resets,
                "sources_evicted": self.sources_evicted,
                "reorder_window": self.reorder_window}

    # ---- holes -----------------------------------------------------------------------------
    def _fill(self, src: _Source, n: int) -> bool:
        """Take ``n`` out of an open hole; False when it is in none."""
        for i, (lo, hi) in enumerate(src.holes):
            if lo <= n < hi:
                self._open -= 1
                if hi - lo == 1:
                    del src.holes[i]
                elif n == lo:
                    src.holes[i][0] = n + 1
                elif n == hi - 1:
                    src.holes[i][1] = n
                else:
                    src.holes[i:i + 1] = [[lo, n], [n + 1, hi]]
                    if len(src.holes) > self.max_holes:
                        self._close(src, 0)
                return True
        return False

    def _age(self, src: _Source) -> None:
        """Close holes (their numbers lost) that fell out of the reorder window."""
        floor = src.next - self.reorder_window
        while src.holes and src.holes[0][0] < floor:
            lo, hi = src.holes[0]
            if hi <= floor:
                self._close(src, 0)
            else:  # partly behind the window: the part behind it is lost
                self.lost += floor - lo
                self._open -= floor - lo
                src.holes[0][0] = floor
                break

    def _close(self, src: _Source, i: int) -> None:
        lo, hi = src.holes.pop(i)
        self.lost += hi - lo
        self._open -= hi - lo

    def _close_all(self, src: _Source) -> None:
        while src.holes:
            self._close(src, 0)
