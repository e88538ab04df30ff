"""``influx_line``: InfluxDB line protocol, one point per line.

    <measurement>[,<tag>=<value>...] <field>=<value>[,<field>=<value>...] [<timestamp>]

Escaping as InfluxDB documents it: in the measurement ``\\,`` and ``\\ ``; in tag keys, tag
values and field keys also ``\\=``; in string field values ``\\"`` and ``\\\\``; a backslash
before any other character is literal. Field values: floats (``1``, ``-1.5e3``), integers
``1i``, unsigned ``1u``, strings ``"..."``, booleans ``t T true True TRUE f F false False
FALSE``. ``#`` starts a comment line; empty lines are skipped.

Fields map to features (a boolean is 1.0/0.0; a string for a feature is ``bad_value``); a
string field named like ``label_field``/``id_field`` is the label/id. The series key
(measurement and tags, tags sorted by key) is the source, so windows are kept per series.
Points of one series with the same timestamp merge their fields (as InfluxDB does); a
point without a timestamp stands alone. Points come out in timestamp order (stable; a line
without a timestamp keeps its place). A point that misses a feature is ``missing_field``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from edgeml.core.formats import F32_MAX
from edgeml.errors import DecodeError

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = frozenset(("t", "T", "true", "True", "TRUE"))
_FALSE = frozenset(("f", "F", "false", "False", "FALSE"))


_TOKENS: dict[tuple[str, bool], re.Pattern[str]] = {}


def _token_re(sep: str, quotes: bool) -> re.Pattern[str]:
    pat = _TOKENS.get((sep, quotes))
    if pat is None:
        esc = re.escape(sep)
        body = rf'\\.|"(?:\\.|[^"\\])*"|[^{esc}"\\]|\\$' if quotes else rf"\\.|[^{esc}\\]|\\$"
        pat = _TOKENS[(sep, quotes)] = re.compile(rf"(?:{body})*")
    return pat


def _split_unescaped(s: str, sep: str, *, quotes: bool = False, limit: int = -1) -> list[str]:
    """Split at ``sep`` not preceded by a backslash (and, with ``quotes``, not inside "...")."""
    if "\\" not in s and (not quotes or '"' not in s):
        return s.split(sep, limit)
    pat = _token_re(sep, quotes)
    out: list[str] = []
    pos = 0
    while True:
        if limit == len(out):
            out.append(s[pos:])
            return out
        m = pat.match(s, pos)
        out.append(m.group())  # type: ignore[union-attr]
        pos = m.end()  # type: ignore[union-attr]
        if pos == len(s):
            return out
        if s[pos] != sep:
            raise ValueError("unterminated string")
        pos += 1
        if pos == len(s):
            out.append("")
            return out


def _unescape(s: str, chars: str) -> str:
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in chars:
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _field_value(raw: str) -> Any:
    if raw.startswith('"'):
        i = 1
        while i < len(raw) and raw[i] != '"':
            i += 2 if raw[i] == "\\" else 1
        if i != len(raw) - 1:
            raise ValueError(f"bad string {raw[:30]!r}")
        return _unescape(raw[1:-1], '"\\')
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw[-1:] in ("i", "u") and _INT.fullmatch(raw[:-1]):
        if raw[-1] == "u" and raw.startswith("-"):
            raise ValueError(f"unsigned integer {raw!r} is negative")
        return int(raw[:-1])
    if _FLOAT.fullmatch(raw):
        return float(raw)
    raise ValueError(f"bad field value {raw[:30]!r}")


def _split_line(line: str) -> list[str]:
    """``<measurement,tags> <fields> [timestamp]`` at the unescaped spaces outside quotes."""
    if "\\" in line or '"' in line:
        parts = _split_unescaped(line, " ", quotes=True)
    else:
        parts = line.split(" ")
    parts = [p for p in parts if p]  # tolerate repeated spaces
    if len(parts) not in (2, 3):
        raise ValueError("expected <measurement,tags> <fields> [timestamp]")
    return parts


def _parse_key(key: str) -> tuple[str, dict[str, str], str]:
    """-> (measurement, tags, series key as the source)."""
    plain = "\\" not in key
    tokens = key.split(",") if plain else _split_unescaped(key, ",")
    measurement = tokens[0] if plain else _unescape(tokens[0], ", ")
    if not measurement:
        raise ValueError("empty measurement")
    tags: dict[str, str] = {}
    for tok in tokens[1:]:
        kv = tok.split("=", 1) if plain else _split_unescaped(tok, "=", limit=1)
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise ValueError(f"bad tag {tok[:30]!r}")
        if plain:
            tags[kv[0]] = kv[1]
        else:
            tags[_unescape(kv[0], ",= ")] = _unescape(kv[1], ",= ")
    return measurement, tags, series_key(measurement, tags)


_key_cached = functools.lru_cache(maxsize=1024)(_parse_key)  # series repeat line after line


def _parse_fields(fieldset: str) -> dict[str, Any]:
    plain = "\\" not in fieldset and '"' not in fieldset
    fields: dict[str, Any] = {}
    for tok in (fieldset.split(",") if plain else
                _split_unescaped(fieldset, ",", quotes=True)):
        kv = tok.split("=", 1) if plain else _split_unescaped(tok, "=", quotes=True, limit=1)
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise ValueError(f"bad field {tok[:30]!r}")
        k, v = kv
        fields[k if plain else _unescape(k, ",= ")] = \
            float(v) if _FLOAT.fullmatch(v) else _field_value(v)
    return fields


def _parse(text: str) -> list[tuple[str, dict[str, str], dict[str, Any], int | None, str]]:
    points = []
    for no, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            parts = _split_line(line)
            key = parts[0]
            measurement, tags, source = (_key_cached(key) if len(key) <= 256
                                         else _parse_key(key))
            fields = _parse_fields(parts[1])
            ts = None
            if len(parts) == 3:
                if not _INT.fullmatch(parts[2]):
                    raise ValueError(f"bad timestamp {parts[2][:30]!r}")
                ts = int(parts[2])
        except ValueError as exc:
            raise ValueError(f"line {no}: {exc}") from None
        points.append((measurement, tags, fields, ts, source))
    return points


def parse_lines(text: str) -> list[tuple[str, dict[str, str], dict[str, Any], int | None]]:
    """-> [(measurement, tags, fields, timestamp or None)]; raises ValueError('line N: ...')."""
    return [(m, dict(t), f, ts) for m, t, f, ts, _ in _parse(text)]


def series_key(measurement: str, tags: dict[str, str]) -> str:
    def esc(s: str, chars: str) -> str:
        for c in chars:
            s = s.replace(c, "\\" + c)
        return s
    return ",".join([esc(measurement, ", ")] +
                    [f"{esc(k, ',= ')}={esc(v, ',= ')}" for k, v in sorted(tags.items())])


def decode_influx(payload: bytes, *, features: tuple[str, ...], id_field: str | None,
                  label_field: str | None, max_records: int):
    """-> (rows, ids, labels, sources) in timestamp order."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("malformed", "line protocol is UTF-8 text") from None
    try:
        points = _parse(text)
    except ValueError as exc:
        raise DecodeError("malformed", f"line protocol: {exc}") from None
    if not points:
        raise DecodeError("wrong_shape", "no points")
    if len(points) > max_records:
        raise DecodeError("too_large", f"{len(points)} points > limit {max_records}")
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    order: list[tuple[str, int | None, dict[str, Any]]] = []
    for _measurement, _tags, fields, ts, source in points:
        if ts is not None and (source, ts) in merged:
            merged[(source, ts)].update(fields)
            continue
        f = dict(fields)
        if ts is not None:
            merged[(source, ts)] = f
        order.append((source, ts, f))
    if all(ts is not None for _, ts, _ in order):
        order.sort(key=lambda p: p[1])  # type: ignore[arg-type,return-value]
    rows, ids, labels, sources = [], [], [], []
    for k, (source, _ts, fields) in enumerate(order):
        row = []
        for f in features:
            if f not in fields:
                missing = [x for x in features if x not in fields]
                raise DecodeError("missing_field", f"point {k} ({source}) lacks "
                                                   f"{', '.join(missing)}")
            v = fields[f]
            if isinstance(v, str):
                raise DecodeError("bad_value", f"point {k}: field {f!r} is a string")
            v = float(v)
            if not abs(v) <= F32_MAX:  # also NaN
                raise DecodeError("non_finite", f"point {k}: field {f!r} is not finite")
            row.append(v)
        rows.append(row)
        ids.append(fields.get(id_field) if id_field else None)
        labels.append(fields.get(label_field) if label_field else None)
        sources.append(source)
    return rows, ids, labels, sources
