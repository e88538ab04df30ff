"""Decoded samples -> model input rows (single samples, or windows per source topic).

The live daemon and ``edgeml replay`` both use :class:`Assembler`, so a replay sees exactly
the rows the daemon scored. For the stateful formats (``value``, ``sparkplug_b``) the
Assembler also keeps the format's session (latest values per source, Sparkplug alias tables
and sequence numbers), fed in archive order, so replaying the archive from its start rebuilds
the same samples.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from edgeml.config import WindowConfig
from edgeml.core.decode import Decoded, Decoder

log = logging.getLogger("edgeml.core.assemble")


class Row(NamedTuple):
    """One model input row and where it came from (the message that completed it).
    Immutable; a named tuple rather than a frozen dataclass because a flood of batch
    messages makes hundreds of thousands per second, and it is made at a quarter of the
    cost."""

    features: np.ndarray  # 1-D float32: n_features, or size * n_features sample-major
    id: Any
    topic: str
    seq: int
    received: float
    label: Any = None
    sub: int = 0  # position among the rows one message produced (batch messages)


_make_row = tuple.__new__  # Row's own __new__ is a Python function around this


class Assembler:
    """Feed raw messages in arrival order; get rows out. Windows are kept per concrete topic,
    so ``sensors/+/imu`` windows each sensor separately (per source instead when the format
    names one: SenML base name, line-protocol series, topic-template source, Sparkplug
    node/device). At most ``max_topics`` partial
    windows are held; the least recently used is evicted (and counted) beyond that."""

    def __init__(self, decoder: Decoder, window: WindowConfig | None = None, *,
                 max_topics: int = 10_000) -> None:
        self.decoder = decoder
        self.window = window
        self.max_topics = max_topics
        self._buffers: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.evicted_windows = 0
        self.session = decoder.session()  # stateful formats only

    def feed(self, topic: str, payload: bytes, seq: int, received: float) -> list[Row]:
        """Raises :class:`~edgeml.errors.DecodeError` for a bad message (nothing is kept)."""
        decoded = self.decoder.decode(payload)
        return self.feed_decoded(topic, decoded, seq, received)

    def feed_decoded(self, topic: str, decoded, seq: int, received: float) -> list[Row]:
        if decoded.parsed is not None:
            decoded = self._session_feed(topic, decoded.parsed, received)
            if decoded is None:
                return []
        samples, ids, labels = decoded.samples, decoded.ids, decoded.labels
        if self.window is None:
            n = len(samples)
            if None in ids:  # a sample without an id of its own is known by the message's seq
                ids = [seq if v is None else v for v in ids]
            # tuple.__new__ over the fields is what Row(...) does, at C speed: a flood of
            # batch messages makes hundreds of thousands of rows a second
            return list(map(_make_row, repeat(Row, n), zip(
                samples, ids, repeat(topic, n), repeat(seq, n), repeat(received, n),
                labels or repeat(None, n), range(n), strict=True)))
        # windows per source when the format names one (value, Sparkplug), else per topic
        keys = decoded.sources if decoded.sources is not None else (topic,) * len(samples)
        return self._windows(topic, decoded, keys, seq, received)

    def _session_feed(self, topic: str, parsed, received: float) -> Decoded | None:
        if self.session is None:
            raise TypeError(f"{self.decoder.format}: a parsed message needs a session")
        try:
            pairs = self.session.feed(topic, parsed, received)
        except Exception:  # a bug must not take the burst down: count it, keep going
            log.exception("%s session failed on a message from %s", self.decoder.format, topic)
            self.session.counts["errors"] += 1
            pairs = []
        dropped = self.session.latest.dropped
        if dropped:
            for prefix in dropped:
                for key in [k for k in self._buffers
                            if k == prefix or k.startswith(prefix + "/")]:
                    del self._buffers[key]
            dropped.clear()
        if not pairs:
            return None
        return Decoded(np.stack([s for _, s in pairs]), (None,) * len(pairs), None,
                       tuple(src for src, _ in pairs))

    def _windows(self, topic: str, decoded: Decoded, keys, seq: int,
                 received: float) -> list[Row]:
        size, hop = self.window.size, self.window.hop  # type: ignore[union-attr]
        samples, ids, labels = decoded.samples, decoded.ids, decoded.labels
        out: list[Row] = []
        for i in range(len(samples)):
            buf = self._buffer(keys[i])
            buf.append(samples[i])
            if len(buf) >= size:
                win = np.concatenate(buf[:size])
                del buf[:hop]
                rid = ids[i] if ids[i] is not None else seq
                out.append(Row(win, rid, topic, seq, received,
                               labels[i] if labels is not None else None, len(out)))
        return out

    def status(self) -> dict | None:
        """The format session's figures (stateful formats), for the device status."""
        return self.session.status() if self.session is not None else None

    def _buffer(self, key: str) -> list[np.ndarray]:
        """The partial window of one source; the least recently fed is evicted (counted)
        beyond ``max_topics``."""
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = []
            if len(self._buffers) > self.max_topics:
                self._buffers.popitem(last=False)
                self.evicted_windows += 1
        else:
            self._buffers.move_to_end(key)
        return buf

    @property
    def pending_topics(self) -> int:
        return len(self._buffers)
