"""Samples from each feature's latest value, per source (``value`` and ``sparkplug_b``).

A source's sample is complete when every feature has been updated since the source's last
sample and none of those values is older than ``max_age_s`` (times are the archived receive
times, so replay rebuilds the same samples). A value that has gone stale is dropped and
counted; a feature updated twice before the sample completes keeps its latest value (counted
as ``overwritten``). At most ``max_sources`` sources are held (least recently updated evicted,
counted).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np


class LatestValues:
    def __init__(self, features: tuple[str, ...], *, max_age_s: float,
                 max_sources: int = 10_000) -> None:
        self.features = features
        self.index = {f: i for i, f in enumerate(features)}
        self.max_age_s = max_age_s
        self.max_sources = max_sources
        # source -> [values float64[n], times float64[n] (nan: not fresh)]
        self._by_source: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        #: sources (prefixes) dropped since the assembler last looked: their partial windows
        #: are dropped too (a window must not span a node's death or rebirth)
        self.dropped: list[str] = []

    def update(self, source: str, feature: str, value: float, t: float) -> np.ndarray | None:
        """Set one feature's latest value; returns the completed sample (float32) or None.
        ``feature`` must be one of ``features`` (callers count the others)."""
        st = self._by_source.get(source)
        if st is None:
            n = len(self.features)
            st = self._by_source[source] = (np.zeros(n), np.full(n, np.nan))
            if len(self._by_source) > self.max_sources:
                self._by_source.popitem(last=False)
                self.counts["evicted_sources"] += 1
        else:
            self._by_source.move_to_end(source)
        values, times = st
        i = self.index[feature]
        stale = times < t - self.max_age_s  # nan compares False: only fresh values expire
        if stale.any():
            self.counts["stale"] += int(stale.sum())
            times[stale] = np.nan
        if not np.isnan(times[i]):
            self.counts["overwritten"] += 1
        values[i] = value
        times[i] = t
        if np.isnan(times).any():
            return None
        times[:] = np.nan
        self.counts["samples"] += 1
        return values.astype(np.float32)

    def drop(self, prefix: str) -> None:
        """Forget the sources ``prefix`` or under ``prefix/`` (a node or device went away)."""
        self.dropped.append(prefix)
        for s in [s for s in self._by_source if s == prefix or s.startswith(prefix + "/")]:
            _, times = self._by_source.pop(s)
            self.counts["dropped"] += int((~np.isnan(times)).sum())

    @property
    def pending_sources(self) -> int:
        return len(self._by_source)
