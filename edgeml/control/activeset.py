"""Each pipeline's active set: who is champion, challenger, shadow or canary, the policy, the
earlier champions, and the state file that keeps all of it across restarts
(``data_dir/state/active.json``, written atomically on every change)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeml.config import POLICIES, ModelSlotConfig, PipelineConfig
from edgeml.control.ports import Pipelines
from edgeml.control.registry import ModelRegistry
from edgeml.control.watch import Watch, WatchLimits
from edgeml.core.model import Member
from edgeml.errors import CommandError, EdgemlError, StoreError
from edgeml.storage.fs import atomic_write

log = logging.getLogger("edgeml.control.activeset")

ROLE_PRIORITY = {"champion": 0, "challenger": 10, "canary": 20, "shadow": 30}
STATE_VERSION = 1
MAX_DEPLOYED = 200


def assign(members: Sequence[Member], member: Member, role: str,
           priority: int | None = None) -> tuple[list[Member], list[Member]]:
    """The active set with ``member`` in ``role``; returns (new set, members dropped from it).

    Rules: one champion (the one it replaces becomes a challenger); one version per model
    name in each other role (a new challenger of "activity" replaces the old one).
    """
    out = [s for s in members if s.key != member.key]
    dropped: list[Member] = []
    if role == "champion":
        old = next((s for s in out if s.role == "champion"), None)
        if old is not None:
            out.remove(old)
            out, more = assign(out, old, "challenger")
            dropped += more
    else:
        for clash in [s for s in out if s.role == role and s.name == member.name]:
            out.remove(clash)
            dropped.append(clash)
    prio = ROLE_PRIORITY[role] if priority is None else priority
    out.append(member if (member.role, member.priority) == (role, prio)
               else member.with_role(role, prio))
    return out, dropped


def label(s: Member | tuple[str, str] | Sequence[str]) -> str:
    name, version = s.key if isinstance(s, Member) else s
    return f"{name}:{version}"


def member_dict(s: Member) -> dict:
    return {"model": s.name, "version": s.version, "role": s.role, "priority": s.priority}


def config_fingerprint(pcfg: PipelineConfig) -> str:
    """Which model list the config file gave; when it changes, the file wins again."""
    doc = [[m.name, m.version, m.role] for m in pcfg.models]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


class StateFile:
    """The persisted active sets, refusals and earlier champions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc = self._load()
        self._lock = asyncio.Lock()

    def _load(self) -> dict:
        empty: dict = {"version": STATE_VERSION, "pipelines": {}, "refused": {}}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.error("ignoring unreadable %s (%s): starting from the config's models",
                      self.path, exc)
            return empty
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION or \
                not isinstance(doc.get("pipelines"), dict):
            log.error("ignoring %s: not a version %d state file", self.path, STATE_VERSION)
            return empty
        doc.setdefault("refused", {})
        return doc

    def pipeline(self, name: str) -> dict:
        return self.doc["pipelines"].setdefault(name, {})

    @property
    def refused(self) -> dict:
        return self.doc["refused"]

    async def save(self, doc: dict) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        async with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(atomic_write, self.path, data)
            except OSError as exc:
                log.error("cannot persist the active set to %s: %s", self.path, exc)


