"""The evidence for comparing model versions across a fleet, from the collector's database.

:func:`version_evidence` returns one :class:`VersionEvidence` per (pipeline, model, version)
for a set of devices and a time range (or the rows stored after a given ``records.id``): what
``edgeml fleet report`` prints and what a staged rollout judges a new version by. Works on
SQLite and PostgreSQL alike: the database does the filtering, Python the arithmetic (so both
give the same figures, with the same percentile and F1 definitions).

Definitions (docs/fleet.md):

- ``rows``: the version's results (every version scores every input: stream ``results``).
- ``errors`` / ``error_rate``: results with an error / rows.
- ``answers`` / ``answer_share``: answers (stream ``outputs``) given by this version / all
  answers of the pipeline in the same selection.
- ``fallbacks`` / ``fallback_rate``: its answers flagged ``fallback`` / its answers.
- ``latency_p50_ms`` / ``latency_p99_ms``: of its answers (input arrival to answer, on the
  device), numpy's linear-interpolation percentiles.
- ``scoring_p50_ms`` / ``scoring_p99_ms``: of its results' own scoring time (every version,
  also one that never answers, such as a canary or a shadow).
- ``agreement``: share of inputs, among those both this version and the champion scored
  without error, where their labels are equal (``compared`` such inputs). The champion is the
  version whose result had role ``champion`` for that same input.
- ``accuracy`` / ``macro_f1``: on results whose input carried a true label (``labelled``);
  macro-F1 averages per-class F1 over the classes seen in the true or predicted labels
  (scikit-learn's ``f1_score(average="macro")``).
- ``drift``: from the devices' drift windows (stream ``drift``, kind ``output``): windows,
  mean and max of ``label_psi`` / ``score_psi``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeml.host.collect.sink import connect, parse_db_url


@dataclass(frozen=True)
class VersionEvidence:
    pipeline: str
    model: str
    version: str
    roles: tuple[str, ...] = ()
    devices: int = 0
    rows: int = 0
    errors: int = 0
    error_rate: float | None = None
    answers: int = 0
    answer_share: float | None = None
    fallbacks: int = 0
    fallback_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    scoring_p50_ms: float | None = None
    scoring_p99_ms: float | None = None
    compared: int = 0
    agreement: float | None = None
    labelled: int = 0
    accuracy: float | None = None
    macro_f1: float | None = None
    drift: dict[str, Any] = field(default_factory=dict)
    last_id: int = 0  # the highest records.id that contributed

    @property
    def key(self) -> str:
        return f"{self.model}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = list(self.roles)
        return d


@dataclass(frozen=True)
class Selection:
    """Which records: devices (None: all), pipeline, ``since <= ts < until`` (device time,
    Unix seconds) and ``records.id > after_id``."""

    devices: tuple[str, ...] | None = None
    pipeline: str | None = None
    since: float | None = None
    until: float | None = None
    after_id: int | None = None

    def where(self, stream: str) -> tuple[str, list[Any]]:
        sql = ["stream = ?"]
        params: list[Any] = [stream]
        if self.devices is not None:
            if not self.devices:
                sql.append("1 = 0")
            else:
                sql.append("device IN (" + ", ".join("?" * len(self.devices)) + ")")
                params += list(self.devices)
        if self.pipeline is not None:
            sql.append("pipeline = ?")
            params.append(self.pipeline)
        if self.since is not None:
            sql.append("ts >= ?")
            params.append(self.since)
        if self.until is not None:
            sql.append("ts < ?")
            params.append(self.until)
        if self.after_id is not None:
            sql.append("id > ?")
            params.append(self.after_id)
        return " AND ".join(sql), params


class FleetDB:
    """A read connection to the collector's database (``sqlite:///...``/``postgresql://``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect, _ = parse_db_url(url)
        self.conn = connect(url)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
        cur = self.conn.execute(sql, tuple(params))
        rows = cur.fetchall()
        if self.dialect == "postgresql":
            self.conn.rollback()  # end the read transaction: no snapshot kept open
        return rows

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> FleetDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def macro_f1(truth: Sequence[str], pred: Sequence[str]) -> float | None:
    """Macro-averaged F1 over the classes in ``truth`` or ``pred``."""
    if not truth:
        return None
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for t, p in zip(truth, pred, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    classes = set(truth) | set(pred)
    f1s = []
    for c in classes:
        den = 2 * tp[c] + fp[c] + fn[c]
        f1s.append(2 * tp[c] / den if den else 0.0)
    return sum(f1s) / len(f1s)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _doc(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    try:
        doc = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def version_evidence(db: str | FleetDB, *, devices: Iterable[str] | None = None,
                     pipeline: str | None = None, since: float | None = None,
                     until: float | None = None, after_id: int | None = None
                     ) -> list[VersionEvidence]:
    """Per-version figures for the selected records (see the module doc for definitions),
    sorted by pipeline, then champion first, then model and version."""
    sel = Selection(tuple(devices) if devices is not None else None, pipeline, since, until,
                    after_id)
    own = isinstance(db, str)
    fdb = FleetDB(db) if isinstance(db, str) else db
    try:
        return _evidence(fdb, sel)
    finally:
        if own:
            fdb.close()


def _evidence(db: FleetDB, sel: Selection) -> list[VersionEvidence]:
    Key = tuple[str, str, str]
    acc: dict[Key, dict[str, Any]] = defaultdict(lambda: {
        "roles": set(), "devices": set(), "rows": 0, "errors": 0, "answers": 0,
        "fallbacks": 0, "latency": [], "scoring": [], "compared": 0, "agree": 0,
        "truth": [], "pred": [], "drift": [], "last_id": 0})

    where, params = sel.where("results")
    results = db.query(
        "SELECT id, device, pipeline, model, version, role, input_key, label, true_label, "
        f"error, latency_ms FROM records WHERE {where}", params)
    champion: dict[str, str | None] = {}
    for _id, _dev, _p, _m, _v, role, ikey, label, _t, error, _lat in results:
        if role == "champion" and ikey is not None:
            champion[ikey] = None if error is not None else label
    for rid, dev, p, m, v, role, ikey, label, truth, error, lat in results:
        a = acc[(p or "", m or "", v or "")]
        a["last_id"] = max(a["last_id"], rid)
        a["devices"].add(dev)
        if role:
            a["roles"].add(role)
        a["rows"] += 1
        if lat is not None:
            a["scoring"].append(float(lat))
        if error is not None:
            a["errors"] += 1
            continue
        champ = champion.get(ikey) if ikey is not None else None
        if champ is not None and label is not None:
            a["compared"] += 1
            a["agree"] += label == champ
        if truth is not None and label is not None:
            a["truth"].append(truth)
            a["pred"].append(label)

    where, params = sel.where("outputs")
    outputs = db.query(
        "SELECT id, device, pipeline, model, version, latency_ms, fallback, error "
        f"FROM records WHERE {where}", params)
    answers_per_pipeline: Counter[str] = Counter()
    for rid, dev, p, m, v, lat, fb, _error in outputs:
        answers_per_pipeline[p or ""] += 1
        if not m or not v:  # nobody answered: counts for the pipeline only
            continue
        a = acc[(p or "", m, v)]
        a["last_id"] = max(a["last_id"], rid)
        a["devices"].add(dev)
        a["answers"] += 1
        a["fallbacks"] += bool(fb)
        if lat is not None:
            a["latency"].append(float(lat))

    where, params = sel.where("drift")
    for rid, p, record in db.query(
            f"SELECT id, pipeline, record FROM records WHERE {where} ORDER BY ts, id", params):
        doc = _doc(record)
        if doc.get("kind") != "output" or not isinstance(doc.get("version"), str):
            continue
        m, _, v = doc["version"].partition(":")
        key = (p or "", m, v)
        if key in acc:
            acc[key]["drift"].append(doc)
            acc[key]["last_id"] = max(acc[key]["last_id"], rid)

    out = []
    for (p, m, v), a in acc.items():
        drift: dict[str, Any] = {}
        if a["drift"]:
            drift["windows"] = len(a["drift"])
            for fig in ("label_psi", "score_psi", "score_ks"):
                vals = [float(d[fig]) for d in a["drift"]
                        if isinstance(d.get(fig), (int, float))]
                if vals:
                    drift[f"{fig}_mean"] = sum(vals) / len(vals)
                    drift[f"{fig}_max"] = max(vals)
                    drift[f"{fig}_last"] = vals[-1]
        labelled = len(a["truth"])
        out.append(VersionEvidence(
            pipeline=p, model=m, version=v, roles=tuple(sorted(a["roles"])),
            devices=len(a["devices"]), rows=a["rows"], errors=a["errors"],
            error_rate=_ratio(a["errors"], a["rows"]), answers=a["answers"],
            answer_share=_ratio(a["answers"], answers_per_pipeline[p]),
            fallbacks=a["fallbacks"], fallback_rate=_ratio(a["fallbacks"], a["answers"]),
            latency_p50_ms=percentile(a["latency"], 50),
            latency_p99_ms=percentile(a["latency"], 99),
            scoring_p50_ms=percentile(a["scoring"], 50),
            scoring_p99_ms=percentile(a["scoring"], 99),
            compared=a["compared"], agreement=_ratio(a["agree"], a["compared"]),
            labelled=labelled,
            accuracy=_ratio(sum(t == q for t, q in zip(a["truth"], a["pred"], strict=True)),
                            labelled),
            macro_f1=macro_f1(a["truth"], a["pred"]), drift=drift, last_id=a["last_id"]))
    out.sort(key=lambda e: (e.pipeline, "champion" not in e.roles, e.model, e.version))
    return out


def input_drift(db: str | FleetDB, *, devices: Iterable[str] | None = None,
                pipeline: str | None = None, since: float | None = None,
                until: float | None = None) -> dict[str, dict[str, Any]]:
    """Per pipeline, the devices' input drift windows: windows, the worst channel PSI (mean
    over windows of each window's max, and the max), out-of-range share (max)."""
    sel = Selection(tuple(devices) if devices is not None else None, pipeline, since, until)
    own = isinstance(db, str)
    fdb = FleetDB(db) if isinstance(db, str) else db
    try:
        where, params = sel.where("drift")
        per: dict[str, dict[str, Any]] = {}
        for p, record in fdb.query(f"SELECT pipeline, record FROM records WHERE {where}",
                                   params):
            doc = _doc(record)
            if doc.get("kind") != "input":
                continue
            psis = [float(x) for x in (doc.get("psi") or {}).values()
                    if isinstance(x, (int, float))]
            oor = [float(x) for x in (doc.get("out_of_range") or {}).values()
                   if isinstance(x, (int, float))]
            d = per.setdefault(p or "", {"windows": 0, "psi_max": [], "oor_max": 0.0,
                                         "devices": set()})
            d["windows"] += 1
            d["devices"].add(doc.get("device"))
            if psis:
                d["psi_max"].append(max(psis))
            if oor:
                d["oor_max"] = max(d["oor_max"], max(oor))
        return {p: {"windows": d["windows"], "devices": len(d["devices"]),
                    "worst_psi_mean": (sum(d["psi_max"]) / len(d["psi_max"])
                                       if d["psi_max"] else None),
                    "worst_psi_max": max(d["psi_max"]) if d["psi_max"] else None,
                    "out_of_range_max": d["oor_max"]} for p, d in sorted(per.items())}
    finally:
        if own:
            fdb.close()


def last_record_id(db: str | FleetDB) -> int:
    """The highest ``records.id`` so far (0 when empty): a mark to pass as ``after_id``
    later. On PostgreSQL ids of concurrent transactions may commit out of order; a reader
    that needs every row after a mark should prefer a time range."""
    own = isinstance(db, str)
    fdb = FleetDB(db) if isinstance(db, str) else db
    try:
        row = fdb.query("SELECT MAX(id) FROM records")
        return int(row[0][0] or 0) if row else 0
    finally:
        if own:
            fdb.close()


def deploy_events(db: str | FleetDB, *, devices: Iterable[str] | None = None,
                  pipeline: str | None = None, name: str | None = None,
                  version: str | None = None, since: float | None = None) -> list[dict]:
    """Deployment outcomes the devices synced (stream ``deploy``: ``active``, ``failed``,
    ``noop``, ``rolled_back``, ``watch_passed``), oldest first, as dicts with ``record_id``,
    ``device``, ``pipeline``, ``name``, ``version``, ``stage``, ``role``, ``reason``, ``ts``,
    ``received``."""
    sql = ["1 = 1"]
    params: list[Any] = []
    devs = tuple(devices) if devices is not None else None
    if devs is not None:
        if not devs:
            return []
        sql.append("device IN (" + ", ".join("?" * len(devs)) + ")")
        params += list(devs)
    for col, val in (("pipeline", pipeline), ("name", name), ("version", version)):
        if val is not None:
            sql.append(f"{col} = ?")
            params.append(val)
    if since is not None:
        sql.append("ts >= ?")
        params.append(since)
    cols = ("record_id", "device", "pipeline", "name", "version", "stage", "role", "reason",
            "ts", "received")
    own = isinstance(db, str)
    fdb = FleetDB(db) if isinstance(db, str) else db
    try:
        rows = fdb.query(f"SELECT {', '.join(cols)} FROM deploy_events WHERE "
                         f"{' AND '.join(sql)} ORDER BY ts", params)
    finally:
        if own:
            fdb.close()
    return [dict(zip(cols, r, strict=True)) for r in rows]
