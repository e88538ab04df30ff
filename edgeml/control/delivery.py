"""Model delivery on the device: deploy messages reassembled into bundles, then verified,
installed, loaded and self-tested, and only then made active. A failure at any stage leaves
the running versions untouched and is reported with the stage and a reason."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from edgeml.config import Config, PipelineConfig
from edgeml.control.activeset import ROLE_PRIORITY, ActiveSets, label, member_dict
from edgeml.control.ports import EventSink, Pipelines
from edgeml.control.protocol import (
    Delivery,
    DeployHeader,
    Event,
    Ignored,
    Reassembler,
    Refused,
    deploy_topic,
)
from edgeml.control.registry import ModelRegistry, check_compatible
from edgeml.core.model import Member
from edgeml.errors import BundleError, DeployError, EdgemlError

log = logging.getLogger("edgeml.control.delivery")


def reason_of(exc: EdgemlError) -> str:
    """``signature: bundle is unsigned ...``: the kind first, for people and for scripts."""
    if isinstance(exc, (DeployError, BundleError)):
        return exc.describe()
    return str(exc)


class Deliveries:
    """Deploy topics in, active versions out, one deployment at a time."""

    def __init__(self, config: Config, pipelines: Pipelines, registry: ModelRegistry,
                 active: ActiveSets, events: EventSink,
                 remember: Callable[[dict], None]) -> None:
        self.config = config
        self.pipelines = pipelines
        self.registry = registry
        self.active = active
        self.events = events
        self._remember = remember
        self.bases: dict[str, str | None] = {
            deploy_topic(config.topic_prefix, device=config.device_id): None}
        for g in config.groups:
            self.bases[deploy_topic(config.topic_prefix, group=g)] = g
        self._reasm = Reassembler(max_bundle_bytes=config.deploy.max_bundle_bytes)
        self.inflight: set[str] = set()

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = []
        for base in self.bases:  # the header topic first: its retained copy comes first
            subs += [(base, 1), (f"{base}/chunk/#", 1)]
        return subs

    def base_of(self, topic: str) -> str | None:
        for base in self.bases:
            if topic == base or topic.startswith(base + "/chunk/"):
                return base
        return None

    def pending(self) -> list[dict]:
        return self._reasm.pending()

    # ---- reassembly (on the loop, cheap) --------------------------------------------------
    def feed(self, msg: Any) -> list[Delivery]:
        """One message on a deploy topic; returns whole, checked deliveries to apply."""
        base = self.base_of(msg.topic)
        if base is None:
            return []
        check = functools.partial(self._precheck, retained=bool(msg.retain), base=base)
        events = self._reasm.feed(base, msg.topic, msg.payload, retained=bool(msg.retain),
                                  check=check)
        return [d for e in events if (d := self._on_event(e)) is not None]

    def expire(self) -> None:
        for event in self._reasm.expire():
            self._on_event(event)

    def _on_event(self, event: Event) -> Delivery | None:
        if isinstance(event, Delivery):
            self.inflight.add(event.header.transfer)
            return event
        if isinstance(event, Ignored):
            rec = self._record(event.header, event.base)
            self.mark_retained_done(event.base, event.header)
            if event.retained:  # a retained deployment seen again (restart, reconnect)
                log.info("deployment %s on %s: no-op (%s)", event.header.label, event.base,
                         event.reason)
                return None
            self.report(rec, "noop", reason=event.reason)
        elif isinstance(event, Refused):
            header = event.header
            rec = self._record(header, event.base) if header else {
                "topic": event.base, "group": self.bases.get(event.base)}
            if event.retained and header is not None:
                if header.sha256 in self.active.state.refused:
                    return None  # already refused and reported once
                self.active.state.refused[header.sha256] = event.reason
                self.active.save_soon()
            log.warning("deployment %s refused: %s", header.label if header else "?",
                        event.reason)
            self.report(rec, "failed", reason=event.reason, at=event.stage)
        return None

    def _precheck(self, header: DeployHeader, *, retained: bool, base: str = "") -> str | None:
        """On a header, before any chunk is kept: refuse early, or call it a no-op."""
        if header.transfer in self.inflight:
            return "already being deployed"
        done = self.active.state.doc.get("retained_done", {})
        if retained and self._retained_key(base, header.transfer) in done:
            return "this retained deployment was processed before (not applied again)"
        refused = self.active.state.refused
        if retained and header.sha256 in refused:
            return f"refused before: {refused[header.sha256]}"
        if header.name is None or header.version is None:
            return None  # a bare bundle: known after verification
        pcfg = self._resolve_pipeline(header.pipeline, header.name)
        if not header.force:
            return self._already(pcfg, header.name, header.version)
        return None

    def _already(self, pcfg: PipelineConfig, name: str, version: str) -> str | None:
        for s in self.pipelines.members(pcfg.name):
            if s.key == (name, version):
                return f"{name} {version} is already active in pipeline {pcfg.name} as {s.role}"
        if self.active.was_deployed(pcfg.name, (name, version)):
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
                                         self.pipelines.members(p.name))]
        if len(using) == 1:
            return using[0]
        raise DeployError("verified", f"cannot tell which pipeline {model} is for; name one "
                                      "(push --pipeline)")

    # ---- trust: no downgrades, caps -------------------------------------------------------
    def _check_release(self, pcfg: PipelineConfig, m: Any, role: str) -> None:
        """No push makes a release older than the current champion's the champion (forced
        or not); older releases may come in as challenger, canary or shadow. The way back
        to an old release is a (signed) rollback or promote command."""
        if role != "champion":
            return
        champ = self.pipelines.champion(pcfg.name)
        if champ is None or champ.key == (m.name, m.version):
            return
        mine, theirs = m.effective_release, champ.manifest.effective_release
        if mine < theirs:
            raise DeployError("verified", (
                f"downgrade: {m.name} {m.version} is release {mine}, older than the "
                f"champion {label(champ)} (release {theirs}); a push never makes an older "
                "release the champion (push it as challenger, canary or shadow, or use a "
                "signed rollback/promote command)"))

    def _check_caps(self, pcfg: PipelineConfig, key: tuple[str, str], role: str,
                    size: int) -> None:
        """A push into a full pipeline (or a full model store) is refused, never evicts."""
        limits = getattr(self.registry.profile, "models", None)
        if limits is None:
            return
        after = projected(self.pipelines.members(pcfg.name), key, role)
        if len(after) > limits.max_active_versions:
            raise DeployError("verified", (
                f"capacity: pipeline {pcfg.name} would have {len(after)} active versions, over "
                f"the firmware profile's models.max_active_versions = "
                f"{limits.max_active_versions}; retire one first (nothing was evicted)"))
        names = sorted({k[0] for k, _ in after})
        if len(names) > limits.max_model_names:
            raise DeployError("verified", (
                f"capacity: pipeline {pcfg.name} would run {len(names)} model names "
                f"({', '.join(names)}), over the firmware profile's models.max_model_names = "
                f"{limits.max_model_names}; retire one first"))
        if self.registry.installed(*key) is None:
            used = store_bytes(self.registry.store.root)
            if used + size > limits.store_budget_bytes:
                raise DeployError("verified", (
                    f"capacity: the model store holds {used} bytes; this bundle "
                    f"({size} bytes) would pass models.store_budget_mb = "
                    f"{limits.store_budget_mb} MB"))

    def _retained_key(self, base: str, transfer: str) -> str:
        return f"{base}#{transfer}"

    def mark_retained_done(self, base: str, header: DeployHeader) -> None:
        """A retained deployment was processed: never apply it again (restart, reconnect)."""
        done = self.active.state.doc.setdefault("retained_done", {})
        done[self._retained_key(base, header.transfer)] = header.sha256
        while len(done) > 200:
            done.pop(next(iter(done)))
        self.active.save_soon()

    # ---- reports ----------------------------------------------------------------------------
    def _record(self, header: DeployHeader, base: str) -> dict:
        pipeline = header.pipeline
        if pipeline is None and header.name is not None:
            with contextlib.suppress(DeployError):
                pipeline = self._resolve_pipeline(None, header.name).name
        return {"name": header.name, "version": header.version, "pipeline": pipeline,
                "role": header.role, "transfer": header.transfer, "sha256": header.sha256,
                "size": header.size, "group": self.bases.get(base), "topic": base}

    def report(self, rec: dict, stage: str, **extra: Any) -> None:
        rec["stage"] = stage
        rec["ts"] = time.time()
        rec.update({k: v for k, v in extra.items() if v is not None})
        if stage in ("active", "failed", "noop"):
            self._remember({k: rec.get(k) for k in (
                "name", "version", "pipeline", "role", "stage", "reason", "transfer", "ts")})
        payload = {"device": self.config.device_id, **{k: v for k, v in rec.items()
                                                       if k != "topic"}}
        self.events.publish(self.config.topic("deploy", "status"), payload)
        if stage in ("active", "failed"):
            self.events.status_changed()

    # ---- the slow part (one at a time, in threads) ----------------------------------------
    async def apply(self, d: Delivery) -> None:
        h = d.header
        rec = self._record(h, d.base)
        stage = "received"
        fresh_install = None
        try:
            data = await asyncio.to_thread(d.check)
            self.report(rec, "received", chunks=h.chunks)
            stage = "verified"
            try:
                bundle = await asyncio.to_thread(self.registry.read_bundle, data)
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
                        self.report(rec, "noop", reason=noop)
                    return
            try:
                check_compatible(pcfg, m)
            except EdgemlError as exc:
                raise DeployError("verified", f"incompatible: {exc}") from exc
            self._check_release(pcfg, m, h.role)
            self._check_caps(pcfg, (m.name, m.version), h.role, len(data))
            existing = self.registry.installed(m.name, m.version)
            if existing is not None and existing.manifest.sha256 != m.sha256:
                raise DeployError("verified", (
                    f"{m.name} {m.version} is already installed with a different model "
                    "(versions are immutable: give the new model a new version)"))
            self.report(rec, "verified", signer=bundle.signer)
            stage = "installed"
            try:
                installed = await asyncio.to_thread(self.registry.install, bundle)
            except EdgemlError as exc:
                raise DeployError("installed", str(exc)) from exc
            if existing is None:
                fresh_install = installed
            self.report(rec, "installed")
            stage = "loaded"
            try:
                model = await self.registry.load(pcfg, installed)
            except EdgemlError as exc:
                raise DeployError("loaded", reason_of(exc)) from exc
            self.report(rec, "loaded", load_ms=round(model.load_ms or 0.0, 2))
            stage = "active"
            prio = h.priority if h.priority is not None else ROLE_PRIORITY[h.role]
            self.active.activate(pcfg, Member(model, h.role, prio), h.role, h.priority,
                                 cause=f"push {h.transfer}")
            fresh_install = None
            self.active.note_deployed(pcfg.name, (m.name, m.version))
            await self.active.save()
            await self.active.prune(m.name)
            self.report(rec, "active", reason=None, active=[
                member_dict(s) for s in self.pipelines.members(pcfg.name)])
        except EdgemlError as exc:
            reason = reason_of(exc)
            at = exc.stage if isinstance(exc, DeployError) else stage
            log.warning("deployment %s %s failed at %s: %s", rec.get("name"),
                        rec.get("version"), at, reason)
            if d.retained:
                self.active.state.refused[h.sha256] = reason
                self.active.save_soon()
            self.report(rec, "failed", reason=reason, at=at)
            if fresh_install is not None and not self.active.in_use(
                    (fresh_install.name, fresh_install.version)):
                with contextlib.suppress(EdgemlError):
                    await asyncio.to_thread(self.registry.remove, fresh_install.name,
                                            fresh_install.version)
        finally:
            self.inflight.discard(h.transfer)
            # live or retained: the broker may hand the same (retained) transfer back later
            self.mark_retained_done(d.base, h)


def projected(members: Any, key: tuple[str, str], role: str) -> list:
    """The ``(key, role)`` pairs of an active set after ``key`` joins it as ``role`` (the
    rules of :func:`edgeml.control.activeset.assign`, on keys only)."""
    out = [(s.key, s.role) for s in members if s.key != key]
    if role == "champion":
        old = next((x for x in out if x[1] == "champion"), None)
        if old is not None:
            out.remove(old)
            out = [x for x in out if not (x[1] == "challenger" and x[0][0] == old[0][0])]
            out.append((old[0], "challenger"))
    else:
        out = [x for x in out if not (x[1] == role and x[0][0] == key[0])]
    out.append((key, role))
    return out


def store_bytes(root: Any) -> int:
    """Bytes of every file under the model store."""
    import os

    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total


__all__ = ["Deliveries", "label", "projected", "reason_of", "store_bytes"]
