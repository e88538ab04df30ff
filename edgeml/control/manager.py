"""The device side of model delivery and commands: deploy messages in, active sets swapped.

The daemon hands every message on a deploy or command topic to :meth:`Control.submit`, which
only queues it. :meth:`Control.run` reassembles transfers (:mod:`edgeml.control.protocol`) and does
the slow, fallible work in threads (hash, verify, install, load, warm up, self-test), one
deployment or command at a time, so the pipelines keep scoring meanwhile. A replacement is
always loaded and self-tested *before* the active set is swapped, and the swap happens between
two batches (:meth:`PipelineRuntime.set_slots`): a failure at any stage leaves the running
versions untouched, and no input is ever scored by "nothing".

The active set (versions, roles, policy, earlier champions) is persisted atomically to
``data_dir/state/active.json`` on every change, so it survives a restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeml.config import POLICIES, ModelSlotConfig, PipelineConfig
from edgeml.control.protocol import (
    ROLES,
    Delivery,
    DeployHeader,
    Event,
    Ignored,
    Reassembler,
    Refused,
    deploy_topic,
)
from edgeml.core.model import ModelSlot
from edgeml.errors import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    CommandError,
    DeployError,
    EdgemlError,
    SelfTestError,
    StoreError,
)

log = logging.getLogger("edgeml.control.manager")

ROLE_PRIORITY = {"champion": 0, "challenger": 10, "canary": 20, "shadow": 30}
COMMANDS = ("promote", "rollback", "retire", "set_policy")
STATE_VERSION = 1
#: rows the new champion must have scored before its error rate or p99 can trip a rollback
WATCH_MIN_ROWS = 10
#: champion/canary pairs needed before agreement can trip a rollback
WATCH_MIN_CANARY = 20
WATCH_TICK_S = 0.2
MAX_RECENT = 20
MAX_DEPLOYED = 200
MAX_INBOX = 10_000
#: a command's ``deadline`` is the sender's clock; allow this much skew against ours
DEADLINE_GRACE_S = 60.0
_REASONS = {
    BundleSignatureError: "signature",
    BundleIntegrityError: "integrity",
    BundleFormatError: "format",
    SelfTestError: "self-test",
}


def _reason(exc: BaseException) -> str:
    """``signature: bundle is unsigned ...``: the kind first, for people and for scripts."""
    if isinstance(exc, DeployError):
        cause = exc.__cause__
        if cause is not None and isinstance(cause, tuple(_REASONS)):
            return _reason(cause)
        text, prefix = str(exc), f"{exc.stage}: "
        return text[len(prefix):] if text.startswith(prefix) else text
    for cls, kind in _REASONS.items():
        if isinstance(exc, cls):
            return f"{kind}: {exc}"
    return str(exc)


def _with_role(slot: ModelSlot, role: str, priority: int) -> ModelSlot:
    """A copy that shares the loaded session: slots a batch in flight holds never change."""
    if slot.role == role and slot.priority == priority:
        return slot
    s = copy.copy(slot)
    s.role = role
    s.priority = priority
    return s


def assign(slots: Sequence[ModelSlot], slot: ModelSlot, role: str,
           priority: int | None = None) -> tuple[list[ModelSlot], list[ModelSlot]]:
    """The active set with ``slot`` in ``role``; returns (new set, slots dropped from it).

    Rules: one champion (the one it replaces becomes a challenger); one version per model
    name in each other role (a new challenger of "activity" replaces the old one).
    """
    out = [s for s in slots if s.key != slot.key]
    dropped: list[ModelSlot] = []
    if role == "champion":
        old = next((s for s in out if s.role == "champion"), None)
        if old is not None:
            out.remove(old)
            out, more = assign(out, old, "challenger")
            dropped += more
    else:
        for clash in [s for s in out if s.role == role and s.name == slot.name]:
            out.remove(clash)
            dropped.append(clash)
    prio = ROLE_PRIORITY[role] if priority is None else priority
    out.append(_with_role(slot, role, prio))
    return out, dropped


def _key(s: ModelSlot | tuple[str, str]) -> str:
    name, version = s.key if isinstance(s, ModelSlot) else s
    return f"{name}:{version}"


def _slot_dict(s: ModelSlot) -> dict:
    return {"model": s.name, "version": s.version, "role": s.role, "priority": s.priority}


def _config_fingerprint(pcfg: PipelineConfig) -> str:
    """Which model list the config file gave; when it changes, the file wins again."""
    doc = [[m.name, m.version, m.role] for m in pcfg.models]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


@dataclass
class _Watch:
    """After a promotion: the new champion on probation."""

    pipeline: str
    champion: tuple[str, str]
    previous: tuple[str, str] | None
    started: float
    until: float
    rows0: int
    errors0: int
    cause: str
    skipped0: int = 0
    last: dict | None = None

    def summary(self, now: float) -> dict:
        return {"champion": _key(self.champion),
                "previous": _key(self.previous) if self.previous else None,
                "cause": self.cause, "remaining_s": round(max(self.until - now, 0.0), 2),
                **(self.last or {})}


class Control:
    """Model delivery and device commands for one :class:`edgeml.core.device.Daemon`."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.config = daemon.config
        cfg = self.config
        self.settings = cfg.deploy
        self.state_path = cfg.data_dir / "state" / "active.json"
        self._state = self._load_state()
        self._bases: dict[str, str | None] = {
            deploy_topic(cfg.topic_prefix, device=cfg.device_id): None}
        for g in cfg.groups:
            self._bases[deploy_topic(cfg.topic_prefix, group=g)] = g
        self._cmd_topic = cfg.topic("cmd")
        self._reasm = Reassembler(max_bundle_bytes=self.settings.max_bundle_bytes)
        self._inbox: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._work: asyncio.Queue = asyncio.Queue()
        self._stopping = False
        self._inflight: set[str] = set()
        self._watch: dict[str, _Watch] = {}
        self._recent: collections.deque[dict] = collections.deque(maxlen=MAX_RECENT)
        self._save_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.commands = 0
        self.inbox_dropped = 0

    # ---- the daemon's hooks ---------------------------------------------------------------
    def initial_models(self, pcfg: PipelineConfig) -> Sequence[Any]:
        """The persisted active set for ``pcfg`` when there is one (and the config's model
        list has not changed since), else the config's models."""
        entry = self._state["pipelines"].get(pcfg.name)
        if not entry or entry.get("config") != _config_fingerprint(pcfg):
            return pcfg.models
        out = []
        for m in entry.get("models", []):
            try:
                self.daemon.store.get(m["name"], m["version"])
            except (EdgemlError, KeyError) as exc:
                log.warning("persisted model %s is gone from the store: %s", m, exc)
                continue
            out.append(ModelSlotConfig(name=m["name"], version=m["version"], role=m["role"],
                                       priority=m["priority"]))
        if not out:
            return pcfg.models
        log.info("pipeline %s: restoring the active set %s", pcfg.name,
                 ", ".join(f"{m.name}:{m.version} ({m.role})" for m in out))
        return out

    def configure(self, runtime: Any) -> None:
        """Optional hook, right after a pipeline's runtime is built: restore its persisted
        policy before the first status goes out (``run`` does it too, a moment later)."""
        pcfg = runtime.config
        entry = self._state["pipelines"].get(pcfg.name)
        if entry and entry.get("config") == _config_fingerprint(pcfg) \
                and entry.get("policy") in POLICIES:
            runtime.policy = entry["policy"]

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = []
        for base in self._bases:  # the header topic first: its retained copy comes first
            subs += [(base, 1), (f"{base}/chunk/#", 1)]
        subs.append((self._cmd_topic, 1))
        return subs

    def handles(self, topic: str) -> bool:
        return topic == self._cmd_topic or self._base_of(topic) is not None

    def submit(self, msg: Any) -> None:
        """Queue one message (called on the loop thread by the dispatcher: no work here)."""
        if len(self._inbox) >= MAX_INBOX:
            self._inbox.popleft()
            self.inbox_dropped += 1
        self._inbox.append(msg)
        self._wake.set()

    async def run(self) -> None:
        self._apply_persisted_policies()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._receive_loop(), name="control-receive")
            tg.create_task(self._apply_loop(), name="control-apply")
            tg.create_task(self._watch_loop(), name="control-watch")

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._work.put_nowait(None)

    def status(self) -> dict:
        now = time.monotonic()
        pipes = {}
        for name, runtime in self.daemon.pipelines.items():
            entry = self._state["pipelines"].get(name, {})
            canary = next((s for s in runtime.slots if s.role == "canary"), None)
            watch = self._watch.get(name)
            pipes[name] = {
                "active": [_slot_dict(s) for s in runtime.slots],
                "policy": runtime.policy,
                "previous_champions": [_key(tuple(k)) for k in entry.get("previous", [])],
                "watch": watch.summary(now) if watch else None,
                "canary": {
                    "canary": _key(canary) if canary else None,
                    "agreement": runtime.canary.value, "window": runtime.canary.count,
                    "threshold": runtime.config.canary_threshold,
                    "alert": bool(runtime.canary_alerted),
                },
            }
        return {"groups": list(self.config.groups), "pipelines": pipes,
                "transfers": self._reasm.pending(), "recent": list(self._recent)[-10:],
                "commands": self.commands, "inbox_dropped": self.inbox_dropped}

    # ---- receiving ------------------------------------------------------------------------
    def _base_of(self, topic: str) -> str | None:
        for base in self._bases:
            if topic == base or topic.startswith(base + "/chunk/"):
                return base
        return None

    async def _receive_loop(self) -> None:
        while not self._stopping:
            if not self._inbox:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
            while self._inbox and not self._stopping:
                msg = self._inbox.popleft()
                try:
                    self._on_message(msg)
                except Exception:  # one bad message must not stop deliveries
                    log.exception("control message on %s failed", msg.topic)
            for event in self._reasm.expire():
                self._on_event(event)

    def _on_message(self, msg: Any) -> None:
        if msg.topic == self._cmd_topic:
            self._on_command_message(msg)
            return
        base = self._base_of(msg.topic)
        if base is None:
            return
        check = functools.partial(self._precheck, retained=bool(msg.retain))
        for event in self._reasm.feed(base, msg.topic, msg.payload, retained=bool(msg.retain),
                                      check=check):
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Delivery):
            self._inflight.add(event.header.transfer)
            self._work.put_nowait(("deploy", event))
        elif isinstance(event, Ignored):
            rec = self._record(event.header, event.base)
            if event.retained:  # a retained deployment seen again (restart, reconnect)
                log.info("deployment %s on %s: no-op (%s)", event.header.label, event.base,
                         event.reason)
                return
            self._report(rec, "noop", reason=event.reason)
        elif isinstance(event, Refused):
            header = event.header
            rec = self._record(header, event.base) if header else {
                "topic": event.base, "group": self._bases.get(event.base)}
            if event.retained and header is not None:
                if header.sha256 in self._state["refused"]:
                    return  # already refused and reported once
                self._state["refused"][header.sha256] = event.reason
                self._save_soon()
            log.warning("deployment %s refused: %s", header.label if header else "?",
                        event.reason)
            self._report(rec, "failed", reason=event.reason, at=event.stage)

    def _precheck(self, header: DeployHeader, *, retained: bool) -> str | None:
        """On a header, before any chunk is kept: refuse early, or call it a no-op."""
        if header.transfer in self._inflight:
            return "already being deployed"
        if retained and header.sha256 in self._state["refused"]:
            return f"refused before: {self._state['refused'][header.sha256]}"
        if header.name is None or header.version is None:
            return None  # a bare bundle: known after verification
        pcfg = self._resolve_pipeline(header.pipeline, header.name)
        if not header.force:
            return self._already(pcfg, header.name, header.version)
        return None

    def _already(self, pcfg: PipelineConfig, name: str, version: str) -> str | None:
        runtime = self.daemon.pipelines[pcfg.name]
        for s in runtime.slots:
            if s.key == (name, version):
                return f"{name} {version} is already active in pipeline {pcfg.name} as {s.role}"
        deployed = self._state["pipelines"].get(pcfg.name, {}).get("deployed", [])
        if [name, version] in deployed:
            return (f"{name} {version} was deployed to pipeline {pcfg.name} before (not active "
                    "now: use promote to bring it back, or push with --force)")
        return None

    def _resolve_pipeline(self, wanted: str | None, model: str) -> PipelineConfig:
        pipes = self.config.pipelines
        if wanted is not None:
            for p in pipes:
                if p.name == wanted:
                    return p
            raise DeployError("verified", f"this device has no pipeline {wanted!r} (it has "
                                          f"{', '.join(p.name for p in pipes) or 'none'})")
        if len(pipes) == 1:
            return pipes[0]
        for p in pipes:
            if p.name == model:
                return p
        using = [p for p in pipes if any(s.name == model for s in
                                         self.daemon.pipelines[p.name].slots)]
        if len(using) == 1:
            return using[0]
        raise DeployError("verified", f"cannot tell which pipeline {model} is for; name one "
                                      "(push --pipeline)")

    # ---- reports ----------------------------------------------------------------------------
    def _record(self, header: DeployHeader, base: str) -> dict:
        pipeline = header.pipeline
        if pipeline is None and header.name is not None:
            with contextlib.suppress(DeployError):
                pipeline = self._resolve_pipeline(None, header.name).name
        return {"name": header.name, "version": header.version, "pipeline": pipeline,
                "role": header.role, "transfer": header.transfer, "sha256": header.sha256,
                "size": header.size, "group": self._bases.get(base), "topic": base}

    def _report(self, rec: dict, stage: str, **extra: Any) -> None:
        rec["stage"] = stage
        rec["ts"] = time.time()
        rec.update({k: v for k, v in extra.items() if v is not None})
        if stage in ("active", "failed", "noop"):
            self._remember({k: rec.get(k) for k in (
                "name", "version", "pipeline", "role", "stage", "reason", "transfer", "ts")})
        payload = {"device": self.config.device_id, **{k: v for k, v in rec.items()
                                                       if k != "topic"}}
        self._publish(self.config.topic("deploy", "status"), payload)
        if stage in ("active", "failed"):
            self.daemon.publish_status_soon()

    def _remember(self, event: dict) -> None:
        """A deployment's outcome: kept for status and synced upstream (outbox ``deploy``)."""
        self._recent.append(event)
        self.daemon.deploy_event(event)

    def _publish(self, topic: str, doc: dict) -> None:
        client = self.daemon.client
        if client is None:
            return
        try:
            client.publish_nowait(topic, json.dumps(doc, separators=(",", ":"),
                                                    default=str).encode(), qos=1)
        except Exception:  # a report must never break a deployment
            log.exception("publish to %s failed", topic)

    # ---- the serial worker ------------------------------------------------------------------
    async def _apply_loop(self) -> None:
        while not self._stopping:
            item = await self._work.get()
            if item is None or self._stopping:
                return
            try:
                kind = item[0]
                if kind == "deploy":
                    await self._deploy(item[1])
                elif kind == "cmd":
                    await self._command(item[1])
                elif kind == "auto":
                    await self._auto_rollback(item[1], item[2])
            except Exception:
                log.exception("control work item %s failed", item[0])

    async def _deploy(self, d: Delivery) -> None:
        h = d.header
        rec = self._record(h, d.base)
        stage = "received"
        fresh_install = None
        try:
            data = await asyncio.to_thread(d.check)
            self._report(rec, "received", chunks=h.chunks)
            stage = "verified"
            try:
                bundle = await asyncio.to_thread(self._read_bundle, data)
            except BundleError as exc:
                raise DeployError("verified", str(exc)) from exc
            m = bundle.manifest
            if h.name is not None and (h.name, h.version) != (m.name, m.version):
                raise DeployError("verified", f"the header says {h.name} {h.version}, the "
                                              f"bundle holds {m.name} {m.version}")
            rec.update(name=m.name, version=m.version)
            pcfg = self._resolve_pipeline(h.pipeline, m.name)
            rec["pipeline"] = pcfg.name
            if h.name is None and not h.force:
                noop = self._already(pcfg, m.name, m.version)
                if noop is not None:
                    if not d.retained:
                        self._report(rec, "noop", reason=noop)
                    return
            from edgeml.core.device import check_compatible

            try:
                check_compatible(pcfg, m)
            except EdgemlError as exc:
                raise DeployError("verified", f"incompatible: {exc}") from exc
            existing = self._installed(m.name, m.version)
            if existing is not None and existing.manifest.sha256 != m.sha256:
                raise DeployError("verified", (
                    f"{m.name} {m.version} is already installed with a different model "
                    "(versions are immutable: give the new model a new version)"))
            self._report(rec, "verified", signer=bundle.signer)
            stage = "installed"
            try:
                installed = await asyncio.to_thread(self.daemon.store.install, bundle)
            except EdgemlError as exc:
                raise DeployError("installed", str(exc)) from exc
            if existing is None:
                fresh_install = installed
            self._report(rec, "installed")
            stage = "loaded"
            prio = h.priority if h.priority is not None else ROLE_PRIORITY[h.role]
            slot = ModelSlot.from_installed(installed, role=h.role, priority=prio,
                                            profile=self.daemon.profile)
            try:
                await asyncio.to_thread(slot.load)
            except EdgemlError as exc:
                raise DeployError("loaded", _reason(exc)) from exc
            self._report(rec, "loaded", load_ms=round(slot.load_ms or 0.0, 2))
            stage = "active"
            await self._activate(pcfg, slot, h.role, h.priority, cause=f"push {h.transfer}")
            fresh_install = None
            deployed = self._pipe_state(pcfg.name).setdefault("deployed", [])
            if [m.name, m.version] not in deployed:
                deployed.append([m.name, m.version])
                del deployed[:-MAX_DEPLOYED]
            await self._save()
            await self._prune(m.name)
            self._report(rec, "active", reason=None, active=[
                _slot_dict(s) for s in self.daemon.pipelines[pcfg.name].slots])
        except EdgemlError as exc:
            reason = _reason(exc)
            at = exc.stage if isinstance(exc, DeployError) else stage
            log.warning("deployment %s %s failed at %s: %s", rec.get("name"),
                        rec.get("version"), at, reason)
            if d.retained:
                self._state["refused"][h.sha256] = reason
                self._save_soon()
            self._report(rec, "failed", reason=reason, at=at)
            if fresh_install is not None and not self._in_use(fresh_install.name,
                                                              fresh_install.version):
                with contextlib.suppress(EdgemlError):
                    await asyncio.to_thread(self.daemon.store.remove, fresh_install.name,
                                            fresh_install.version)
        finally:
            self._inflight.discard(h.transfer)

    def _read_bundle(self, data: bytes) -> Any:
        from edgeml.bundle import read_bundle

        return read_bundle(data, trusted_keys=self.daemon.trusted_keys,
                           max_bytes=self.settings.max_bundle_bytes)

    def _installed(self, name: str, version: str) -> Any:
        try:
            return self.daemon.store.get(name, version)
        except StoreError:
            return None

    def _in_use(self, name: str, version: str) -> bool:
        return any(s.key == (name, version) for r in self.daemon.pipelines.values()
                   for s in r.slots)

    async def _activate(self, pcfg: PipelineConfig, slot: ModelSlot, role: str,
                        priority: int | None, *, cause: str) -> None:
        runtime = self.daemon.pipelines[pcfg.name]
        old = runtime.champion()
        new, dropped = assign(runtime.slots, slot, role, priority)
        if role == "champion" and old is not None and old.key != slot.key:
            self._push_previous(pcfg.name, old.key)
        runtime.set_slots(new)
        log.info("pipeline %s: %s %s active as %s%s", pcfg.name, slot.name, slot.version, role,
                 f" (dropped {', '.join(_key(s) for s in dropped)})" if dropped else "")
        if role == "champion":
            self._start_watch(pcfg.name, slot.key, old.key if old else None, cause)

    def _pipe_state(self, name: str) -> dict:
        return self._state["pipelines"].setdefault(name, {})

    def _push_previous(self, pipeline: str, key: tuple[str, str]) -> None:
        prev = self._pipe_state(pipeline).setdefault("previous", [])
        item = [key[0], key[1]]
        if item in prev:
            prev.remove(item)
        prev.append(item)
        del prev[:-self.settings.keep_versions]

    async def _prune(self, name: str) -> None:
        protect = {s.version for r in self.daemon.pipelines.values() for s in r.slots
                   if s.name == name}
        for entry in self._state["pipelines"].values():
            protect |= {v for n, v in entry.get("previous", []) if n == name}
        try:
            removed = await asyncio.to_thread(self.daemon.store.prune, name,
                                              self.settings.keep_versions, protect)
        except EdgemlError as exc:
            log.warning("pruning %s failed: %s", name, exc)
            return
        if removed:
            log.info("pruned %s versions %s (keep_versions=%d)", name, ", ".join(removed),
                     self.settings.keep_versions)

    # ---- commands ---------------------------------------------------------------------------
    def _on_command_message(self, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            self._reply({"id": None}, False, f"command is not JSON: {exc}")
            return
        if not isinstance(doc, dict):
            self._reply({"id": None}, False, "command must be a JSON object")
            return
        if msg.retain:  # a retained command would run again at every restart
            log.warning("ignoring a retained command: %s", doc)
            self._reply(doc, False, "retained commands are ignored; publish without retain")
            return
        self._work.put_nowait(("cmd", doc))

    def _reply(self, doc: dict, ok: bool, message: str, **extra: Any) -> None:
        rid = doc.get("id") if isinstance(doc.get("id"), (str, int, float)) else None
        out = {"id": rid, "ok": ok, "cmd": doc.get("cmd"), "message": message,
               "device": self.config.device_id, "ts": time.time(), **extra}
        if ok:
            self.daemon.publish_status_soon()  # the fleet view sees the change at once
        self._publish(self.config.topic("cmd", "reply"), out)

    async def _command(self, doc: dict) -> None:
        self.commands += 1
        cmd = doc.get("cmd")
        try:
            deadline = doc.get("deadline")
            if isinstance(deadline, (int, float)) and not isinstance(deadline, bool) \
                    and time.time() > deadline + DEADLINE_GRACE_S:
                raise CommandError("the command arrived after its deadline (the sender gave "
                                   "up waiting); not carried out")
            if cmd not in COMMANDS:
                raise CommandError(f"unknown cmd {cmd!r} (one of {', '.join(COMMANDS)})")
            pcfg = self._command_pipeline(doc)
            message = await getattr(self, f"_cmd_{cmd}")(pcfg, doc)
        except EdgemlError as exc:
            log.warning("command %s failed: %s", cmd, exc)
            self._reply(doc, False, _reason(exc))
            return
        runtime = self.daemon.pipelines[pcfg.name]
        log.info("command %s on %s: %s", cmd, pcfg.name, message)
        self._reply(doc, True, message, pipeline=pcfg.name, policy=runtime.policy,
                    active=[_slot_dict(s) for s in runtime.slots])

    def _command_pipeline(self, doc: dict) -> PipelineConfig:
        name = doc.get("pipeline")
        pipes = self.config.pipelines
        if name is None:
            if len(pipes) == 1:
                return pipes[0]
            raise CommandError("'pipeline' is required (this device has "
                               f"{', '.join(p.name for p in pipes)})")
        for p in pipes:
            if p.name == name:
                return p
        raise CommandError(f"no pipeline {name!r} on this device (it has "
                           f"{', '.join(p.name for p in pipes) or 'none'})")

    @staticmethod
    def _opt_str(doc: dict, key: str) -> str | None:
        v = doc.get(key)
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v:
            raise CommandError(f"'{key}' must be a string, not {v!r}")
        return v

    def _find(self, pcfg: PipelineConfig, model: str | None, version: str | None, *,
              exclude_champion: bool) -> ModelSlot | None:
        runtime = self.daemon.pipelines[pcfg.name]
        cands = [s for s in runtime.slots if (model is None or s.name == model)
                 and (version is None or s.version == version)]
        if version is None and exclude_champion:
            cands = [s for s in cands if s.role != "champion"]
            challengers = [s for s in cands if s.role == "challenger"]
            cands = challengers or cands
        if len(cands) > 1:
            raise CommandError(
                f"several versions match in pipeline {pcfg.name}: "
                f"{', '.join(f'{_key(s)} ({s.role})' for s in cands)}; give a version")
        return cands[0] if cands else None

    async def _load_from_store(self, pcfg: PipelineConfig, name: str, version: str,
                               role: str) -> ModelSlot:
        try:
            installed = self.daemon.store.get(name, version)
        except StoreError as exc:
            raise CommandError(f"{name} {version} is not active and not in the model store "
                               "(pruned or never installed)") from exc
        from edgeml.core.device import check_compatible

        check_compatible(pcfg, installed.manifest)
        slot = ModelSlot.from_installed(installed, role=role, priority=ROLE_PRIORITY[role],
                                        profile=self.daemon.profile)
        await asyncio.to_thread(slot.load)
        return slot

    async def _cmd_promote(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = self._opt_str(doc, "model"), self._opt_str(doc, "version")
        runtime = self.daemon.pipelines[pcfg.name]
        target = self._find(pcfg, model, version, exclude_champion=True)
        if target is None:
            if model is None or version is None:
                raise CommandError(f"no challenger{' of ' + model if model else ''} in "
                                   f"pipeline {pcfg.name}; give the model and version")
            target = await self._load_from_store(pcfg, model, version, "champion")
        if target.role == "champion":
            return f"{_key(target)} is already the champion"
        old = runtime.champion()
        await self._activate(pcfg, target, "champion", None, cause="promote")
        await self._save()
        return (f"promoted {_key(target)} to champion"
                + (f"; {_key(old)} is now a challenger" if old else ""))

    async def _cmd_rollback(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = self._opt_str(doc, "model"), self._opt_str(doc, "version")
        return await self._rollback(pcfg, model, version, retire_current=False)

    async def _rollback(self, pcfg: PipelineConfig, model: str | None, version: str | None,
                        *, retire_current: bool) -> str:
        runtime = self.daemon.pipelines[pcfg.name]
        champ = runtime.champion()
        prev = self._pipe_state(pcfg.name).setdefault("previous", [])
        if version is not None:
            target_key = (model or (champ.name if champ else pcfg.name), version)
        else:
            cands = [tuple(k) for k in prev if model is None or k[0] == model]
            if not cands:
                raise CommandError(f"no previous champion to roll back to in pipeline "
                                   f"{pcfg.name}")
            target_key = cands[-1]
        if champ is not None and champ.key == target_key:
            raise CommandError(f"{_key(target_key)} is already the champion")
        slot = next((s for s in runtime.slots if s.key == target_key), None)
        if slot is None:
            slot = await self._load_from_store(pcfg, *target_key, "champion")
        new, _ = assign(runtime.slots, slot, "champion")
        if retire_current and champ is not None:
            new = [s for s in new if s.key != champ.key]
        if list(target_key) in prev:
            prev.remove(list(target_key))
        runtime.set_slots(new)
        self._watch.pop(pcfg.name, None)
        await self._save()
        what = "retired" if retire_current else "kept as challenger"
        return (f"rolled back to {_key(target_key)}"
                + (f"; {_key(champ)} {what}" if champ else ""))

    async def _cmd_retire(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = self._opt_str(doc, "model"), self._opt_str(doc, "version")
        if model is None:
            raise CommandError("'model' is required for retire")
        target = self._find(pcfg, model, version, exclude_champion=True)
        if target is None:
            raise CommandError(f"{model} {version or ''} is not active in pipeline "
                               f"{pcfg.name}".replace("  ", " "))
        if target.role == "champion":
            raise CommandError(f"{_key(target)} is the champion; promote another version or "
                               "roll back first (a pipeline never runs without a champion)")
        runtime = self.daemon.pipelines[pcfg.name]
        runtime.set_slots([s for s in runtime.slots if s.key != target.key])
        await self._save()
        return f"retired {_key(target)} ({target.role}); it stays in the model store"

    async def _cmd_set_policy(self, pcfg: PipelineConfig, doc: dict) -> str:
        policy = doc.get("policy")
        if policy not in POLICIES:
            raise CommandError(f"'policy' must be one of {', '.join(POLICIES)}, not {policy!r}")
        runtime = self.daemon.pipelines[pcfg.name]
        old = runtime.policy
        runtime.policy = policy
        self._pipe_state(pcfg.name)["policy"] = policy
        await self._save()
        return f"policy {old} -> {policy}"

    # ---- the watch window and automatic rollback -------------------------------------------
    def _start_watch(self, pipeline: str, champion: tuple[str, str],
                     previous: tuple[str, str] | None, cause: str) -> None:
        runtime = self.daemon.pipelines[pipeline]
        # agreement measured from now on is the new champion's, not the old one's
        runtime.canary.clear()
        runtime.canary_alerted = False
        if self.settings.watch_window_s <= 0:
            self._watch.pop(pipeline, None)
            return
        vs = runtime.stats.version(*champion)
        now = time.monotonic()
        self._watch[pipeline] = _Watch(pipeline, champion, previous, now,
                                       now + self.settings.watch_window_s, vs.rows, vs.errors,
                                       cause, skipped0=vs.skipped)

    def evaluate(self, w: _Watch) -> str | None:
        """Why the watched champion must go (a threshold it passed), or None."""
        s = self.settings
        runtime = self.daemon.pipelines[w.pipeline]
        vs = runtime.stats.version(*w.champion)
        # rows a stuck champion skipped were given to it and not scored: they count as errors
        rows = vs.rows - w.rows0
        errors = vs.errors - w.errors0 + vs.skipped - w.skipped0
        n = rows + errors
        error_rate = errors / n if n else None
        lat = vs.latency.summary()
        p99 = lat["p99_ms"] if lat else None
        agreement = runtime.canary.value if any(x.role == "canary" for x in runtime.slots) \
            else None
        w.last = {"rows": rows, "errors": errors, "error_rate": error_rate, "p99_ms": p99,
                  "canary_agreement": agreement, "canary_window": runtime.canary.count}
        if n >= WATCH_MIN_ROWS and error_rate is not None and error_rate > s.max_error_rate:
            return (f"error rate {error_rate:.3f} over {n} rows is above max_error_rate "
                    f"{s.max_error_rate}")
        if s.max_p99_ms is not None and rows >= WATCH_MIN_ROWS and p99 is not None \
                and p99 > s.max_p99_ms:
            return f"p99 latency {p99:.3f} ms is above max_p99_ms {s.max_p99_ms}"
        need = min(WATCH_MIN_CANARY, runtime.config.canary_window)
        if s.min_canary_agreement is not None and agreement is not None \
                and runtime.canary.count >= need and agreement < s.min_canary_agreement:
            return (f"canary agreement {agreement:.3f} over {runtime.canary.count} rows is "
                    f"below min_canary_agreement {s.min_canary_agreement}")
        return None

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_TICK_S)
            now = time.monotonic()
            for name, w in list(self._watch.items()):
                runtime = self.daemon.pipelines.get(name)
                champ = runtime.champion() if runtime else None
                if champ is None or champ.key != w.champion:
                    self._watch.pop(name, None)  # changed by a command meanwhile
                    continue
                try:
                    why = self.evaluate(w)
                except Exception:
                    log.exception("watch evaluation failed for %s", name)
                    continue
                if why is not None:
                    self._watch.pop(name, None)
                    self._work.put_nowait(("auto", w, why))
                elif now >= w.until:
                    self._watch.pop(name, None)
                    log.info("pipeline %s: %s passed its watch window", name,
                             _key(w.champion))
                    self._remember({"name": w.champion[0], "version": w.champion[1],
                                    "pipeline": name, "stage": "watch_passed",
                                    "ts": time.time()})

    async def _auto_rollback(self, w: _Watch, why: str) -> None:
        pcfg = self.config.pipeline(w.pipeline)
        runtime = self.daemon.pipelines[w.pipeline]
        champ = runtime.champion()
        if champ is None or champ.key != w.champion:
            return
        detail = {"model": w.champion[0], "version": w.champion[1], "reason": why,
                  "watch": w.last, "previous": _key(w.previous) if w.previous else None}
        try:
            if w.previous is None:
                raise CommandError("no previous champion to go back to")
            message = await self._rollback(pcfg, *w.previous, retire_current=True)
        except EdgemlError as exc:
            log.error("pipeline %s: %s failed its watch (%s) but cannot be rolled back: %s",
                      w.pipeline, _key(w.champion), why, exc)
            self.daemon.alert(w.pipeline, "auto_rollback_failed", {**detail,
                                                                   "error": str(exc)})
            return
        log.error("pipeline %s: automatic rollback: %s (%s)", w.pipeline, message, why)
        self._remember({"name": w.champion[0], "version": w.champion[1],
                        "pipeline": w.pipeline, "stage": "rolled_back", "reason": why,
                        "ts": time.time()})
        self.daemon.alert(w.pipeline, "auto_rollback", {**detail, "message": message})

    # ---- persisted state -------------------------------------------------------------------
    def _load_state(self) -> dict:
        empty: dict = {"version": STATE_VERSION, "pipelines": {}, "refused": {}}
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.error("ignoring unreadable %s (%s): starting from the config's models",
                      self.state_path, exc)
            return empty
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION or \
                not isinstance(doc.get("pipelines"), dict):
            log.error("ignoring %s: not a version %d state file", self.state_path,
                      STATE_VERSION)
            return empty
        doc.setdefault("refused", {})
        return doc

    def _apply_persisted_policies(self) -> None:
        for pcfg in self.config.pipelines:
            entry = self._state["pipelines"].get(pcfg.name)
            runtime = self.daemon.pipelines.get(pcfg.name)
            if not entry or runtime is None:
                continue
            if entry.get("config") != _config_fingerprint(pcfg):
                entry.pop("previous", None)  # the config file changed: it wins
                entry.pop("policy", None)
                entry.pop("models", None)
                continue
            if entry.get("policy") in POLICIES:
                runtime.policy = entry["policy"]

    def _snapshot(self) -> dict:
        for pcfg in self.config.pipelines:
            runtime = self.daemon.pipelines.get(pcfg.name)
            if runtime is None:
                continue
            entry = self._pipe_state(pcfg.name)
            entry["config"] = _config_fingerprint(pcfg)
            entry["models"] = [{"name": s.name, "version": s.version, "role": s.role,
                                "priority": s.priority} for s in runtime.slots]
            entry["policy"] = runtime.policy
        refused = self._state["refused"]
        while len(refused) > MAX_DEPLOYED:
            refused.pop(next(iter(refused)))
        return json.loads(json.dumps(self._state))

    async def _save(self) -> None:
        doc = self._snapshot()
        async with self._save_lock:
            try:
                await asyncio.to_thread(_write_atomic, self.state_path, doc)
            except OSError as exc:
                log.error("cannot persist the active set to %s: %s", self.state_path, exc)

    def _save_soon(self) -> None:
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(self._save())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _write_atomic(path: Path, doc: dict) -> None:
    """Temp file, fsync, rename, fsync the directory: the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["COMMANDS", "ROLES", "ROLE_PRIORITY", "Control", "assign"]
