"""One version's outputs for a scored batch, kept as columns (labels, scores).

Each row's ``output`` map (``{"label": ..., "scores": {...}}``) is what answers and records
carry, but a batch of ten-sample messages has hundreds of them, and most are only ever
packed. :class:`Outputs` builds the maps only when one is read, and packs a classifier's
rows straight from the score array: the bytes are exactly what msgpack gives for the maps
(the tests compare), at a fraction of the cost.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np

# what the answer and record packers produce for plain values (floats as float64)
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_LABEL_HEAD = b"\x82" + _packb("label")  # {"label": ..., "scores": {...}}


#: below this many rows, packing each map costs less than the array set-up
VECTOR_MIN_ROWS = 16
_UNSET = object()


#: per key tuple: ``"scores"`` and the map header; each key packed, with msgpack's float64
#: marker after it; a packer of ``key, score, key, score, ...``
_LAYOUTS: dict[tuple[str, ...], tuple[bytes, tuple[bytes, ...], Any]] = {}


def _scores_layout(keys: tuple[str, ...]) -> tuple[bytes, tuple[bytes, ...], Any]:
    layout = _LAYOUTS.get(keys)
    if layout is None:
        if len(_LAYOUTS) >= 256:  # active sets are small; a long-lived daemon must not grow
            _LAYOUTS.clear()
        cb = tuple(_packb(c) + b"\xcb" for c in keys)
        fmt = ">" + "".join(f"{len(c)}sd" for c in cb)
        layout = _LAYOUTS[keys] = (_packb("scores") + _map_header(len(keys)), cb,
                                   struct.Struct(fmt).pack)
    return layout


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else (b"\xde" + n.to_bytes(2, "big"))


class Outputs(Sequence[dict]):
    """Per-row output maps of one version for one batch, built on first read.

    ``kind`` is how the maps look: ``scores`` (a classifier with a score per class, keyed by
    the class as a string), ``score`` (one score column), ``list`` (scores as a list) or
    ``label`` / ``value`` (no scores)."""

    __slots__ = ("_keys", "_maps", "_matrix", "_packed", "kind", "labels", "scores")

    def __init__(self, kind: str, labels: list, scores: np.ndarray | None,
                 keys: Sequence[str] = ()) -> None:
        self.kind, self.labels, self.scores, self._keys = kind, labels, scores, tuple(keys)
        self._maps: list[dict] | None = None
        self._packed: list[bytes] | None = None
        self._matrix: np.ndarray | object | None = _UNSET

    def maps(self) -> list[dict]:
        if self._maps is None:
            self._maps = self._build()
        return self._maps

    def _build(self) -> list[dict]:
        labels, kind = self.labels, self.kind
        if kind in ("label", "value"):
            return [{kind: lab} for lab in labels]
        scores = self.scores.tolist()  # type: ignore[union-attr]
        if kind == "scores":
            keys = self._keys
            return [{"label": lab, "scores": dict(zip(keys, s, strict=True))}
                    for lab, s in zip(labels, scores, strict=True)]
        if kind == "score":
            return [{"label": lab, "score": s[0]} for lab, s in zip(labels, scores, strict=True)]
        return [{"label": lab, "scores": s} for lab, s in zip(labels, scores, strict=True)]

    def packed(self) -> list[bytes]:
        """Each row's map as msgpack, byte for byte ``packb(map)``."""
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def matrix(self) -> np.ndarray | None:
        """Every row's packed map as one row of a ``uint8`` array (``n x width``), when they
        all have one width: a classifier's rows with small integer labels, enough of them
        for the array to pay (:data:`VECTOR_MIN_ROWS`); else None. The rows of a grouped
        record are then slices of this array beside the rows' own fields."""
        if self._matrix is _UNSET:
            self._matrix = self._vector(small_only=True)
        return self._matrix  # type: ignore[return-value]

    def _float_scores(self) -> bool:
        """A classifier's rows with a float score per class: packed without their maps."""
        scores = self.scores
        return (self.kind == "scores" and scores is not None and scores.ndim == 2
                and scores.dtype.kind == "f")

    def _vectorable(self) -> bool:
        return self._float_scores() and len(self.labels) >= VECTOR_MIN_ROWS

    def _vector(self, *, small_only: bool) -> np.ndarray | None:
        """{"label": <label>, "scores": {<key>: <float64>, ...}} laid out in one array, a row
        of bytes per output, the scores written in as big-endian float64 (msgpack's 0xcb),
        as packing each float would give. With small integer labels the label is in it (one
        byte, msgpack's positive fixint); otherwise the array holds what follows the label
        (None with ``small_only``)."""
        if not self._vectorable():
            return None
        scores = self.scores
        n, k = scores.shape  # type: ignore[union-attr]
        labels = self.labels
        small = set(map(type, labels)) == {int} and min(labels) >= 0 and max(labels) < 128
        if small_only and not small:
            return None
        keys = [_packb(c) for c in self._keys]
        head = (_LABEL_HEAD + b"\x00" if small else b"") + _packb("scores") + _map_header(k)
        width = len(head) + sum(len(c) + 9 for c in keys)
        out = np.empty((n, width), dtype=np.uint8)
        out[:, :len(head)] = np.frombuffer(head, dtype=np.uint8)
        if small:
            out[:, len(_LABEL_HEAD)] = labels
        at = len(head)
        as_f8 = scores.astype(">f8").view(np.uint8).reshape(n, k * 8)  # type: ignore[union-attr]
        for j, c in enumerate(keys):
            out[:, at:at + len(c)] = np.frombuffer(c, dtype=np.uint8)
            at += len(c)
            out[:, at] = 0xCB
            out[:, at + 1:at + 9] = as_f8[:, j * 8:(j + 1) * 8]
            at += 9
        return out

    def _pack(self) -> list[bytes]:
        if not self._float_scores():
            pack = _packb
            return [pack(m) for m in self.maps()]
        if not self._vectorable():
            return self._pack_few()
        out = self.matrix()
        if out is not None:  # small integer labels: each row's bytes whole
            width = out.shape[1]
            rows = out.tobytes()
            return [rows[i:i + width] for i in range(0, len(rows), width)]
        out = self._vector(small_only=False)
        assert out is not None
        width = out.shape[1]
        rows = out.tobytes()
        pack = _packb
        return [b"".join((_LABEL_HEAD, pack(lab), rows[i * width:(i + 1) * width]))
                for i, lab in enumerate(self.labels)]

    def _pack_few(self) -> list[bytes]:
        """A few classifier rows without building their maps: what follows the label is one
        struct per row, the keys' bytes as constants between the big-endian float64s."""
        head, keys, row = _scores_layout(self._keys)
        pack = _packb
        return [b"".join((_LABEL_HEAD, pack(lab), head,
                          row(*[v for pair in zip(keys, s, strict=True) for v in pair])))
                for lab, s in zip(self.labels, self.scores.tolist(),  # type: ignore[union-attr]
                                  strict=True)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: Any) -> Any:
        return self.maps()[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.maps())
