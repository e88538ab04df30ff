"""``senml``: Sensor Measurement Lists, RFC 8428, JSON representation (a JSON array).

Records are resolved as the RFC says (section 4.6): name = bn + n, time = bt + t,
value = bv + v, unit = u or bu. A resolved name ends with a feature name: the feature is
that suffix (the longest configured feature that ends the name after a separator ``:`` ``/``
``.`` ``_`` ``-``, or the whole name) and the source is the rest, so ``bn =
"urn:dev:ow:10e2073a01080063:"`` with ``n = "ax"`` is feature ``ax`` of source
``urn:dev:ow:10e2073a01080063:`` however the sender splits bn and n.

Records of one source at one time make one sample (a feature seen twice at the same time
starts the next sample); samples come out in time order (stable). ``v`` is the value (``vb``
is 1.0/0.0); ``vs`` names the label (record named like ``label_field``) or the id (named
like ``id_field``); a string or data value for a feature is ``bad_value``. Records that name
no feature are ignored; a sample missing a feature is ``missing_field``. Times below 2**28
are relative to "now" (RFC 8428 4.5.3) and only order the samples.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from edgeml.core.formats import F32_MAX
from edgeml.errors import DecodeError

_SEPARATORS = ":/._-"
_KNOWN = frozenset(("bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd",
                    "s", "t", "ut"))
_NUMBERS = ("bt", "bv", "bs", "v", "s", "t", "ut")


def _num(rec: dict, key: str, i: int) -> float | None:
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DecodeError("bad_value", f"record {i}: {key} must be a number, got {v!r:.40}")
    return float(v)


def _split(name: str, features: tuple[str, ...]) -> tuple[str, str] | None:
    # names repeat from pack to pack: cache the short ones (the cache stays small)
    return _split_cached(name, features) if len(name) <= 128 else _split_name(name, features)


def _split_name(name: str, features: tuple[str, ...]) -> tuple[str, str] | None:
    best = None
    for f in features:
        if name == f:
            return "", f
        if name.endswith(f) and name[-len(f) - 1] in _SEPARATORS and (
                best is None or len(f) > len(best)):
            best = f
    return None if best is None else (name[: -len(best)], best)


_split_cached = functools.lru_cache(maxsize=4096)(_split_name)


def decode_senml(payload: bytes, *, features: tuple[str, ...], id_field: str | None,
                 label_field: str | None, max_records: int):
    """-> (rows float32 [k, n], ids, labels or None, sources) in time order."""
    try:
        pack = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError("malformed", f"not valid JSON: {exc}") from None
    if not isinstance(pack, list):
        raise DecodeError("malformed", "a SenML pack is a JSON array of records")
    if not pack:
        raise DecodeError("wrong_shape", "empty SenML pack")
    if len(pack) > max_records:
        raise DecodeError("too_large", f"{len(pack)} records > limit {max_records}")
    bn, bt, bv = "", 0.0, 0.0
    index = {f: j for j, f in enumerate(features)}
    open_groups: dict[tuple[str, float], _Group] = {}
    groups: list[_Group] = []
    for i, rec in enumerate(pack):
        if not isinstance(rec, dict):
            raise DecodeError("malformed", f"record {i} is not a JSON object")
        for k in rec:
            if k not in _KNOWN and k.endswith("_"):  # must-understand (RFC 8428 4.4)
                raise DecodeError("malformed", f"record {i}: unsupported must-understand "
                                               f"field {k!r}")
        ver = rec.get("bver")
        if ver is not None and (isinstance(ver, bool) or not isinstance(ver, int) or ver > 10):
            raise DecodeError("malformed", f"record {i}: unsupported SenML version {ver!r}")
        for key in _NUMBERS:
            if key in rec:
                _num(rec, key, i)
        if "bn" in rec:
            if not isinstance(rec["bn"], str):
                raise DecodeError("malformed", f"record {i}: bn must be a string")
            bn = rec["bn"]
        if "bt" in rec:
            bt = float(rec["bt"])
        if "bv" in rec:
            bv = float(rec["bv"])
        name = rec.get("n", "")
        if not isinstance(name, str):
            raise DecodeError("malformed", f"record {i}: n must be a string")
        name = bn + name
        if not name:
            raise DecodeError("malformed", f"record {i}: no name (neither bn nor n)")
        t = bt + (float(rec["t"]) if "t" in rec else 0.0)
        where = _split(name, features)
        if where is None:
            for fld in (id_field, label_field):
                if fld and (w := _split(name, (fld,))) is not None:
                    g = _open(open_groups, groups, (w[0], t), i, len(features))
                    val: Any = rec.get("vs", rec.get("v"))
                    if fld == id_field:
                        g.id = val
                    else:
                        g.label = val
                    break
            continue  # a record that names no feature is not ours
        source, feature = where
        if "v" in rec or ("bv" in rec and not any(x in rec for x in ("vs", "vb", "vd"))):
            value = bv + (float(rec["v"]) if "v" in rec else 0.0)
        elif "vb" in rec:
            if not isinstance(rec["vb"], bool):
                raise DecodeError("bad_value", f"record {i}: vb must be true or false")
            value = 1.0 if rec["vb"] else 0.0
        elif "vs" in rec or "vd" in rec:
            raise DecodeError("bad_value", f"record {i}: feature {feature!r} has a "
                                           f"{'string' if 'vs' in rec else 'data'} value")
        else:
            raise DecodeError("missing_field", f"record {i}: feature {feature!r} has no value")
        if not abs(value) <= F32_MAX:  # also NaN
            raise DecodeError("non_finite", f"record {i}: value is not finite")
        j = index[feature]
        g = _open(open_groups, groups, (source, t), i, len(features))
        if g.seen[j]:  # the same feature again at the same time: the next sample
            del open_groups[(source, t)]
            g = _open(open_groups, groups, (source, t), i, len(features))
        g.values[j] = value
        g.seen[j] = True
    if not groups:
        raise DecodeError("missing_field", f"no record names a feature ({', '.join(features)})")
    groups.sort(key=lambda g: g.time)  # stable: order of appearance at equal times
    for g in groups:
        if not all(g.seen):
            missing = [f for f, s in zip(features, g.seen, strict=True) if not s]
            raise DecodeError("missing_field", f"sample of {g.source or 'the pack'} at record "
                                               f"{g.first} lacks {', '.join(missing)}")
    return ([g.values for g in groups], [g.id for g in groups],
            [g.label for g in groups], [g.source for g in groups])


class _Group:
    __slots__ = ("first", "id", "label", "seen", "source", "time", "values")

    def __init__(self, source: str, time: float, first: int, n: int) -> None:
        self.source, self.time, self.first = source, time, first
        self.values = [0.0] * n
        self.seen = [False] * n
        self.id: Any = None
        self.label: Any = None


def _open(open_groups: dict, groups: list, key: tuple[str, float], i: int, n: int) -> _Group:
    g = open_groups.get(key)
    if g is None:
        g = open_groups[key] = _Group(key[0], key[1], i, n)
        groups.append(g)
    return g
