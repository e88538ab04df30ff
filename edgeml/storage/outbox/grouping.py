"""One record for the rows of one input message, and back.

A message that carries several samples (``{"samples": [...]}``, a JSON array, a SenML pack)
or completes several windows makes several rows. Their records differ only in a few fields
(which row, its id, its output, its true label), so the device stores and syncs them as one
*grouped* record: the shared fields once, and ``rows``, each row's own fields. That is a
tenth of the records and a third of the bytes for a ten-sample message, and well under half
of what syncing it cost the device. A grouped record stands for exactly the per-row records
:func:`expand_group` gives back, ids included; the collector stores those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from edgeml.storage.outbox.records import id_part

#: the fields a grouped record keeps per row (in each element of ``rows``); every other
#: field is one the rows share
ROW_FIELDS = frozenset(("row", "id", "output", "true_label"))
#: rows in one grouped record at most: a message of 1,000 samples makes ten records, each
#: well inside a stored chunk (64 KiB) and any broker's message size limit
GROUP_MAX_ROWS = 100


def row_position(input_seq: Any, row: Any) -> Any:
    """A row record's position in its id: ``input_seq``, or ``input_seq.row`` past row 0."""
    return f"{input_seq}.{row}" if row else input_seq


def group_position(input_seq: Any, first: Any, last: Any) -> str:
    """A grouped record's position in its id, ``input_seq.first-last``: never a row's."""
    return f"{input_seq}.{first}-{last}"


def _shared(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ROW_FIELDS}


def _row_fields_in(rec: Mapping[str, Any]) -> int:
    return ("row" in rec) + ("id" in rec) + ("output" in rec) + ("true_label" in rec)


def message_spans(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """``[start, end)`` runs of consecutive records of one input message (one ``input_seq``)
    that share every field but :data:`ROW_FIELDS`, at most :data:`GROUP_MAX_ROWS` long; a
    record alone is a run of one."""
    spans: list[tuple[int, int]] = []
    start = 0
    n = len(records)
    get_shared = None  # the run's shared fields, read at C speed (a run is ~10 records)
    for i in range(1, n + 1):
        if i < n:
            first, rec = records[start], records[i]
            if (i - start < GROUP_MAX_ROWS and rec.get("input_seq") == first.get("input_seq")
                    and "rows" not in rec and "rows" not in first):
                if get_shared is None:
                    keys = [k for k in first if k not in ROW_FIELDS]
                    get_shared, n_keys = itemgetter(*keys), len(keys)
                    shared = get_shared(first)
                try:
                    if (get_shared(rec) == shared
                            and len(rec) - _row_fields_in(rec) == n_keys):
                        continue
                except KeyError:  # a shared field missing here: another run
                    pass
        spans.append((start, i))
        start, get_shared = i, None
    return spans


def row_entry(rec: Mapping[str, Any]) -> dict[str, Any]:
    """One element of ``rows``: ``row``, ``id``, ``output`` and ``true_label`` when set."""
    entry = {"row": rec.get("row", 0), "id": rec.get("id"), "output": rec.get("output")}
    if "true_label" in rec:
        entry["true_label"] = rec["true_label"]
    return entry


def group_record(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The grouped record of several rows' records (one run of :func:`message_spans`)."""
    rec = _shared(records[0])
    rec["rows"] = [row_entry(r) for r in records]
    return rec


def expand_group(record_id: str, rec: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-row records a grouped record stands for, each with its own id, exactly as the
    device would have written them one by one. Raises ValueError, saying why, for a grouped
    record that does not hold together (no rows, an id that is not its rows')."""
    rows = rec.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(e, dict) for e in rows):
        raise ValueError("'rows' must be a non-empty list of maps")
    parts = record_id.split("/")
    seq = rec.get("input_seq")
    if len(parts) != 6 or seq is None:
        raise ValueError("a grouped record needs an id of six parts and an 'input_seq'")
    first, last = rows[0].get("row", 0), rows[-1].get("row", 0)
    if parts[2] != id_part(group_position(seq, first, last)):
        raise ValueError(f"id {record_id!r} is not that of rows {first}-{last} of input "
                         f"{seq!r}")
    # a row's own fields come from its element only, never from the shared ones
    shared = {k: v for k, v in rec.items() if k != "rows" and k not in ROW_FIELDS}
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for e in rows:
        row = e.get("row", 0)
        row_rec = {"id": e.get("id"), **shared, "output": e.get("output")}
        if row:
            row_rec["row"] = row
        if "true_label" in e:
            row_rec["true_label"] = e["true_label"]
        rid = "/".join((*parts[:2], id_part(row_position(seq, row)), *parts[3:]))
        if rid in seen:
            raise ValueError(f"row {row!r} appears twice")
        seen.add(rid)
        out.append((rid, row_rec))
    return out
