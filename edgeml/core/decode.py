"""Payload -> validated float32 samples. Pure functions; the daemon and replay share them.

Accepted shapes (JSON or msgpack, see docs/topics.md):
- one sample, named features:  ``{"ax": 0.1, ..., "id": "a1", "label": "Walking"}``
- one sample, array field:     ``{"values": [0.1, ...], "id": "a1"}``
- a batch:                     ``{"samples": [<sample>, ...], "id": "b7"}`` or ``[<sample>, ...]``
  and, with an array field, ``{"values": [[...], [...]]}`` (one row per sample).
Anything else is a :class:`~edgeml.errors.DecodeError` with a short ``reason`` code.

The formats ``senml``, ``influx_line``, ``value`` and ``sparkplug_b`` are decoded by
:mod:`edgeml.core.formats` (dispatched from :meth:`Decoder.decode`); the last two only parse
here and are assembled by their session (:meth:`Decoder.session`, kept by the Assembler).
"""

from __future__ import annotations

import functools
import json
import operator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import msgpack
import numpy as np

from edgeml.core.formats import EXTRA_FORMATS, STATEFUL_FORMATS
from edgeml.errors import DecodeError

_JSON_START = frozenset(b"{[ \t\r\n")


@dataclass(frozen=True)
class Decoded:
    """Samples of one message: ``samples`` float32 ``[k, n_features]``; ids/labels per sample."""

    samples: np.ndarray
    ids: tuple[Any, ...]
    labels: tuple[Any, ...] | None
    #: per sample, the source its window is kept for (None: the message's topic)
    sources: tuple[str, ...] | None = None
    #: stateful formats (value, sparkplug_b): the parsed message for the session; no samples
    parsed: Any = None


