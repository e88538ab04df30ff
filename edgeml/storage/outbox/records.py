"""Record identity and wire encoding: what a record's id is, how a record is packed (msgpack,
``record_id`` first), what a chunk is charged, and the id-splicing helpers. The outbox stores
exactly these bytes and the uplink splices them into batch messages without decoding them,
so this module is shared by both ends (:mod:`edgeml.core.uplink` builds messages with it)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import msgpack

# Per-row cost beyond payload and id: the row header, the rowid, the covering stream index entry
# and B-tree slack. Measured on SQLite 3.40 (see docs/sync.md); keeps ``bytes_used`` close to the
# space the live rows take in the file.
ROW_OVERHEAD = 96


@dataclass(frozen=True)
class OutboxChunk:
    """One stored row: ``count`` records of one stream from one ``put_many``, oldest first.

    ``payload`` is the records back to back, each a msgpack map whose first key is
    ``record_id``: the very bytes a batch message carries, so the uplink splices chunks into a
    message without decoding them. ``rowid`` orders chunks (insertion order) and is never
    reused; ``size`` is what the chunk is charged against the budget.
    """

    rowid: int
    stream: str
    chunk_id: str
    count: int
    payload: bytes
    created: float
    size: int

    def records(self) -> list[dict[str, Any]]:
        """The records, decoded, each with its ``record_id``."""
        return unpack_records(self.payload)

    def record_ids(self) -> list[str]:
        return [r.get("record_id") for r in self.records()]


def id_part(value: object) -> str:
    """One part of a record id: ``str(value)``, percent-encoded if it holds ``/`` or ``%``."""
    s = str(value)
    return quote(s, safe="") if ("/" in s or "%" in s) else s


def record_id(device: str, pipeline: str, input_seq: int | str, model: str, version: str,
              stream: str) -> str:
    """The stable unique id of a record, e.g. ``watch-01/activity/1234/activity/2/results``.

    A ``/`` or ``%`` inside a part is percent-encoded, so distinct parts never give one id.
    """
    return "/".join(id_part(p) for p in (device, pipeline, input_seq, model, version, stream))


def chunk_id(first_record_id: str, count: int) -> str:
    """A chunk's unique id: its first record's id and how many records it holds."""
    return f"{first_record_id}+{count}"


def chunk_bytes(stream: str, cid: str, payload: bytes) -> int:
    """Bytes a chunk is charged against the budget: its records (each with its id), the chunk
    id (row and unique index), stream name and a fixed per-row overhead."""
    return len(payload) + 2 * len(cid) + len(stream) + ROW_OVERHEAD


def _msgpack_default(obj: object) -> object:
    # numpy scalars and arrays (and anything else with tolist) become plain lists/numbers.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode_record(record: Mapping[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True, default=_msgpack_default)


_local = threading.local()
_RID_KEY = msgpack.packb("record_id")


def _packer() -> msgpack.Packer:
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, default=_msgpack_default)
    return packer


def result_packer() -> msgpack.Packer:
    """This thread's Packer, as :func:`pack_record` packs with: for callers that assemble a
    record's bytes from separately packed parts (a msgpack map is its header, then each key
    and value packed in turn)."""
    return _packer()


_MAP_HEADERS = [bytes([0x80 | n]) for n in range(16)]


def pack_map_header(n: int) -> bytes:
    """The msgpack header of a map of ``n`` entries."""
    return _MAP_HEADERS[n] if n < 16 else _packer().pack_map_header(n)


def pack_record(rid: str, record: Mapping[str, Any]) -> bytes:
    """A record as stored and sent: its fields with ``record_id`` in front, byte for byte
    ``encode_record({"record_id": rid, **record})``, with a reused per-thread Packer (packb
    builds a Packer per call, which costs more than the packing)."""
    packer = _packer()
    try:
        return packer.pack({"record_id": rid, **record})
    except BaseException:
        _local.packer = None  # never reuse a packer that failed half way
        raise


def pack_each(ids: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """:func:`pack_record` of each record (one packer lookup for them all)."""
    pack = _packer().pack
    try:
        return [pack({"record_id": rid, **rec}) for rid, rec in zip(ids, records, strict=True)]
    except BaseException:
        _local.packer = None
        raise


def pack_records(ids: Sequence[str], records: Sequence[Mapping[str, Any]]) -> bytes:
    """Records back to back, each byte for byte :func:`pack_record`'s: a chunk's payload.

    One Packer call for them all (an array of the maps, its header cut off), which costs
    about half as much per record as packing each on its own. Raises what msgpack raises if
    any record cannot be encoded; the caller then packs them one by one to refuse that one
    alone."""
    packer = _packer()
    try:
        packed = packer.pack([{"record_id": rid, **rec} for rid, rec in zip(ids, records,
                                                                             strict=True)])
    except BaseException:
        _local.packer = None  # never reuse a packer that failed half way
        raise
    h = packed[0]
    if 0x90 <= h <= 0x9F:
        return packed[1:]
    return packed[3:] if h == 0xDC else packed[5:]


def with_record_id(rid: str, packed_map: bytes) -> bytes | None:
    """``packed_map`` (a record packed as a msgpack map, without its id) as :func:`pack_record`
    would give it, without packing the record again; None if the bytes are not a map."""
    return _prepend_id(_packer(), rid, packed_map)


def _prepend_id(packer: msgpack.Packer, rid: str, packed_map: bytes) -> bytes | None:
    """``packed_map`` (a msgpack map) with ``record_id`` spliced in as its first key, without
    decoding it; None if the bytes are not a map."""
    n, body = _map_body(packed_map)
    if body is None:
        return None
    return b"".join((packer.pack_map_header(n + 1), _RID_KEY, packer.pack(rid), body))


def unpack_records(payload: bytes) -> list[Any]:
    """The records of a chunk payload (maps with non-string keys are allowed)."""
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(payload) + 1)
    up.feed(payload)
    return list(up)


def _ids_of(payload: bytes) -> list[str]:
    try:
        return [r.get("record_id") if isinstance(r, dict) else None
                for r in unpack_records(payload)]
    except (ValueError, msgpack.UnpackException):  # a damaged row: dedup cannot use it
        return []


def _map_body(payload: bytes) -> tuple[int, bytes | None]:
    """``(entries, bytes after the header)`` of a msgpack map, or ``(0, None)``."""
    if not payload:
        return 0, None
    h = payload[0]
    if 0x80 <= h <= 0x8F:
        return h & 0x0F, payload[1:]
    if h == 0xDE and len(payload) >= 3:
        return int.from_bytes(payload[1:3], "big"), payload[3:]
    if h == 0xDF and len(payload) >= 5:
        return int.from_bytes(payload[1:5], "big"), payload[5:]
    return 0, None


class _NewChunk:
    """A chunk about to be stored: its records' ids and payload. ``parts`` (each record's
    bytes) are only needed when a chunk must be cut (the budget is full); a chunk packed in
    one go (:meth:`packed`) makes them on demand from its records, byte for byte the same."""

    __slots__ = ("_parts", "_records", "chunk_id", "ids", "payload", "size", "stream")

    def __init__(self, stream: str, chunk_id: str, ids: list[str], parts: list[bytes] | None,
                 payload: bytes, size: int,
                 records: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.stream, self.chunk_id, self.ids = stream, chunk_id, ids
        self._parts, self._records = parts, records
        self.payload, self.size = payload, size

    @classmethod
    def of(cls, stream: str, ids: list[str], parts: list[bytes]) -> _NewChunk:
        payload = b"".join(parts)
        cid = chunk_id(ids[0], len(ids))
        return cls(stream, cid, ids, parts, payload, chunk_bytes(stream, cid, payload))

    @classmethod
    def packed(cls, stream: str, ids: list[str], records: Sequence[Mapping[str, Any]],
               payload: bytes) -> _NewChunk:
        """A chunk whose payload :func:`pack_records` made from ``records``."""
        cid = chunk_id(ids[0], len(ids))
        return cls(stream, cid, ids, None, payload, chunk_bytes(stream, cid, payload), records)

    @property
    def parts(self) -> list[bytes]:
        if self._parts is None:
            assert self._records is not None
            self._parts = [pack_record(rid, rec)
                           for rid, rec in zip(self.ids, self._records, strict=True)]
        return self._parts

    @property
    def count(self) -> int:
        return len(self.ids)

    def singles(self) -> list[_NewChunk]:
        return [_NewChunk.of(self.stream, [rid], [part])
                for rid, part in zip(self.ids, self.parts, strict=True)]
