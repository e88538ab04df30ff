"""Where synced records are stored: an embedded SQLite file or PostgreSQL, one interface.

:class:`Sink` is synchronous on purpose (the collector runs it on one worker thread): each
:meth:`Sink.store` call writes many deliveries in **one transaction** and returns only after
``COMMIT``; the collector acknowledges those deliveries after that, never before. Rows are
keyed by ``record_id`` (``INSERT ... ON CONFLICT DO NOTHING``), so a redelivered batch adds
nothing. Connection failures raise :class:`~edgeml.errors.SinkUnavailableError` (the caller
retries the same deliveries after :meth:`Sink.reconnect`); a batch the database itself refuses
(a value it cannot store) is retried delivery by delivery and the one it refuses goes to
quarantine with the database's reason.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeml.errors import CollectError, ConfigError, SinkUnavailableError
from edgeml.host.collect.batch import Parsed, parse_delivery
from edgeml.host.collect.schema import migrate

log = logging.getLogger("edgeml.host.collect.sink")

DEFAULT_DB = "sqlite:///edgeml-fleet.db"
#: PostgreSQL: batches of at least this many records go through COPY
COPY_MIN_ROWS = 50
_RECORD_COLUMNS = ("record_id, device, stream, pipeline, model, version, ts, received, "
                   "input_key, input_id, role, label, true_label, latency_ms, fallback, error, "
                   "record")


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the sink needs of a delivery (the collector's :class:`Delivery` fits)."""

    topic: str
    payload: bytes
    source: str = ""


@dataclass(frozen=True, slots=True)
class StoreResult:
    deliveries: int
    records: int  # records in the batches (good ones)
    stored: int  # new rows in ``records``
    duplicates: int  # records already there
    quarantined: int  # quarantine rows written (whole messages or single records)


