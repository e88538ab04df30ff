"""Counters and latency figures the daemon reports on ``{p}/{d}/status``.

Plain integers bumped on the event loop thread (and a few from scoring threads, where a lost
increment under a race would only blur a figure, never data). Latencies keep a ring of the most
recent values per version so percentiles reflect now, not the whole uptime.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

import numpy as np

from edgeml.core.gaps import SequenceGaps

#: upper bounds (ms) of the cumulative latency histogram exported on /metrics (in seconds)
LATENCY_BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)


class LatencyRing:
    """The last ``size`` latencies in ms; percentiles on demand. Also counts every value
    since start into :data:`LATENCY_BUCKETS_MS` (``hist``, ``total_ms``) for /metrics."""

    def __init__(self, size: int = 2048) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self.hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.total_ms = 0.0

    def add(self, ms: float) -> None:
        self._values.append(ms)
        self.hist[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.total_ms += ms

    def add_repeated(self, ms: float, n: int) -> None:
        """``n`` equal values at once: the rows of one message share their latency."""
        if n == 1:
            self.add(ms)
            return
        self._values.extend([ms] * n)
        self.hist[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += n
        self.total_ms += ms * n

    def extend(self, values) -> None:
        for v in values:
            self.add(v)

    def summary(self) -> dict[str, float] | None:
        if not self._values:
            return None
        arr = np.fromiter(self._values, dtype=np.float64)
        p50, p99 = np.percentile(arr, [50, 99])
        return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
                "max_ms": round(float(arr.max()), 3), "n": int(arr.size)}


@dataclass
class VersionStats:
    rows: int = 0
    batches: int = 0
    errors: int = 0
    late: int = 0
    skipped: int = 0
    answered: int = 0
    fallbacks: int = 0  # answers this version gave as a fallback (not the policy's first pick)
    latency: LatencyRing = field(default_factory=LatencyRing)
    last_error: str | None = None

    def to_dict(self) -> dict:
        return {"rows": self.rows, "batches": self.batches, "errors": self.errors,
                "late": self.late, "skipped": self.skipped, "answered": self.answered,
                "latency": self.latency.summary(), "last_error": self.last_error}


class AgreementWindow:
    """Champion/canary agreement over the last ``size`` rows both scored."""

    def __init__(self, size: int = 200) -> None:
        self._hits: collections.deque[bool] = collections.deque(maxlen=size)

    def add_many(self, a: list, b: list) -> None:
        self._hits.extend(x == y for x, y in zip(a, b, strict=False))

    @property
    def value(self) -> float | None:
        return (sum(self._hits) / len(self._hits)) if self._hits else None

    @property
    def count(self) -> int:
        return len(self._hits)

    @property
    def size(self) -> int:
        return self._hits.maxlen or 0

    def resized(self, size: int) -> AgreementWindow:
        """A window of another size holding the newest rows of this one."""
        new = AgreementWindow(size)
        new._hits.extend(self._hits)
        return new

    def clear(self) -> None:
        self._hits.clear()


@dataclass
class PipelineStats:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: collections.Counter = field(default_factory=collections.Counter)
    rows: int = 0
    dropped: int = 0
    #: times the device stopped taking input until the full queue had room (policy "wait")
    queue_waits: int = 0
    scored: int = 0
    published: int = 0
    fallbacks: int = 0
    unanswered: int = 0
    batches: int = 0
    errors: int = 0
    answer_latency: LatencyRing = field(default_factory=LatencyRing)
    versions: dict[str, VersionStats] = field(default_factory=dict)
    #: gaps in the senders' own numbering (edgeml.core.gaps), per source topic
    sequence: SequenceGaps = field(default_factory=SequenceGaps)

    def version(self, name: str, version: str) -> VersionStats:
        key = f"{name}:{version}"
        vs = self.versions.get(key)
        if vs is None:
            vs = self.versions[key] = VersionStats()
        return vs


class RateMeter:
    """Messages per second over the interval between two status reports."""

    def __init__(self) -> None:
        self._last_t = time.monotonic()
        self._last_n = 0

    def rate(self, total: int) -> float:
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-9)
        r = (total - self._last_n) / dt
        self._last_t, self._last_n = now, total
        return round(r, 2)
