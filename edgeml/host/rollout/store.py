"""A rollout's state, kept in the fleet database beside the collector's tables, so the host
tool can be killed and started again and carry on where it was.

Tables (created if missing; ``rollout_schema`` holds the version, migrations go forward):

* ``rollouts``: one row per rollout: id, state (running, done, halted, aborted), the bundle's
  digest, model, version, group, pipeline, role, waves, hold, thresholds, current wave, reason;
* ``rollout_waves``: one row per wave: its spec, devices, state (installing, holding, passed,
  failed), when its installs were active, the verdict with its evidence (JSON);
* ``rollout_devices``: one row per device: its wave, state (installing, active, failed,
  rolled_back, rollback_failed), when the version became active there (device clock), detail.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from edgeml.host.rollout.db import Database

SCHEMA_VERSION = 1
FINAL_STATES = ("done", "halted", "aborted")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rollout_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
        bundle_path TEXT, model TEXT NOT NULL, version TEXT NOT NULL, fleet_group TEXT NOT NULL,
        pipeline TEXT, role TEXT NOT NULL, waves TEXT NOT NULL, hold TEXT NOT NULL,
        thresholds TEXT NOT NULL, current_wave INTEGER NOT NULL, reason TEXT)""",
    """CREATE TABLE IF NOT EXISTS rollout_waves (
        rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, spec TEXT NOT NULL,
        state TEXT NOT NULL, devices TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
        active_at DOUBLE PRECISION, judged DOUBLE PRECISION, verdict TEXT,
        PRIMARY KEY (rollout_id, wave))""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL,
        state TEXT NOT NULL, active_at DOUBLE PRECISION, pipeline TEXT, detail TEXT,
        updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (rollout_id, device))""",
)


@dataclass
class Rollout:
    id: str
    state: str
    bundle_sha256: str
    model: str
    version: str
    group: str
    role: str
    waves: list[str]
    hold: str
    thresholds: dict
    current_wave: int = 0
    pipeline: str | None = None
    bundle_path: str | None = None
    reason: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


@dataclass
class Wave:
    rollout_id: str
    wave: int
    spec: str
    state: str
    devices: list[str]
    started: float
    active_at: float | None = None
    judged: float | None = None
    verdict: dict | None = None


@dataclass
class DeviceState:
    device: str
    wave: int
    state: str
    active_at: float | None = None
    pipeline: str | None = None
    detail: str | None = None


class RolloutStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.migrate()

    def migrate(self) -> None:
        for stmt in _SCHEMA:
            self.db.execute(stmt)
        rows = self.db.query("SELECT version FROM rollout_schema")
        if not rows:
            self.db.execute("INSERT INTO rollout_schema (version) VALUES (?)",
                            (SCHEMA_VERSION,))
        elif max(r[0] for r in rows) > SCHEMA_VERSION:
            from edgeml.errors import RolloutError

            raise RolloutError(f"the rollout tables are schema {max(r[0] for r in rows)}, "
                               f"newer than this edgeml knows ({SCHEMA_VERSION}); upgrade")
        self.db.commit()

    # ---- rollouts -------------------------------------------------------------------------
    def create(self, **kw: Any) -> Rollout:
        r = Rollout(id=kw.pop("id", None) or new_id(), state="running", **kw)
        self.db.execute(
            "INSERT INTO rollouts (id, created, updated, state, bundle_sha256, bundle_path, "
            "model, version, fleet_group, pipeline, role, waves, hold, thresholds, "
            "current_wave, reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.created, r.updated, r.state, r.bundle_sha256, r.bundle_path, r.model,
             r.version, r.group, r.pipeline, r.role, json.dumps(r.waves), r.hold,
             json.dumps(r.thresholds), r.current_wave, r.reason))
        self.db.commit()
        return r

    def save(self, r: Rollout) -> None:
        r.updated = time.time()
        self.db.execute(
            "UPDATE rollouts SET updated = ?, state = ?, pipeline = ?, current_wave = ?, "
            "reason = ? WHERE id = ?",
            (r.updated, r.state, r.pipeline, r.current_wave, r.reason, r.id))
        self.db.commit()

    _COLS = ("id, created, updated, state, bundle_sha256, bundle_path, model, version, "
             "fleet_group, pipeline, role, waves, hold, thresholds, current_wave, reason")

    def _rollout(self, row: tuple) -> Rollout:
        (rid, created, updated, state, sha, path, model, version, group, pipeline, role,
         waves, hold, thresholds, current, reason) = row
        return Rollout(id=rid, state=state, bundle_sha256=sha, model=model, version=version,
                       group=group, role=role, waves=json.loads(waves), hold=hold,
                       thresholds=json.loads(thresholds), current_wave=int(current),
                       pipeline=pipeline, bundle_path=path, reason=reason,
                       created=float(created), updated=float(updated))

    def get(self, rollout_id: str) -> Rollout | None:
        rows = self.db.query(f"SELECT {self._COLS} FROM rollouts WHERE id = ?", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def find_running(self, *, bundle_sha256: str | None = None,
                     group: str | None = None) -> list[Rollout]:
        sql = f"SELECT {self._COLS} FROM rollouts WHERE state = 'running'"
        params: list = []
        if bundle_sha256 is not None:
            sql += " AND bundle_sha256 = ?"
            params.append(bundle_sha256)
        if group is not None:
            sql += " AND fleet_group = ?"
            params.append(group)
        return [self._rollout(r) for r in self.db.query(sql + " ORDER BY created", params)]

    def recent(self, limit: int = 20) -> list[Rollout]:
        rows = self.db.query(f"SELECT {self._COLS} FROM rollouts ORDER BY created DESC "
                             f"LIMIT {int(limit)}")
        return [self._rollout(r) for r in rows]

    # ---- waves ----------------------------------------------------------------------------
    def add_wave(self, w: Wave) -> None:
        self.db.execute(
            "INSERT INTO rollout_waves (rollout_id, wave, spec, state, devices, started, "
            "active_at, judged, verdict) VALUES (?,?,?,?,?,?,?,?,?)",
            (w.rollout_id, w.wave, w.spec, w.state, json.dumps(w.devices), w.started,
             w.active_at, w.judged, None if w.verdict is None else json.dumps(w.verdict)))
        self.db.commit()

    def save_wave(self, w: Wave) -> None:
        self.db.execute(
            "UPDATE rollout_waves SET state = ?, devices = ?, active_at = ?, judged = ?, "
            "verdict = ? WHERE rollout_id = ? AND wave = ?",
            (w.state, json.dumps(w.devices), w.active_at, w.judged,
             None if w.verdict is None else json.dumps(w.verdict), w.rollout_id, w.wave))
        self.db.commit()

    def waves(self, rollout_id: str) -> list[Wave]:
        rows = self.db.query(
            "SELECT rollout_id, wave, spec, state, devices, started, active_at, judged, "
            "verdict FROM rollout_waves WHERE rollout_id = ? ORDER BY wave", (rollout_id,))
        return [Wave(rollout_id=r[0], wave=int(r[1]), spec=r[2], state=r[3],
                     devices=json.loads(r[4]), started=float(r[5]),
                     active_at=None if r[6] is None else float(r[6]),
                     judged=None if r[7] is None else float(r[7]),
                     verdict=None if r[8] is None else json.loads(r[8])) for r in rows]

    # ---- devices --------------------------------------------------------------------------
    def set_device(self, rollout_id: str, d: DeviceState) -> None:
        now = time.time()
        self.db.execute("DELETE FROM rollout_devices WHERE rollout_id = ? AND device = ?",
                        (rollout_id, d.device))
        self.db.execute(
            "INSERT INTO rollout_devices (rollout_id, device, wave, state, active_at, "
            "pipeline, detail, updated) VALUES (?,?,?,?,?,?,?,?)",
            (rollout_id, d.device, d.wave, d.state, d.active_at, d.pipeline, d.detail, now))
        self.db.commit()

    def devices(self, rollout_id: str) -> dict[str, DeviceState]:
        rows = self.db.query(
            "SELECT device, wave, state, active_at, pipeline, detail FROM rollout_devices "
            "WHERE rollout_id = ? ORDER BY wave, device", (rollout_id,))
        return {r[0]: DeviceState(device=r[0], wave=int(r[1]), state=r[2],
                                  active_at=None if r[3] is None else float(r[3]),
                                  pipeline=r[4], detail=r[5]) for r in rows}


def new_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
