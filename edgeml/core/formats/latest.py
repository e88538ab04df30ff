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


class _Source:
    __slots__ = ("fresh", "oldest", "times", "values")

    def __init__(self, n: int) -> None:
        self.values = [0.0] * n
        self.times: list[float | None] = [None] * n  # None: no fresh value
        self.fresh = 0
        self.oldest = float("inf")  # the oldest fresh value's time


class LatestValues:
    def __init__(self, features: tuple[str, ...], *, max_age_s: float,
                 max_sources: int = 10_000) -> None:
        self.features = features
        self.index = {f: i for i, f in enumerate(features)}
        self.max_age_s = max_age_s
        self.max_sources = max_sources
        self._by_source: OrderedDict[str, _Source] = OrderedDict()
        self.counts: Counter[str] = Counter()
        #: sources (prefixes) dropped since the assembler last looked: their partial windows
        #: are dropped too (a window must not span a node's death or rebirth)
        self.dropped: list[str] = []

    def update(self, source: str, feature: str, value: float, t: float) -> np.ndarray | None:
        """Set one feature's latest value; returns the completed sample (float32) or None.
        ``feature`` must be one of ``features`` (callers count the others)."""
        st = self._by_source.get(source)
        if st is None:
            st = self._by_source[source] = _Source(len(self.features))
            if len(self._by_source) > self.max_sources:
                self._by_source.popitem(last=False)
                self.counts["evicted_sources"] += 1
        else:
            self._by_source.move_to_end(source)
        times = st.times
        limit = t - self.max_age_s
        if st.oldest < limit:  # something fresh went stale
            oldest = float("inf")
            for j, tj in enumerate(times):
                if tj is None:
                    continue
                if tj < limit:
                    times[j] = None
                    st.fresh -= 1
                    self.counts["stale"] += 1
                elif tj < oldest:
                    oldest = tj
            st.oldest = oldest
        i = self.index[feature]
        if times[i] is None:
            st.fresh += 1
        else:
            self.counts["overwritten"] += 1
        st.values[i] = value
        times[i] = t
        if t < st.oldest:
            st.oldest = t
        if st.fresh < len(times):
            return None
        sample = np.array(st.values, dtype=np.float32)
        st.times = [None] * len(times)
        st.fresh = 0
        st.oldest = float("inf")
        self.counts["samples"] += 1
        return sample

    def drop(self, prefix: str) -> None:
        """Forget the sources ``prefix`` or under ``prefix/`` (a node or device went away)."""
        self.dropped.append(prefix)
        for s in [s for s in self._by_source if s == prefix or s.startswith(prefix + "/")]:
            self.counts["dropped"] += self._by_source.pop(s).fresh

    @property
    def pending_sources(self) -> int:
        return len(self._by_source)
