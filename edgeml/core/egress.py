"""The egress stage: selected answers on ``{p}/{d}/out/{pipeline}``, every version's result,
alerts and deployment outcomes into the outbox (each with its stable record id), written in
one SQLite transaction per burst on the outbox's own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain, groupby, repeat
from operator import attrgetter
from typing import Any

import msgpack
import numpy as np

from edgeml.core.outputs import Outputs
from edgeml.core.rendezvous import AnswerColumn
from edgeml.core.scoring import AnswerRecords, ResultRecords
from edgeml.errors import TransportError
from edgeml.storage.outbox import record_id
from edgeml.storage.outbox.grouping import (
    GROUP_MAX_ROWS,
    group_position,
    group_record,
    message_spans,
    row_position,
)
from edgeml.storage.outbox.records import (
    id_part,
    pack_each,
    pack_map_header,
    pack_record,
    with_record_id,
)
from edgeml.transport.base import Transport

log = logging.getLogger("edgeml.core.egress")

OUTBOX_WRITE_INTERVAL_S = 0.05  # records move into SQLite in one transaction this often
OUTBOX_WRITE_MAX = 5000  # ... or as soon as this many are waiting
PENDING_MAX = 200_000  # records waiting for the writer thread; beyond this they are counted


def msgpack_bytes(rec: dict) -> bytes:
    return msgpack.packb(rec, use_bin_type=True, default=str)


def json_bytes(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":"), default=str).encode()


def by_message(records: list[dict]) -> list[list[dict]]:
    """Answers grouped by input message (consecutive records with one ``input_seq``)."""
    groups: list[list[dict]] = []
    seq = None
    for rec in records:
        s = rec["input_seq"]
        if groups and s == seq:
            groups[-1].append(rec)
        else:
            groups.append([rec])
            seq = s
    return groups


def _position(rec: dict) -> Any:
    rows = rec.get("rows")
    if rows:  # a grouped record: the message's rows first to last
        return group_position(rec["input_seq"], rows[0]["row"], rows[-1]["row"])
    return row_position(rec["input_seq"], rec.get("row"))


def row_record_id(device: str, rec: dict, stream: str) -> str:
    """The outbox's stable id; ``input_seq.row`` for a row past a message's first,
    ``input_seq.first-last`` for a grouped record."""
    return record_id(device, rec["pipeline"], _position(rec), rec["model"], rec["version"],
                     stream)


def row_record_ids(device: str, records: Sequence[dict], stream: str) -> list[str]:
    """:func:`row_record_id` of each record, for a scored batch at once: the parts around the
    position (device and pipeline; model, version and stream) are encoded once per run of
    one version, not once per record."""
    ids: list[str] = []
    append = ids.append
    dev = id_part(device)
    tail = "/" + id_part(stream)
    pipeline = model = version = head = end = None
    for rec in records:
        p, m, v = rec["pipeline"], rec["model"], rec["version"]
        if p != pipeline or m != model or v != version:
            pipeline, model, version = p, m, v
            head = f"{dev}/{id_part(p)}/"
            end = f"/{id_part(m)}/{id_part(v)}{tail}"
        seq = rec["input_seq"]
        if type(seq) is int and not rec.get("row") and "rows" not in rec:
            append(f"{head}{seq}{end}")  # the usual case; no "/" or "%" in an int
        else:
            append(f"{head}{id_part(_position(rec))}{end}")
    return ids


class _Run:
    """Records of one stream waiting for the writer, with their ids; ``parts``: already
    packed (a scored batch, packed as it is emitted), else ``records`` are."""

    __slots__ = ("ids", "parts", "records", "stream")

    def __init__(self, stream: str, ids: list[str], records: list[dict] | None,
                 parts: list[bytes] | None = None) -> None:
        self.stream, self.ids, self.records, self.parts = stream, ids, records, parts

    def __len__(self) -> int:
        return len(self.ids)

    def tail(self, start: int) -> _Run:
        return _Run(self.stream, self.ids[start:],
                    self.records[start:] if self.records is not None else None,
                    self.parts[start:] if self.parts is not None else None)

    def group(self) -> tuple[str, list[str], list[dict] | None, list[bytes] | None]:
        return (self.stream, self.ids, self.records, self.parts)


def _packed_run(device: str, stream: str, records: list[dict],
                published: list[bytes | None] | None = None) -> _Run:
    """A scored batch's records, with ids and packed now, while they are fresh in memory:
    what waits for the writer thread is a few compact bytes per record, not dicts. The rows
    of one message become one grouped record (:mod:`edgeml.storage.outbox.grouping`). An
    answer published as msgpack is not packed again: ``published[i]`` (None where it cannot
    serve) gets the record id spliced in. A batch that cannot be packed (a record that cannot
    be encoded, a reserved field) goes as records, one per row: the outbox refuses the
    culprit alone."""
    for rec in records:
        if "record_id" in rec:  # reserved: the outbox refuses it (and says why)
            return _Run(stream, row_record_ids(device, records, stream), records)
    spans = message_spans(records)
    if len(spans) == len(records):
        stored, sources = records, published
    else:  # several rows of one message: one record
        stored = [records[a] if b - a == 1 else group_record(records[a:b]) for a, b in spans]
        sources = None if published is None else [
            published[a] if b - a == 1 else None for a, b in spans]
    ids = row_record_ids(device, stored, stream)
    try:
        if sources is None:
            return _Run(stream, ids, None, pack_each(ids, stored))
        return _Run(stream, ids, None, [
            (with_record_id(rid, p) if p is not None else None) or pack_record(rid, rec)
            for rid, rec, p in zip(ids, stored, sources, strict=True)])
    except (TypeError, ValueError, OverflowError):
        return _Run(stream, row_record_ids(device, records, stream), records)


def _packed_results(device: str, rr: ResultRecords, parts: _RowParts | None = None) -> _Run:
    """Every version's results for a scored batch, packed straight from the columns: what
    rows share (id, topic, ts, input_seq, row, true_label) is packed once per row, what a
    version shares once per version, and only the id and the output once per record; a
    message's rows as one grouped record. Byte for byte what :func:`_packed_run` gives for
    ``rr.records()`` (the tests compare); a value that cannot be packed sends the batch the
    usual way. ``parts``: the batch's rows already packed (by its answers)."""
    try:
        if parts is None or parts.rows is not rr.rows:
            parts = _RowParts(rr.rows)
        return _pack_results(device, rr, parts)
    except (TypeError, ValueError, OverflowError):
        return _packed_run(device, "results", rr.records())


