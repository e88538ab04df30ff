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
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgpack

#: streams devices sync (docs/sync.md); another name is kept too (stored, not quarantined)
KNOWN_STREAMS = ("outputs", "results", "alerts", "deploy", "drift")
#: an envelope's ``schema`` this collector understands
SCHEMAS = (1,)
#: the largest record kept as JSON; a bigger one is quarantined (it would bloat every query)
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RecordRow:
    """One record as the ``records`` table stores it (the extracted columns + the JSON)."""

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
    raw: dict = field(default_factory=dict, compare=False, repr=False)


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


def to_json(rec: dict) -> str:
    try:
        text = json.dumps(rec, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(rec), separators=(",", ":"), default=_json_default)
    if "\\u0000" in text:
        text = json.dumps(_finite(json.loads(text)), separators=(",", ":"))
    return text


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v.replace("\x00", "\ufffd")
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
    pipeline, model, version = rec.get("pipeline"), rec.get("model"), rec.get("version")
    input_key = None
    if stream in ("outputs", "results"):
        # <device>/<pipeline>/<input_seq>/<model>/<version>/<stream>: the input's part
        input_key = rid.rsplit("/", 3)[0]
    kind = rec.get("kind")
    if stream == "deploy":
        model = model if model is not None else rec.get("name")
    fallback = rec.get("fallback")
    return RecordRow(
        record_id=rid, device=device, stream=stream,
        pipeline=_text(pipeline), model=_text(model), version=_text(version),
        ts=_num(rec.get("ts")), input_key=input_key, input_id=_text(rec.get("id")),
        role=_text(rec.get("role")), label=_label(rec.get("output")),
        true_label=_text(rec.get("true_label")), latency_ms=_num(rec.get("latency_ms")),
        fallback=None if fallback is None else int(bool(fallback)),
        error=_text(rec.get("error")), record=raw_json,
        kind=_text(kind), stage=_text(rec.get("stage")), raw=rec,
    )


def parse_delivery(topic: str, payload: bytes, prefix: str = "edgeml") -> Parsed:
    """Rows and rejects of one batch message (never raises)."""
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
        if reason is None:
            raw_json = to_json(rec)
            if len(raw_json) > MAX_RECORD_BYTES:
                reason = f"record {i} is {len(raw_json)} bytes as JSON (limit {MAX_RECORD_BYTES})"
            else:
                try:
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
