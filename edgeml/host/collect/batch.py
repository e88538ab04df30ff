"""Turn one synced batch message into rows for the fleet database, or into quarantine entries.

Pure functions, no database: the sink calls :func:`parse_delivery` for every delivery. A
message that cannot be trusted as a whole (foreign topic, not msgpack/JSON, an envelope that
contradicts its topic) becomes one quarantine entry; inside a good envelope a single bad
record (no ``record_id``, an id of another device) is quarantined alone and the rest is kept.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote

import msgpack

from edgeml.storage.outbox.grouping import expand_group

#: streams devices sync (docs/sync.md); another name is kept too (stored, not quarantined)
KNOWN_STREAMS = ("outputs", "results", "alerts", "deploy", "drift")
#: streams whose records may stand for the rows of one message (``rows``), stored per row
GROUPED_STREAMS = ("outputs", "results")
#: an envelope's ``schema`` this collector understands
SCHEMAS = (1,)
#: the largest record kept as JSON; a bigger one is quarantined (it would bloat every query)
MAX_RECORD_BYTES = 1 << 20


class RecordRow(NamedTuple):
    """One record as the ``records`` table stores it (the extracted columns + the JSON), in
    the table's column order (``received`` is added by the sink). A tuple: the collector
    builds one per record, so construction cost matters."""

    record_id: str
    device: str
    stream: str
    pipeline: str | None
    model: str | None
    version: str | None
    ts: float | None
    input_key: str | None
    input_id: str | None
    role: str | None
    label: str | None
    true_label: str | None
    latency_ms: float | None
    fallback: int | None
    error: str | None
    record: str  # JSON
    kind: str | None = None  # alerts and drift windows
    stage: str | None = None  # deploy events
    raw: dict | None = None  # the decoded record


@dataclass(frozen=True, slots=True)
class Reject:
    """Something to quarantine: why, and the bytes as received (a whole message or one
    record re-encoded as msgpack)."""

    reason: str
    payload: bytes
    device: str | None = None


@dataclass(frozen=True, slots=True)
class Parsed:
    device: str | None
    stream: str | None
    sent: float | None
    rows: tuple[RecordRow, ...]
    rejects: tuple[Reject, ...]


def split_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """``{prefix}/{device}/sync/{stream}`` -> (device, stream), else None."""
    parts = topic.split("/")
    pre = prefix.split("/") if prefix else []
    n = len(pre)
    if len(parts) != n + 3 or parts[:n] != pre or parts[n + 1] != "sync":
        return None
    device, stream = parts[n], parts[n + 2]
    if not device or not stream:
        return None
    return device, stream


def decode_payload(payload: bytes) -> Any:
    """msgpack (the default) or JSON (``Uplink(format="json")``); raises ValueError."""
    if payload[:1] in (b"{", b"["):
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"neither msgpack nor JSON ({type(exc).__name__}: {exc})") from exc


def _json_default(obj: object) -> object:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, msgpack.ExtType):
        return {"ext": obj.code, "data": base64.b64encode(obj.data).decode("ascii")}
    return str(obj)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None and NUL-free strings: what JSON and PostgreSQL's jsonb accept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return obj.replace("\x00", "\ufffd") if "\x00" in obj else obj
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default, allow_nan=False)


def to_json(rec: dict) -> str:
    """The record as JSON that SQLite and PostgreSQL's jsonb both accept."""
    try:
        text = _ENCODER.encode(rec)
    except ValueError:  # NaN or infinity somewhere
        text = _ENCODER.encode(_finite(rec))
    if "\\u0000" in text:
        text = _ENCODER.encode(_finite(json.loads(text)))
    return text


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if type(v) is str:
        return v if "\x00" not in v else v.replace("\x00", "\ufffd")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # 1.0 and 1 are the same class label
    return str(v)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _label(output: Any) -> str | None:
    if isinstance(output, dict):
        if "label" in output:
            return _text(output["label"])
        if "value" in output:
            return _text(output["value"])
        return None
    if isinstance(output, (str, int, float)):
        return _text(output)
    return None


def _part(value: str) -> str:
    return quote(value, safe="") if ("/" in value or "%" in value) else value