_local = threading.local()


def _strict_packer() -> msgpack.Packer:
    """This thread's Packer without a fallback for odd values: a value it cannot pack sends
    the batch the way that can (and that says which record is at fault)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


#: what every record of one version shares, packed once per version, not per batch:
#: (device, pipeline, model, version, role, stream) -> (id head, id end, packed fields)
_VERSION_PARTS: dict[tuple, tuple[str, str, bytes]] = {}
_VERSION_PARTS_MAX = 256  # active sets are small; a long-lived daemon must not grow this
_K = {k: msgpack.packb(k) for k in ("record_id", "id", "topic", "row", "true_label", "output",
                                    "rows", "latency_ms", "policy", "fallback")}
_LATE = {flag: msgpack.packb(["late", flag, "output"])[1:] for flag in (False, True)}
_ELEM3, _ELEM4 = pack_map_header(3), pack_map_header(4)  # a grouped record's row: +true_label
#: map headers by the number of the version's own fields (latency, error), then the row's
_HEADERS = [[pack_map_header(11 + t + k) for k in range(3)] for t in range(3)]
_ANSWER_HEADERS = [pack_map_header(11 + k) for k in range(3)]
_UNSET = object()
#: the ``row`` field of row numbers below 128 (msgpack packs them in one byte)
_ROW_FIELD = {n: _K["row"] + msgpack.packb(n) for n in range(128)}
#: the start of a grouped record's row element, ``{row: <n>, id: ...``
_ELEM_HEADS = {n: _ELEM3 + field for n, field in _ROW_FIELD.items()}
#: a row's own fields beyond the shared ones when it has no true label: ``row`` past row 0
_ROW_EXTRAS = {n: (field, 1) if n else (b"", 0) for n, field in _ROW_FIELD.items()}
_LABEL_OF, _SUB_OF = attrgetter("label"), attrgetter("sub")
_MESSAGE_OF = attrgetter("seq", "topic", "received")


def _version_parts(device: str, pipeline: str, name: str, version: str, role: str | None,
                   stream: str) -> tuple[str, str, bytes]:
    key = (device, pipeline, name, version, role, stream)
    parts = _VERSION_PARTS.get(key)
    if parts is None:
        if len(_VERSION_PARTS) >= _VERSION_PARTS_MAX:
            _VERSION_PARTS.clear()
        fields = ["pipeline", pipeline, "model", name, "version", version]
        if role is not None:
            fields += ("role", role)
        parts = _VERSION_PARTS[key] = (
            f"{id_part(device)}/{id_part(pipeline)}/",
            f"/{id_part(name)}/{id_part(version)}/{id_part(stream)}",
            _strict_packer().pack(fields)[1:])
    return parts


def _row_spans(rows: Sequence[Any]) -> list[tuple[int, int]]:
    """``[start, end)`` runs of one message's rows (one seq, topic and receive time, at most
    ``GROUP_MAX_ROWS``): what :func:`message_spans` gives for each version's records."""
    spans: list[tuple[int, int]] = []
    start = 0
    for _, same in groupby(rows, _MESSAGE_OF):
        end = start + len(list(same))
        while end - start > GROUP_MAX_ROWS:
            spans.append((start, start + GROUP_MAX_ROWS))
            start += GROUP_MAX_ROWS
        spans.append((start, end))
        start = end
    return spans


