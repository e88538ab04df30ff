"""Synced batches from NATS JetStream: a durable pull consumer that several collectors share.

Devices speak MQTT 3.1.1 to NATS's MQTT listener; NATS maps the topic
``{p}/{d}/sync/{stream}`` to the subject ``{p}.{d}.sync.{stream}`` (a ``.`` inside a topic
level becomes ``//``). Where the consumer reads, chosen by the URL's ``from`` parameter:

- ``from=mqtt`` (the default): the MQTT layer's own stream ``$MQTT_msgs``, filtered to
  ``$MQTT.msgs.{p}.*.sync.>``. NATS stores a device's QoS 1 publish there *before* it sends
  the PUBACK, so every record a device saw acknowledged is in it. The stream keeps a message
  while some consumer still wants it (interest retention): the durable consumer must exist
  before devices sync (the MQTT layer creates the stream when the first MQTT client connects;
  the source waits for it).
- ``from=stream``: a stream of our own on ``{p}.*.sync.>`` (``stream=NAME``, default
  ``EDGEML_SYNC``), created if missing with 3 replicas in a cluster, 1 on a single server. The
  MQTT layer hands it a plain publish after acknowledging the device, so what arrives while
  the stream does not exist or has no leader (a node lost) is gone: measured, see
  docs/fleet.md.

Messages are acknowledged only when the collector calls the delivery's ``ack`` (after its
commit); anything not acknowledged within ``ack_wait_s`` is delivered again, to this or
another collector of the same durable (``group``). The collector drops duplicates by
``record_id``.

URL: ``nats://HOST:PORT[,HOST:PORT...][?from=mqtt|stream&stream=NAME]``; a user and password
in the URL (or ``username``/``password``) are passed to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from edgeml.errors import ConfigError, TransportError
from edgeml.host.collect.source import Delivery

log = logging.getLogger("edgeml.host.collect.nats")

MQTT_STREAM = "$MQTT_msgs"
MQTT_SUBJECT_PREFIX = "$MQTT.msgs."
DEFAULT_STREAM = "EDGEML_SYNC"
DEFAULT_DURABLE = "edgeml-collect"
FROM = ("mqtt", "stream")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: JetStream's answer when a stream asks for more replicas than there are servers
_NOT_CLUSTERED = (10074, 10023)


def topic_to_subject(topic: str) -> str:
    """NATS's MQTT mapping: ``/`` separates tokens, a ``.`` inside a level becomes ``//``."""
    return ".".join(level.replace(".", "//") for level in topic.split("/"))


def subject_to_topic(subject: str) -> str:
    """The inverse of :func:`topic_to_subject`: ``//`` is a ``.`` inside a level."""
    out = []
    i = 0
    while i < len(subject):
        if subject.startswith("//", i):
            out.append(".")
            i += 2
        elif subject[i] == ".":
            out.append("/")
            i += 1
        else:
            out.append(subject[i])
            i += 1
    return "".join(out)


