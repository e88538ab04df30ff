"""A staged rollout, wired to the fleet: waves of devices, installs over MQTT, holds and
judgements from the collector's database, signed rollbacks.

Every step is written to the rollout tables before the next one starts, so a runner started
again on the same bundle and group carries on (:meth:`RolloutRunner.run`): a wave whose
installs were under way installs again (a device that has the version already reports it
active), a wave that was holding holds on from when its installs were active.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.errors import EdgemlError, FleetTimeout, RolloutError
from edgeml.host.rollout.db import Database, redact
from edgeml.host.rollout.evidence import evidence as gather_evidence
from edgeml.host.rollout.evidence import row_counts
from edgeml.host.rollout.plan import (
    Breach,
    Evidence,
    Hold,
    Thresholds,
    Verdict,
    WaveSpec,
    judge,
    next_wave,
    parse_hold,
    parse_waves,
)
from edgeml.host.rollout.store import DeviceState, Rollout, RolloutStore, Wave

ROLES = ("canary", "challenger", "shadow")
DEFAULT_THRESHOLDS = Thresholds(max_error_rate=0.01)
#: per-device lines in a judgement's explanation (devices named by a breach and the wave's
#: own come first); the stored verdict has them all
MAX_DEVICE_LINES = 20


@dataclass(frozen=True)
class RolloutSettings:
    bundle: Path
    group: str
    waves: str = "1,10%,50%,100%"
    hold: str = "500rows"
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    role: str = "canary"
    pipeline: str | None = None
    hold_timeout_s: float = 600.0
    poll_s: float = 1.0
    push_timeout_s: float = 60.0
    command_timeout_s: float = 10.0
    force: bool = False
    sign_key: Any = None
    early_halt_rows: int = 200
    early_every_s: float = 5.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RolloutError(f"--role must be one of {', '.join(ROLES)}, not {self.role!r} "
                               "(a rollout tries a version beside the champion; promote it "
                               "when the rollout is done)")
        parse_waves(self.waves)
        parse_hold(self.hold)
        if self.early_halt_rows < 0:
            raise RolloutError("--early-halt-rows must be 0 (off) or more")
        for name in ("hold_timeout_s", "poll_s", "push_timeout_s", "command_timeout_s",
                     "early_every_s"):
            if getattr(self, name) <= 0:
                raise RolloutError(f"{name} must be above 0")


class _Stopped(Exception):
    """The rollout was stopped elsewhere (``--abort`` from another shell)."""

    def __init__(self, rollout: Rollout) -> None:
        super().__init__(rollout.state)
        self.rollout = rollout


class RolloutRunner:
    def __init__(self, settings: RolloutSettings, fleet: Any, db: Database, *,
                 say: Callable[[str], None] = lambda s: None) -> None:
        self.s = settings
        self.fleet = fleet
        self.db = db
        self.store = RolloutStore(db)
        self.say = say
        try:
            self.data = Path(settings.bundle).read_bytes()
        except OSError as exc:
            raise RolloutError(f"cannot read the bundle {settings.bundle}: "
                               f"{exc.strerror or exc}") from exc
        from edgeml.bundle import read_bundle

        self.manifest = read_bundle(self.data).manifest
        self.digest = hashlib.sha256(self.data).hexdigest()
        self.specs: tuple[WaveSpec, ...] = parse_waves(settings.waves)
        self.hold: Hold = parse_hold(settings.hold)
        self._reader: Any = None  # the collector's read connection, opened when first needed

    # ---- start or resume ------------------------------------------------------------------
    def open(self) -> tuple[Rollout, bool]:
        """The running rollout of this bundle to this group (resumed), or a new one."""
        running = self.store.find_running(bundle_sha256=self.digest, group=self.s.group)
        if running:
            return running[-1], True
        others = self.store.find_running(group=self.s.group)
        if others:
            o = others[-1]
            raise RolloutError(
                f"rollout {o.id} of {o.model} {o.version} to group {o.group} is still running "
                f"(wave {o.current_wave + 1} of {len(o.waves)}); let it finish, or stop it "
                f"with `edgeml rollout --abort {o.id} --db ...`")
        r = self.store.create(
            bundle_sha256=self.digest, bundle_path=str(self.s.bundle),
            model=self.manifest.name, version=self.manifest.version, group=self.s.group,
            role=self.s.role, pipeline=self.s.pipeline, waves=[str(w) for w in self.specs],
            hold=str(self.hold), thresholds={**self.s.thresholds.as_dict(),
                                             "hold_timeout_s": self.s.hold_timeout_s,
                                             "early_halt_rows": self.s.early_halt_rows})
        return r, False

    async def run(self) -> Rollout:
        if not self.db.has_table("records"):
            raise RolloutError(f"{self.db.url} has no records table yet: start `edgeml collect "
                               f"--db {self.db.url} ...` first (the rollout judges what it "
                               "stores)")
        try:
            return await self._run()
        finally:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def _run(self) -> Rollout:
        r, resumed = self.open()
        label = f"{r.model} {r.version}"
        if resumed:
            self.say(f"resuming rollout {r.id} of {label} to group {r.group} at wave "
                     f"{r.current_wave + 1} of {len(r.waves)}")
        else:
            self.say(f"rollout {r.id}: {label} (bundle sha256 {self.digest[:12]}) to group "
                     f"{r.group} as {r.role}, waves {','.join(r.waves)}, hold {r.hold}")
        thresholds = Thresholds.from_dict(r.thresholds)
        hold_timeout = float(r.thresholds.get("hold_timeout_s") or self.s.hold_timeout_s)
        specs = [_spec(w) for w in r.waves]
        hold = parse_hold(r.hold)
        try:
            return await self._waves(r, specs, hold, thresholds, hold_timeout)
        except _Stopped as stop:
            self.say(f"rollout {r.id} was {stop.rollout.state} elsewhere "
                     f"({stop.rollout.reason}); stopping here")
            return stop.rollout

    def _check(self, r: Rollout) -> None:
        """Raise :class:`_Stopped` when the stored rollout is no longer running."""
        stored = self.store.get(r.id)
        if stored is not None and stored.state != "running":
            raise _Stopped(stored)

    async def _waves(self, r: Rollout, specs: list[WaveSpec], hold: Hold,
                     thresholds: Thresholds, hold_timeout: float) -> Rollout:
        label = f"{r.model} {r.version}"
        while r.current_wave < len(specs):
            self._check(r)
            i = r.current_wave
            waves = {w.wave: w for w in self.store.waves(r.id)}
            wave = waves.get(i)
            if wave is None:
                wave = await self._plan_wave(r, i, specs[i])
                if wave is None:
                    r.current_wave += 1
                    self.store.save(r)
                    continue
            if wave.state == "installing":
                problem = await self._install(r, wave)
                self._check(r)
                if problem is not None:
                    wave.state = "failed"
                    wave.verdict = {"passed": False, "install": problem}
                    wave.judged = time.time()
                    self.store.save_wave(wave)
                    return await self._halt(r, f"wave {i + 1} ({wave.spec}): {problem}")
                wave.state = "holding"
                wave.active_at = time.time()
                self.store.save_wave(wave)
            if wave.state == "holding":
                verdict, hold_doc = await self._hold_and_judge(r, wave, hold, thresholds,
                                                               hold_timeout)
                self._check(r)
                wave.verdict = {**verdict.as_dict(), "hold": hold_doc}
                wave.judged = time.time()
                wave.state = "passed" if verdict.passed else "failed"
                self.store.save_wave(wave)
                for line in explain(verdict, wave.devices):
                    self.say(f"  {line}")
                if not verdict.passed:
                    return await self._halt(r, f"wave {i + 1} ({wave.spec}): {verdict.reason}")
                self.say(f"wave {i + 1} ({wave.spec}) passed: thresholds held")
            if wave.state == "failed":  # judged failed before a restart: finish the halt
                return await self._halt(r, r.reason or f"wave {i + 1} failed")
            r.current_wave = i + 1
            self.store.save(r)
        r.state = "done"
        devices = self.store.devices(r.id)
        r.reason = f"{label} is active on {sum(d.state == 'active' for d in devices.values())} " \
                   f"device(s) of group {r.group} as {r.role}"
        self.store.save(r)
        self.say(f"rollout {r.id} done: {r.reason}")
        return r

    # ---- waves ----------------------------------------------------------------------------
    async def _online_members(self, group: str) -> dict[str, dict]:
        docs = await self.fleet.statuses()
        return {d: doc for d, doc in docs.items() if doc.get("state") == "online"
                and group in ((doc.get("deploy") or {}).get("groups") or [])}

    async def _plan_wave(self, r: Rollout, i: int, spec: WaveSpec) -> Wave | None:
        online = await self._online_members(r.group)
        taken = list(self.store.devices(r.id))
        if i == 0 and not online:
            raise RolloutError(f"no device of group {r.group} is online (their retained "
                               "status says so; see `edgeml status`)")
        chosen = next_wave(r.id, spec, online, taken)
        if not chosen:
            self.say(f"wave {i + 1} ({spec}): no device to add "
                     f"({len(taken)} of {len(set(taken) | set(online))} already run it)")
            return None
        wave = Wave(r.id, i, str(spec), "installing", chosen, time.time())
        self.store.add_wave(wave)
        for d in chosen:
            self.store.set_device(r.id, DeviceState(d, i, "installing"))
        self.say(f"wave {i + 1} ({spec}): {', '.join(chosen)}")
        return wave

    async def _install(self, r: Rollout, wave: Wave) -> str | None:
        """Install on every device of the wave; the first refusal stops the wave (its reason
        is returned); nothing is evicted to make room."""
        known = self.store.devices(r.id)
        statuses = await self.fleet.statuses()
        for d in wave.devices:
            ds = known.get(d) or DeviceState(d, wave.wave, "installing")
            if ds.state == "active":
                continue
            why = would_replace(statuses.get(d) or {}, r.pipeline, r.model, r.version, r.role)
            if why is not None:
                ds.state, ds.detail = "failed", why
                self.store.set_device(r.id, ds)
                return f"{d} refused: {why}"
            try:
                res = await self.fleet.push(self.data, device=d, pipeline=r.pipeline,
                                            role=r.role, timeout=self.s.push_timeout_s,
                                            force=self.s.force)
            except FleetTimeout as exc:
                res, err = None, str(exc)
            else:
                err = None
            doc = res.final.get(d) if res is not None else None
            stage = (doc or {}).get("stage")
            reason = str((doc or {}).get("reason") or "")
            if stage == "active" or (stage == "noop" and "already active" in reason):
                ds.state = "active"
                ts = (doc or {}).get("ts")
                ds.active_at = float(ts) if stage == "active" and isinstance(
                    ts, (int, float)) else time.time()
                ds.pipeline = (doc or {}).get("pipeline") or r.pipeline
                ds.detail = None
                self.store.set_device(r.id, ds)
                if r.pipeline is None and ds.pipeline:
                    r.pipeline = ds.pipeline
                    self.store.save(r)
                self.say(f"  {d}: {r.model} {r.version} active as {r.role} in pipeline "
                         f"{ds.pipeline}")
                continue
            if doc is None:
                why = err or f"no final deploy report within {self.s.push_timeout_s:g} s"
            else:
                why = f"{stage}: {reason}" if reason else str(stage)
            ds.state, ds.detail = "failed", why
            self.store.set_device(r.id, ds)
            return f"{d} refused the install ({why})"
        return None

    async def _hold_and_judge(self, r: Rollout, wave: Wave, hold: Hold,
                              thresholds: Thresholds, hold_timeout: float
                              ) -> tuple[Verdict, dict]:
        started = wave.active_at or time.time()
        early_rows = int(r.thresholds.get("early_halt_rows") or 0)
        next_early = time.monotonic() + self.s.early_every_s
        if hold.seconds is not None:
            left = started + hold.seconds - time.time()
            self.say(f"wave {wave.wave + 1}: holding {hold} ({max(left, 0):.0f} s left)")
            while (left := started + hold.seconds - time.time()) > 0:
                await asyncio.sleep(min(left, self.s.poll_s))
                self._check(r)
                if early_rows and time.monotonic() >= next_early:
                    next_early = time.monotonic() + self.s.early_every_s
                    early = self._early(r, wave, thresholds, early_rows, started, "time")
                    if early is not None:
                        return early
            ev = self._evidence(r)
            return judge(ev, thresholds, wave.devices), {
                "kind": "time", "seconds": hold.seconds, "from": started, "to": time.time()}
        assert hold.rows is not None
        self.say(f"wave {wave.wave + 1}: holding until its devices sent {hold.rows} result "
                 f"rows of {r.model} {r.version}")
        last_shown = -1
        while True:
            counts = self._row_counts(r, wave.devices)
            rows = sum(counts.values())
            if rows >= hold.rows:
                break
            waited = time.time() - started
            if waited > hold_timeout:
                ev = self._evidence(r)
                verdict = judge(ev, thresholds, wave.devices)
                short = Breach("hold", rows, hold.rows, tuple(wave.devices),
                               f"not enough evidence: the wave's devices sent {rows} of "
                               f"{hold.rows} rows within {hold_timeout:g} s")
                return Verdict(False, (short, *verdict.breaches), ev), {
                    "kind": "rows", "rows": rows, "wanted": hold.rows, "from": started,
                    "to": time.time(), "timed_out": True}
            if rows // max(hold.rows // 4, 1) != last_shown:
                last_shown = rows // max(hold.rows // 4, 1)
                self.say(f"  {rows} of {hold.rows} rows")
            await asyncio.sleep(self.s.poll_s)
            self._check(r)
            if early_rows and time.monotonic() >= next_early:
                next_early = time.monotonic() + self.s.early_every_s
                early = self._early(r, wave, thresholds, early_rows, started, "rows")
                if early is not None:
                    return early
        ev = self._evidence(r)
        return judge(ev, thresholds, wave.devices), {
            "kind": "rows", "rows": rows, "wanted": hold.rows, "from": started,
            "to": time.time()}

    def _early(self, r: Rollout, wave: Wave, thresholds: Thresholds, min_rows: int,
               started: float, kind: str) -> tuple[Verdict, dict] | None:
        """During a hold: a breach on at least ``min_rows`` pooled rows halts at once (a
        version that fails everything does not run for the whole hold)."""
        ev = self._evidence(r)
        if ev.total.rows < min_rows:
            return None
        partial = dataclasses.replace(thresholds, min_rows_per_device=0)
        verdict = judge(ev, partial, wave.devices)
        if verdict.passed:
            return None
        self.say(f"  halting early, during the hold: {verdict.reason}")
        return verdict, {"kind": kind, "early": True, "rows": ev.total.rows,
                         "from": started, "to": time.time()}

    def _since(self, r: Rollout, devices: list[str] | None = None) -> dict[str, float]:
        """Device -> when the version became active there (the start of its evidence)."""
        return {d: s.active_at for d, s in self.store.devices(r.id).items()
                if s.state == "active" and s.active_at is not None
                and (devices is None or d in devices)}

    def _reader_db(self) -> Any:
        if self._reader is None:
            from edgeml.host.collect.evidence import FleetDB

            self._reader = FleetDB(self.db.url)
        return self._reader

    def _evidence(self, r: Rollout) -> Evidence:
        return self._read(gather_evidence, r, self._since(r))

    def _row_counts(self, r: Rollout, devices: list[str]) -> dict[str, int]:
        return self._read(row_counts, r, self._since(r, devices))

    def _read(self, query: Callable, r: Rollout, since: dict[str, float]) -> Any:
        """A query of the collector's tables; a database error stops this run (the rollout
        stays running in the database, to be resumed)."""
        try:
            return query(self._reader_db(), pipeline=r.pipeline, model=r.model,
                         version=r.version, since=since)
        except Exception as exc:
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    self._reader.close()
                self._reader = None
            if isinstance(exc, EdgemlError):
                raise
            raise RolloutError(f"cannot read the evidence in {redact(self.db.url)} "
                               f"({type(exc).__name__}: {exc}); rollout {r.id} stays "
                               "running: run the same command again to resume") from exc

    # ---- halting --------------------------------------------------------------------------
    async def _halt(self, r: Rollout, reason: str) -> Rollout:
        r.state = "halted"
        r.reason = reason
        self.store.save(r)
        self.say(f"rollout {r.id} halted: {reason}")
        await rollback(self.store, self.fleet, r, sign_key=self.s.sign_key,
                       timeout=self.s.command_timeout_s, say=self.say)
        return r


async def rollback(store: RolloutStore, fleet: Any, r: Rollout, *, sign_key: Any,
                   timeout: float, say: Callable[[str], None]) -> dict[str, str]:
    """Retire the version (signed, when a key is given) on every device of the rollout that
    may run it; returns device -> outcome. A device that does not run it counts as done."""
    out: dict[str, str] = {}
    for d, ds in store.devices(r.id).items():
        if ds.state not in ("active", "installing", "rollback_failed"):
            continue
        try:
            reply = await fleet.command(d, "retire", pipeline=ds.pipeline or r.pipeline,
                                        model=r.model, version=r.version, timeout=timeout,
                                        sign_key=sign_key)
        except FleetTimeout as exc:
            ds.state, ds.detail = "rollback_failed", str(exc)
        else:
            msg = str(reply.get("message") or "")
            if reply.get("ok") or "is not active" in msg:
                ds.state, ds.detail = "rolled_back", msg
            else:
                ds.state, ds.detail = "rollback_failed", msg
        store.set_device(r.id, ds)
        out[d] = ds.state
        say(f"  {d}: {ds.state.replace('_', ' ')}" + (f" ({ds.detail})" if ds.detail else ""))
    return out


async def abort(store: RolloutStore, fleet: Any, rollout_id: str, *, sign_key: Any,
                timeout: float, say: Callable[[str], None]) -> Rollout:
    r = store.get(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r} in the database")
    if r.state != "running":
        raise RolloutError(f"rollout {rollout_id} is {r.state}, not running")
    r.state, r.reason = "aborted", "aborted by the operator"
    store.save(r)
    say(f"rollout {r.id} aborted; rolling back")
    await rollback(store, fleet, r, sign_key=sign_key, timeout=timeout, say=say)
    return r


def would_replace(status: dict, pipeline: str | None, model: str, version: str,
                  role: str) -> str | None:
    """Why installing would silently push out another version (a device keeps one version
    per model name and role besides the champion), or None."""
    pipes = ((status.get("deploy") or {}).get("pipelines") or {})
    if pipeline is None:
        if len(pipes) == 1:
            pipeline = next(iter(pipes))
        elif model in pipes:
            pipeline = model
        else:
            return None  # the device resolves it, or refuses with its own reason
    members = (pipes.get(pipeline) or {}).get("active") or []
    for m in members:
        if not isinstance(m, dict):
            continue
        if m.get("model") == model and m.get("role") == role and \
                str(m.get("version")) != version:
            return (f"pipeline {pipeline} already runs {model} {m.get('version')} as {role}; "
                    f"installing {model} {version} as {role} would replace it (retire it "
                    "first, or roll out with another --role); nothing was changed")
    return None


def _spec(text: str) -> WaveSpec:
    return parse_waves(text)[0]


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def explain(verdict: Verdict, wave_devices: list[str] | None = None) -> list[str]:
    """The lines that say what the decision was and what evidence it used."""
    t = verdict.evidence.total
    lines = [("PASS" if verdict.passed else "HALT") + f": {verdict.reason}",
             f"evidence: {t.rows} result rows of the new version from "
             f"{len(verdict.evidence.per_device)} device(s), inputs received "
             f"{_when(t.first_ts)} .. {_when(t.last_ts)}; {t.compared} also scored by the "
             f"champion"]
    per = verdict.evidence.per_device
    named = {d for b in verdict.breaches for d in b.devices} | set(wave_devices or ())
    order = sorted(per, key=lambda d: (d not in named, d))
    for d in order[:MAX_DEVICE_LINES]:
        f = per[d]
        mark = " (this wave)" if wave_devices and d in wave_devices else ""
        dis = "n/a" if f.disagreement is None else f"{f.disagreement:.1%}"
        err = "n/a" if f.error_rate is None else f"{f.error_rate:.1%}"
        p99 = "n/a" if f.p99_ms is None else f"{f.p99_ms:.2f} ms"
        lines.append(f"  {d}{mark}: {f.rows} rows, disagreement {dis}, errors {err}, "
                     f"p99 {p99}, {_when(f.first_ts)} .. {_when(f.last_ts)}")
    if len(order) > MAX_DEVICE_LINES:
        lines.append(f"  ... and {len(order) - MAX_DEVICE_LINES} more device(s) (all of them "
                     "in the wave's verdict: edgeml rollout --list, or --json)")
    return lines
