"""What the collector's database says about a version on the devices of a rollout.

The agreement, error and row figures are the collector's own
(:func:`edgeml.host.collect.evidence.version_evidence`, what `edgeml fleet report` prints),
taken per device from the moment the version became active there. A rollout needs two more
things the report does not give, read here from the contract's ``records`` columns: the
version's own scoring time (``latency_ms`` of its result records; a canary or a challenger
seldom answers, so the answers' latency says nothing about it) and the time range of the
inputs the figures cover.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgeml.host.collect.evidence import FleetDB, percentile, version_evidence
from edgeml.host.rollout.plan import Evidence, Figures

RESULTS_STREAM = "results"


def device_figures(db: FleetDB, *, device: str, since: float, pipeline: str | None,
                   model: str, version: str) -> tuple[Figures, list[float]]:
    """One device's figures for ``model version`` from ``since`` (device clock), and the
    latencies behind its p99 (pooled later)."""
    rows = errors = compared = disagreed = 0
    for ev in version_evidence(db, devices=[device], pipeline=pipeline, since=since):
        if (ev.model, ev.version) == (model, version):
            rows, errors, compared = ev.rows, ev.errors, ev.compared
            disagreed = compared - round((ev.agreement or 0.0) * compared)
            break
    sql = ("SELECT ts, latency_ms, error FROM records WHERE stream = ? AND device = ? "
           "AND model = ? AND version = ? AND ts >= ?")
    params: list = [RESULTS_STREAM, device, model, version, since]
    if pipeline is not None:
        sql += " AND pipeline = ?"
        params.append(pipeline)
    stamps: list[float] = []
    latencies: list[float] = []
    for ts, lat, error in db.query(sql, params):
        if ts is not None:
            stamps.append(float(ts))
        if lat is not None and error is None:
            latencies.append(float(lat))
    return Figures(rows=rows, errors=errors, compared=compared, disagreed=disagreed,
                   p99_ms=percentile(latencies, 99), latency_rows=len(latencies),
                   first_ts=min(stamps, default=None),
                   last_ts=max(stamps, default=None)), latencies


def evidence(db: FleetDB, *, pipeline: str | None, model: str, version: str,
             since: Mapping[str, float]) -> Evidence:
    """Pooled and per-device figures for ``model version`` on the devices of ``since``
    (device -> when the version became active there, by the device's clock: the same clock
    as the records' ``ts``)."""
    per: dict[str, Figures] = {}
    pooled: list[float] = []
    for device, start in sorted(since.items()):
        per[device], lats = device_figures(db, device=device, since=start, pipeline=pipeline,
                                           model=model, version=version)
        pooled += lats
    firsts = [f.first_ts for f in per.values() if f.first_ts is not None]
    lasts = [f.last_ts for f in per.values() if f.last_ts is not None]
    total = Figures(rows=sum(f.rows for f in per.values()),
                    errors=sum(f.errors for f in per.values()),
                    compared=sum(f.compared for f in per.values()),
                    disagreed=sum(f.disagreed for f in per.values()),
                    p99_ms=percentile(pooled, 99), latency_rows=len(pooled),
                    first_ts=min(firsts, default=None), last_ts=max(lasts, default=None))
    return Evidence(total, per)


def row_counts(db: FleetDB, *, pipeline: str | None, model: str, version: str,
               since: Mapping[str, float]) -> dict[str, int]:
    """Result rows of ``model version`` per device since it became active there: the cheap
    count a rows hold polls (the full figures are computed once, when the wave is judged)."""
    out = {}
    for device, start in since.items():
        sql = ("SELECT COUNT(*) FROM records WHERE stream = ? AND device = ? AND model = ? "
               "AND version = ? AND ts >= ?")
        params: list = [RESULTS_STREAM, device, model, version, start]
        if pipeline is not None:
            sql += " AND pipeline = ?"
            params.append(pipeline)
        out[device] = int(db.query(sql, params)[0][0])
    return out