def parse_nats_url(url: str) -> tuple[list[str], dict[str, str]]:
    """``nats://h1:4222,h2:4222?from=mqtt`` -> (server URLs, options)."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls"):
        raise ConfigError(f"must be nats://HOST:PORT, not {url!r}", key="--source")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    servers = []
    for host in hosts.split(","):
        if not host:
            raise ConfigError(f"no host in {url!r}", key="--source")
        servers.append(f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{host}")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(opts) - {"from", "stream"}
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in {url!r} "
                          "(known: from, stream)", key="--source")
    return servers, opts


class NatsSource:
    """``async with NatsSource(url, prefix=..., group=...) as src:
    async for d in src.deliveries(): ...``"""

    def __init__(self, url: str, *, prefix: str = "edgeml", group: str | None = None,
                 from_: str | None = None, stream: str | None = None,
                 replicas: int | None = None, max_batch: int = 256, ack_wait_s: float = 30.0,
                 max_ack_pending: int = 10_000, username: str | None = None,
                 password: str | None = None) -> None:
        servers, opts = parse_nats_url(url)
        self.url = url
        self.name = url
        self.servers = servers
        self.prefix = prefix
        self.mode = from_ or opts.get("from", "mqtt")
        if self.mode not in FROM:
            raise ConfigError(f"from must be mqtt or stream, not {self.mode!r}",
                              key="--source")
        self.durable = group or DEFAULT_DURABLE
        if not _NAME.match(self.durable):
            raise ConfigError(f"a NATS durable consumer name is 1-64 of A-Z a-z 0-9 _ -, "
                              f"not {self.durable!r}", key="--group")
        subjects = f"{topic_to_subject(prefix)}.*.sync.>"
        if self.mode == "mqtt":
            self.stream = MQTT_STREAM
            self.filter = MQTT_SUBJECT_PREFIX + subjects
        else:
            self.stream = stream or opts.get("stream", DEFAULT_STREAM)
            if not _NAME.match(self.stream):
                raise ConfigError(f"a stream name is 1-64 of A-Z a-z 0-9 _ -, "
                                  f"not {self.stream!r}", key="--source")
            self.filter = subjects
        self.subjects = subjects
        self.replicas = replicas
        self._auth = {"user": username, "password": password} if username else {}
        self.max_batch = max_batch
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self._nc: nats.NATS | None = None
        self._sub = None
        self._closing = False
        self.received = 0
        self.errors = 0
        self.last_error: str | None = None

    # ---- connecting ---------------------------------------------------------------------
    async def __aenter__(self) -> NatsSource:
        try:
            self._nc = await nats.connect(
                servers=self.servers, name=f"edgeml-collect-{self.durable}",
                max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                connect_timeout=5, allow_reconnect=True,
                disconnected_cb=self._disconnected, reconnected_cb=self._reconnected,
                error_cb=self._error_cb, **self._auth)
        except Exception as exc:  # nats-py raises several kinds; one clear error here
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            await self._ensure()
        except BaseException:
            await self._nc.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        if self._nc is not None:
            # acks sent so far go out first; anything not acknowledged is redelivered
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()

    async def _disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from %s; reconnecting", self.url)

    async def _reconnected(self) -> None:
        log.info("reconnected to %s", self._nc.connected_url.netloc if self._nc else self.url)

    async def _error_cb(self, exc: Exception) -> None:
        self._note(f"{type(exc).__name__}: {exc}")

    def _note(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.warning("%s: %s", self.url, message)

    async def _ensure(self, timeout: float = 60.0) -> None:
        """The stream (made if missing), the durable consumer, then the pull subscription
        bound to it."""
        assert self._nc is not None
        js = self._nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        waited = False
        while True:
            try:
                await self._make_stream(js)
                break
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                    nats.errors.NoRespondersError) as exc:  # no JetStream leader yet
                if not waited:
                    log.warning("waiting for JetStream on %s: %s", self.url,
                                type(exc).__name__)
                    waited = True
            if asyncio.get_running_loop().time() > deadline:
                raise TransportError(f"{self.url}: stream {self.stream} not available "
                                     f"within {timeout:g} s")
            await asyncio.sleep(0.5)
        config = ConsumerConfig(
            durable_name=self.durable, filter_subject=self.filter,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s, max_ack_pending=self.max_ack_pending,
            max_waiting=512)
        try:
            await js.add_consumer(self.stream, config)
        except nats.js.errors.APIError as exc:
            # exists with other settings (another collector of an older release): use it
            log.info("durable consumer %s on %s exists (%s); using it", self.durable,
                     self.stream, exc.description)
        self._sub = await js.pull_subscribe_bind(self.durable, self.stream)

    def _stream_config(self, replicas: int) -> StreamConfig:
        if self.mode == "mqtt":
            # exactly what NATS's MQTT layer makes when its first client connects (it then
            # uses this one): made first, no acknowledged publish can find it missing
            return StreamConfig(name=MQTT_STREAM, subjects=[MQTT_SUBJECT_PREFIX + ">"],
                                retention=RetentionPolicy.INTEREST, storage=StorageType.FILE,
                                num_replicas=replicas)
        return StreamConfig(name=self.stream, subjects=[self.subjects], num_replicas=replicas)

    async def _make_stream(self, js) -> None:
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        else:
            if self.mode == "stream" and self.subjects not in (info.config.subjects or []):
                raise ConfigError(f"stream {self.stream} exists without subject "
                                  f"{self.subjects} (has {info.config.subjects})",
                                  key="--source")
            return
        for replicas in ([self.replicas] if self.replicas else [3, 1]):
            try:
                config = self._stream_config(replicas)
                await js.add_stream(config)
                log.info("created stream %s on %s with %d replica(s)", self.stream,
                         config.subjects[0], replicas)
                return
            except nats.js.errors.APIError as exc:
                if exc.err_code in _NOT_CLUSTERED and replicas > 1 and not self.replicas:
                    continue
                if exc.err_code == 10058:  # name in use: another collector made it just now
                    return
                raise TransportError(f"cannot create stream {self.stream}: "
                                     f"{exc.description}") from exc

    # ---- receiving ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def stats(self) -> dict:
        return {"source": self.name, "stream": self.stream, "filter": self.filter,
                "durable": self.durable, "connected": self.connected,
                "received": self.received, "errors": self.errors,
                "last_error": self.last_error}

    def _delivery(self, msg) -> Delivery:
        subject = msg.subject
        if subject.startswith(MQTT_SUBJECT_PREFIX):
            subject = subject[len(MQTT_SUBJECT_PREFIX):]
        done = False

        async def ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            try:
                await msg.ack()
            except Exception as exc:  # lost: redelivered after ack_wait, dropped as duplicate
                self._note(f"ack failed ({type(exc).__name__}: {exc}); it will be "
                           "delivered again")

        return Delivery(subject_to_topic(subject), msg.data, ack, self.name)

    async def deliveries(self) -> AsyncIterator[Delivery]:
        assert self._sub is not None, "enter the source first"
        backoff = 0.2
        while not self._closing:
            try:
                msgs = await self._sub.fetch(self.max_batch, timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue  # nothing waiting
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # leader election, reconnect: try again
                if self._closing:
                    return
                self._note(f"fetch: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            for msg in msgs:
                self.received += 1
                yield self._delivery(msg)
