"""The composition root: one device, its stages wired one way, run as named tasks in one
TaskGroup.

    source (transport) -> ingress (decode, dead-letter, archive, assemble) -> scoring
    (micro-batches, versions, rendezvous) -> egress (answers, record ids, outbox) -> uplink

``async with Device(config) as device: await device.run()`` until :meth:`request_stop`
(``edgeml run`` calls it on SIGTERM/SIGINT and :meth:`reload` on SIGHUP; a process that
embeds a device keeps its own signal handling). Control (deliveries, commands, the watch) sees the
pipelines, the model registry and an event sink through narrow ports, never the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeml.config import Config, PipelineConfig, load_device_profile
from edgeml.control.identity import Identity, check_identity, warn_if_untrusted
from edgeml.control.registry import ModelRegistry
from edgeml.control.service import Control
from edgeml.core import status as status_doc
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.core.egress import Egress, json_bytes
from edgeml.core.ingress import Ingress, Inlet
from edgeml.core.model import Member
from edgeml.core.scoring import PipelineRuntime, ScoringSettings
from edgeml.core.stats import RateMeter
from edgeml.errors import DecodeError, EdgemlError, TransportError
from edgeml.storage.models import ModelStore
from edgeml.transport.base import Connector, Publication, Transport
from edgeml.transport.settings import DEFAULT_MAX_INFLIGHT

log = logging.getLogger("edgeml.core.device")

#: config keys a SIGHUP applies per pipeline; everything else needs a restart
LIVE_KEYS = ("policy", "deadline_ms", "top_n", "models", "canary_window", "canary_threshold")
RESTART_KEYS = ("device_id", "data_dir", "topic_prefix", "broker", "upstream", "upstreams",
                "upstream_failover_after_s", "profile",
                "profile_overrides", "trusted_keys", "groups", "sync", "deploy", "metrics",
                "drift")


def mqtt_connector(settings: Any, *, will: Publication | None = None,
                   manual_ack: bool = False, require_connection: bool = True) -> Transport:
    from edgeml.transport.mqtt import MqttTransport

    return MqttTransport(settings, will=will, manual_ack=manual_ack,
                         require_connection=require_connection)


def answer_window(max_batch: int) -> int:
    """QoS 1 answers in flight on the publishing connection when ``[broker] max_inflight`` is
    not set: two scored batches' worth, at least DEFAULT_MAX_INFLIGHT. A smaller window holds a
    batch's answers back until PUBACKs return, one released per acknowledgement, and the
    device idles meanwhile (measured with 256-row batches on a stock mosquitto: a window of
    100 answered 17% fewer messages per second at full load than one of 400)."""
    return max(DEFAULT_MAX_INFLIGHT, 2 * max_batch)


@dataclasses.dataclass
class _Pipeline:
    config: PipelineConfig
    runtime: PipelineRuntime
    inlet: Inlet


class PipelineSet:
    """The pipelines behind control's port: read and swap active sets, set policies."""

    def __init__(self) -> None:
        self._by_name: dict[str, _Pipeline] = {}

    def add(self, p: _Pipeline) -> None:
        self._by_name[p.config.name] = p

    def __iter__(self):
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> PipelineRuntime:
        return self._by_name[name].runtime

    def get(self, name: str) -> _Pipeline | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def config(self, name: str) -> PipelineConfig:
        return self._by_name[name].config

    def members(self, name: str) -> tuple[Member, ...]:
        return self._by_name[name].runtime.members

    def champion(self, name: str) -> Member | None:
        return self._by_name[name].runtime.champion()

    def policy(self, name: str) -> str:
        return self._by_name[name].runtime.policy

    def set_members(self, name: str, members: Sequence[Member]) -> None:
        self._by_name[name].runtime.set_members(members)

    def set_policy(self, name: str, policy: str) -> None:
        self._by_name[name].runtime.set_policy(policy)

    def reset_canary(self, name: str) -> None:
        self._by_name[name].runtime.reset_canary()

    def figures(self, name: str, key: tuple[str, str]) -> dict:
        return self._by_name[name].runtime.figures(key)

    def canary(self, name: str) -> dict:
        return self._by_name[name].runtime.canary_status()