class _RowParts:
    """A scored batch's rows packed once, for its answers and every version's results: the
    runs of one message's rows (:func:`_row_spans`) and what each row and run contribute.

    Per run: ``(start, end, position in the record id, topic field, ts and input_seq
    fields)``. Per row: its ``id`` field, and its ``row`` and ``true_label`` fields with
    their count (what a row record has beyond the shared ones)."""

    __slots__ = ("_elems", "_matrix", "_unlabelled", "extras", "ids", "rows", "runs")

    def __init__(self, rows: Sequence[Any]) -> None:
        pack = _strict_packer().pack
        k_id, k_row, k_label, k_topic = _K["id"], _K["row"], _K["true_label"], _K["topic"]
        self.rows = rows
        self.ids = [k_id + pack(r.id) for r in rows]
        extras: list[tuple[bytes, int]] | None = None
        self._unlabelled = set(map(_LABEL_OF, rows)) == {None}  # the usual rows
        if self._unlabelled:
            try:
                extras = [_ROW_EXTRAS[s] for s in map(_SUB_OF, rows)]
            except (KeyError, TypeError):  # a row number msgpack packs in more than a byte
                extras = None
        self.extras = extras if extras is not None else [
                (b"", 0) if not r.sub and r.label is None else
                (k_row + pack(r.sub), 1) if r.label is None else
                (k_label + pack(r.label), 1) if not r.sub else
                (k_row + pack(r.sub) + k_label + pack(r.label), 2) for r in rows]
        runs = []
        for start, end in _row_spans(rows):
            first = rows[start]
            seq = first.seq
            if end - start == 1:
                sub = first.sub
                pos = (f"{seq}" if type(seq) is int and not sub
                       else id_part(row_position(seq, sub)))
            else:
                pos = id_part(group_position(seq, first.sub, rows[end - 1].sub))
            runs.append((start, end, pos, k_topic + pack(first.topic),
                         pack(["ts", first.received, "input_seq", seq])[1:]))
        self.runs = runs
        self._elems: tuple[list[bytes], list[bytes]] | None = None
        self._matrix: np.ndarray | object | None = _UNSET

    def elems(self) -> tuple[list[bytes], list[bytes]]:
        """Each row as an element of a grouped record's ``rows``, but for its output:
        ``{row, id, output: <here>, true_label?}`` as the bytes before and after it."""
        if self._elems is None:
            pack = _strict_packer().pack
            k_row, k_out, k_label = _K["row"], _K["output"], _K["true_label"]
            self._elems = (
                [(_ELEM3 if r.label is None else _ELEM4) + k_row + pack(r.sub) + rid + k_out
                 for r, rid in zip(self.rows, self.ids, strict=True)],
                [b"" if r.label is None else k_label + pack(r.label) for r in self.rows])
        return self._elems

    def elem_matrix(self) -> np.ndarray | None:
        """What :meth:`elems` gives before each output, as one row of a ``uint8`` array per
        row, when every row's is the same width (no true labels, row numbers below 128, ids
        that pack to one length, as a numbered batch's ``"<id>:<row>"`` do): then a grouped
        record's elements are one slice of this array beside the outputs' own
        (:meth:`~edgeml.core.outputs.Outputs.matrix`), not three parts per row. Else None."""
        if self._matrix is _UNSET:
            self._matrix = self._elem_matrix()
        return self._matrix  # type: ignore[return-value]

    def _elem_matrix(self) -> np.ndarray | None:
        rows, ids = self.rows, self.ids
        if not self._unlabelled:
            return None
        if any(e - b == 1 for b, e, *_ in self.runs):
            # a lone row's element is never read: it stands in as a grouped row's
            ids = list(ids)
            stand_in = next(ids[b] for b, e, *_ in self.runs if e - b > 1)
            for b, e, *_ in self.runs:
                if e - b == 1:
                    ids[b] = stand_in
        if len(set(map(len, ids))) != 1:
            return None
        try:
            heads = [_ELEM_HEADS[sub] for sub in map(_SUB_OF, rows)]
        except (KeyError, TypeError):  # a row number msgpack packs in more than a byte
            return None
        data = b"".join(chain.from_iterable(zip(heads, ids, repeat(_K["output"]))))
        return np.frombuffer(data, dtype=np.uint8).reshape(len(rows), -1)


