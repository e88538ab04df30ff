"""Control on the device: deliveries, commands and the watch, behind three narrow ports.

The ingress stage hands every message on a deploy or command topic to :meth:`Control.submit`,
which only queues it. :meth:`Control.run` reassembles transfers and does the slow, fallible
work in threads (hash, verify, install, load, warm up, self-test), one deployment or command
at a time, so the pipelines keep scoring meanwhile. A replacement is always loaded and
self-tested *before* the active set is swapped, and the swap happens between two batches: a
failure at any stage leaves the running versions untouched.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from edgeml.config import Config, PipelineConfig
from edgeml.control.activeset import ActiveSets, StateFile, label, member_dict
from edgeml.control.commands import Commands, parse_command
from edgeml.control.delivery import Deliveries
from edgeml.control.ports import EventSink, Pipelines
from edgeml.control.registry import ModelRegistry
from edgeml.control.signing import CommandVerifier, CounterFile
from edgeml.control.watch import Watch, WatchLimits, judge
from edgeml.errors import CommandError, EdgemlError

log = logging.getLogger("edgeml.control")

WATCH_TICK_S = 0.2
MAX_RECENT = 20
MAX_INBOX = 10_000


class Control:
    """Model delivery, device commands and the post-promotion watch for one device."""

    def __init__(self, config: Config, *, pipelines: Pipelines, registry: ModelRegistry,
                 events: EventSink) -> None:
        self.config = config
        self.pipelines = pipelines
        self.events = events
        d = config.deploy
        self.limits = WatchLimits(d.watch_window_s, d.max_error_rate, d.max_p99_ms,
                                  d.min_canary_agreement)
        self.state = StateFile(config.data_dir / "state" / "active.json")
        self.active = ActiveSets(pipelines, registry, self.state,
                                 keep_versions=d.keep_versions, limits=self.limits,
                                 on_watch=self._set_watch)
        self.deliveries = Deliveries(config, pipelines, registry, self.active, events,
                                     self._remember)
        self.verifier = CommandVerifier(
            registry.trusted_keys, config.device_id,
            CounterFile(config.data_dir / "state" / "cmd_counters.json"))
        self.commands = Commands(config, pipelines, self.active, events, self.verifier)
        self._inbox: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._work: asyncio.Queue = asyncio.Queue()
        self._stopping = False
        self._watch: dict[str, Watch] = {}
        self._recent: collections.deque[dict] = collections.deque(maxlen=MAX_RECENT)
        self.inbox_dropped = 0

    # ---- the composition root's hooks -----------------------------------------------------
    def initial_models(self, pcfg: PipelineConfig):
        return self.active.initial_models(pcfg)

    def persisted_policy(self, pcfg: PipelineConfig) -> str | None:
        return self.active.persisted_policy(pcfg)

    def subscriptions(self) -> list[tuple[str, int]]:
        return [*self.deliveries.subscriptions(), (self.commands.topic, 1)]

    def handles(self, topic: str) -> bool:
        return topic == self.commands.topic or self.deliveries.base_of(topic) is not None

    def submit(self, msg: Any) -> None:
        """Queue one message (called on the loop thread by the ingress stage: no work here)."""
        if len(self._inbox) >= MAX_INBOX:
            self._inbox.popleft()
            self.inbox_dropped += 1
        self._inbox.append(msg)
        self._wake.set()

    async def run(self) -> None:
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
        for name in self.pipelines.names():
            members = self.pipelines.members(name)
            entry = self.state.doc["pipelines"].get(name, {})
            canary = next((s for s in members if s.role == "canary"), None)
            watch = self._watch.get(name)
            pipes[name] = {
                "active": [member_dict(s) for s in members],
                "policy": self.pipelines.policy(name),
                "previous_champions": [label(k) for k in entry.get("previous", [])],
                "watch": watch.summary(now) if watch else None,
                "canary": {"canary": label(canary) if canary else None,
                           **self.pipelines.canary(name)},
            }
        return {"groups": list(self.config.groups), "pipelines": pipes,
                "transfers": self.deliveries.pending(), "recent": list(self._recent)[-10:],
                "commands": self.commands.count, "inbox_dropped": self.inbox_dropped}

    # ---- receiving --------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        while not self._stopping:
            if not self._inbox:
                self._wake.clear()
                # asyncio.wait, not wait_for: before Python 3.12 wait_for can swallow a
                # cancellation that lands as the event fires
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=0.5)
                finally:
                    waiter.cancel()
            while self._inbox and not self._stopping:
                msg = self._inbox.popleft()
                try:
                    self._on_message(msg)
                except Exception:  # one bad message must not stop deliveries
                    log.exception("control message on %s failed", msg.topic)
            self.deliveries.expire()

    def _on_message(self, msg: Any) -> None:
        if msg.topic == self.commands.topic:
            doc, refusal = parse_command(msg.payload, retained=bool(msg.retain))
            if refusal is not None:
                self.commands.reply(doc or {"id": None}, False, refusal)
            else:
                self._work.put_nowait(("cmd", doc))
            return
        for delivery in self.deliveries.feed(msg):
            self._work.put_nowait(("deploy", delivery))

    def _remember(self, event: dict) -> None:
        """A deployment's outcome: kept for status and synced upstream (outbox ``deploy``)."""
        self._recent.append(event)
        self.events.deploy_event(event)

    # ---- the serial worker ------------------------------------------------------------------
    async def _apply_loop(self) -> None:
        while not self._stopping:
            item = await self._work.get()
            if item is None or self._stopping:
                return
            try:
                kind = item[0]
                if kind == "deploy":
                    await self.deliveries.apply(item[1])
                elif kind == "cmd":
                    await self.commands.run(item[1])
                elif kind == "auto":
                    await self._auto_rollback(item[1], item[2])
            except Exception:
                log.exception("control work item %s failed", item[0])

    # ---- the watch window and automatic rollback -------------------------------------------
    def _set_watch(self, watch: Watch | None, pipeline: str) -> None:
        if watch is None:
            self._watch.pop(pipeline, None)
        else:
            self._watch[pipeline] = watch

    def evaluate(self, w: Watch) -> str | None:
        """Why the watched champion must go (a limit it passed), or None."""
        why, w.last = judge(w.start, self.pipelines.figures(w.pipeline, w.champion),
                            self.limits)
        return why

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_TICK_S)
            now = time.monotonic()
            for name, w in list(self._watch.items()):
                champ = self.pipelines.champion(name) if name in self.pipelines.names() \
                    else None
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
                             label(w.champion))
                    self._remember({"name": w.champion[0], "version": w.champion[1],
                                    "pipeline": name, "stage": "watch_passed",
                                    "ts": time.time()})

    async def _auto_rollback(self, w: Watch, why: str) -> None:
        pcfg = self.config.pipeline(w.pipeline)
        champ = self.pipelines.champion(w.pipeline)
        if champ is None or champ.key != w.champion:
            return
        detail = {"model": w.champion[0], "version": w.champion[1], "reason": why,
                  "watch": w.last, "previous": label(w.previous) if w.previous else None}
        try:
            if w.previous is None:
                raise CommandError("no previous champion to go back to")
            message = await self.active.rollback(pcfg, *w.previous, retire_current=True)
        except EdgemlError as exc:
            log.error("pipeline %s: %s failed its watch (%s) but cannot be rolled back: %s",
                      w.pipeline, label(w.champion), why, exc)
            self.events.alert(w.pipeline, "auto_rollback_failed", {**detail,
                                                                   "error": str(exc)})
            return
        log.error("pipeline %s: automatic rollback: %s (%s)", w.pipeline, message, why)
        self._remember({"name": w.champion[0], "version": w.champion[1],
                        "pipeline": w.pipeline, "stage": "rolled_back", "reason": why,
                        "ts": time.time()})
        self.events.alert(w.pipeline, "auto_rollback", {**detail, "message": message})
