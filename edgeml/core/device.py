"""``edgeml run``: the device daemon, wired as named tasks in one TaskGroup.

source (MQTT) -> decode -> raw-input log -> window -> batch -> score -> rendezvous ->
answers on ``{p}/{d}/out/{pipeline}`` + every version's result into the outbox -> uplink.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from edgeml import __version__
from edgeml.config import Config, PipelineConfig
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.core.model import ModelSlot
from edgeml.core.scoring import BatchingSettings, PipelineRuntime
from edgeml.core.stats import RateMeter
from edgeml.errors import DecodeError, EdgemlError
from edgeml.topics import matches as topic_matches
from edgeml.transport.mqtt import BrokerSettings, Message, MqttClient, Publication

log = logging.getLogger("edgeml.core.device")

DLQ_PAYLOAD_COPY = 1024  # bytes of a rejected payload copied into its dead-letter record
OUTBOX_WRITE_INTERVAL_S = 0.05  # records move into SQLite in one transaction this often
OUTBOX_WRITE_MAX = 5000  # ... or as soon as this many are waiting



class _Pipe:
    """A pipeline's run-time parts: decoder/assembler in front, the runtime behind."""

    def __init__(self, cfg: PipelineConfig, runtime: PipelineRuntime, assembler: Assembler,
                 rawlog: Any) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.assembler = assembler
        self.rawlog = rawlog
        self.encode: Callable[[dict], bytes] = (
            _json_bytes if cfg.output_format == "json" else _msgpack_bytes)
        self.out_topic = ""


def _msgpack_bytes(rec: dict) -> bytes:
    return msgpack.packb(rec, use_bin_type=True, default=str)


def _json_bytes(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":"), default=str).encode()