def _side_by_side(rows: np.ndarray | None, outputs: np.ndarray | None) -> bytes | None:
    """Each row's element of a grouped record, all rows in one string of bytes (a row of
    :meth:`_RowParts.elem_matrix` and one of :meth:`Outputs.matrix` each), or None."""
    if rows is None or outputs is None or len(rows) != len(outputs):
        return None
    return np.concatenate((rows, outputs), axis=1).tobytes()


def _rows_array(body: list[bytes], before: list[bytes], outs: list[bytes],
                after: list[bytes], start: int, end: int) -> None:
    """Append a grouped record's ``rows`` elements ``start:end`` to ``body``."""
    body += chain.from_iterable(zip(before[start:end], outs[start:end], after[start:end],
                                    strict=True))


def _pack_results(device: str, rr: ResultRecords, rp: _RowParts) -> _Run:
    packer = _strict_packer()
    pack, array_header = packer.pack, packer.pack_array_header
    rows = rr.rows
    late = _LATE[bool(rr.late)] if type(rr.late) is bool else pack(
        ["late", rr.late, "output"])[1:]
    late_shared = pack(["late", rr.late])[1:]
    runs = rp.runs
    grouped = any(e - b > 1 for b, e, *_ in runs)
    elem_rows = rp.elem_matrix() if grouped else None
    before: list[bytes] | None = None
    after: list[bytes] = []
    ids_b, extras = rp.ids, rp.extras
    rid_key, rows_key = _K["record_id"], _K["rows"]
    ids: list[str] = []
    parts: list[bytes] = []
    add_id, add_part, join = ids.append, parts.append, b"".join
    for o in rr.outcomes:  # then version by version, message by message, as records() lists
        head, end_, ver = _version_parts(device, rr.pipeline, o.name, o.version, o.role,
                                         "results")
        if o.error:
            tail = ["latency_ms", round(o.elapsed_ms, 3), "error", o.error] \
                if o.elapsed_ms is not None else ["error", o.error]
            tail_b = pack(tail)[1:]
            n_tail = len(tail) // 2
        elif o.elapsed_ms is not None:
            tail_b = _K["latency_ms"] + pack(round(o.elapsed_ms, 3))
            n_tail = 1
        else:
            tail_b, n_tail = b"", 0
        headers = _HEADERS[n_tail]
        outputs = o.outputs
        # every row's grouped element in one string: a message's elements are one slice
        out_rows = outputs.matrix() if elem_rows is not None and isinstance(outputs, Outputs) \
            else None
        flat = _side_by_side(elem_rows, out_rows)
        if flat is not None:
            width = len(flat) // len(rows)
            skip = width - out_rows.shape[1]  # type: ignore[union-attr]  # the row's fields
            outs = None
        elif outputs is None:
            outs = [b"\xc0"] * len(rows)  # nil
        elif isinstance(outputs, Outputs):
            outs = outputs.packed()
        else:
            outs = [pack(out) for out in outputs]
        # record_id, the ten fields every record has, this version's own; then the row's
        for start, end, pos, topic, ts_seq in runs:
            rid = head + pos + end_
            add_id(rid)
            if end - start == 1:
                c, k = extras[start]
                out = outs[start] if outs is not None else \
                    flat[start * width + skip:(start + 1) * width]  # type: ignore[index]
                add_part(join((headers[k], rid_key, pack(rid), ids_b[start], topic, ver,
                               ts_seq, late, out, c, tail_b)))
                continue
            body = [pack_map_header(10 + n_tail), rid_key, pack(rid), topic, ver, ts_seq,
                    late_shared, tail_b, rows_key, array_header(end - start)]
            if flat is not None:
                body.append(flat[start * width:end * width])
            else:
                if before is None:
                    before, after = rp.elems()
                _rows_array(body, before, outs, after, start, end)  # type: ignore[arg-type]
            add_part(join(body))
    return _Run("results", ids, None, parts)