class Device:
    """One device: config in, stages built and wired, run until stopped."""

    def __init__(self, config: Config, *, profile: Any = None,
                 reload: Callable[[], Config] | None = None,
                 connector: Connector | None = None) -> None:
        self.config = config
        self.profile = profile or load_device_profile(config)
        self._reload_config = reload
        self._connector: Connector = connector or mqtt_connector
        self.reloads = 0
        self.started = time.time()
        self.state = "starting"
        self.ready = asyncio.Event()
        self.load_errors: list[str] = []
        self.recovered_rows = 0
        self.storage_events: list[dict] = []  # damaged files found and moved aside
        self.pipelines = PipelineSet()
        self._stop = asyncio.Event()
        self._rate = RateMeter()
        self._entered = False
        self.transport: Transport | None = None  # sensor input: subscriptions, acks
        self.out_transport: Transport | None = None  # answers, dead letters, alerts, status
        self.outbox: Any = None
        self.uplink: Any = None
        self._uplink_transport: Transport | None = None
        self.monitors: dict[str, Any] = {}  # pipeline -> DriftMonitor (edgeml.core.drift)
        self.http: Any = None  # the /metrics server (edgeml.core.http), when [metrics] listens

    # ---- public ------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def topic(self, *parts: str) -> str:
        return self.config.topic(*parts)

    async def __aenter__(self) -> Device:
        """Open storage and load every configured model (nothing is connected yet)."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # this data dir's instance id; the warning when commands are unsigned
        self.identity = Identity(cfg.data_dir)
        warn_if_untrusted(cfg.trusted_keys, self.topic("cmd"))
        self.store = ModelStore(cfg.data_dir / "models")
        self.registry = ModelRegistry(self.store, profile=self.profile,
                                      trusted_keys=_load_keys(cfg.trusted_keys),
                                      max_bundle_bytes=cfg.deploy.max_bundle_bytes)
        self.outbox = self._open_outbox()
        self.egress = Egress(
            device=cfg.device_id, topic=self.topic, outbox=self.outbox,
            record_results=cfg.sync.record_results,
            out_formats={p.name: p.output_format for p in cfg.pipelines},
            out_qos={p.name: p.output_qos for p in cfg.pipelines},
            on_status_changed=self.publish_status_soon)
        from edgeml.core.metrics import EventCounter

        self.events = EventCounter(self.egress)  # counts deploy events/rollbacks for /metrics
        self.control = Control(cfg, pipelines=self.pipelines, registry=self.registry,
                               events=self.events)
        try:
            await self._build_pipelines()
        except BaseException:
            self._close_storage()
            raise
        self.ingress = Ingress([p.inlet for p in self.pipelines], device=cfg.device_id,
                               dlq_topic=self.topic("dlq"), control=self.control,
                               alert=self.egress.alert)
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close_storage()
        self._entered = False

    async def run(self) -> None:
        """Connect, serve until :meth:`request_stop`, drain, disconnect."""
        if not self._entered:
            async with self:
                await self.run()
            return
        cfg = self.config
        # refuse to run as a twin; continue past published seqs (restored dir)
        await check_identity(self.identity, connector=self._connector, settings=cfg.broker,
                             prefix=cfg.topic_prefix, device_id=cfg.device_id,
                             rawlogs={p.config.name: p.inlet.rawlog for p in self.pipelines},
                             on_alert=self.egress.alert)
        will = Publication(self.topic("status"), json_bytes({
            **status_doc.offline(cfg.device_id, "connection lost"),
            "identity": self.identity.status(
                {p.config.name: p.inlet.rawlog.next_seq for p in self.pipelines})}),
            qos=1, retain=True)
        manual_ack = any(p.qos > 0 for p in cfg.pipelines)
        # MQTT 5: the broker never sends more than the profile allows in one packet, and may
        # have up to 65,535 QoS 1 messages in flight to the device (Receive Maximum) instead of
        # queueing them where its own limits drop them (mosquitto: max_queued_messages 1000,
        # and 20 in flight for MQTT 3.1.1 clients). That window is not our memory: the
        # transport stops reading while the loop is behind (a bounded inbox), and ingress
        # stops taking input while QoS 1 acks wait for room in a full scoring queue, so the
        # rest waits in the broker and in TCP buffers. Acks go out as soon as a burst is
        # archived. (Measured with a 20,000-message burst on a stock mosquitto: a window of
        # 500 lost 13k of it in the broker's queue of 1000, one of 10,000 lost 1.6k.)
        q = self.profile.queue
        settings = dataclasses.replace(
            cfg.broker, max_packet_bytes=q.max_packet_kb * 1024, receive_maximum=65535)
        # Two connections: sensor input (subscriptions, acknowledgements) and everything the
        # device publishes (answers, dead letters, alerts, status with the last will). A
        # broker whose queue towards a client is full drops every packet for it, PUBACKs
        # included (mosquitto: max_queued_messages, 1000 by default, since 2.0.16 and in
        # distribution builds of 2.0.11): on one shared connection a QoS 0 flood then ate the
        # PUBACKs of the answers, the client's in-flight window stayed full for good and no
        # answer left the device again. The publishing connection carries no sensor traffic,
        # so its PUBACKs never queue behind (or get dropped with) the input.
        # It only ever receives PUBACKs: with protocol "auto" it speaks MQTT 3.1.1, whose
        # PUBACK is four bytes paho decodes without building reason-code and property objects
        # (a measurable share of the cost of a QoS 1 answer). Every broker speaks 3.1.1.
        out_protocol = "3.1.1" if cfg.broker.protocol == "auto" else cfg.broker.protocol
        transport = self._connector(settings, manual_ack=manual_ack)
        out = self._connector(dataclasses.replace(
            cfg.broker, client_id=f"{cfg.broker.client_id}-out", clean_start=True,
            protocol=out_protocol,
            max_inflight=cfg.broker.max_inflight or answer_window(self.profile.batching.max_batch),
        ), will=will)
        self._refresh_birth(out)
        async with transport, out:
            self.transport = transport
            self.out_transport = out
            self.egress.transport = out
            try:
                await self._start_uplink()
                await self._serve(transport, out)
            finally:
                if self._uplink_transport is not None:
                    await self._uplink_transport.close()
        log.info("stopped")

    async def _serve(self, transport: Transport, out: Transport) -> None:
        cfg = self.config
        subs: list[tuple[str, int]] = []
        for p in self.pipelines:
            subs += [(t, p.config.qos) for t in p.config.subscriptions]
        subs += self.control.subscriptions()
        await transport.subscribe(subs)
        self.state = "online"
        await self._start_http()
        async with asyncio.TaskGroup() as tg:
            scorers = [tg.create_task(p.runtime.run(), name=f"score:{p.config.name}")
                       for p in self.pipelines]
            ingress = tg.create_task(self.ingress.run(transport, out), name="ingress")
            status = tg.create_task(self._heartbeat(), name="status")
            fsync = tg.create_task(self._fsync_loop(), name="rawlog-fsync")
            writer = tg.create_task(self.egress.run_writer(), name="outbox-writer")
            tg.create_task(self.control.run(), name="control")
            drift = tg.create_task(self._drift_ticks(), name="drift")
            uplink = None
            if self.uplink is not None:
                uplink = tg.create_task(self.uplink.run(), name="uplink")
            outbound = self._start_outbound(tg, out)
            self._recover()
            for event in self.storage_events:
                self.egress.alert(event.get("pipeline", "*"), event["kind"], event)
            self.publish_status_soon()
            self.ready.set()
            log.info("ready: device %s, %d pipeline(s), subscribed to %s", cfg.device_id,
                     len(self.pipelines.names()), ", ".join(t for t, _ in subs))
            await self._stop.wait()
            # drain: no new input, score what was accepted, hand it all to the outbox
            log.info("stopping: draining %d queued row(s)",
                     sum(p.runtime.queue_depth for p in self.pipelines))
            ingress.cancel()
            for p in self.pipelines:
                p.runtime.stop()
            await asyncio.wait(scorers, timeout=10)
            self.egress.close_writer()
            await asyncio.wait([writer], timeout=10)
            if uplink is not None:
                await self._uplink_drain(timeout=2.0)
                uplink.cancel()
            fsync.cancel()
            status.cancel()
            if outbound is not None:
                outbound.cancel()
            drift.cancel()
            if self.http is not None:
                await self.http.close()
            self.control.stop()
            self.state = "offline"
            with contextlib.suppress(EdgemlError):
                await out.publish(self.topic("status"), self._status_bytes(),
                                        qos=1, retain=True, timeout=2)

    def _start_outbound(self, tg: asyncio.TaskGroup, transport: Transport
                        ) -> asyncio.Task | None:
        """What format sessions ask to send (Sparkplug rebirth requests) is queued on the
        session by the ingress stage and published here: decoding never calls the transport."""
        sessions = [p.inlet.assembler.session for p in self.pipelines
                    if getattr(p.inlet.assembler.session, "outbound", None) is not None]
        if not sessions:
            return None
        wake = asyncio.Event()
        for s in sessions:
            s.notify = wake.set

        async def drain() -> None:
            while True:
                await wake.wait()
                wake.clear()
                for s in sessions:
                    while s.outbound:
                        topic, payload = s.outbound.popleft()
                        try:
                            transport.publish_nowait(topic, payload, qos=0)
                            s.counts["rebirth_sent"] += 1
                        except TransportError as exc:
                            s.counts["rebirth_send_failed"] += 1
                            log.warning("request on %s not sent: %s", topic, exc)
        return tg.create_task(drain(), name="outbound")

    # ---- SIGHUP ----------------------------------------------------------------------------
    async def reload(self) -> list[str]:
        """Re-read the config file and apply what can change without dropping the stream:
        per pipeline the policy, deadline, top_n, canary settings and the model versions (new
        versions are loaded before the active set is swapped). Anything else (broker, device,
        data dir, topics, decoding, windows, pipelines added or removed) needs a restart: it
        is logged and left as it was. Returns what was not applied."""
        assert self._reload_config is not None
        try:
            new = self._reload_config()
        except EdgemlError as exc:
            log.error("reload refused, config unchanged: %s", exc)
            return [str(exc)]
        old = self.config
        ignored = [k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]
        if [p.name for p in old.pipelines] != [p.name for p in new.pipelines]:
            ignored.append("pipelines (added, removed or renamed)")
        for pcfg in new.pipelines:
            pipe = self.pipelines.get(pcfg.name)
            if pipe is None:
                continue
            frozen = [k for k in pcfg.__dataclass_fields__
                      if k not in LIVE_KEYS and getattr(pcfg, k) != getattr(pipe.config, k)]
            ignored += [f"pipelines.{pcfg.name}.{k}" for k in frozen]
            # apply what can change live; keep the running value of everything else
            pcfg = dataclasses.replace(pcfg, **{k: getattr(pipe.config, k) for k in frozen})
            persisted = self.control.initial_models(pcfg) is not pcfg.models
            if pcfg.models != pipe.config.models and persisted:
                ignored.append(f"pipelines.{pcfg.name}.models (the active set pushed over MQTT "
                               "wins; use promote/rollback/retire)")
            elif pcfg.models != pipe.config.models:
                members = await self._load_members(pcfg, pcfg.models)
                if len(members) == len(pcfg.models):
                    pipe.runtime.set_members(members)
                else:
                    ignored.append(f"pipelines.{pcfg.name}.models (a version failed to load; "
                                   "the running versions stay)")
                    continue
            pipe.runtime.reconfigure(pcfg)
            pipe.config = pcfg
            pipe.inlet.config = pcfg
        self.reloads += 1
        if ignored:
            log.warning("reloaded %s; these changes need a restart and were not applied: %s",
                        new.source, ", ".join(ignored))
        else:
            log.info("reloaded %s", new.source)
        return ignored

    # ---- start-up ----------------------------------------------------------------------------
    async def _build_pipelines(self) -> None:
        from edgeml.storage.rawlog import RawLog

        disk = self.profile.disk
        settings = ScoringSettings(
            max_batch=self.profile.batching.max_batch,
            max_wait_ms=self.profile.batching.max_wait_ms,
            queue_limit=self.profile.queue.max_messages,
            queue_policy=self.profile.queue.policy,
        )
        for pcfg in self.config.pipelines:
            # the persisted active set (after pushes/promotions) wins over the config file
            members = await self._load_members(pcfg, self.control.initial_models(pcfg))
            runtime = PipelineRuntime(pcfg, emitter=self.egress, batching=settings)
            runtime.set_members(members)
            policy = self.control.persisted_policy(pcfg)
            if policy is not None:
                runtime.set_policy(policy)
            n_features = None
            if pcfg.field is not None and members:
                n_features = members[0].manifest.input.n_features
            assembler = Assembler(Decoder.from_pipeline(pcfg, n_features), pcfg.window)
            rawlog = RawLog(
                self.config.data_dir / "rawlog" / pcfg.name,
                segment_bytes=disk.rawlog_segment_bytes, budget_bytes=disk.rawlog_budget_bytes,
                max_age_s=disk.rawlog_max_age_s, fsync_interval_s=disk.fsync_interval_s,
            )
            rec = rawlog.recovery
            if rec is not None and rec.truncated_bytes:
                self.storage_events.append({
                    "kind": "rawlog_recovered", "pipeline": pcfg.name,
                    "segment": rec.segment, "truncated_bytes": rec.truncated_bytes,
                    "records_kept": rec.records_kept, "detail": rec.detail,
                    "ts": time.time()})
            inlet = Inlet(pcfg, assembler, rawlog, runtime.enqueue, runtime.stats,
                          backlog=runtime)
            runtime.observer = self._monitor(pcfg)
            runtime.observer.stats = runtime.stats
            runtime.observer.follow(runtime.members)
            self.pipelines.add(_Pipeline(pcfg, runtime, inlet))

    async def _load_members(self, pcfg: PipelineConfig, models) -> list[Member]:
        """Load (and install, when a bundle file is given) every model; failures are logged,
        counted in status and leave the other versions running."""
        async def one(m) -> Member | None:
            try:
                model = await self.registry.load_configured(pcfg, m)
            except EdgemlError as exc:
                msg = f"pipeline {pcfg.name}: {m.name} {m.version} not loaded: {exc}"
                log.error("%s", msg)
                self.load_errors.append(msg)
                return None
            return Member(model, m.role, m.priority)
        loaded = await asyncio.gather(*(one(m) for m in models))
        return [s for s in loaded if s is not None]

    def _open_outbox(self) -> Any:
        """Open the outbox; a damaged one (it fails to open, or SQLite's quick check finds
        problems) is moved aside with what it still holds counted, and a fresh one started:
        the device keeps answering, and the quarantine is reported in status and alerted."""
        if not self.config.sync.enabled:
            return None
        from edgeml.errors import OutboxError
        from edgeml.storage.outbox import DEFAULT_STREAMS, Outbox, StreamPolicy
        from edgeml.storage.outbox.damage import check_integrity, quarantine

        path = self.config.data_dir / "outbox" / "outbox.db"

        # + "drift": one record per drift window (edgeml.core.drift), evicted before outputs
        streams = {**DEFAULT_STREAMS, "drift": StreamPolicy("drift", 2, "drop_oldest")}

        def open_() -> Any:
            return Outbox(path, budget_bytes=self.profile.disk.outbox_budget_bytes,
                          fsync_interval_s=self.profile.disk.fsync_interval_s, streams=streams)
        problems: list[str] = []
        try:
            problems = check_integrity(path)
            if not problems:
                return open_()
        except OutboxError as exc:
            problems = [str(exc)]
        except Exception as exc:  # sqlite3 refuses the file outright
            problems = [f"{type(exc).__name__}: {exc}"]
        report = quarantine(path)
        self.storage_events.append({
            "kind": "outbox_quarantined", "problems": list(problems)[:5],
            "moved_to": str(report.moved_to), "records_lost": report.records,
            "count_error": report.count_error, "ts": time.time()})
        log.error("the outbox %s is damaged (%s); moved aside to %s with %s record(s) not "
                  "synced; starting a fresh one", path, "; ".join(problems[:3]),
                  report.moved_to, report.records if report.records is not None else "?")
        return open_()

    async def _start_uplink(self) -> None:
        if self.outbox is None:
            return
        from edgeml.core.uplink import Uplink

        cfg = self.config
        s = cfg.sync
        if len(cfg.upstreams) > 1:  # failover: the uplink makes (and switches) its clients
            self.uplink = Uplink(
                self.outbox, cfg.upstreams, connector=self._connector,
                failover_after_s=cfg.upstream_failover_after_s,
                topic_prefix=cfg.topic_prefix, device_id=cfg.device_id,
                batch_max_records=s.batch_max_records, batch_max_wait_s=s.batch_max_wait_s,
                bandwidth_bytes_per_s=s.bandwidth_bytes_per_s,
            )
            self.egress.uplink = self.uplink
            return
        settings = cfg.upstream or dataclasses.replace(
            cfg.broker, client_id=f"{cfg.broker.client_id}-uplink")
        # the upstream may be away at start: the outbox holds everything meanwhile
        transport = self._connector(settings, require_connection=False)
        await transport.__aenter__()
        self._uplink_transport = transport
        self.uplink = Uplink(
            self.outbox, transport, topic_prefix=cfg.topic_prefix, device_id=cfg.device_id,
            batch_max_records=s.batch_max_records, batch_max_wait_s=s.batch_max_wait_s,
            bandwidth_bytes_per_s=s.bandwidth_bytes_per_s,
        )
        self.egress.uplink = self.uplink

    async def _uplink_drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.outbox.stats()["backlog"]:
                return
            self.uplink.notify()
            await asyncio.sleep(0.05)

    def _close_storage(self) -> None:
        for p in self.pipelines:
            p.runtime.close()
            with contextlib.suppress(Exception):
                p.inlet.rawlog.sync()
            p.inlet.rawlog.close()
        self.egress.shutdown()
        if self.outbox is not None:
            self.outbox.close()

    def _recover(self) -> None:
        """Score again what was accepted (acknowledged, archived) but whose answers never
        reached the outbox: a kill -9 or power cut between the raw-input log and the outbox.
        The outbox's high-water mark per pipeline says where to resume; records it already
        holds are ignored by id. Without an outbox there is nothing durable to resume from."""
        if self.outbox is None:
            return
        marks = self.outbox.marks()
        fresh: dict[str, int] = {}
        for p in self.pipelines:
            name, rawlog = p.config.name, p.inlet.rawlog
            last = rawlog.next_seq - 1
            mark = marks.get(name)
            if mark is None:  # first start with this outbox: nothing before now is owed
                fresh[name] = last
                continue
            if mark >= last:
                continue
            assembler = Assembler(p.inlet.assembler.decoder, p.config.window)
            rows = []
            for rec in rawlog.read(start_seq=mark + 1):
                try:
                    rows += assembler.feed(rec.topic, rec.payload, rec.seq, rec.received)
                except DecodeError:
                    continue  # it was dead-lettered when it arrived
            log.warning("pipeline %s: re-scoring %d row(s) from %d archived message(s) after "
                        "seq %d that never reached the outbox (unclean stop)", name, len(rows),
                        last - mark, mark)
            if rows:
                p.runtime.enqueue(rows)
            self.recovered_rows += len(rows)
        if fresh:
            self.outbox.put_many([], marks=fresh)

    async def _fsync_loop(self) -> None:
        interval = self.profile.disk.fsync_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for p in list(self.pipelines):
                try:
                    await asyncio.to_thread(p.inlet.rawlog.sync)
                except Exception:
                    log.exception("raw-input log fsync failed for %s", p.config.name)

    # ---- drift, metrics, readiness -------------------------------------------------------------
    def _monitor(self, pcfg: PipelineConfig) -> Any:
        from edgeml.core.drift import DriftMonitor, drift_record_id

        name = pcfg.name

        def record(doc: dict) -> None:  # one record per drift window, synced on sync/drift
            if self.egress.outbox is not None:
                self.egress.record("drift", drift_record_id(self.config.device_id, name, doc),
                                   doc)

        win = pcfg.window
        mon = DriftMonitor(name, self.config.drift, features=pcfg.features or (),
                           window=win.size if win else None, hop=win.hop if win else None,
                           alert=lambda kind, detail: self.egress.alert(name, kind, detail),
                           record=record, clock=time.time)
        self.monitors[name] = mon
        return mon

    async def _drift_ticks(self) -> None:
        interval = self.config.drift.rate_interval_s
        while True:
            for mon in self.monitors.values():
                try:
                    mon.tick()
                except Exception:
                    log.exception("drift rate check failed for %s", mon.pipeline)
            await asyncio.sleep(interval)

    def readiness(self) -> tuple[bool, dict]:
        """Ready: connected, and every pipeline has at least one loaded, self-tested version
        (a version is only ever active after its self-test)."""
        connected = all(t is not None and t.connected
                        for t in (self.transport, self.out_transport))
        pipes = {p.config.name: len(p.runtime.members) for p in self.pipelines}
        ok = self.state == "online" and connected and all(pipes.values())
        return ok, {"ready": ok, "state": self.state, "connected": connected,
                    "active_versions": pipes, "load_errors": self.load_errors[-5:]}

    async def _start_http(self) -> None:
        addr = self.config.metrics.address
        if addr is None or self.http is not None:
            return
        from edgeml.core import metrics
        from edgeml.core.http import HttpServer, json_route

        registry = metrics.make_registry(self)
        server = HttpServer(addr[0], addr[1], {
            "/metrics": lambda: (200, metrics.CONTENT_TYPE, metrics.exposition(registry)),
            "/healthz": json_route(lambda: (True, {"ok": True, "state": self.state})),
            "/readyz": json_route(self.readiness),
        })
        try:
            host, port = await server.start()
        except OSError as exc:  # a taken port must not stop the data path
            log.error("metrics endpoint not started on %s: %s", self.config.metrics.listen, exc)
            return
        self.http = server
        log.info("metrics on http://%s:%d/metrics", host, port)

    # ---- status ----------------------------------------------------------------------------
    def publish_status_soon(self) -> None:
        """Publish the retained status now (after a deployment or command), not at the next
        heartbeat, so ``edgeml status`` shows the change at once."""
        transport = self.out_transport
        if transport is None:
            return
        try:
            payload = self._status_bytes()
            transport.publish_nowait(self.topic("status"), payload, qos=1, retain=True)
            self._refresh_birth(transport, payload)
        except Exception:
            log.exception("status report failed")

    def _refresh_birth(self, transport: Transport, payload: bytes | None = None) -> None:
        """What a reconnect announces: the newest status, made here on the loop."""
        if payload is None or self.state != "online":
            doc = self.status("online" if self.state != "starting" else "starting")
            payload = json_bytes(doc)
        transport.set_birth([Publication(self.topic("status"), payload, qos=1, retain=True)])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            self.publish_status_soon()

    def status(self, state: str | None = None) -> dict:
        doc = self._status(state)
        # instance id and the seqs handed out so far (twin / restore checks)
        doc["identity"] = self.identity.status(
            {p.config.name: p.inlet.rawlog.next_seq for p in self.pipelines})
        return doc

    def _status(self, state: str | None = None) -> dict:
        pipes = {}
        total_received = 0
        for p in self.pipelines:
            d = p.runtime.status()
            d["published"] = self.egress.published.get(p.config.name, 0)
            d["rawlog"] = status_doc.safe(lambda p=p: p.inlet.rawlog.stats)
            d["windows_pending"] = p.inlet.assembler.pending_topics
            d["sequence"] = p.runtime.stats.sequence.status()
            fmt = p.inlet.assembler.status()
            if fmt is not None:
                d["format"] = {"name": p.config.format, **fmt}
            if p.config.name in self.monitors:
                d["drift"] = status_doc.safe(self.monitors[p.config.name].status)
            pipes[p.config.name] = d
            total_received += p.runtime.stats.received
        doc = status_doc.build(
            device=self.config.device_id, state=state or self.state, started=self.started,
            profile=self.profile.name, pipelines=pipes,
            received_per_s=self._rate.rate(total_received), dlq=self.ingress.dead_letters,
            load_errors=self.load_errors, reloads=self.reloads,
            recovered_rows=self.recovered_rows, transport=self.transport, outbox=self.outbox,
            outbox_overflow=self.egress.overflow, uplink=self.uplink, control=self.control,
            publish_errors=self.egress.publish_errors + self.ingress.dead_letters_lost)
        if isinstance(doc.get("outbox"), dict):
            doc["outbox"].update(write_errors=self.egress.write_errors,
                                 write_error=self.egress.write_error)
        doc["storage"] = {"events": self.storage_events[-5:],
                          "archive": self.ingress.archive_status()}
        return doc

    def _status_bytes(self) -> bytes:
        return json_bytes(self.status(self.state))


def _load_keys(paths: tuple[Path, ...]) -> list:
    if not paths:  # no signature checks: do not map cryptography's OpenSSL (~5 MB RSS)
        return []
    from edgeml.keys import load_public_key

    return [load_public_key(p) for p in paths]
