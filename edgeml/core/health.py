"""Sensor health helpers (pure logic): the k-in-a-row alert gate and per-source rates."""

from __future__ import annotations

from typing import Any


class AlertGate:
    """Raised after ``k`` bad evaluations in a row; cleared after ``k`` good ones in a row.
    :meth:`update` returns ``"raised"``, ``"cleared"`` or ``None``."""

    __slots__ = ("active", "bad_run", "good_run", "k")

    def __init__(self, k: int) -> None:
        self.k = max(int(k), 1)
        self.active = False
        self.bad_run = 0
        self.good_run = 0

    def update(self, bad: bool) -> str | None:
        if bad:
            self.bad_run += 1
            self.good_run = 0
            if not self.active and self.bad_run >= self.k:
                self.active = True
                return "raised"
        else:
            self.good_run += 1
            self.bad_run = 0
            if self.active and self.good_run >= self.k:
                self.active = False
                return "cleared"
        return None


class RateTracker:
    """Samples per second per source topic between two ticks, against a baseline (the
    exponentially weighted mean of earlier good intervals). At most ``max_sources`` sources
    are tracked; the rest are counted in ``untracked``. An interval in which a source with a
    baseline delivered nothing is a gap (``gaps``)."""

    ALPHA = 0.3
    WARMUP = 3  # intervals before a source has a baseline

    def __init__(self, ratio: float, max_sources: int, k: int) -> None:
        self.ratio = ratio
        self.max_sources = max_sources
        self._n: dict[str, int] = {}
        self._base: dict[str, list[float]] = {}  # source -> [baseline, intervals, last rate]
        self._last: float | None = None
        self.untracked = 0
        self.gaps = 0

    def add(self, source: str, n: int) -> None:
        c = self._n.get(source)
        if c is None:
            if len(self._n) >= self.max_sources:
                self.untracked += n
                return
            self._n[source] = n
        else:
            self._n[source] = c + n

    def tick(self, now: float) -> list[tuple[str, bool, dict[str, Any]]]:
        """Per tracked source: (source, bad, figures) once it has a baseline."""
        last, self._last = self._last, now
        if last is None or now <= last:
            for s in self._n:
                self._n[s] = 0
            return []
        dt = now - last
        out = []
        for src, n in self._n.items():
            rate = n / dt
            self._n[src] = 0
            b = self._base.get(src)
            if b is None:
                self._base[src] = [rate, 1, rate]
                continue
            b[2] = rate
            if b[1] < self.WARMUP:
                b[0] = (1 - self.ALPHA) * b[0] + self.ALPHA * rate if b[1] else rate
                b[1] += 1
                continue
            bad = rate < self.ratio * b[0]
            if n == 0:
                self.gaps += 1
            if not bad:  # the baseline learns only from normal intervals
                b[0] = (1 - self.ALPHA) * b[0] + self.ALPHA * rate
            out.append((src, bad, {"rate": round(rate, 3), "baseline": round(b[0], 3)}))
        return out

    def status(self) -> dict[str, Any]:
        return {"tracked": len(self._n), "untracked_samples": self.untracked, "gaps": self.gaps,
                "rates": {s: round(b[2], 3) for s, b in list(self._base.items())[:10]}}