def _pack_answers(device: str, ar: AnswerRecords, outs: list[bytes], *, rows_out: _RowParts,
                  store: bool, matrix: np.ndarray | None = None,
                  ) -> tuple[list[tuple[bytes, int]], _Run | None]:
    """Answers that one version (``ar.answers``, an :class:`AnswerColumn`) gave every row,
    packed from the columns: one payload per input message (a map, or an array of its rows'
    maps) with its row count, and, when ``store``, the ``outputs`` records for the outbox
    (a message's rows as one grouped record), byte for byte what the records give."""
    packer = _strict_packer()
    pack, array_header = packer.pack, packer.pack_array_header
    col = ar.answers
    o = col.outcome  # type: ignore[attr-defined]
    rp = rows_out
    rows, ids_b, extras, lat = ar.rows, rp.ids, rp.extras, ar.latency_ms
    head, end_, pmv = _version_parts(device, ar.pipeline, o.name, o.version, None, "outputs")
    pfl = _K["policy"] + pack(ar.policy) + _K["fallback"] + pack(col.fallback) \
        + _K["latency_ms"]
    k_out, headers, join = _K["output"], _ANSWER_HEADERS, b"".join
    # one payload per input message (a message longer than a run spans several runs): its
    # map, or the array of its rows' maps, joined at once from the parts
    runs = rp.runs
    payloads: list[tuple[bytes, int]] = []
    lone: dict[int, bytes] = {}  # a one-row message's map: its outputs record reuses it
    r, n_runs = 0, len(runs)
    while r < n_runs:
        first = runs[r][0]
        seq = rows[first].seq
        m = r + 1
        while m < n_runs and rows[runs[m][0]].seq == seq:
            m += 1
        last = runs[m - 1][1]
        if last - first == 1:
            _, _, _, topic, ts_seq = runs[r]
            c, k = extras[first]
            one = join((headers[k], ids_b[first], topic + pmv + k_out, outs[first],
                        pfl + pack(lat[first]) + ts_seq, c))
            lone[first] = one
            payloads.append((one, 1))
        else:
            pieces = [array_header(last - first)]
            for start, end, _, topic, ts_seq in runs[r:m]:
                middle = topic + pmv + k_out
                tail = pfl + pack(lat[start]) + ts_seq
                for rid, out, (c, k) in zip(ids_b[start:end], outs[start:end],
                                            extras[start:end], strict=True):
                    pieces += (headers[k], rid, middle, out, tail, c)
            payloads.append((join(pieces), last - first))
        r = m
    if not store:
        return payloads, None
    rid_key, rows_key = _K["record_id"], _K["rows"]
    grouped = any(e - b > 1 for b, e, *_ in rp.runs)
    flat = _side_by_side(rp.elem_matrix(), matrix) if grouped else None
    width = len(flat) // len(rows) if flat is not None else 0
    before, after = rp.elems() if grouped and flat is None else ([], [])
    ids: list[str] = []
    parts: list[bytes] = []
    for start, end, pos, topic, ts_seq in rp.runs:
        rid = head + pos + end_
        ids.append(rid)
        if end - start == 1:
            c, k = extras[start]
            one = lone.get(start) or join((  # the last row of a long message: not kept
                headers[k], ids_b[start], topic + pmv + k_out, outs[start],
                pfl + pack(lat[start]) + ts_seq, c))
            parts.append(join((pack_map_header(12 + k), rid_key, pack(rid), one[1:])))
            continue
        body = [pack_map_header(11), rid_key, pack(rid), topic, pmv, pfl, pack(lat[start]),
                ts_seq, rows_key, array_header(end - start)]
        if flat is not None:
            body.append(flat[start * width:end * width])
        else:
            _rows_array(body, before, outs, after, start, end)
        parts.append(join(body))
    return payloads, _Run("outputs", ids, None, parts)