def parse_db_url(url: str) -> tuple[str, str]:
    """``sqlite:///PATH`` / ``sqlite:///:memory:`` / ``postgresql://...`` -> (dialect, target)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ConfigError(f"use sqlite:///PATH (three slashes), not {url!r}", key="--db")
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ConfigError(f"no file in {url!r}", key="--db")
        return "sqlite", path
    if parts.scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise ConfigError(f"must be sqlite:///PATH or postgresql://..., not {url!r}", key="--db")


def connect(url: str) -> Any:
    """A raw DB-API connection (sqlite3 in autocommit mode or psycopg), for readers."""
    dialect, target = parse_db_url(url)
    if dialect == "sqlite":
        if target != ":memory:" and not Path(target).exists():
            raise CollectError(f"no fleet database at {target}")
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        return conn
    psycopg = _psycopg()
    try:
        return psycopg.connect(target, connect_timeout=10)
    except psycopg.Error as exc:
        raise SinkUnavailableError(f"cannot connect to {_safe(target)}: {exc}") from exc


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise CollectError("PostgreSQL needs psycopg 3: pip install 'edgeml[fleet]'") from exc
    return psycopg


def _safe(url: str) -> str:
    """A URL without its password, for logs and errors."""
    p = urlsplit(url)
    if p.password:
        netloc = p.netloc.replace(f":{p.password}@", ":***@")
        return p._replace(netloc=netloc).geturl()
    return url


class Sink:
    """``Sink(url)``: open (creating/migrating the schema), then :meth:`store` batches.

    - ``prefix``: the topic prefix devices use (``{prefix}/{device}/sync/{stream}``).
    - ``retention_days``: :meth:`expire` deletes records (and alerts, deploy events,
      quarantine entries) older than this; None keeps everything."""

    def __init__(self, url: str = DEFAULT_DB, *, prefix: str = "edgeml",
                 retention_days: float | None = None) -> None:
        self.url = url
        self.dialect, self._target = parse_db_url(url)
        if retention_days is not None and retention_days <= 0:
            raise ConfigError(f"must be positive, not {retention_days}", key="--retention-days")
        self.prefix = prefix
        self.retention_days = retention_days
        self._conn: Any = None
        self._staging = False  # PostgreSQL: the COPY staging table exists on this connection
        self._errors: tuple[type[BaseException], ...] = ()
        self._unavailable: tuple[type[BaseException], ...] = ()
        self.schema: tuple[int, int] | None = None
        self.connect()

    # ---- connection ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return _safe(self.url)

    def connect(self) -> None:
        """(Re)open the connection and bring the schema up to date."""
        self.close()
        try:
            if self.dialect == "sqlite":
                self._errors = (sqlite3.DatabaseError,)
                self._unavailable = (sqlite3.OperationalError,)
                if self._target != ":memory:":
                    Path(self._target).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self._target, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")
            else:
                psycopg = _psycopg()
                self._errors = (psycopg.DatabaseError,)
                self._unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
                conn = psycopg.connect(self._target, connect_timeout=10)
            self._conn = conn
            self.schema = migrate(conn, self.dialect, self._execute)
        except CollectError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise SinkUnavailableError(f"cannot open {self.name}: {exc}") from exc
        except Exception as exc:
            self.close()
            if self._unavailable and isinstance(exc, self._unavailable + self._errors):
                raise SinkUnavailableError(f"cannot open {self.name}: {exc}") from exc
            raise

    def reconnect(self) -> None:
        self.connect()

    def close(self) -> None:
        self._staging = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- SQL helpers --------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        if self.dialect == "postgresql":
            return sql.replace("?", "%s").replace("JSONVAL(%s)", "CAST(%s AS jsonb)")
        return sql.replace("JSONVAL(?)", "?")

    def _execute(self, sql: str, params: tuple = ()) -> Any:
        return self._conn.execute(self._sql(sql), params)

    def _executemany(self, sql: str, rows: Sequence[tuple]) -> int:
        """Run for every row; the number of rows changed."""
        if not rows:
            return 0
        if self.dialect == "sqlite":
            before = self._conn.total_changes
            self._conn.executemany(self._sql(sql), rows)
            return self._conn.total_changes - before
        with self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)
            return max(cur.rowcount, 0)

    def _begin(self) -> None:
        if self.dialect == "sqlite":
            self._conn.execute("BEGIN IMMEDIATE")

    # ---- storing ------------------------------------------------------------------------
    def store(self, deliveries: Sequence[Incoming], now: float | None = None) -> StoreResult:
        """Write ``deliveries`` in one transaction and commit. Raises
        :class:`SinkUnavailableError` when the database cannot be reached (nothing is
        committed then; call :meth:`reconnect` and try the same deliveries again)."""
        if self._conn is None:
            raise SinkUnavailableError(f"not connected to {self.name}")
        now = time.time() if now is None else now
        parsed = [parse_delivery(d.topic, d.payload, self.prefix) for d in deliveries]
        try:
            return self._write(deliveries, parsed, now)
        except self._unavailable as exc:
            self._rollback()
            raise SinkUnavailableError(f"{self.name}: {exc}") from exc
        except Exception as exc:  # a value the database refused (or a bug): isolate it
            self._rollback()
            if len(deliveries) == 1:
                return self._quarantine_refused(deliveries[0], parsed[0], now, exc)
            log.warning("the database refused a batch of %d deliveries (%s); "
                        "storing them one by one", len(deliveries), exc)
        totals = [0, 0, 0, 0, 0]
        for d, p in zip(deliveries, parsed, strict=True):
            r = self.store_one(d, p, now)
            for i, v in enumerate((r.deliveries, r.records, r.stored, r.duplicates,
                                   r.quarantined)):
                totals[i] += v
        return StoreResult(*totals)

    def store_one(self, d: Incoming, p: Parsed, now: float) -> StoreResult:
        try:
            return self._write([d], [p], now)
        except self._unavailable as exc:
            self._rollback()
            raise SinkUnavailableError(f"{self.name}: {exc}") from exc
        except Exception as exc:
            self._rollback()
            return self._quarantine_refused(d, p, now, exc)

    def _quarantine_refused(self, d: Incoming, p: Parsed, now: float,
                            exc: BaseException) -> StoreResult:
        reason = f"the database refused the batch: {type(exc).__name__}: {exc}".strip()
        try:
            self._begin()
            self._quarantine(now, [(d.source, d.topic, p.device, reason[:2000], d.payload)])
            self._conn.commit()
        except self._errors as exc2:
            self._rollback()
            raise SinkUnavailableError(f"{self.name}: cannot write quarantine: {exc2}") from exc2
        return StoreResult(1, 0, 0, 0, 1)

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.rollback()

    def _quarantine(self, now: float, rows: Iterable[tuple]) -> int:
        return self._executemany(
            "INSERT INTO quarantine (received, source, topic, device, reason, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)", [(now, *r) for r in rows])

    def _write(self, deliveries: Sequence[Incoming], parsed: Sequence[Parsed],
               now: float) -> StoreResult:
        rec_rows: list[tuple] = []
        alerts: list[tuple] = []
        deploys: list[tuple] = []
        quarantine: list[tuple] = []
        devices: dict[str, list] = {}
        versions: dict[tuple[str, str, str], tuple[float, float]] = {}
        lag: dict[tuple[str, str], list] = {}
        records = 0
        for d, p in zip(deliveries, parsed, strict=True):
            for rej in p.rejects:
                quarantine.append((d.source, d.topic, rej.device, rej.reason, rej.payload))
            if p.device is None or (not p.rows and p.rejects and p.sent is None):
                continue
            dev = devices.setdefault(p.device, [0, None, d.source])
            dev[0] += 1
            if p.sent is not None:
                dev[1] = p.sent if dev[1] is None else max(dev[1], p.sent)
            records += len(p.rows)
            key = (p.device, p.stream or "")
            entry = lag.setdefault(key, [0, 0, 0.0, 0.0, None])
            entry[0] += 1
            entry[1] += len(p.rows)
            if p.sent is not None:
                delay = max(0.0, now - p.sent)
                entry[2] += delay
                entry[3] = max(entry[3], delay)
                entry[4] = delay
            for r in p.rows:
                rec_rows.append((*r[:7], now, *r[7:16]))
                if r.pipeline and r.model and r.version and r.stream in ("outputs", "results"):
                    vk = (r.pipeline, r.model, r.version)
                    t = r.ts if r.ts is not None else now
                    lo, hi = versions.get(vk, (t, t))
                    versions[vk] = (min(lo, t), max(hi, t))
                if r.stream == "alerts":
                    alerts.append((r.record_id, r.device, r.pipeline, r.kind, r.ts, now,
                                   r.record))
                elif r.stream == "deploy":
                    raw = r.raw or {}
                    deploys.append((r.record_id, r.device, r.pipeline,
                                    _s(raw.get("name")), r.version, r.stage, r.role,
                                    _s(raw.get("reason")), r.ts, now))
        self._begin()
        stored = self._insert_records(rec_rows)
        self._executemany(
            "INSERT INTO alerts (record_id, device, pipeline, kind, ts, received, record) "
            "VALUES (?, ?, ?, ?, ?, ?, JSONVAL(?)) ON CONFLICT (record_id) DO NOTHING", alerts)
        self._executemany(
            "INSERT INTO deploy_events (record_id, device, pipeline, name, version, stage, "
            "role, reason, ts, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (record_id) DO NOTHING", deploys)
        greatest = "MAX" if self.dialect == "sqlite" else "GREATEST"
        least = "MIN" if self.dialect == "sqlite" else "LEAST"
        self._executemany(
            "INSERT INTO devices (device, first_seen, last_seen, last_sent, batches, "
            "last_source) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET "
            "last_seen = excluded.last_seen, "
            f"last_sent = COALESCE({greatest}(devices.last_sent, excluded.last_sent), "
            "excluded.last_sent, devices.last_sent), "
            "batches = devices.batches + excluded.batches, last_source = excluded.last_source",
            [(dev, now, now, v[1], v[0], v[2]) for dev, v in sorted(devices.items())])
        self._executemany(
            "INSERT INTO versions (pipeline, model, version, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pipeline, model, version) DO UPDATE SET "
            f"first_seen = {least}(versions.first_seen, excluded.first_seen), "
            f"last_seen = {greatest}(versions.last_seen, excluded.last_seen)",
            [(*k, lo, hi) for k, (lo, hi) in sorted(versions.items())])
        lag_rows = [(dev, stream, batches, n, lag_sum, lag_max, last, now)
                    for (dev, stream), (batches, n, lag_sum, lag_max, last)
                    in sorted(lag.items())]
        self._executemany(
            "INSERT INTO ingest_lag (device, stream, batches, records, lag_sum_s, "
            "lag_max_s, last_lag_s, last_received) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device, stream) DO UPDATE SET "
            "batches = ingest_lag.batches + excluded.batches, "
            "records = ingest_lag.records + excluded.records, "
            "lag_sum_s = ingest_lag.lag_sum_s + excluded.lag_sum_s, "
            f"lag_max_s = {greatest}(ingest_lag.lag_max_s, excluded.lag_max_s), "
            "last_lag_s = COALESCE(excluded.last_lag_s, ingest_lag.last_lag_s), "
            "last_received = excluded.last_received", lag_rows)
        q = self._quarantine(now, quarantine)
        self._conn.commit()
        return StoreResult(len(deliveries), records, stored, len(rec_rows) - stored, q)

    def _insert_records(self, rows: list[tuple]) -> int:
        """The new rows of ``records``; duplicates (by record_id) are skipped.

        PostgreSQL: rows are streamed with ``COPY`` into a temporary table (emptied at each
        commit) and moved with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, several
        times faster than a pipelined ``executemany`` for batches of hundreds of rows."""
        if not rows:
            return 0
        if self.dialect == "postgresql" and len(rows) >= COPY_MIN_ROWS:
            with self._conn.cursor() as cur:
                if not self._staging:
                    cur.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS incoming_records "
                        "(LIKE records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                    cur.execute("ALTER TABLE incoming_records DROP COLUMN IF EXISTS id")
                    self._staging = True
                with cur.copy(f"COPY incoming_records ({_RECORD_COLUMNS}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
                cur.execute(f"INSERT INTO records ({_RECORD_COLUMNS}) SELECT "
                            f"{_RECORD_COLUMNS} FROM incoming_records "
                            "ON CONFLICT (record_id) DO NOTHING")
                stored = max(cur.rowcount, 0)
                cur.execute("DELETE FROM incoming_records")  # several per transaction
                return stored
        return self._executemany(
            f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?, ?, ?, JSONVAL(?)) ON CONFLICT (record_id) DO NOTHING", rows)

    # ---- retention ----------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Delete what is older than ``retention_days``; the number of records deleted."""
        if self.retention_days is None or self._conn is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400.0
        try:
            self._begin()
            n = self._execute("DELETE FROM records WHERE COALESCE(ts, received) < ?",
                              (cutoff,)).rowcount
            self._execute("DELETE FROM alerts WHERE COALESCE(ts, received) < ?", (cutoff,))
            self._execute("DELETE FROM deploy_events WHERE COALESCE(ts, received) < ?",
                          (cutoff,))
            self._execute("DELETE FROM quarantine WHERE received < ?", (cutoff,))
            self._conn.commit()
        except self._errors as exc:
            self._rollback()
            raise SinkUnavailableError(f"{self.name}: retention: {exc}") from exc
        return max(n, 0)

    # ---- reading (tests, benchmarks, status) ----------------------------------------------
    def count(self, table: str = "records") -> int:
        if table not in ("records", "alerts", "deploy_events", "quarantine", "devices",
                         "versions", "ingest_lag"):
            raise CollectError(f"unknown table {table!r}")
        return int(self._execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _s(v: Any) -> str | None:
    return None if v is None else str(v)
