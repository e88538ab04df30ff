"""Decoded samples -> model input rows (single samples, or windows per source topic).

The live daemon and ``edgeml replay`` both use :class:`Assembler`, so a replay sees exactly
the rows the daemon scored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeml.config import WindowConfig
from edgeml.core.decode import Decoder


@dataclass(frozen=True, slots=True)
class Row:
    """One model input row and where it came from (the message that completed it)."""

    features: np.ndarray  # 1-D float32: n_features, or size * n_features sample-major
    id: Any
    topic: str
    seq: int
    received: float
    label: Any = None
    sub: int = 0  # position among the rows one message produced (batch messages)


class Assembler:
    """Feed raw messages in arrival order; get rows out. Windows are kept per concrete topic,
    so ``sensors/+/imu`` windows each sensor separately. At most ``max_topics`` partial
    windows are held; the least recently used is evicted (and counted) beyond that."""

    def __init__(self, decoder: Decoder, window: WindowConfig | None = None, *,
                 max_topics: int = 10_000) -> None:
        self.decoder = decoder
        self.window = window
        self.max_topics = max_topics
        self._buffers: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.evicted_windows = 0

    def feed(self, topic: str, payload: bytes, seq: int, received: float) -> list[Row]:
        """Raises :class:`~edgeml.errors.DecodeError` for a bad message (nothing is kept)."""
        decoded = self.decoder.decode(payload)
        return self.feed_decoded(topic, decoded, seq, received)

    def feed_decoded(self, topic: str, decoded, seq: int, received: float) -> list[Row]:
        samples, ids, labels = decoded.samples, decoded.ids, decoded.labels
        if self.window is None:
            return [Row(samples[i], ids[i] if ids[i] is not None else seq, topic, seq, received,
                        labels[i] if labels is not None else None, i)
                    for i in range(len(samples))]
        size, hop = self.window.size, self.window.hop
        buf = self._buffers.get(topic)
        if buf is None:
            buf = self._buffers[topic] = []
            if len(self._buffers) > self.max_topics:
                self._buffers.popitem(last=False)
                self.evicted_windows += 1
        else:
            self._buffers.move_to_end(topic)
        out: list[Row] = []
        for i in range(len(samples)):
            buf.append(samples[i])
            if len(buf) >= size:
                win = np.concatenate(buf[:size])
                del buf[:hop]
                rid = ids[i] if ids[i] is not None else seq
                out.append(Row(win, rid, topic, seq, received,
                               labels[i] if labels is not None else None, len(out)))
        return out

    @property
    def pending_topics(self) -> int:
        return len(self._buffers)