class ActiveSets:
    """Changes to the active sets, each persisted: activate, roll back, retire, set policy."""

    def __init__(self, pipelines: Pipelines, registry: ModelRegistry, state: StateFile, *,
                 keep_versions: int, limits: WatchLimits,
                 on_watch: Callable[[Watch | None, str], None]) -> None:
        self.pipelines = pipelines
        self.registry = registry
        self.state = state
        self.keep_versions = keep_versions
        self.limits = limits
        self._on_watch = on_watch  # (new watch or None to end one, pipeline)
        self._tasks: set[asyncio.Task] = set()

    # ---- start-up ---------------------------------------------------------------------
    def initial_models(self, pcfg: PipelineConfig) -> Sequence[ModelSlotConfig]:
        """The persisted active set for ``pcfg`` when there is one (and the config's model
        list has not changed since), else the config's models."""
        entry = self.state.doc["pipelines"].get(pcfg.name)
        if not entry or entry.get("config") != config_fingerprint(pcfg):
            return pcfg.models
        out = []
        for m in entry.get("models", []):
            try:
                self.registry.get(m["name"], m["version"])
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

    def persisted_policy(self, pcfg: PipelineConfig) -> str | None:
        """The policy set by command, unless the config file changed since (then it wins
        and what was persisted for the pipeline is forgotten)."""
        entry = self.state.doc["pipelines"].get(pcfg.name)
        if not entry:
            return None
        if entry.get("config") != config_fingerprint(pcfg):
            for k in ("previous", "policy", "models"):
                entry.pop(k, None)
            return None
        policy = entry.get("policy")
        return policy if policy in POLICIES else None

    # ---- changes ------------------------------------------------------------------------
    def in_use(self, key: tuple[str, str]) -> bool:
        return any(s.key == key for n in self.pipelines.names()
                   for s in self.pipelines.members(n))

    def previous(self, pipeline: str) -> list:
        return self.state.pipeline(pipeline).setdefault("previous", [])

    def activate(self, pcfg: PipelineConfig, member: Member, role: str,
                 priority: int | None, *, cause: str) -> None:
        name = pcfg.name
        old = self.pipelines.champion(name)
        new, dropped = assign(self.pipelines.members(name), member, role, priority)
        if role == "champion" and old is not None and old.key != member.key:
            self._push_previous(name, old.key)
        self.pipelines.set_members(name, new)
        log.info("pipeline %s: %s %s active as %s%s", name, member.name, member.version, role,
                 f" (dropped {', '.join(label(s) for s in dropped)})" if dropped else "")
        if role == "champion":
            self._start_watch(name, member.key, old.key if old else None, cause)

    def _push_previous(self, pipeline: str, key: tuple[str, str]) -> None:
        prev = self.previous(pipeline)
        item = [key[0], key[1]]
        if item in prev:
            prev.remove(item)
        prev.append(item)
        del prev[:-self.keep_versions]

    def _start_watch(self, pipeline: str, champion: tuple[str, str],
                     previous: tuple[str, str] | None, cause: str) -> None:
        self.pipelines.reset_canary(pipeline)
        if self.limits.window_s <= 0:
            self._on_watch(None, pipeline)
            return
        now = time.monotonic()
        figures = self.pipelines.figures(pipeline, champion)
        self._on_watch(Watch(pipeline, champion, previous, now, now + self.limits.window_s,
                             figures, cause), pipeline)

    async def load_stored(self, pcfg: PipelineConfig, name: str, version: str,
                          role: str) -> Member:
        try:
            installed = self.registry.get(name, version)
        except StoreError as exc:
            raise CommandError(f"{name} {version} is not active and not in the model store "
                               "(pruned or never installed)") from exc
        model = await self.registry.load(pcfg, installed)
        return Member(model, role, ROLE_PRIORITY[role])

    async def rollback(self, pcfg: PipelineConfig, model: str | None, version: str | None,
                       *, retire_current: bool) -> str:
        name = pcfg.name
        champ = self.pipelines.champion(name)
        prev = self.previous(name)
        if version is not None:
            target_key = (model or (champ.name if champ else name), version)
        else:
            cands = [tuple(k) for k in prev if model is None or k[0] == model]
            if not cands:
                raise CommandError(f"no previous champion to roll back to in pipeline {name}")
            target_key = cands[-1]
        if champ is not None and champ.key == target_key:
            raise CommandError(f"{label(target_key)} is already the champion")
        members = self.pipelines.members(name)
        member = next((s for s in members if s.key == target_key), None)
        if member is None:
            member = await self.load_stored(pcfg, *target_key, "champion")
        new, dropped = assign(members, member, "champion")
        if retire_current and champ is not None:
            dropped += [s for s in new if s.key == champ.key]
            new = [s for s in new if s.key != champ.key]
        if list(target_key) in prev:
            prev.remove(list(target_key))
        self.pipelines.set_members(name, new)
        self._on_watch(None, name)
        await self.save()
        what = "retired" if retire_current else "kept as challenger"
        return (f"rolled back to {label(target_key)}"
                + (f"; {label(champ)} {what}" if champ else ""))

    def retire(self, pcfg: PipelineConfig, member: Member) -> None:
        self.pipelines.set_members(pcfg.name, [s for s in self.pipelines.members(pcfg.name)
                                               if s.key != member.key])

    def set_policy(self, pcfg: PipelineConfig, policy: str) -> str:
        old = self.pipelines.policy(pcfg.name)
        self.pipelines.set_policy(pcfg.name, policy)
        self.state.pipeline(pcfg.name)["policy"] = policy
        return old

    def note_deployed(self, pipeline: str, key: tuple[str, str]) -> None:
        deployed = self.state.pipeline(pipeline).setdefault("deployed", [])
        if [key[0], key[1]] not in deployed:
            deployed.append([key[0], key[1]])
            del deployed[:-MAX_DEPLOYED]

    def was_deployed(self, pipeline: str, key: tuple[str, str]) -> bool:
        deployed = self.state.doc["pipelines"].get(pipeline, {}).get("deployed", [])
        return [key[0], key[1]] in deployed

    async def prune(self, name: str) -> None:
        protect = {s.version for n in self.pipelines.names()
                   for s in self.pipelines.members(n) if s.name == name}
        for entry in self.state.doc["pipelines"].values():
            protect |= {v for n, v in entry.get("previous", []) if n == name}
        try:
            removed = await asyncio.to_thread(self.registry.prune, name, self.keep_versions,
                                              protect)
        except EdgemlError as exc:
            log.warning("pruning %s failed: %s", name, exc)
            return
        if removed:
            log.info("pruned %s versions %s (keep_versions=%d)", name, ", ".join(removed),
                     self.keep_versions)

    # ---- persistence --------------------------------------------------------------------
    def snapshot(self) -> dict:
        for name in self.pipelines.names():
            pcfg = self.pipelines.config(name)
            entry = self.state.pipeline(name)
            entry["config"] = config_fingerprint(pcfg)
            entry["models"] = [{"name": s.name, "version": s.version, "role": s.role,
                                "priority": s.priority} for s in self.pipelines.members(name)]
            entry["policy"] = self.pipelines.policy(name)
        refused = self.state.refused
        while len(refused) > MAX_DEPLOYED:
            refused.pop(next(iter(refused)))
        return json.loads(json.dumps(self.state.doc))

    async def save(self) -> None:
        await self.state.save(self.snapshot())

    def save_soon(self) -> None:
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(self.save())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