class Daemon:
    """One device. ``await Daemon(config).run()`` until :meth:`request_stop`."""

    def __init__(self, config: Config, *, profile: Any = None,
                 reload: Callable[[], Config] | None = None) -> None:
        from edgeml.config import load_device_profile

        self.config = config
        self.profile = profile or load_device_profile(config)
        self._reload_config = reload
        self.reloads = 0
        self.started = time.time()
        self.state = "starting"
        self._stop = asyncio.Event()
        self._pipes: dict[str, _Pipe] = {}
        self._route_cache: dict[str, list[_Pipe]] = {}
        self._client: MqttClient | None = None
        self._outbox: Any = None
        self._uplink: Any = None
        self._pending_records: list[tuple[str, str, dict]] = []
        self._pending_marks: dict[str, int] = {}
        self._records_ready = asyncio.Event()
        self._stop_writer = False  # set at shutdown: the writer flushes what is left and ends
        self._outbox_pool = concurrent.futures.ThreadPoolExecutor(1, "outbox")
        self._rate = RateMeter()
        self.load_errors: list[str] = []
        self.control: Any = None  # model delivery + commands (edgeml.control.manager), when present
        self.ready = asyncio.Event()
        self.dlq_published = 0
        self.outbox_overflow = 0
        self.recovered_rows = 0

    # ---- public --------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def client(self) -> MqttClient | None:
        return self._client

    @property
    def pipelines(self) -> dict[str, PipelineRuntime]:
        return {name: p.runtime for name, p in self._pipes.items()}

    def topic(self, *parts: str) -> str:
        return self.config.topic(*parts)

    async def run(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        from edgeml.storage.models import ModelStore

        self.store = ModelStore(cfg.data_dir / "models")
        self.trusted_keys = _load_keys(cfg.trusted_keys)
        self.control = _make_control(self)
        await self._build_pipelines()
        self._open_outbox()
        will = Publication(self.topic("status"), _json_bytes(
            {"device": cfg.device_id, "state": "offline", "reason": "connection lost"}),
            qos=1, retain=True)
        manual_ack = any(p.qos > 0 for p in cfg.pipelines)
        client = MqttClient(cfg.broker, will=will, birth=self._birth, manual_ack=manual_ack)
        async with client:
            self._client = client
            uplink_client = await self._start_uplink_client()
            try:
                await self._serve(client, uplink_client)
            finally:
                if uplink_client is not None:
                    await uplink_client.close()
        self._close_storage()
        log.info("stopped")

    async def _serve(self, client: MqttClient, uplink_client: MqttClient | None) -> None:
        cfg = self.config
        subs: list[tuple[str, int]] = []
        for p in self._pipes.values():
            subs += [(t, p.cfg.qos) for t in p.cfg.subscriptions]
        if self.control is not None:
            subs += self.control.subscriptions()
        await client.subscribe(subs)
        self.state = "online"
        async with asyncio.TaskGroup() as tg:
            scorers = [tg.create_task(p.runtime.run(), name=f"score:{name}")
                       for name, p in self._pipes.items()]
            dispatch = tg.create_task(self._dispatch(client), name="dispatch")
            status = tg.create_task(self._heartbeat(client), name="status")
            fsync = tg.create_task(self._fsync_loop(), name="rawlog-fsync")
            writer = tg.create_task(self._outbox_writer(), name="outbox-writer")
            if self.control is not None:
                tg.create_task(self.control.run(), name="control")
            uplink = None
            if self._uplink is not None and uplink_client is not None:
                uplink = tg.create_task(self._uplink.run(), name="uplink")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
            if self._reload_config is not None:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signal.SIGHUP, lambda: tg.create_task(
                        self.reload(), name="reload"))
            self._recover()
            await self._publish_status(client)
            self.ready.set()
            log.info("ready: device %s, %d pipeline(s), subscribed to %s", cfg.device_id,
                     len(self._pipes), ", ".join(t for t, _ in subs))
            await self._stop.wait()
            # drain: no new input, score what was accepted, hand it all to the outbox
            log.info("stopping: draining %d queued row(s)",
                     sum(p.runtime.queue_depth for p in self._pipes.values()))
            dispatch.cancel()
            for p in self._pipes.values():
                p.runtime.stop()
            await asyncio.wait(scorers, timeout=10)
            self._records_ready.set()
            self._stop_writer = True
            await asyncio.wait([writer], timeout=10)
            if uplink is not None:
                await self._uplink_drain(timeout=2.0)
                uplink.cancel()
            fsync.cancel()
            status.cancel()
            if self.control is not None:
                self.control.stop()
            self.state = "offline"
            with contextlib.suppress(Exception):
                await client.publish(self.topic("status"), self._status_bytes("offline"),
                                     qos=1, retain=True, timeout=2)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    # ---- SIGHUP ----------------------------------------------------------------------------
    async def reload(self) -> list[str]:
        """Re-read the config file and apply what can change without dropping the stream:
        per pipeline the policy, deadline, top_n, canary settings and the model slots (new
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
        ignored = [k for k in ("device_id", "data_dir", "topic_prefix", "broker", "upstream",
                               "profile", "profile_overrides", "trusted_keys", "groups",
                               "sync", "deploy")
                   if getattr(old, k) != getattr(new, k)]
        old_names = [p.name for p in old.pipelines]
        new_names = [p.name for p in new.pipelines]
        if old_names != new_names:
            ignored.append("pipelines (added, removed or renamed)")
        live_keys = ("policy", "deadline_ms", "top_n", "models", "canary_window",
                     "canary_threshold")
        for pcfg in new.pipelines:
            pipe = self._pipes.get(pcfg.name)
            if pipe is None:
                continue
            frozen = [k for k in pcfg.__dataclass_fields__
                      if k not in live_keys and getattr(pcfg, k) != getattr(pipe.cfg, k)]
            ignored += [f"pipelines.{pcfg.name}.{k}" for k in frozen]
            # apply what can change live; keep the running value of everything else
            pcfg = dataclasses.replace(pcfg, **{k: getattr(pipe.cfg, k) for k in frozen})
            persisted = (self.control is not None
                         and self.control.initial_models(pcfg) is not pcfg.models)
            if pcfg.models != pipe.cfg.models and persisted:
                ignored.append(f"pipelines.{pcfg.name}.models (the active set pushed over MQTT "
                               "wins; use promote/rollback/retire)")
            elif pcfg.models != pipe.cfg.models:
                slots = await self.load_slots(pcfg, pcfg.models)
                if len(slots) == len(pcfg.models):
                    pipe.runtime.set_slots(slots)
                else:
                    ignored.append(f"pipelines.{pcfg.name}.models (a version failed to load; "
                                   "the running versions stay)")
                    continue
            pipe.runtime.reconfigure(pcfg)
            pipe.cfg = pcfg
        self.reloads += 1
        if ignored:
            log.warning("reloaded %s; these changes need a restart and were not applied: %s",
                        new.source, ", ".join(ignored))
        else:
            log.info("reloaded %s", new.source)
        return ignored

    # ---- start-up --------------------------------------------------------------------------
    async def _build_pipelines(self) -> None:
        from edgeml.storage.rawlog import RawLog

        disk = self.profile.disk
        batching = BatchingSettings(
            max_batch=self.profile.batching.max_batch,
            max_wait_ms=self.profile.batching.max_wait_ms,
            queue_limit=self.profile.queue.max_messages,
            queue_policy=self.profile.queue.policy,
        )
        for pcfg in self.config.pipelines:
            # the persisted active set (after pushes/promotions) wins over the config file
            models = self.control.initial_models(pcfg) if self.control else pcfg.models
            slots = await self.load_slots(pcfg, models)
            runtime = PipelineRuntime(pcfg, emitter=self, batching=batching)
            runtime.set_slots(slots)
            if self.control is not None:
                self.control.configure(runtime)  # restores a persisted policy
            n_features = None
            if pcfg.field is not None and slots:
                n_features = slots[0].manifest.input.n_features
            assembler = Assembler(Decoder.from_pipeline(pcfg, n_features), pcfg.window)
            rawlog = RawLog(
                self.config.data_dir / "rawlog" / pcfg.name,
                segment_bytes=disk.rawlog_segment_bytes, budget_bytes=disk.rawlog_budget_bytes,
                max_age_s=disk.rawlog_max_age_s, fsync_interval_s=disk.fsync_interval_s,
            )
            pipe = _Pipe(pcfg, runtime, assembler, rawlog)
            pipe.out_topic = self.topic("out", pcfg.name)
            self._pipes[pcfg.name] = pipe

    async def load_slots(self, pcfg: PipelineConfig, models) -> list[ModelSlot]:
        """Load (and install, when a bundle file is given) every model; failures are logged,
        counted in status and leave the other versions running."""
        async def one(m) -> ModelSlot | None:
            try:
                return await asyncio.to_thread(self._load_slot, pcfg, m)
            except EdgemlError as exc:
                msg = f"pipeline {pcfg.name}: {m.name} {m.version} not loaded: {exc}"
                log.error("%s", msg)
                self.load_errors.append(msg)
                return None
        loaded = await asyncio.gather(*(one(m) for m in models))
        return [s for s in loaded if s is not None]

    def _load_slot(self, pcfg: PipelineConfig, m) -> ModelSlot:
        if m.bundle is not None:
            installed = self.store.install(m.bundle, trusted_keys=self.trusted_keys)
            if (installed.name, installed.version) != (m.name, m.version):
                raise EdgemlError(f"bundle {m.bundle} holds {installed.name} "
                                  f"{installed.version}, not {m.name} {m.version}")
        else:
            installed = self.store.get(m.name, m.version)
        check_compatible(pcfg, installed.manifest)
        slot = ModelSlot.from_installed(installed, role=m.role, priority=m.priority,
                                        profile=self.profile)
        slot.load()
        return slot

    def _open_outbox(self) -> None:
        if not self.config.sync.enabled:
            return
        from edgeml.storage.outbox import Outbox

        self._outbox = Outbox(self.config.data_dir / "outbox" / "outbox.db",
                              budget_bytes=self.profile.disk.outbox_budget_bytes,
                              fsync_interval_s=self.profile.disk.fsync_interval_s)

    async def _start_uplink_client(self) -> MqttClient | None:
        if self._outbox is None:
            return None
        from edgeml.core.uplink import Uplink

        cfg = self.config
        settings = cfg.upstream or _derive_uplink_settings(cfg.broker)
        # the upstream may be away at start: the outbox holds everything meanwhile
        client = MqttClient(settings, require_connection=False)
        await client.__aenter__()
        s = cfg.sync
        self._uplink = Uplink(
            self._outbox, client, topic_prefix=cfg.topic_prefix, device_id=cfg.device_id,
            batch_max_records=s.batch_max_records, batch_max_wait_s=s.batch_max_wait_s,
            bandwidth_bytes_per_s=s.bandwidth_bytes_per_s,
        )
        return client

    async def _uplink_drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._outbox.stats()["backlog"]:
                return
            self._uplink.notify()
            await asyncio.sleep(0.05)

    def _close_storage(self) -> None:
        for p in self._pipes.values():
            p.runtime.close()
            with contextlib.suppress(Exception):
                p.rawlog.sync()
            p.rawlog.close()
        self._outbox_pool.shutdown(wait=True)
        if self._outbox is not None:
            self._outbox.close()

    def _recover(self) -> None:
        """Score again what was accepted (acknowledged, archived) but whose answers never
        reached the outbox: a kill -9 or power cut between the raw-input log and the outbox.
        The outbox's high-water mark per pipeline says where to resume; records it already
        holds are ignored by id. Without an outbox there is nothing durable to resume from."""
        if self._outbox is None:
            return
        marks = self._outbox.marks()
        fresh: dict[str, int] = {}
        for name, pipe in self._pipes.items():
            last = pipe.rawlog.next_seq - 1
            mark = marks.get(name)
            if mark is None:  # first start with this outbox: nothing before now is owed
                fresh[name] = last
                continue
            if mark >= last:
                continue
            assembler = Assembler(pipe.assembler.decoder, pipe.cfg.window)
            rows = []
            for rec in pipe.rawlog.read(start_seq=mark + 1):
                try:
                    rows += assembler.feed(rec.topic, rec.payload, rec.seq, rec.received)
                except DecodeError:
                    continue  # it was dead-lettered when it arrived
            log.warning("pipeline %s: re-scoring %d row(s) from %d archived message(s) after "
                        "seq %d that never reached the outbox (unclean stop)", name, len(rows),
                        last - mark, mark)
            if rows:
                pipe.runtime.enqueue(rows)
            self.recovered_rows += len(rows)
        if fresh:
            self._outbox.put_many([], marks=fresh)

    # ---- the data path ---------------------------------------------------------------------
    async def _dispatch(self, client: MqttClient) -> None:
        async for msgs in client.batches(1024):
            try:
                self.handle_messages(client, msgs)
            except Exception:  # never let one burst take the daemon down
                log.exception("dispatch failed for a burst of %d message(s)", len(msgs))
                for m in msgs:
                    client.ack(m)

    def handle_messages(self, client: MqttClient, msgs: list[Message]) -> None:
        per_pipe: dict[str, list[tuple[Message, Any]]] = {}
        for m in msgs:
            pipes = self._route(m.topic)
            if not pipes:
                if self.control is not None and self.control.handles(m.topic):
                    self.control.submit(m)
                continue
            for pipe in pipes:
                st = pipe.runtime.stats
                st.received += 1
                try:
                    decoded = pipe.assembler.decoder.decode(m.payload)
                except DecodeError as exc:
                    st.rejected += 1
                    st.rejected_by_reason[exc.reason] += 1
                    self._dead_letter(client, pipe.cfg.name, m, exc)
                    continue
                per_pipe.setdefault(pipe.cfg.name, []).append((m, decoded))
        for name, items in per_pipe.items():
            pipe = self._pipes[name]
            seqs = pipe.rawlog.append_many([(m.topic, m.payload, m.received) for m, _ in items])
            rows = []
            for (m, decoded), seq in zip(items, seqs, strict=True):
                rows += pipe.assembler.feed_decoded(m.topic, decoded, seq, m.received)
            pipe.runtime.stats.accepted += len(items)
            if rows:
                pipe.runtime.enqueue(rows)
        for m in msgs:  # acknowledged only now: accepted input is in the raw-input log
            client.ack(m)

    def _route(self, topic: str) -> list[_Pipe]:
        hit = self._route_cache.get(topic)
        if hit is None:
            hit = [p for p in self._pipes.values()
                   if any(topic_matches(f, topic) for f in p.cfg.topics)]
            if len(self._route_cache) > 50_000:
                self._route_cache.clear()
            self._route_cache[topic] = hit
        return hit

    def _dead_letter(self, client: MqttClient, pipeline: str, m: Message,
                     exc: DecodeError) -> None:
        copy = m.payload[:DLQ_PAYLOAD_COPY]
        rec = {
            "device": self.config.device_id, "pipeline": pipeline, "topic": m.topic,
            "reason": exc.reason, "detail": exc.detail, "ts": m.received,
            "payload_bytes": len(m.payload), "truncated": len(m.payload) > len(copy),
            "payload_b64": base64.b64encode(copy).decode(),
        }
        client.publish_nowait(self.topic("dlq"), _json_bytes(rec), qos=1)
        self.dlq_published += 1
        log.info("dead letter from %s: %s", m.topic, exc)

    # ---- Emitter (called by the pipelines) --------------------------------------------------
    def answers(self, pipeline: str, records: list[dict]) -> None:
        pipe = self._pipes[pipeline]
        client = self._client
        if client is not None:
            topic, qos, encode = pipe.out_topic, pipe.cfg.output_qos, pipe.encode
            for rec in records:
                client.publish_nowait(topic, encode(rec), qos)
            pipe.runtime.stats.published += len(records)
        if self._outbox is not None:
            dev = self.config.device_id
            self._queue_records([
                ("outputs", _record_id(dev, rec, "outputs"), rec) for rec in records])
            if records:  # answers go out in input order: all up to here are queued
                self._pending_marks[pipeline] = records[-1]["input_seq"]

    def results(self, pipeline: str, records: list[dict]) -> None:
        if self._outbox is not None and self.config.sync.record_results:
            dev = self.config.device_id
            self._queue_records([
                ("results", _record_id(dev, rec, "results"), rec) for rec in records])

    def alert(self, pipeline: str, kind: str, detail: dict) -> None:
        rec = {"device": self.config.device_id, "pipeline": pipeline, "kind": kind,
               "ts": time.time(), **detail}
        if self._client is not None:
            self._client.publish_nowait(self.topic("alerts"), _json_bytes(rec), qos=1)
        if self._outbox is not None:
            rid = f"{self.config.device_id}/{pipeline}/alert/{kind}/{rec['ts']:.6f}"
            self._queue_records([("alerts", rid, rec)])

    def deploy_event(self, event: dict) -> None:
        """A deployment outcome (active, failed, noop, rolled_back, watch_passed) for the
        outbox's ``deploy`` stream, so upstream keeps a history of what ran where."""
        if self._outbox is None:
            return
        rec = {"device": self.config.device_id, **event}
        from edgeml.storage.outbox import record_id

        rid = record_id(self.config.device_id, str(event.get("pipeline")),
                        f"{event.get('stage')}@{event.get('ts', 0):.6f}",
                        str(event.get("name")), str(event.get("version")), "deploy")
        self._queue_records([("deploy", rid, rec)])

    def _queue_records(self, items: list[tuple[str, str, dict]]) -> None:
        pending = self._pending_records
        pending.extend(items)
        if len(pending) > 200_000:  # the writer thread is far behind: bound memory, count it
            drop = len(pending) - 200_000
            del pending[:drop]
            self.outbox_overflow += drop
        self._records_ready.set()

    async def _outbox_writer(self) -> None:
        """Moves queued records into SQLite on one worker thread, a transaction per burst."""
        loop = asyncio.get_running_loop()
        while True:
            await self._records_ready.wait()
            if not self._stop_writer and len(self._pending_records) < OUTBOX_WRITE_MAX:
                # one transaction per ~50 ms, not per scored batch: a commit costs far more
                # than a row. Nothing is at risk meanwhile: after a crash the daemon re-scores
                # from the raw-input log past the outbox's high-water mark.
                await asyncio.sleep(OUTBOX_WRITE_INTERVAL_S)
            self._records_ready.clear()
            if self._pending_records or self._pending_marks:
                items, self._pending_records = self._pending_records, []
                marks, self._pending_marks = self._pending_marks, {}
                try:
                    await loop.run_in_executor(self._outbox_pool, functools.partial(
                        self._outbox.put_many, items, marks=marks))
                except Exception:
                    log.exception("outbox write of %d record(s) failed", len(items))
                if self._uplink is not None:
                    self._uplink.notify()
            if self._stop_writer and not self._pending_records:
                return

    async def _fsync_loop(self) -> None:
        interval = self.profile.disk.fsync_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for p in list(self._pipes.values()):
                try:
                    await asyncio.to_thread(p.rawlog.sync)
                except Exception:
                    log.exception("raw-input log fsync failed for %s", p.cfg.name)

    # ---- status ----------------------------------------------------------------------------
    def publish_status_soon(self) -> None:
        """Publish the retained status now (after a deployment or command), not at the next
        heartbeat, so ``edgeml status`` shows the change at once."""
        if self._client is not None:
            self._client.publish_nowait(self.topic("status"), self._status_bytes(self.state),
                                        qos=1, retain=True)

    async def _heartbeat(self, client: MqttClient) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            await self._publish_status(client)

    async def _publish_status(self, client: MqttClient) -> None:
        try:
            payload = self._status_bytes(self.state)
            client.publish_nowait(self.topic("status"), payload, qos=1, retain=True)
        except Exception:
            log.exception("status report failed")

    def _birth(self) -> list[Publication]:
        return [Publication(self.topic("status"), self._status_bytes(
            "online" if self.state != "starting" else "starting"), qos=1, retain=True)]

    def status(self, state: str | None = None) -> dict:
        pipes = {}
        total_received = 0
        for name, p in self._pipes.items():
            d = p.runtime.status()
            d["rawlog"] = _safe(lambda p=p: p.rawlog.stats)
            d["windows_pending"] = p.assembler.pending_topics
            pipes[name] = d
            total_received += p.runtime.stats.received
        status: dict[str, Any] = {
            "device": self.config.device_id, "state": state or self.state, "ts": time.time(),
            "uptime_s": round(time.time() - self.started, 3), "edgeml": __version__,
            "profile": self.profile.name, "pid": os.getpid(),
            "received_per_s": self._rate.rate(total_received), "pipelines": pipes,
            "dlq": self.dlq_published, "load_errors": self.load_errors[-10:],
            "reloads": self.reloads, "recovered_rows": self.recovered_rows,
        }
        if self._client is not None:
            status["mqtt"] = {"connected": self._client.connected,
                              "connects": self._client.connects,
                              "disconnects": self._client.disconnects}
        if self._outbox is not None:
            status["outbox"] = _safe(self._outbox.stats)  # in-memory counters, cheap
            status["outbox"]["overflow_dropped"] = self.outbox_overflow
        if self._uplink is not None:
            status["uplink"] = _safe(lambda: self._uplink.stats)
        if self.control is not None:
            status["deploy"] = _safe(self.control.status)
        return status

    def _status_bytes(self, state: str) -> bytes:
        return _json_bytes(self.status(state))


