"""The host side of model delivery: push bundles, send commands, read the fleet's status.

``async with Fleet(broker_url) as fleet`` opens one MQTT connection (a clean session: the CLI
leaves nothing behind on the broker but the retained group deployments it means to leave).
Every operation subscribes before it publishes on the same connection, so no reply can be
missed; :meth:`Fleet.sync` is a round trip through the broker that guarantees every retained
message for the subscriptions made so far has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml.control.protocol import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TRANSFER_TIMEOUT_S,
    FINAL_STAGES,
    PushPlan,
    chunk_topic,
    deploy_topic,
    plan_push,
    unframe,
)
from edgeml.errors import DeployError, FleetTimeout, TransportError
from edgeml.topics import matches as topic_matches
from edgeml.transport.base import Message
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_PREFIX = "edgeml"




@dataclass(frozen=True)
class PushResult:
    """What came back from one push. ``final`` maps device -> its last report (active, noop
    or failed); ``expected`` are the group members that were online when the push began."""

    plan: PushPlan
    target: str
    group: bool
    reports: tuple[dict, ...]
    final: dict[str, dict]
    expected: tuple[str, ...] = ()
    timed_out: bool = False

    @property
    def failed(self) -> dict[str, dict]:
        return {d: r for d, r in self.final.items() if r.get("stage") == "failed"}

    @property
    def waiting_for(self) -> tuple[str, ...]:
        """Expected devices (or the one device) with no final report."""
        want = self.expected if self.group else (self.target,)
        return tuple(d for d in want if d not in self.final)

    @property
    def exit_code(self) -> int:
        """0: every device that finished is active or noop (and one did; for a group, every
        member that was online too); 1: a device reported failed; 2: timed out."""
        if self.failed:
            return 1
        if not self.final or self.waiting_for:
            return 2
        return 0


@dataclass
class _Listener:
    filters: tuple[str, ...]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Fleet:
    """One connection to the devices' broker, for the host-side verbs."""

    def __init__(self, broker: str | BrokerSettings = DEFAULT_BROKER, *,
                 topic_prefix: str = DEFAULT_PREFIX, client_id: str | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        if isinstance(broker, BrokerSettings):
            self.settings = broker
        else:
            self.settings = BrokerSettings(
                url=broker, client_id=client_id or f"edgeml-cli-{secrets.token_hex(4)}",
                clean_start=True, connect_timeout_s=connect_timeout_s)
        self.prefix = topic_prefix
        self._client: MqttTransport | None = None
        self._listeners: list[_Listener] = []
        self._subscribed: set[str] = set()
        self._reader: asyncio.Task | None = None
        self._sync_topic = f"{topic_prefix}/_fleet/{self.settings.client_id or 'cli'}"
        self._status_filter = f"{topic_prefix}/+/status"
        # retained messages come once per SUBSCRIBE: keep the latest status of every device
        # for as long as we are subscribed, so a second statuses() call sees them too
        self._status_cache: dict[str, dict] = {}

    async def __aenter__(self) -> Fleet:
        self._client = MqttTransport(self.settings)
        await self._client.__aenter__()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self._subscribe([self._sync_topic])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> MqttTransport:
        if self._client is None:
            raise TransportError("Fleet is not connected; use 'async with Fleet(...)'")
        return self._client

    # ---- plumbing -------------------------------------------------------------------------
    async def _read(self) -> None:
        async for m in self.client.messages():
            if topic_matches(self._status_filter, m.topic):
                dev, doc = _status_doc(m)
                if dev is not None:
                    self._status_cache[dev] = doc
            for lst in list(self._listeners):
                if any(topic_matches(f, m.topic) for f in lst.filters):
                    lst.queue.put_nowait(m)

    async def _subscribe(self, filters: list[str]) -> None:
        new = [f for f in filters if f not in self._subscribed]
        if new:
            await self.client.subscribe([(f, 1) for f in new])
            self._subscribed.update(new)

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False,
                       timeout: float = 30.0) -> None:
        """QoS 1, one at a time: each waits for its PUBACK before the next goes out. (Order
        is kept, and MqttTransport is never asked to track two acknowledgements at once.)"""
        try:
            await self.client.publish(topic, payload, qos=1, retain=retain, timeout=timeout)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise FleetTimeout(f"the broker did not acknowledge a publish to {topic} within "
                               f"{timeout:g} s") from exc

    @contextlib.asynccontextmanager
    async def listen(self, *filters: str) -> AsyncIterator[asyncio.Queue]:
        """Messages on ``filters`` while the block runs (retained ones included)."""
        lst = _Listener(filters)
        self._listeners.append(lst)
        try:
            await self._subscribe(list(filters))
            yield lst.queue
        finally:
            self._listeners.remove(lst)

    async def sync(self, timeout: float = 10.0) -> None:
        """A round trip through the broker: afterwards every retained message of the
        subscriptions made so far has been delivered (one connection keeps order)."""
        nonce = secrets.token_hex(8).encode()
        async with self.listen(self._sync_topic) as q:
            await self._publish(self._sync_topic, nonce, timeout=timeout)
            deadline = time.monotonic() + timeout
            while True:
                m = await _get(q, deadline, "the broker did not echo a sync message")
                if m.payload == nonce:
                    return

    # ---- status -----------------------------------------------------------------------------
    async def statuses(self, timeout: float = 10.0) -> dict[str, dict]:
        """The retained status of every device that ever reported, by device id."""
        await self._subscribe([self._status_filter])
        await self.sync(timeout)
        return dict(self._status_cache)

    async def watch_statuses(self) -> AsyncIterator[tuple[str, dict]]:
        """Every status report as it comes: the retained ones first, then live updates."""
        async with self.listen(self._status_filter) as q:
            for dev, doc in list(self._status_cache.items()):
                yield dev, doc
            while True:
                dev, doc = _status_doc(await q.get())
                if dev is not None:
                    yield dev, doc

    # ---- push -------------------------------------------------------------------------------
    async def push(self, bundle: Path | bytes, *, device: str | None = None,
                   group: str | None = None, pipeline: str | None = None,
                   role: str = "challenger", priority: int | None = None,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, timeout: float = 60.0,
                   transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
                   force: bool = False,
                   on_report: Callable[[dict], None] | None = None) -> PushResult:
        """Publish a bundle to a device or a group and collect the devices' stage reports
        until every device finished (or ``timeout``). Group pushes are retained."""
        from edgeml.bundle import read_bundle

        if (device is None) == (group is None):
            raise DeployError("received", "give exactly one of device or group")
        data = bundle if isinstance(bundle, bytes) else _read_file(bundle)
        manifest = read_bundle(data).manifest  # a broken bundle fails here, not on devices
        base = deploy_topic(self.prefix, device=device, group=group)
        plan = plan_push(data, base=base, name=manifest.name, version=manifest.version,
                         pipeline=pipeline, role=role, priority=priority,
                         chunk_size=chunk_size, timeout_s=transfer_timeout_s, force=force)
        status_filter = f"{self.prefix}/{device or '+'}/deploy/status"
        expected: tuple[str, ...] = ()
        old_chunks: list[str] = []
        async with self.listen(status_filter) as reports:
            if group is not None:
                expected, old_chunks = await self._group_before_push(group, base, plan)
            retain = group is not None
            for t, p in plan.messages:
                await self._publish(t, p, retain=retain, timeout=timeout)
            for t in old_chunks:  # retained chunks of the push this one replaces
                await self._publish(t, b"", retain=True, timeout=timeout)
            return await self._collect(plan, reports, device or group or "", group is not None,
                                       expected, timeout, on_report)

    async def _group_before_push(self, group: str, base: str,
                                 plan: PushPlan) -> tuple[tuple[str, ...], list[str]]:
        """The group's online members (from their retained status) and the retained chunk
        topics of the previous group push (cleared once the new one is out)."""
        old: list[str] = []
        await self._subscribe([self._status_filter])
        async with self.listen(base) as q:
            await self.sync()
            while not q.empty():
                old = _previous_chunks(base, q.get_nowait().payload, plan)
        members = [dev for dev, doc in self._status_cache.items()
                   if doc.get("state") == "online"
                   and group in ((doc.get("deploy") or {}).get("groups") or [])]
        return tuple(sorted(members)), old

    async def _collect(self, plan: PushPlan, q: asyncio.Queue, target: str, group: bool,
                       expected: tuple[str, ...], timeout: float,
                       on_report: Callable[[dict], None] | None) -> PushResult:
        reports: list[dict] = []
        final: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            if not group and target in final:
                break
            if group and expected and all(d in final for d in expected):
                break
            try:
                m = await _get(q, deadline, "")
            except FleetTimeout:
                timed_out = True
                break
            try:
                doc = json.loads(m.payload)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(doc, dict) or doc.get("transfer") != plan.header.transfer:
                continue
            dev = str(doc.get("device") or m.topic.split("/")[-3])
            reports.append(doc)
            if on_report is not None:
                on_report(doc)
            if doc.get("stage") in FINAL_STAGES:
                final[dev] = doc
        return PushResult(plan, target, group, tuple(reports), final, expected, timed_out)

    async def clear_group(self, group: str) -> int:
        """Remove a group's retained deployment (header and chunks); returns topics cleared."""
        base = deploy_topic(self.prefix, group=group)
        topics: list[str] = []
        async with self.listen(base, f"{base}/chunk/#") as q:
            await self.sync()
            while not q.empty():
                m = q.get_nowait()
                if m.payload:
                    topics.append(m.topic)
        for t in topics:
            await self._publish(t, b"", retain=True)
        return len(topics)

    # ---- commands ---------------------------------------------------------------------------
    async def command(self, device: str, cmd: str, *, pipeline: str | None = None,
                      model: str | None = None, version: str | None = None,
                      policy: str | None = None, timeout: float = 10.0,
                      sign_key: Any = None, extra: dict | None = None) -> dict:
        """Send one command and wait for its reply (a dict with ``ok`` and ``message``).
        Raises FleetTimeout when no reply comes; the command carries a deadline, so a device
        that gets it later (it was offline) does not carry it out. With ``sign_key`` (an
        Ed25519 private key) the command names its device, carries a counter (host time in
        ns) and an expiry, and is signed (:mod:`edgeml.control.signing`)."""
        rid = secrets.token_hex(8)
        doc: dict[str, Any] = {"id": rid, "cmd": cmd, "deadline": time.time() + timeout}
        for k, v in (("pipeline", pipeline), ("model", model), ("version", version),
                     ("policy", policy)):
            if v is not None:
                doc[k] = v
        doc.update(extra or {})
        if sign_key is not None:
            from edgeml.control.signing import sign_command

            doc = sign_command({**doc, "device": device}, sign_key,
                               expires_in_s=max(timeout, 1.0) + 60.0)
        async with self.listen(f"{self.prefix}/{device}/cmd/reply") as q:
            await self._publish(f"{self.prefix}/{device}/cmd", json.dumps(doc).encode(),
                                timeout=timeout)
            deadline = time.monotonic() + timeout
            while True:
                m = await _get(q, deadline, f"no reply from {device} within {timeout:g} s "
                                            "(is it online? `edgeml status`)")
                try:
                    reply = json.loads(m.payload)
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(reply, dict) and reply.get("id") == rid:
                    return reply


async def _get(q: asyncio.Queue, deadline: float, what: str) -> Any:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FleetTimeout(what or "timed out")
    try:
        return await asyncio.wait_for(q.get(), remaining)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise FleetTimeout(what or "timed out") from exc


def _status_doc(m: Message) -> tuple[str | None, dict]:
    try:
        doc = json.loads(m.payload)
    except (ValueError, UnicodeDecodeError):
        return None, {}
    if not isinstance(doc, dict):
        return None, {}
    return str(doc.get("device") or m.topic.split("/")[-2]), doc


def _previous_chunks(base: str, payload: bytes, plan: PushPlan) -> list[str]:
    if not payload:
        return []
    try:
        meta, _ = unframe(payload)
    except DeployError:
        return []
    transfer, chunks = meta.get("transfer"), meta.get("chunks")
    if meta.get("kind") != "header" or not isinstance(transfer, str) or \
            transfer == plan.header.transfer or not isinstance(chunks, int) or \
            not 0 < chunks <= 100_000:
        return []
    return [chunk_topic(base, transfer, i) for i in range(chunks)]


def _read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeployError("received", f"cannot read {path}: {exc.strerror or exc}") from exc