@dataclass(frozen=True, kw_only=True)
class Decoder:
    """Decodes the payloads of one pipeline. Build once, call per message."""

    format: str = "auto"
    features: tuple[str, ...] | None = None
    field: str | None = None
    n_features: int | None = None
    id_field: str = "id"
    label_field: str | None = "label"
    max_payload_bytes: int = 256 * 1024
    max_batch_samples: int = 1024
    #: format options: ValueSpec (value) or SparkplugSpec (sparkplug_b)
    spec: Any = None

    @classmethod
    def from_pipeline(cls, pipeline: Any, n_features: int | None = None) -> Decoder:
        """From a :class:`edgeml.config.PipelineConfig` (``n_features`` for array fields)."""
        return cls(
            format=pipeline.format, features=pipeline.features, field=pipeline.field,
            n_features=len(pipeline.features) if pipeline.features else n_features,
            id_field=pipeline.id_field, label_field=pipeline.label_field,
            max_payload_bytes=pipeline.max_payload_bytes,
            max_batch_samples=pipeline.max_batch_samples,
            spec=getattr(pipeline, "format_spec", None),
        )

    def session(self) -> Any:
        """A fresh per-pipeline session for a stateful format (None for the others)."""
        if self.format == "value":
            from edgeml.core.formats.value import ValueSession

            return ValueSession(self.spec, self.features or ())
        if self.format == "sparkplug_b":
            from edgeml.core.formats.sparkplug import SparkplugSession

            return SparkplugSession(self.spec, self.features or ())
        return None

    def parse(self, payload: bytes) -> Any:
        if len(payload) > self.max_payload_bytes:
            raise DecodeError("too_large", f"{len(payload)} bytes > limit "
                                           f"{self.max_payload_bytes}")
        if not payload:
            raise DecodeError("malformed", "empty payload")
        fmt = self.format
        if fmt == "auto":
            fmt = "json" if payload[0] in _JSON_START else "msgpack"
        if fmt == "json":
            try:
                return json.loads(payload)
            except RecursionError:
                raise DecodeError("malformed", "not valid JSON: nested too deeply") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise DecodeError("malformed", f"not valid JSON: {exc}") from None
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                   max_bin_len=self.max_payload_bytes)
        except msgpack.ExtraData:
            hint = " (looks like JSON)" if payload[:1] in (b"{", b"[") else ""
            raise DecodeError("malformed", f"not valid msgpack: trailing bytes{hint}") from None
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
            # TypeError: a map key msgpack can carry and Python cannot hash (a list)
            raise DecodeError("malformed", f"not valid msgpack: {exc}") from None

    def decode(self, payload: bytes) -> Decoded:
        if self.format in EXTRA_FORMATS:
            return self._decode_extra(payload)
        doc = self.parse(payload)
        if isinstance(doc, list):
            return self._batch(doc, None)
        if not isinstance(doc, dict):
            raise DecodeError("malformed", f"expected a map or a list, got {type(doc).__name__}")
        if "samples" in doc:
            items = doc["samples"]
            if not isinstance(items, list):
                raise DecodeError("malformed", "'samples' must be a list")
            return self._batch(items, doc)
        if self.field is not None:
            vals = doc.get(self.field)
            if isinstance(vals, list) and vals and isinstance(vals[0], list):
                rows = self._check(vals, f"field '{self.field}'")
                n = rows.shape[0]
                base = _check_id(doc.get(self.id_field))
                ids = tuple(base if n == 1 else _sub_id(base, i) for i in range(n))
                lab = doc.get(self.label_field) if self.label_field else None
                return Decoded(rows, ids, (lab,) * n if lab is not None else None)
        row = self._row(doc)
        lab = doc.get(self.label_field) if self.label_field else None
        return Decoded(self._check([row], "sample"), (_check_id(doc.get(self.id_field)),),
                       (lab,) if lab is not None else None)

    def _decode_extra(self, payload: bytes) -> Decoded:
        if len(payload) > self.max_payload_bytes:
            raise DecodeError("too_large", f"{len(payload)} bytes > limit "
                                           f"{self.max_payload_bytes}")
        if not payload:
            raise DecodeError("malformed", "empty payload")
        fmt, features = self.format, self.features or ()
        parse = _format_parser(fmt)
        if fmt in STATEFUL_FORMATS:  # parsed here, assembled by the session
            return Decoded(_NO_SAMPLES, (), None, parsed=parse(payload))
        rows, ids, labels, sources = parse(payload, features=features, id_field=self.id_field,
                                           label_field=self.label_field,
                                           max_records=self.max_batch_samples)
        has_labels = any(lab is not None for lab in labels)
        return Decoded(self._check(rows, fmt), tuple(_check_id(i) for i in ids),
                       tuple(labels) if has_labels else None, tuple(sources))

    def _batch(self, items: list, doc: dict | None) -> Decoded:
        if not items:
            raise DecodeError("wrong_shape", "empty batch")
        if len(items) > self.max_batch_samples:
            raise DecodeError("too_large", f"{len(items)} samples > limit "
                                           f"{self.max_batch_samples}")
        base = _check_id(doc.get(self.id_field)) if doc else None
        fast = self._batch_of_maps(items, doc, base)
        if fast is not None:
            return fast
        rows, ids, labels = [], [], []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                if self.field is not None and isinstance(item, list):
                    item = {self.field: item}
                else:
                    raise DecodeError("malformed", f"samples[{i}] is not a map")
            rows.append(self._row(item, f"samples[{i}]"))
            sid = _check_id(item.get(self.id_field))
            ids.append(sid if sid is not None else _sub_id(base, i))
            labels.append(item.get(self.label_field) if self.label_field else None)
        if doc and self.label_field and doc.get(self.label_field) is not None:
            labels = [doc[self.label_field] if lab is None else lab for lab in labels]
        has_labels = any(lab is not None for lab in labels)
        return Decoded(self._check(rows, "batch"), tuple(ids),
                       tuple(labels) if has_labels else None)

    def _batch_of_maps(self, items: list, doc: dict | None, base: Any) -> Decoded | None:
        """:meth:`_batch` for the usual batch (maps that have every named feature) a column at
        a time; None for anything else, which the per-sample loop decodes and, if it is bad,
        names the sample."""
        feats = self.features
        if feats is None:
            return None
        try:
            if len(feats) > 1:  # a tuple of the features per sample, read at C speed
                get = operator.itemgetter(*feats)
                rows = [get(item) for item in items]
            else:
                rows = [[item[f] for f in feats] for item in items]
        except (KeyError, TypeError, IndexError):
            return None
        if set(map(type, items)) != {dict}:
            return None
        idf = self.id_field
        lf = self.label_field
        if sum(map(len, items)) == len(items) * len(feats) and idf not in feats \
                and lf not in feats and not (doc and lf and doc.get(lf) is not None):
            # the usual samples: the features and nothing else (no ids, no labels of their own)
            return Decoded(self._check_uniform(rows, "batch"), (None,) * len(items)
                           if base is None
                           else tuple([f"{base}:{i}" for i in range(len(items))]), None)
        sids = [item.get(idf) for item in items]
        if all(v is None for v in sids):
            ids = (None,) * len(items) if base is None else \
                tuple([f"{base}:{i}" for i in range(len(items))])
        else:
            ids = tuple([_check_id(v) if v is not None else _sub_id(base, i)
                         for i, v in enumerate(sids)])
        labels = None
        if lf:
            labs = [item.get(lf) for item in items]
            if doc and doc.get(lf) is not None:
                labs = [doc[lf] if lab is None else lab for lab in labs]
            if any(lab is not None for lab in labs):
                labels = tuple(labs)
        return Decoded(self._check_uniform(rows, "batch"), ids, labels)

    def _row(self, item: dict, where: str = "sample") -> list:
        if self.features is not None:
            try:
                return [item[f] for f in self.features]
            except KeyError:
                missing = [f for f in self.features if f not in item]
                raise DecodeError("missing_field", f"{where} lacks {', '.join(missing)}") from None
        vals = item.get(self.field)  # type: ignore[arg-type]
        if not isinstance(vals, list):
            raise DecodeError("missing_field", f"{where} lacks array field '{self.field}'")
        return vals

    def _check_uniform(self, rows: list, where: str) -> np.ndarray:
        """:meth:`_check` for rows of one length (a value per feature, as the column-wise
        batch reads them): every value in one pass, the array filled from it without numpy
        working out a nested shape. Anything unusual goes to :meth:`_check`, which says what
        is wrong exactly as before."""
        flat = list(chain.from_iterable(rows))
        if flat and set(map(type, flat)) <= _NUMBER_SET:
            try:
                arr = np.fromiter(flat, np.float32, len(flat)).reshape(len(rows), -1)
            except (OverflowError, ValueError):
                return self._check(rows, where)
            if self.n_features is None or arr.shape[1] == self.n_features:
                if not np.isfinite(arr).all():  # numbers only: no null among them
                    raise DecodeError("non_finite", f"{where}: NaN or infinite value")
                return arr
        return self._check(rows, where)

    def _check(self, rows: list, where: str) -> np.ndarray:
        try:  # the usual rows (lists or tuples of plain numbers): every value's type at once
            plain = set(map(type, chain.from_iterable(rows))) <= _NUMBER_SET
        except TypeError:  # a row that is a single value
            plain = False
        for r in () if plain else rows:  # else the slow way, to name what is wrong
            for v in (r if isinstance(r, (list, tuple)) else (r,)):
                if type(v) not in _NUMBER_TYPES:
                    if isinstance(v, bool):
                        raise DecodeError("bad_value", f"{where}: boolean {v!r} is not a number")
                    if isinstance(v, (str, bytes)):  # "0.25" is text, not a number
                        raise DecodeError("bad_value", f"{where}: {_short(v)} is a string, "
                                                       "not a number")
        try:
            arr = np.asarray(rows, dtype=np.float32)
        except OverflowError:
            raise DecodeError("bad_value", f"{where}: a number too large for float32") from None
        except (TypeError, ValueError):
            bad = next((v for r in rows for v in (r if isinstance(r, (list, tuple)) else [r])
                        if isinstance(v, (str, bytes, dict, list, bool)) or v is None), None)
            if bad is None and any(isinstance(r, (list, tuple)) and len(r) != len(rows[0])
                                   for r in rows):
                raise DecodeError("wrong_shape", f"{where}: rows of different lengths") from None
            raise DecodeError("bad_value", f"{where}: non-numeric value {bad!r}") from None
        if arr.ndim != 2:
            raise DecodeError("wrong_shape", f"{where}: expected rows of numbers")
        if self.n_features is not None and arr.shape[1] != self.n_features:
            raise DecodeError("wrong_shape", f"{where}: {arr.shape[1]} features, expected "
                                             f"{self.n_features}")
        if not np.isfinite(arr).all():
            if any(v is None for r in rows for v in r):
                raise DecodeError("bad_value", f"{where}: null is not a number")
            raise DecodeError("non_finite", f"{where}: NaN or infinite value")
        return arr