def make_row(device: str, stream: str, rec: dict, raw_json: str) -> RecordRow:
    rid = rec["record_id"]
    get = rec.get
    # <device>/<pipeline>/<input_seq>/<model>/<version>/<stream>: the input's part
    input_key = rid.rsplit("/", 3)[0] if stream in ("outputs", "results") else None
    model = get("model")
    if model is None and stream == "deploy":
        model = get("name")
    fallback = get("fallback")
    output = get("output")
    return RecordRow(
        rid, device, stream, _text(get("pipeline")), _text(model), _text(get("version")),
        _num(get("ts")), input_key, _text(get("id")), _text(get("role")), _label(output),
        _text(get("true_label")), _num(get("latency_ms")),
        None if fallback is None else int(bool(fallback)), _text(get("error")), raw_json,
        _text(get("kind")), _text(get("stage")), rec)


def _expand(rec: dict) -> list[dict]:
    """A grouped record's per-row records, each with its own ``record_id``."""
    rid = rec["record_id"]
    return [{"record_id": row_id, **row} for row_id, row in expand_group(
        rid, {k: v for k, v in rec.items() if k != "record_id"})]


def parse_delivery(topic: str, payload: bytes, prefix: str = "edgeml") -> Parsed:
    """Rows and rejects of one batch message (never raises)."""
    try:
        return _parse(topic, payload, prefix)
    except Exception as exc:  # whatever it is, it must not stop the collector
        return Parsed(None, None, None, (), (Reject(
            f"unexpected error reading the message: {type(exc).__name__}: {exc}", payload),))


def _parse(topic: str, payload: bytes, prefix: str) -> Parsed:
    where = split_topic(topic, prefix)
    if where is None:
        return Parsed(None, None, None, (), (Reject(
            f"foreign topic {topic!r} (expected {prefix}/<device>/sync/<stream>)", payload),))
    device, stream = where
    try:
        doc = decode_payload(payload)
    except ValueError as exc:
        return Parsed(device, stream, None, (), (Reject(str(exc), payload, device),))
    if not isinstance(doc, dict):
        return Parsed(device, stream, None, (), (Reject(
            f"the message is a {type(doc).__name__}, not a batch map", payload, device),))
    schema = doc.get("schema")
    if schema not in SCHEMAS:
        return Parsed(device, stream, None, (), (Reject(
            f"unknown batch schema {schema!r} (this collector reads {list(SCHEMAS)})",
            payload, device),))
    if doc.get("device") != device or doc.get("stream") != stream:
        return Parsed(device, stream, None, (), (Reject(
            f"envelope says device {doc.get('device')!r} stream {doc.get('stream')!r}, "
            f"the topic {topic!r}", payload, device),))
    records = doc.get("records")
    if not isinstance(records, list):
        return Parsed(device, stream, None, (), (Reject(
            "the batch has no 'records' list", payload, device),))
    sent = _num(doc.get("sent"))
    own = _part(device) + "/"
    rows: list[RecordRow] = []
    rejects: list[Reject] = []
    for i, rec in enumerate(records):
        reason = None
        if not isinstance(rec, dict):
            reason = f"record {i} is a {type(rec).__name__}, not a map"
        elif not isinstance(rec.get("record_id"), str) or not rec["record_id"]:
            reason = f"record {i} has no record_id"
        elif not rec["record_id"].startswith(own):
            reason = f"record {i}: record_id {rec['record_id']!r} is not of device {device!r}"
        if reason is None and stream in GROUPED_STREAMS and "rows" in rec:
            try:  # one record for a message's rows: stored as the rows' records
                expanded = [make_row(device, stream, r, to_json(r)) for r in _expand(rec)]
                if any(len(r.record) > MAX_RECORD_BYTES for r in expanded):
                    reason = f"record {i}: a row is over {MAX_RECORD_BYTES} bytes as JSON"
                else:
                    rows.extend(expanded)
                    continue
            except Exception as exc:  # a malformed group is refused whole, nothing else
                reason = f"record {i}: {type(exc).__name__}: {exc}"
        elif reason is None:
            try:
                raw_json = to_json(rec)
                if len(raw_json) > MAX_RECORD_BYTES:
                    reason = (f"record {i} is {len(raw_json)} bytes as JSON "
                              f"(limit {MAX_RECORD_BYTES})")
                else:
                    rows.append(make_row(device, stream, rec, raw_json))
                    continue
            except Exception as exc:  # a malformed field must not take the batch down
                reason = f"record {i}: {type(exc).__name__}: {exc}"
        try:
            blob = msgpack.packb(rec, use_bin_type=True, default=_json_default)
        except Exception:
            blob = repr(rec).encode()
        rejects.append(Reject(reason, blob, device))
    return Parsed(device, stream, sent, tuple(rows), tuple(rejects))
