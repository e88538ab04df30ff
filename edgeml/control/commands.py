"""Device commands on ``{p}/{d}/cmd``: promote, rollback, retire, set_policy. Each is
answered on ``{p}/{d}/cmd/reply`` with ``ok``, a message and the resulting active set."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from edgeml.config import POLICIES, Config, PipelineConfig
from edgeml.control.activeset import ActiveSets, label, member_dict
from edgeml.control.delivery import reason_of
from edgeml.control.ports import EventSink, Pipelines
from edgeml.control.signing import CommandRefused, CommandVerifier
from edgeml.core.model import Member
from edgeml.errors import CommandError, EdgemlError

log = logging.getLogger("edgeml.control.commands")

COMMANDS = ("promote", "rollback", "retire", "set_policy")
#: a command's ``deadline`` is the sender's clock; allow this much skew against ours
DEADLINE_GRACE_S = 60.0


def parse_command(payload: bytes, *, retained: bool) -> tuple[dict | None, str | None]:
    """(the command document, None) or (what to reply to, why it is refused)."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return {"id": None}, f"command is not JSON: {exc}"
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        return {"id": None}, f"command refused: a number in it is too large ({exc})"
    if not isinstance(doc, dict):
        return {"id": None}, "command must be a JSON object"
    if retained:  # a retained command would run again at every restart
        log.warning("ignoring a retained command: %s", doc)
        return doc, "retained commands are ignored; publish without retain"
    return doc, None


def _opt_str(doc: dict, key: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v:
        raise CommandError(f"'{key}' must be a string, not {v!r}")
    return v


class Commands:
    def __init__(self, config: Config, pipelines: Pipelines, active: ActiveSets,
                 events: EventSink, verifier: CommandVerifier | None = None) -> None:
        self.config = config
        self.verifier = verifier
        self.refused = 0
        self.pipelines = pipelines
        self.active = active
        self.events = events
        self.topic = config.topic("cmd")
        self.count = 0

    def reply(self, doc: dict, ok: bool, message: str, **extra: Any) -> None:
        rid = doc.get("id") if isinstance(doc.get("id"), (str, int, float)) else None
        out = {"id": rid, "ok": ok, "cmd": doc.get("cmd"), "message": message,
               "device": self.config.device_id, "ts": time.time(), **extra}
        if ok:
            self.events.status_changed()  # the fleet view sees the change at once
        self.events.publish(self.config.topic("cmd", "reply"), out)

    async def run(self, doc: dict) -> None:
        self.count += 1
        cmd = doc.get("cmd")
        if self.verifier is not None:
            try:
                signer = self.verifier.verify(doc)
            except CommandRefused as exc:
                self._refuse(doc, exc)
                return
            except OSError as exc:  # the counter could not be persisted: refuse, not risk
                self._refuse(doc, CommandRefused("state", f"cannot persist the command "
                                                          f"counter: {exc}"))
                return
            if signer is not None:
                log.info("command %s signed by key %s", cmd, signer)
        try:
            deadline = doc.get("deadline")
            if isinstance(deadline, (int, float)) and not isinstance(deadline, bool) \
                    and time.time() > deadline + DEADLINE_GRACE_S:
                raise CommandError("the command arrived after its deadline (the sender gave "
                                   "up waiting); not carried out")
            if cmd not in COMMANDS:
                raise CommandError(f"unknown cmd {cmd!r} (one of {', '.join(COMMANDS)})")
            pcfg = self._pipeline(doc)
            message = await getattr(self, f"_{cmd}")(pcfg, doc)
        except EdgemlError as exc:
            log.warning("command %s failed: %s", cmd, exc)
            self.reply(doc, False, reason_of(exc))
            return
        log.info("command %s on %s: %s", cmd, pcfg.name, message)
        self.reply(doc, True, message, pipeline=pcfg.name,
                   policy=self.pipelines.policy(pcfg.name),
                   active=[member_dict(s) for s in self.pipelines.members(pcfg.name)])

    def _refuse(self, doc: dict, exc: CommandRefused) -> None:
        """Not carried out: the reason on cmd/reply, and an alert (synced upstream)."""
        self.refused += 1
        log.warning("command %r refused: %s", doc.get("cmd"), exc)
        self.reply(doc, False, str(exc), refused=exc.kind)
        pipeline = doc.get("pipeline") if isinstance(doc.get("pipeline"), str) else None
        if pipeline is None and self.config.pipelines:
            pipeline = self.config.pipelines[0].name
        sig = doc.get("sig") if isinstance(doc.get("sig"), dict) else {}
        self.events.alert(pipeline or "-", "command_refused", {
            "cmd": str(doc.get("cmd"))[:64], "reason": str(exc), "refused": exc.kind,
            "key": str(sig.get("key"))[:64] if sig else None,
            "target": str(doc.get("device"))[:128] if doc.get("device") else None})

    def _pipeline(self, doc: dict) -> PipelineConfig:
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

    def _find(self, pcfg: PipelineConfig, model: str | None, version: str | None, *,
              exclude_champion: bool) -> Member | None:
        cands = [s for s in self.pipelines.members(pcfg.name)
                 if (model is None or s.name == model)
                 and (version is None or s.version == version)]
        if version is None and exclude_champion:
            cands = [s for s in cands if s.role != "champion"]
            challengers = [s for s in cands if s.role == "challenger"]
            cands = challengers or cands
        if len(cands) > 1:
            raise CommandError(
                f"several versions match in pipeline {pcfg.name}: "
                f"{', '.join(f'{label(s)} ({s.role})' for s in cands)}; give a version")
        return cands[0] if cands else None

    async def _promote(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = _opt_str(doc, "model"), _opt_str(doc, "version")
        target = self._find(pcfg, model, version, exclude_champion=True)
        if target is None:
            if model is None or version is None:
                raise CommandError(f"no challenger{' of ' + model if model else ''} in "
                                   f"pipeline {pcfg.name}; give the model and version")
            target = await self.active.load_stored(pcfg, model, version, "champion")
        if target.role == "champion":
            return f"{label(target)} is already the champion"
        old = self.pipelines.champion(pcfg.name)
        self.active.activate(pcfg, target, "champion", None, cause="promote")
        await self.active.save()
        return (f"promoted {label(target)} to champion"
                + (f"; {label(old)} is now a challenger" if old else ""))

    async def _rollback(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = _opt_str(doc, "model"), _opt_str(doc, "version")
        return await self.active.rollback(pcfg, model, version, retire_current=False)

    async def _retire(self, pcfg: PipelineConfig, doc: dict) -> str:
        model, version = _opt_str(doc, "model"), _opt_str(doc, "version")
        if model is None:
            raise CommandError("'model' is required for retire")
        target = self._find(pcfg, model, version, exclude_champion=True)
        if target is None:
            raise CommandError(f"{model} {version or ''} is not active in pipeline "
                               f"{pcfg.name}".replace("  ", " "))
        if target.role == "champion":
            raise CommandError(f"{label(target)} is the champion; promote another version or "
                               "roll back first (a pipeline never runs without a champion)")
        self.active.retire(pcfg, target)
        await self.active.save()
        return f"retired {label(target)} ({target.role}); it stays in the model store"

    async def _set_policy(self, pcfg: PipelineConfig, doc: dict) -> str:
        policy = doc.get("policy")
        if policy not in POLICIES:
            raise CommandError(f"'policy' must be one of {', '.join(POLICIES)}, not {policy!r}")
        old = self.active.set_policy(pcfg, policy)
        await self.active.save()
        return f"policy {old} -> {policy}"