_NUMBER_TYPES = (int, float)
_NUMBER_SET = frozenset(_NUMBER_TYPES)
MAX_ID_CHARS = 256


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_id(v: Any) -> Any:
    """An input id must survive every encoding it meets (JSON, msgpack, record ids): a short
    string, a 64-bit integer or a finite number. Anything else is refused here, for this
    message alone, rather than failing a whole outbox write later."""
    if v is None or (type(v) is str and len(v) <= MAX_ID_CHARS):
        return v
    if type(v) is int and -(2**63) <= v < 2**64:
        return v
    if type(v) is float and np.isfinite(v):
        return v
    if type(v) is str:
        raise DecodeError("bad_id", f"id is {len(v)} characters (at most {MAX_ID_CHARS})")
    if type(v) is int:
        raise DecodeError("bad_id", "id is an integer outside 64 bits")
    raise DecodeError("bad_id", f"id must be a string or a number, not {_short(v)}")


_NO_SAMPLES = np.zeros((0, 0), dtype=np.float32)


@functools.cache
def _format_parser(fmt: str) -> Any:
    """The format module's parse function, imported on first use (protobuf only for
    sparkplug_b)."""
    if fmt == "value":
        from edgeml.core.formats.value import parse_value

        return parse_value
    if fmt == "sparkplug_b":
        from edgeml.core.formats.sparkplug import parse_payload

        return parse_payload
    if fmt == "senml":
        from edgeml.core.formats.senml import decode_senml

        return decode_senml
    from edgeml.core.formats.influx import decode_influx

    return decode_influx


def _sub_id(base: Any, i: int) -> Any:
    return None if base is None else f"{base}:{i}"