class Egress:
    """Where scored records go. Implements the pipelines' ``Emitter`` and control's event
    sink; never calls back into a stage before it."""

    def __init__(self, *, device: str, topic: Callable[..., str], outbox: Any,
                 record_results: bool, out_formats: dict[str, str],
                 out_qos: dict[str, int], on_status_changed: Callable[[], None]) -> None:
        self.device = device
        self._topic = topic
        self.outbox = outbox
        self.record_results = record_results
        self._out = {name: (topic("out", name), out_qos[name],
                            json_bytes if fmt == "json" else msgpack_bytes)
                     for name, fmt in out_formats.items()}
        self._status_changed = on_status_changed
        self.transport: Transport | None = None
        self.uplink: Any = None  # notified after each outbox write
        self.published: dict[str, int] = dict.fromkeys(out_formats, 0)
        self.overflow = 0
        self.publish_errors = 0
        self.write_errors = 0
        self.write_error: str | None = None
        self.retry_s = 1.0
        self._pending: list[_Run] = []
        self._pending_n = 0  # records in _pending
        self._marks: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._closing = False
        self._answer_plain = True
        # msgpack_bytes with a Packer made once, not per answer (packb makes one per call)
        self._answer_packer = msgpack.Packer(use_bin_type=True, default=self._answer_default)
        self._rows_cache: _RowParts | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "outbox")

    # ---- the pipelines' Emitter -----------------------------------------------------------
    def answers(self, pipeline: str, records: Sequence[dict]) -> None:
        if isinstance(records, AnswerRecords):
            if self._answers_from_columns(pipeline, records):
                return
            records = records.records()
        else:
            records = list(records)
        transport = self.transport
        published: list[bytes | None] | None = None  # msgpack answers the outbox can reuse
        if transport is not None:
            topic, qos, encode = self._out[pipeline]
            if encode is msgpack_bytes:
                encode = self._pack_answer
                if self.outbox is not None:
                    published = [None] * len(records)
            end = 0
            for group in by_message(records):
                start, end = end, end + len(group)
                try:
                    # one answer message per input message: its rows' answers as an array
                    # when it made several rows (a batch, or several windows)
                    if len(group) == 1:
                        payload = encode(group[0])
                        if published is not None and self._answer_plain:
                            published[start] = payload  # the outbox reuses these bytes
                    elif published is not None:
                        # each row's answer packed once: the array is their concatenation
                        # behind its header, and the outbox reuses each row's bytes
                        parts = []
                        plain = True
                        for rec in group:
                            parts.append(encode(rec))
                            plain = plain and self._answer_plain
                        if plain:
                            published[start:end] = parts
                        payload = b"".join((self._answer_packer.pack_array_header(
                            len(parts)), *parts))
                    else:
                        payload = encode(group)
                    transport.publish_nowait(topic, payload, qos)
                except (TransportError, TypeError, ValueError, OverflowError) as exc:
                    # this answer alone is not published; the outbox still gets it below
                    self.publish_errors += 1
                    log.warning("answer for %s not published: %s", group[0].get("id"), exc)
                    continue
                self.published[pipeline] += len(group)
            transport.flush()  # the answers leave now, in one write
        if self.outbox is not None and records:
            self._queue(_packed_run(self.device, "outputs", records, published))
            # answers go out in input order: all up to here are queued
            self._marks[pipeline] = records[-1]["input_seq"]

    def _answers_from_columns(self, pipeline: str, ar: AnswerRecords) -> bool:
        """Answers that one version gave every row of the batch, published and stored packed
        straight from the columns, byte for byte what packing the records gives; False
        (nothing published, nothing stored) when they cannot go this way: another output
        format, answers of several versions, a value msgpack cannot pack as it is."""
        answers = ar.answers
        if not isinstance(answers, AnswerColumn) or not ar.rows:
            return False
        outputs = answers.outcome.outputs
        if not isinstance(outputs, Outputs):
            return False
        transport = self.transport
        if transport is not None and self._out[pipeline][2] is not msgpack_bytes:
            return False
        try:
            store = self.outbox is not None
            payloads, run = _pack_answers(self.device, ar, outputs.packed(),
                                          rows_out=self._row_parts(ar.rows), store=store,
                                          matrix=outputs.matrix() if store else None)
        except (TypeError, ValueError, OverflowError):
            return False
        if transport is not None:
            topic, qos, _ = self._out[pipeline]
            for payload, n in payloads:
                try:
                    transport.publish_nowait(topic, payload, qos)
                except TransportError as exc:
                    self.publish_errors += 1  # the outbox still gets it below
                    log.warning("answer not published: %s", exc)
                    continue
                self.published[pipeline] += n
            transport.flush()  # the answers leave now, in one write
        if run is not None:
            self._queue(run)
            self._marks[pipeline] = ar.rows[-1].seq  # answers go out in input order
        return True

    def _row_parts(self, rows: Sequence[Any]) -> _RowParts:
        """The packed per-row parts of a batch, shared by its answers and every version's
        results (the same batch object reaches both)."""
        cached = self._rows_cache
        if cached is not None and cached.rows is rows:
            return cached
        parts = self._rows_cache = _RowParts(rows)
        return parts

    def _pack_answer(self, rec: dict) -> bytes:
        """:func:`msgpack_bytes`, noting whether every value was plain msgpack (no ``str()``
        fallback): then the outbox stores these very bytes with the record id spliced in."""
        self._answer_plain = True
        return self._answer_packer.pack(rec)

    def _answer_default(self, obj: object) -> str:
        self._answer_plain = False
        return str(obj)

    @property
    def wants_results(self) -> bool:
        """Whether :meth:`results` keeps anything: without an outbox (or with results not
        recorded) the pipelines need not build per-version records at all."""
        return self.outbox is not None and self.record_results

    def results(self, pipeline: str, records: Sequence[dict]) -> None:
        if self.outbox is not None and self.record_results and records:
            self._queue(_packed_results(self.device, records, self._rows_cache)
                        if isinstance(records, ResultRecords)
                        else _packed_run(self.device, "results", list(records)))

    def alert(self, pipeline: str, kind: str, detail: dict) -> None:
        rec = {"device": self.device, "pipeline": pipeline, "kind": kind, "ts": time.time(),
               **detail}
        if self.transport is not None:
            try:
                self.transport.publish_nowait(self._topic("alerts"), json_bytes(rec), qos=1)
            except TransportError as exc:  # the outbox still gets it below
                self.publish_errors += 1
                log.warning("alert %s not published: %s", kind, exc)
        if self.outbox is not None:
            rid = f"{self.device}/{pipeline}/alert/{kind}/{rec['ts']:.6f}"
            self._queue(_Run("alerts", [rid], [rec]))

    # ---- control's event sink ---------------------------------------------------------------
    def publish(self, topic: str, doc: dict) -> None:
        """A JSON report (deploy stage, command reply) at QoS 1; never raises."""
        if self.transport is None:
            return
        try:
            self.transport.publish_nowait(topic, json_bytes(doc), qos=1)
        except Exception:  # a report must never break a deployment
            log.exception("publish to %s failed", topic)

    def deploy_event(self, event: dict) -> None:
        """A deployment outcome (active, failed, noop, rolled_back, watch_passed) for the
        outbox's ``deploy`` stream, so upstream keeps a history of what ran where."""
        if self.outbox is None:
            return
        rec = {"device": self.device, **event}
        rid = record_id(self.device, str(event.get("pipeline")),
                        f"{event.get('stage')}@{event.get('ts', 0):.6f}",
                        str(event.get("name")), str(event.get("version")), "deploy")
        self._queue(_Run("deploy", [rid], [rec]))

    def status_changed(self) -> None:
        self._status_changed()

    def record(self, stream: str, rid: str, rec: dict) -> None:
        """Any other stream's record (drift windows) into the outbox, with its own id."""
        if self.outbox is not None:
            self._queue(_Run(stream, [rid], [{"device": self.device, **rec}]))

    # ---- the outbox writer ---------------------------------------------------------------
    def _queue(self, run: _Run) -> None:
        self._pending.append(run)
        self._pending_n += len(run)
        if self._pending_n > PENDING_MAX:  # the writer thread is far behind: bound memory
            self._trim()
        self._ready.set()

    def _trim(self) -> None:
        """Drop the oldest waiting records beyond ``PENDING_MAX`` (counted)."""
        pending = self._pending
        drop = self._pending_n - PENDING_MAX
        self.overflow += drop
        self._pending_n = PENDING_MAX
        while drop > 0:
            run = pending[0]
            if len(run) <= drop:
                drop -= len(run)
                del pending[0]
            else:
                pending[0] = run.tail(drop)
                drop = 0

    def _write(self, runs: list[_Run], marks: dict[str, int]) -> Any:
        """On the writer thread: one ``put_groups`` transaction."""
        return self.outbox.put_groups([r.group() for r in runs], marks=marks)

    async def run_writer(self) -> None:
        """Moves queued records into SQLite on one worker thread, a transaction per burst,
        until :meth:`close_writer`; then writes what is left and returns."""
        if self.outbox is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            if not self._closing and self._pending_n < OUTBOX_WRITE_MAX:
                # one transaction per ~50 ms, not per scored batch: a commit costs far more
                # than a row. Nothing is at risk meanwhile: after a crash the device re-scores
                # from the raw-input log past the outbox's high-water mark. (Longer intervals
                # measured no cheaper: the larger batch falls out of the CPU caches.)
                await asyncio.sleep(OUTBOX_WRITE_INTERVAL_S)
            self._ready.clear()
            if self._pending or self._marks:
                items, self._pending, self._pending_n = self._pending, [], 0
                marks, self._marks = self._marks, {}
                try:
                    await loop.run_in_executor(self._pool, self._write, items, marks)
                except Exception as exc:
                    # disk full, I/O error, a damaged file: keep the records (bounded) and
                    # try again; after a crash the raw log re-scores past the mark anyway
                    self._write_failed(items, marks, exc)
                    if self._closing:
                        return
                    await asyncio.sleep(self.retry_s)
                    self._ready.set()
                    continue
                if self.write_error is not None:
                    log.warning("outbox writes work again after %d failed attempt(s)",
                                self.write_errors)
                    self.write_error = None
                    self.alert("*", "outbox_write_resumed", {"failed_writes": self.write_errors})
                if self.uplink is not None:
                    self.uplink.notify()
            if self._closing and not self._pending:
                return

    def _write_failed(self, items: list[_Run], marks: dict, exc: Exception) -> None:
        self.write_errors += 1
        first = self.write_error is None
        self.write_error = str(exc)
        self._pending[:0] = items  # back in front, in order
        n = sum(len(r) for r in items)
        self._pending_n += n
        for k, v in marks.items():
            self._marks[k] = max(v, self._marks.get(k, v))
        if self._pending_n > PENDING_MAX:
            self._trim()
        if first:
            log.error("outbox write of %d record(s) failed, will retry: %s", n, exc)
            problems = self._check_outbox()
            self.alert("*", "outbox_write_failed", {"error": str(exc), "waiting": (
                self._pending_n), **({"damaged": problems} if problems else {})})

    def _check_outbox(self) -> list[str]:
        try:
            return self.outbox.check_integrity()
        except Exception as exc:  # the check itself failed: report that
            return [f"integrity check failed: {exc}"]

    def close_writer(self) -> None:
        self._closing = True
        self._ready.set()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
