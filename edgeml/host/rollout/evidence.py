"""What the collector's database says about a version on some devices since some time.

Reads only the fleet contract's ``records`` table (``device``, ``stream``, ``pipeline``,
``model``, ``version``, ``ts`` and the record as JSON), so it works with any collector that
keeps that contract. A result record (stream ``results``) is one version's output for one
input row; the new version's rows are paired with the champion's on the same input (same
device, ``input_seq`` and ``row``) to count disagreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edgeml.host.rollout.db import Database, as_json
from edgeml.host.rollout.plan import Evidence, Figures, percentile

RESULTS_STREAM = "results"


@dataclass
class _Acc:
    rows: int = 0
    errors: int = 0
    compared: int = 0
    disagreed: int = 0
    latencies: list[float] = field(default_factory=list)
    first_ts: float | None = None
    last_ts: float | None = None

    def figures(self) -> Figures:
        return Figures(rows=self.rows, errors=self.errors, compared=self.compared,
                       disagreed=self.disagreed, p99_ms=percentile(self.latencies, 99),
                       latency_rows=len(self.latencies), first_ts=self.first_ts,
                       last_ts=self.last_ts)

    def add(self, other: _Acc) -> None:
        self.rows += other.rows
        self.errors += other.errors
        self.compared += other.compared
        self.disagreed += other.disagreed
        self.latencies += other.latencies
        for ts in (other.first_ts, other.last_ts):
            if ts is not None:
                self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
                self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)


def _label(rec: dict):
    out = rec.get("output")
    if isinstance(out, dict):
        lab = out.get("label")
        return tuple(lab) if isinstance(lab, list) else lab
    return None


def figures_from_records(records: Iterable[tuple[str, dict]], *, model: str, version: str,
                         since: Mapping[str, float]) -> Evidence:
    """Evidence from ``(device, result record)`` pairs: only devices in ``since`` and only
    records whose ``ts`` (the input's receive time on the device) is at or after the time
    the version became active there."""
    new: dict[tuple, dict] = {}
    champ: dict[tuple, object] = {}
    for device, rec in records:
        start = since.get(device)
        ts = rec.get("ts") if isinstance(rec, dict) else None
        if start is None or not isinstance(ts, (int, float)) or ts < start:
            continue
        key = (device, rec.get("input_seq"), rec.get("row"))
        if str(rec.get("model")) == model and str(rec.get("version")) == version:
            new[key] = rec  # a duplicate delivery keeps one row
        elif rec.get("role") == "champion" and not rec.get("error"):
            champ[key] = _label(rec)
    accs: dict[str, _Acc] = {d: _Acc() for d in since}
    for key, rec in new.items():
        a = accs[key[0]]
        a.rows += 1
        ts = float(rec["ts"])
        a.first_ts = ts if a.first_ts is None else min(a.first_ts, ts)
        a.last_ts = ts if a.last_ts is None else max(a.last_ts, ts)
        failed = bool(rec.get("error")) or rec.get("output") is None
        if failed:
            a.errors += 1
        lat = rec.get("latency_ms")
        if isinstance(lat, (int, float)) and not isinstance(lat, bool) and not failed:
            a.latencies.append(float(lat))
        if not failed and key in champ:
            a.compared += 1
            if _label(rec) != champ[key]:
                a.disagreed += 1
    total = _Acc()
    for a in accs.values():
        total.add(a)
    return Evidence(total.figures(), {d: a.figures() for d, a in accs.items()})


def fetch_results(db: Database, *, pipeline: str | None, devices: Sequence[str],
                  since: float) -> list[tuple[str, dict]]:
    """Every result record of ``devices`` (in ``pipeline``, if known) from ``since`` on:
    the new version's and the champion's, as ``(device, record)``."""
    if not devices:
        return []
    marks = ",".join("?" for _ in devices)
    sql = (f"SELECT device, record FROM records WHERE stream = ? AND device IN ({marks}) "
           "AND ts >= ?")
    params: list = [RESULTS_STREAM, *devices, ts_param(db, since)]
    if pipeline:
        sql += " AND pipeline = ?"
        params.append(pipeline)
    out = []
    for device, raw in db.query(sql, params):
        rec = as_json(raw)
        if isinstance(rec, dict):
            out.append((str(device), rec))
    return out


def ts_param(db: Database, ts: float) -> float:
    """The ``ts`` column holds the input's receive time on the device, in Unix seconds."""
    return float(ts)


def evidence(db: Database, *, pipeline: str | None, model: str, version: str,
             since: Mapping[str, float]) -> Evidence:
    """The figures for ``model version`` on the devices of ``since`` (device -> the time the
    version became active there)."""
    if not since:
        return Evidence(Figures(), {})
    rows = fetch_results(db, pipeline=pipeline, devices=sorted(since),
                         since=min(since.values()))
    return figures_from_records(rows, model=model, version=version, since=since)
