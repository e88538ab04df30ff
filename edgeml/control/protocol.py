"""The deploy wire format and chunk reassembly, shared by ``edgeml push`` and the device.

Pure logic, no MQTT and no clock of its own (the clock is injected), so every refusal is
testable without a broker. The format (see docs/deploy.md):

* every deploy message is one line of JSON, ``\\n``, then an optional binary body;
* ``{"kind": "bundle", ...}`` + the whole bundle: a small deployment in one message;
* ``{"kind": "header", ...}`` (no body) on the deploy topic, then one ``{"kind": "chunk",
  "transfer", "index", "sha256"}`` + bytes message per chunk on
  ``<deploy topic>/chunk/<transfer>/<index>``;
* a bare bundle (zip bytes, as ``mosquitto_pub -f model.edgeml`` sends it) is accepted too.

A transfer is either complete and checked (every chunk's sha256, then the whole bundle's
sha256 and size) or refused; nothing partial ever reaches the model store.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeml.bundle import name_is_safe
from edgeml.errors import DeployError

PROTOCOL = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNKS = 100_000
DEFAULT_TRANSFER_TIMEOUT_S = 30.0
MAX_TRANSFER_TIMEOUT_S = 600.0
#: a chunk that arrives before its header (retained messages come in topic order) is kept
#: this long, waiting for the header
ORPHAN_TTL_S = 30.0
MAX_HEADER_LINE = 8192

ROLES = ("champion", "challenger", "shadow", "canary")
STAGES = ("received", "verified", "installed", "loaded", "active", "failed", "noop")
FINAL_STAGES = ("active", "failed", "noop")
ZIP_MAGIC = b"PK\x03\x04"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def new_transfer_id() -> str:
    """A fresh id per push, so retained chunks of two pushes never mix."""
    return secrets.token_hex(8)


def deploy_topic(prefix: str, *, device: str | None = None, group: str | None = None) -> str:
    """``{p}/{d}/deploy`` or ``{p}/group/{g}/deploy``."""
    if (device is None) == (group is None):
        raise ValueError("give exactly one of device or group")
    return f"{prefix}/{device}/deploy" if device else f"{prefix}/group/{group}/deploy"


def chunk_topic(base: str, transfer: str, index: int) -> str:
    return f"{base}/chunk/{transfer}/{index}"


# --- records --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DeployHeader:
    """What a deployment is: the bundle's identity and, for chunked transfers, its layout.

    ``name``/``version`` are what the sender read from the manifest (the device checks them
    against the verified manifest). ``pipeline``/``role``/``priority`` say where it goes.
    """

    transfer: str
    size: int
    sha256: str
    name: str | None = None
    version: str | None = None
    pipeline: str | None = None
    role: str = "challenger"
    priority: int | None = None
    chunks: int = 1
    chunk_size: int = 0
    timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S
    force: bool = False

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "v": PROTOCOL, "transfer": self.transfer, "size": self.size, "sha256": self.sha256,
            "name": self.name, "version": self.version, "pipeline": self.pipeline,
            "role": self.role, "chunks": self.chunks, "chunk_size": self.chunk_size,
            "timeout_s": self.timeout_s,
        }
        if self.priority is not None:
            d["priority"] = self.priority
        if self.force:
            d["force"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict, *, body_len: int | None = None) -> DeployHeader:
        """Validate a header from the network; DeployError("received", ...) names the key."""
        def bad(key: str, msg: str) -> DeployError:
            return DeployError("received", f"deploy header {key!r}: {msg}")

        def opt_name(key: str) -> str | None:
            v = d.get(key)
            if v is None:
                return None
            if not name_is_safe(v):
                raise bad(key, f"{v!r} is not a safe name")
            return v

        def integer(key: str, default: int | None = None, minimum: int = 0) -> int:
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, f"must be an integer, not {v!r}")
            if v < minimum:
                raise bad(key, f"must be >= {minimum}, got {v}")
            return v

        v = d.get("v", PROTOCOL)
        if v != PROTOCOL:
            raise bad("v", f"protocol version {v!r} is not supported (this device speaks "
                           f"{PROTOCOL})")
        transfer = d.get("transfer")
        if not name_is_safe(transfer):
            raise bad("transfer", f"{transfer!r} is not a safe id")
        sha = d.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise bad("sha256", "must be 64 lowercase hex digits")
        size = integer("size", minimum=1)
        role = d.get("role") or "challenger"
        if role not in ROLES:
            raise bad("role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        priority = d.get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise bad("priority", f"must be an integer, not {priority!r}")
        if priority is not None and not -2**31 <= priority < 2**31:
            raise bad("priority", f"must be within -2**31..2**31-1, got {str(priority)[:24]}")
        timeout = d.get("timeout_s", DEFAULT_TRANSFER_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise bad("timeout_s", f"must be a number > 0, not {timeout!r}")
        if body_len is not None:  # the whole bundle in this message
            chunks, chunk_size = 1, size
            if body_len != size:
                raise DeployError("received", f"the message carries {body_len} bytes, its "
                                              f"header says {size} (truncated?)")
        else:
            chunks = integer("chunks", minimum=1)
            chunk_size = integer("chunk_size", minimum=MIN_CHUNK_SIZE)
            if chunks > MAX_CHUNKS:
                raise bad("chunks", f"at most {MAX_CHUNKS} chunks, got {chunks}")
            if not (chunks - 1) * chunk_size < size <= chunks * chunk_size:
                raise bad("chunks", f"{chunks} chunks of {chunk_size} bytes cannot hold "
                                    f"{size} bytes")
        force = d.get("force", False)
        if not isinstance(force, bool):
            raise bad("force", "must be true or false")
        return cls(transfer=transfer, size=size, sha256=sha, name=opt_name("name"),
                   version=opt_name("version"), pipeline=opt_name("pipeline"), role=role,
                   priority=priority, chunks=chunks, chunk_size=chunk_size,
                   timeout_s=min(float(timeout), MAX_TRANSFER_TIMEOUT_S), force=force)

    def chunk_len(self, index: int) -> int:
        """How many bytes chunk ``index`` must carry."""
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - (self.chunks - 1) * self.chunk_size

    @property
    def label(self) -> str:
        return f"{self.name or '?'} {self.version or '?'}"


@dataclass(frozen=True)
class Chunk:
    transfer: str
    index: int
    sha256: str
    data: bytes


@dataclass(frozen=True)
class Delivery:
    """A complete transfer: its chunks in order. :meth:`check` joins them and verifies the
    size and sha256 of the whole (run it off the event loop: 64 MB take ~0.1 s)."""

    header: DeployHeader
    parts: tuple[bytes, ...]
    base: str
    retained: bool = False

    @property
    def data(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def check(self) -> bytes:
        """The bundle bytes, after checking them against the header."""
        h = self.header
        data = self.data
        if len(data) != h.size:
            raise DeployError("received", f"reassembled {len(data)} bytes, the header "
                                          f"says {h.size}")
        actual = sha256_hex(data)
        if actual != h.sha256:
            raise DeployError("received", f"bundle sha256 {actual[:16]}... does not match "
                                          f"the header's {h.sha256[:16]}... (corrupt transfer)")
        return data


# --- encoding (the sender) ------------------------------------------------------------------
def frame(meta: dict, body: bytes = b"") -> bytes:
    """One deploy message: a compact JSON line, ``\\n``, the body."""
    return json.dumps(meta, separators=(",", ":"), sort_keys=True).encode() + b"\n" + body


def unframe(payload: bytes) -> tuple[dict, bytes]:
    """Split a deploy message; DeployError("received") when the first line is not JSON."""
    nl = payload.find(b"\n", 0, MAX_HEADER_LINE + 1)
    line, body = (payload, b"") if nl < 0 else (payload[:nl], payload[nl + 1:])
    if len(line) > MAX_HEADER_LINE:
        raise DeployError("received", f"deploy message header line is longer than "
                                      f"{MAX_HEADER_LINE} bytes")
    try:
        meta = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DeployError("received", f"deploy message does not start with a JSON line: "
                                      f"{exc}") from exc
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise DeployError("received", f"deploy message header has a number too large to "
                                      f"read ({exc})") from exc
    if not isinstance(meta, dict):
        raise DeployError("received", "deploy message header must be a JSON object")
    return meta, body


@dataclass(frozen=True)
class PushPlan:
    """The messages of one push: ``(topic, payload)`` pairs in publishing order."""

    header: DeployHeader
    base: str
    messages: tuple[tuple[str, bytes], ...]

    @property
    def chunk_topics(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.messages if t != self.base)


def plan_push(bundle: bytes, *, base: str, name: str, version: str,
              pipeline: str | None = None, role: str = "challenger",
              priority: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
              timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S, force: bool = False,
              transfer: str | None = None) -> PushPlan:
    """Split ``bundle`` into deploy messages: one when it fits ``chunk_size``, else a header
    followed by ``ceil(size / chunk_size)`` chunks."""
    if chunk_size < MIN_CHUNK_SIZE:
        raise DeployError("received", f"chunk size must be at least {MIN_CHUNK_SIZE} bytes")
    if role not in ROLES:
        raise DeployError("received", f"role must be one of {', '.join(ROLES)}, not {role!r}")
    size = len(bundle)
    n = max(1, -(-size // chunk_size))
    if n > MAX_CHUNKS:
        raise DeployError("received", f"{n} chunks is over the limit of {MAX_CHUNKS}; use "
                                      "a larger chunk size")
    header = DeployHeader(
        transfer=transfer or new_transfer_id(), size=size, sha256=sha256_hex(bundle),
        name=name, version=version, pipeline=pipeline, role=role, priority=priority,
        chunks=n, chunk_size=chunk_size if n > 1 else size, timeout_s=timeout_s, force=force)
    if n == 1:
        return PushPlan(header, base, ((base, frame({**header.to_dict(), "kind": "bundle"},
                                                    bundle)),))
    msgs = [(base, frame({**header.to_dict(), "kind": "header"}))]
    view = memoryview(bundle)
    for i in range(n):
        part = bytes(view[i * chunk_size:(i + 1) * chunk_size])
        meta = {"v": PROTOCOL, "kind": "chunk", "transfer": header.transfer, "index": i,
                "sha256": sha256_hex(part)}
        msgs.append((chunk_topic(base, header.transfer, i), frame(meta, part)))
    return PushPlan(header, base, tuple(msgs))


# --- reassembly (the device) ----------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    """A transfer that will not be installed, and why (``stage`` is where it stopped)."""

    header: DeployHeader | None
    reason: str
    base: str
    retained: bool = False
    stage: str = "received"


@dataclass(frozen=True)
class Ignored:
    """A deployment the device already has (same name and version): nothing to do."""

    header: DeployHeader
    reason: str
    base: str
    retained: bool = False


Event = Delivery | Refused | Ignored
#: called with every new header: raise DeployError to refuse it, return a reason to ignore
#: it as a no-op, or None to accept it
Check = Callable[[DeployHeader], str | None]


@dataclass
class _Transfer:
    header: DeployHeader
    base: str
    retained: bool
    last: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0


class Reassembler:
    """Turns deploy messages into complete :class:`Delivery` objects or refusals.

    One transfer in flight per deploy topic: a new header on the same topic interrupts (and
    refuses) the previous transfer. Bounded: a header over ``max_bundle_bytes`` is refused
    before any chunk is kept; chunks that come before their header are held up to
    ``max_bundle_bytes`` in total for ``ORPHAN_TTL_S``.
    """

    def __init__(self, *, max_bundle_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bundle_bytes = max_bundle_bytes
        self._clock = clock
        self._active: dict[str, _Transfer] = {}  # base topic -> transfer in flight
        self._orphans: OrderedDict[tuple[str, str, int], tuple[Chunk, float, bool]] = \
            OrderedDict()
        self._orphan_bytes = 0
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()  # finished transfers

    # -- inspection --
    def pending(self) -> list[dict]:
        """Transfers in flight, for status reports."""
        return [{"topic": t.base, "transfer": t.header.transfer, "name": t.header.name,
                 "version": t.header.version, "chunks": t.header.chunks,
                 "received": len(t.parts), "bytes": t.received_bytes, "size": t.header.size}
                for t in self._active.values()]

    # -- input --
    def feed(self, base: str, topic: str, payload: bytes, *, retained: bool = False,
             check: Check | None = None) -> list[Event]:
        """One message from ``topic`` (``base`` or ``base/chunk/...``)."""
        if not payload:
            return []  # a cleared retained message
        if topic == base:
            return self._on_bundle_topic(base, payload, retained, check)
        try:
            meta, body = unframe(payload)
            transfer, index, sha = meta.get("transfer"), meta.get("index"), meta.get("sha256")
            if meta.get("kind") != "chunk" or not name_is_safe(transfer) or \
                    isinstance(index, bool) or not isinstance(index, int) or \
                    not isinstance(sha, str):
                raise DeployError("received", f"malformed chunk message on {topic}")
        except DeployError as exc:
            # a garbled chunk cannot be attributed to a transfer with certainty: refuse the
            # one in flight on this topic (it can no longer complete correctly)
            t = self._active.pop(base, None)
            if t is None:
                return []
            self._finish(t.base, t.header.transfer)
            return [Refused(t.header, str(exc), base, t.retained)]
        return self._on_chunk(base, Chunk(transfer, index, sha, body), retained)

    def expire(self) -> list[Event]:
        """Refuse transfers idle for longer than their timeout; drop stale orphan chunks."""
        now = self._clock()
        out: list[Event] = []
        for base, t in list(self._active.items()):
            if now - t.last > t.header.timeout_s:
                del self._active[base]
                self._finish(base, t.header.transfer)
                missing = [i for i in range(t.header.chunks) if i not in t.parts]
                out.append(Refused(t.header, (
                    f"transfer timed out after {t.header.timeout_s:g} s without data: received "
                    f"{len(t.parts)} of {t.header.chunks} chunks (missing "
                    f"{_ranges(missing)})"), base, t.retained))
        for key, (chunk, at, _) in list(self._orphans.items()):
            if now - at > ORPHAN_TTL_S:
                del self._orphans[key]
                self._orphan_bytes -= len(chunk.data)
        return out

    # -- internals --
    def _finish(self, base: str, transfer: str) -> None:
        self._done[(base, transfer)] = None
        while len(self._done) > 256:
            self._done.popitem(last=False)

    def _on_bundle_topic(self, base: str, payload: bytes, retained: bool,
                         check: Check | None) -> list[Event]:
        if payload.startswith(ZIP_MAGIC):  # a bare bundle: mosquitto_pub -f x.edgeml
            if len(payload) > self.max_bundle_bytes:
                return [Refused(None, _too_big(len(payload), self.max_bundle_bytes), base,
                                retained)]
            digest = sha256_hex(payload)
            header = DeployHeader(transfer=digest[:16], size=len(payload), sha256=digest)
            return self._start(base, header, payload, retained, check)
        meta: dict | None = None
        try:
            meta, body = unframe(payload)
            kind = meta.get("kind")
            if kind == "bundle":
                size = meta.get("size")
                if isinstance(size, int) and size > self.max_bundle_bytes:
                    raise DeployError("received", _too_big(size, self.max_bundle_bytes))
                header = DeployHeader.from_dict(meta, body_len=len(body))
            elif kind == "header":
                header = DeployHeader.from_dict(meta)
            else:
                raise DeployError("received", f"unknown deploy message kind {kind!r} (expected "
                                              "'bundle' or 'header')")
        except DeployError as exc:
            return [Refused(_partial_header(meta), str(exc), base, retained)]
        return self._start(base, header, body if kind == "bundle" else None, retained, check)

    def _start(self, base: str, header: DeployHeader, body: bytes | None, retained: bool,
               check: Check | None) -> list[Event]:
        out: list[Event] = []
        current = self._active.get(base)
        if current is not None and current.header.transfer == header.transfer \
                and body is None:
            current.last = self._clock()  # the same header again (redelivery): keep going
            return out
        if current is not None:
            del self._active[base]
            self._finish(base, current.header.transfer)
            out.append(Refused(current.header, (
                f"transfer interrupted after {len(current.parts)} of {current.header.chunks} "
                f"chunks: a new deployment ({header.label}) arrived on {base}"), base,
                current.retained))
        self._done.pop((base, header.transfer), None)
        if header.size > self.max_bundle_bytes:
            self._finish(base, header.transfer)
            out.append(Refused(header, _too_big(header.size, self.max_bundle_bytes), base,
                               retained))
            return out
        try:
            noop = check(header) if check is not None else None
        except DeployError as exc:
            self._finish(base, header.transfer)
            self._drop_orphans(base, header.transfer)
            out.append(Refused(header, str(exc), base, retained, exc.stage))
            return out
        if noop is not None:
            self._finish(base, header.transfer)
            self._drop_orphans(base, header.transfer)
            out.append(Ignored(header, noop, base, retained))
            return out
        if body is not None:
            self._finish(base, header.transfer)
            out.append(Delivery(header, (body,), base, retained))
            return out
        t = _Transfer(header, base, retained, self._clock())
        self._active[base] = t
        for key in [k for k in self._orphans if k[0] == base and k[1] == header.transfer]:
            chunk, _, _ = self._orphans.pop(key)
            self._orphan_bytes -= len(chunk.data)
            out += self._add(t, chunk)
            if base not in self._active:
                break
        return out

    def _drop_orphans(self, base: str, transfer: str) -> None:
        for key in [k for k in self._orphans if k[0] == base and k[1] == transfer]:
            chunk, _, _ = self._orphans.pop(key)
            self._orphan_bytes -= len(chunk.data)

    def _on_chunk(self, base: str, chunk: Chunk, retained: bool) -> list[Event]:
        t = self._active.get(base)
        if t is None or t.header.transfer != chunk.transfer:
            if (base, chunk.transfer) in self._done:
                return []  # late chunk of a finished, refused or ignored transfer
            self._keep_orphan(base, chunk, retained)
            return []
        return self._add(t, chunk)

    def _keep_orphan(self, base: str, chunk: Chunk, retained: bool) -> None:
        key = (base, chunk.transfer, chunk.index)
        if key in self._orphans or len(chunk.data) > self.max_bundle_bytes:
            return
        self._orphans[key] = (chunk, self._clock(), retained)
        self._orphan_bytes += len(chunk.data)
        while self._orphan_bytes > self.max_bundle_bytes and self._orphans:
            old, _, _ = self._orphans.popitem(last=False)[1]
            self._orphan_bytes -= len(old.data)

    def _add(self, t: _Transfer, chunk: Chunk) -> list[Event]:
        h = t.header
        problem = None
        if not 0 <= chunk.index < h.chunks:
            problem = f"chunk index {chunk.index} is outside 0..{h.chunks - 1}"
        elif len(chunk.data) != h.chunk_len(chunk.index):
            problem = (f"chunk {chunk.index} carries {len(chunk.data)} bytes, expected "
                       f"{h.chunk_len(chunk.index)} (truncated?)")
        elif sha256_hex(chunk.data) != chunk.sha256:
            problem = f"chunk {chunk.index} sha256 does not match its header (corrupt chunk)"
        if problem is not None:
            del self._active[t.base]
            self._finish(t.base, h.transfer)
            return [Refused(h, problem, t.base, t.retained)]
        t.last = self._clock()
        if chunk.index in t.parts:
            return []  # a redelivered chunk (QoS 1 duplicate)
        t.parts[chunk.index] = chunk.data
        t.received_bytes += len(chunk.data)
        if len(t.parts) < h.chunks:
            return []
        del self._active[t.base]
        self._finish(t.base, h.transfer)
        parts = tuple(t.parts[i] for i in range(h.chunks))  # joined off the event loop
        return [Delivery(h, parts, t.base, t.retained)]


def _too_big(size: int, limit: int) -> str:
    return (f"bundle of {size} bytes is over the device's limit of {limit} bytes "
            "(deploy.max_bundle_bytes)")


def _partial_header(meta: Any) -> DeployHeader | None:
    """Best effort: name and version of a refused header, for the status report."""
    if not isinstance(meta, dict):
        return None
    def s(k: str) -> str | None:
        v = meta.get(k)
        return v if name_is_safe(v) else None
    sha = meta.get("sha256") if isinstance(meta.get("sha256"), str) else ""
    size = meta.get("size") if isinstance(meta.get("size"), int) else 0
    return DeployHeader(transfer=s("transfer") or "unknown", size=size, sha256=sha,
                        name=s("name"), version=s("version"), pipeline=s("pipeline"))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5" (a missing-chunk list stays one short line)."""
    if not indices:
        return "none"
    out, start, prev = [], indices[0], indices[0]
    for i in [*indices[1:], None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    if len(out) > 8:
        out = [*out[:8], "..."]
    return ", ".join(out)