def _make_control(daemon: Daemon) -> Any:
    """Model delivery and device commands (edgeml.control.manager), when this build has them."""
    try:
        from edgeml.control.manager import Control
    except ImportError as exc:
        if exc.name != "edgeml.control.manager":
            raise
        return None
    return Control(daemon)


def check_compatible(pcfg: PipelineConfig, manifest: Any) -> None:
    """Refuse a model whose input does not fit the pipeline (count, names, window)."""
    spec = manifest.input
    who = f"{manifest.name} {manifest.version}"
    if pcfg.features is not None and len(pcfg.features) != len(spec.features):
        raise EdgemlError(f"{who} takes {len(spec.features)} features per sample; pipeline "
                          f"{pcfg.name} gives {len(pcfg.features)}")
    if pcfg.features is not None and tuple(pcfg.features) != tuple(spec.features):
        log.warning("%s: feature names %s differ from the pipeline's %s (taken by position)",
                    who, list(spec.features), list(pcfg.features))
    want = pcfg.window.size if pcfg.window else None
    if (spec.window or None) != want:
        raise EdgemlError(f"{who} expects windows of {spec.window or 1} sample(s); pipeline "
                          f"{pcfg.name} makes {want or 1}")


def _record_id(device: str, rec: dict, stream: str) -> str:
    """The outbox's stable id; ``input_seq.row`` when one message made several rows."""
    from edgeml.storage.outbox import record_id

    row = rec.get("row")
    pos = f"{rec['input_seq']}.{row}" if row else rec["input_seq"]
    return record_id(device, rec["pipeline"], pos, rec["model"], rec["version"], stream)


def _derive_uplink_settings(broker: BrokerSettings) -> BrokerSettings:
    from dataclasses import replace

    return replace(broker, client_id=f"{broker.client_id}-uplink")


def _load_keys(paths: tuple[Path, ...]) -> list:
    if not paths:  # no signature checks: do not map cryptography's OpenSSL (~5 MB RSS)
        return []
    from edgeml.keys import load_public_key

    return [load_public_key(p) for p in paths]


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return {"error": str(exc)}
