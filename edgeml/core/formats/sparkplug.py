"""``sparkplug_b``: Eclipse Sparkplug B payloads (protobuf) on
``spBv1.0/{group}/{type}/{node}[/{device}]``.

The protobuf message classes are built at run time from a descriptor written here from the
field numbers the specification publishes (Tahu's ``sparkplug_b.proto``, ``Payload`` and
``Payload.Metric``; metadata, property sets, data sets and templates are left unparsed), so
the device needs only the ``protobuf`` package (the ``sparkplug`` extra) and no generated
code. This module is imported only when a pipeline uses ``sparkplug_b``.

:class:`SparkplugSession` is the host-application side of one pipeline: alias tables from
NBIRTH/DBIRTH per node and device, the node's sequence number over every message that carries
one (NBIRTH resets it; NDATA, DBIRTH, DDATA, DDEATH advance it modulo 256), NDEATH/DDEATH
(an NDEATH whose bdSeq does not match the node's NBIRTH is an old session's will and is
ignored), metric names mapped to features, ``is_historical`` metrics kept out of live
samples (they stay in the archive, as every accepted message does). A real gap in the
sequence (not the 255 -> 0 wrap, not a redelivered duplicate) is counted and reported in
status. With ``rebirth = true`` a gap, a DATA message from a node without a BIRTH or an
unknown alias puts the node on hold (its data is ignored until the next NBIRTH) and queues
one rebirth request (an NCMD with ``Node Control/Rebirth = true``), at most one per node per
``rebirth_interval_s`` (archived receive time). The session never publishes: requests wait in
:attr:`SparkplugSession.outbound` for the device to send.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeml.core.formats import F32_MAX
from edgeml.core.formats.latest import LatestValues
from edgeml.errors import DecodeError

log = logging.getLogger("edgeml.core.formats.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BOOLEAN = 11
_SIGNED32 = (1, 2, 3)  # Int8, Int16, Int32 travel as uint32 two's complement
_SIGNED64 = (4,)  # Int64 as uint64 two's complement
_NUMERIC_ONEOF = ("int_value", "long_value", "float_value", "double_value", "boolean_value")
STATUS_NODES = 50
_SEQ_TYPES = frozenset(("NDATA", "DBIRTH", "DDATA", "DDEATH"))


def available() -> bool:
    """Is the ``protobuf`` package importable (the ``sparkplug`` extra)?"""
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SparkplugSpec:
    group_id: str
    edge_node_id: str = "+"
    metrics: tuple[tuple[str, str], ...] = ()  # (metric name, feature); empty: same names
    rebirth: bool = False
    rebirth_interval_s: float = 30.0
    max_age_s: float = 10.0

    @property
    def topic_filter(self) -> str:
        """The node's whole namespace: its seq counts NDATA, DBIRTH, DDATA and DDEATH."""
        return f"{NAMESPACE}/{self.group_id}/+/{self.edge_node_id}/#"


# ---- protobuf ------------------------------------------------------------------------------
@functools.cache
def payload_class() -> Any:
    """The ``Payload`` message class, built from our own descriptor (proto2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="edgeml_sparkplug_b.proto",
                                            package="edgeml.sparkplug_b", syntax="proto2")
    payload = fd.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")

    def add(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
        f = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof

    add(metric, "name", 1, F.TYPE_STRING)
    add(metric, "alias", 2, F.TYPE_UINT64)
    add(metric, "timestamp", 3, F.TYPE_UINT64)
    add(metric, "datatype", 4, F.TYPE_UINT32)
    add(metric, "is_historical", 5, F.TYPE_BOOL)
    add(metric, "is_transient", 6, F.TYPE_BOOL)
    add(metric, "is_null", 7, F.TYPE_BOOL)
    metric.oneof_decl.add(name="value")
    add(metric, "int_value", 10, F.TYPE_UINT32, oneof=0)
    add(metric, "long_value", 11, F.TYPE_UINT64, oneof=0)
    add(metric, "float_value", 12, F.TYPE_FLOAT, oneof=0)
    add(metric, "double_value", 13, F.TYPE_DOUBLE, oneof=0)
    add(metric, "boolean_value", 14, F.TYPE_BOOL, oneof=0)
    add(metric, "string_value", 15, F.TYPE_STRING, oneof=0)
    add(metric, "bytes_value", 16, F.TYPE_BYTES, oneof=0)
    add(payload, "timestamp", 1, F.TYPE_UINT64)
    add(payload, "metrics", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED,
        ".edgeml.sparkplug_b.Payload.Metric")
    add(payload, "seq", 3, F.TYPE_UINT64)
    add(payload, "uuid", 4, F.TYPE_STRING)
    add(payload, "body", 5, F.TYPE_BYTES)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    desc = pool.FindMessageTypeByName("edgeml.sparkplug_b.Payload")
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.22
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(pool).GetPrototype(desc)
    return GetMessageClass(desc)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str | None
    alias: int | None
    timestamp: int | None
    datatype: int | None
    is_historical: bool
    is_null: bool
    kind: str | None  # which value field is set
    value: Any


@dataclass(frozen=True, slots=True)
class SpbPayload:
    timestamp: int | None
    seq: int | None
    metrics: tuple[Metric, ...]


def parse_payload(payload: bytes) -> SpbPayload:
    from google.protobuf.message import DecodeError as PbDecodeError

    msg = payload_class()()
    try:
        msg.ParseFromString(payload)
    except Exception as exc:  # PbDecodeError and anything else: untrusted bytes
        what = "" if isinstance(exc, PbDecodeError) else f"{type(exc).__name__}: "
        raise DecodeError("malformed", f"not a Sparkplug B payload: {what}{exc}") from None
    metrics = []
    for m in msg.metrics:
        kind = m.WhichOneof("value")
        metrics.append(Metric(
            m.name if m.HasField("name") else None, m.alias if m.HasField("alias") else None,
            m.timestamp if m.HasField("timestamp") else None,
            m.datatype if m.HasField("datatype") else None, m.is_historical, m.is_null,
            kind, getattr(m, kind) if kind else None))
    return SpbPayload(msg.timestamp if msg.HasField("timestamp") else None,
                      msg.seq if msg.HasField("seq") else None, tuple(metrics))


def encode_rebirth(timestamp_ms: int) -> bytes:
    """An NCMD payload asking the edge node to publish its BIRTH certificates again."""
    msg = payload_class()(timestamp=timestamp_ms)
    m = msg.metrics.add(name=REBIRTH_METRIC, timestamp=timestamp_ms, datatype=BOOLEAN)
    m.boolean_value = True
    return msg.SerializeToString()


def numeric(m: Metric, datatype: int | None) -> float | None:
    """The metric's value as a float, or None when it is not a number."""
    if m.kind not in _NUMERIC_ONEOF:
        return None
    v = m.value
    if m.kind == "boolean_value":
        return 1.0 if v else 0.0
    if m.kind == "int_value" and datatype in _SIGNED32 and v >= 2**31:
        v -= 2**32
    elif m.kind == "long_value" and datatype in _SIGNED64 and v >= 2**63:
        v -= 2**64
    return float(v)


# ---- the host-application session -------------------------------------------------------------
@dataclass
class _Edge:
    """A node or a device: its alias table and datatypes from its BIRTH."""

    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)

    def learn(self, metrics: tuple[Metric, ...]) -> None:
        self.aliases.clear()
        self.datatypes.clear()
        for m in metrics:
            if m.name is None:
                continue
            if m.alias is not None:
                self.aliases[m.alias] = m.name
            if m.datatype is not None:
                self.datatypes[m.name] = m.datatype


@dataclass
class _Node:
    edge: _Edge = field(default_factory=_Edge)
    devices: dict[str, _Edge] = field(default_factory=dict)
    born: bool = False
    seq: int | None = None
    bdseq: Any = None
    on_hold: bool = False
    last_request: float | None = None
    gaps: int = 0


class SparkplugSession:
    """One pipeline's Sparkplug B host state. Feed messages in archive order."""

    def __init__(self, spec: SparkplugSpec, features: tuple[str, ...], *,
                 max_outbound: int = 16, max_nodes: int = 10_000,
                 max_devices: int = 10_000) -> None:
        self.max_nodes = max_nodes  # names come from the network: the tables are bounded
        self.max_devices = max_devices
        self.spec = spec
        self.features = features
        self.mapping = dict(spec.metrics) if spec.metrics else {f: f for f in features}
        self.latest = LatestValues(features, max_age_s=spec.max_age_s)
        self.counts: Counter[str] = self.latest.counts
        self.nodes: dict[str, _Node] = {}
        self.last_gap: dict | None = None
        #: rebirth requests (topic, payload) for the device to publish; bounded
        self.outbound: deque[tuple[str, bytes]] = deque(maxlen=max_outbound)
        self.notify: Callable[[], None] | None = None

    def feed(self, topic: str, msg: SpbPayload, received: float
             ) -> list[tuple[str, np.ndarray]]:
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
            self.counts["unknown_topic"] += 1
            return []
        _, group, mtype, node_id = parts[:4]
        device = parts[4] if len(parts) == 5 else None
        key = f"{group}/{node_id}"
        if mtype in ("NCMD", "DCMD"):
            self.counts["commands_seen"] += 1  # ours or another host's: not the node's seq
            return []
        node = self.nodes.get(key)
        if mtype == "NBIRTH":
            node = self._add_node(key, _Node(
                born=True, seq=msg.seq, gaps=node.gaps if node else 0,
                last_request=node.last_request if node else None))
            node.edge.learn(msg.metrics)
            node.bdseq = next((m.value for m in msg.metrics if m.name == "bdSeq"), None)
            self.latest.drop(key)
            self.counts["births"] += 1
            return []
        if mtype == "NDEATH":
            if node is None or not node.born:
                return []
            bd = next((m.value for m in msg.metrics if m.name == "bdSeq"), None)
            if bd is not None and node.bdseq is not None and bd != node.bdseq:
                self.counts["stale_deaths"] += 1
                return []
            node.born = False
            node.devices.clear()
            node.seq = None
            self.latest.drop(key)
            self.counts["deaths"] += 1
            return []
        if mtype not in _SEQ_TYPES:
            self.counts["unknown_topic"] += 1
            return []
        if node is None or not node.born:
            self.counts["no_birth"] += 1
            self._hold(key, node, received)
            return []
        if msg.seq is None:
            self.counts["missing_seq"] += 1
        elif node.seq is not None:
            expected = (node.seq + 1) % 256
            if msg.seq == node.seq:
                self.counts["duplicates"] += 1  # a redelivery: already seen
                return []
            if msg.seq != expected:
                self.counts["seq_gaps"] += 1
                node.gaps += 1
                self.last_gap = {"node": key, "expected": expected, "got": msg.seq,
                                 "at": received}
                log.warning("sparkplug node %s: sequence gap (expected %d, got %d)%s", key,
                            expected, msg.seq, "; rebirth requested" if self.spec.rebirth
                            else "")
                self._hold(key, node, received)
            node.seq = msg.seq
        if node.on_hold:
            self.counts["held"] += 1
            self._hold(key, node, received)
            return []
        source = key if device is None else f"{key}/{device}"
        if mtype == "DBIRTH":
            if device not in node.devices and len(node.devices) >= self.max_devices:
                node.devices.pop(next(iter(node.devices)))
                self.counts["evicted_devices"] += 1
            edge = node.devices[device] = _Edge()  # type: ignore[index]
            edge.learn(msg.metrics)
            self.latest.drop(source)
            self.counts["births"] += 1
            return []
        if mtype == "DDEATH":
            node.devices.pop(device, None)  # type: ignore[arg-type]
            self.latest.drop(source)
            self.counts["deaths"] += 1
            return []
        edge = node.edge if device is None else node.devices.get(device)
        if edge is None:
            self.counts["no_birth"] += 1
            self._hold(key, node, received)
            return []
        out = []
        for m in msg.metrics:
            name = m.name if m.name is not None else edge.aliases.get(m.alias)  # type: ignore
            if name is None:
                self.counts["unknown_alias"] += 1
                self._hold(key, node, received)
                if node.on_hold:  # rebirth: the rest of the node's data waits for its BIRTH
                    return out
                continue
            if m.is_historical:
                self.counts["historical"] += 1
                continue
            feature = self.mapping.get(name)
            if feature is None:
                self.counts["unmapped"] += 1
                continue
            if m.is_null:
                self.counts["nulls"] += 1
                continue
            dt = m.datatype if m.datatype is not None else edge.datatypes.get(name)
            value = numeric(m, dt)
            if value is None or not abs(value) <= F32_MAX:
                self.counts["bad_value"] += 1
                continue
            sample = self.latest.update(source, feature, value, received)
            if sample is not None:
                out.append((source, sample))
        return out

    def _hold(self, key: str, node: _Node | None, received: float) -> None:
        """Without ``rebirth``: count only. With it: ignore the node until its next NBIRTH and
        ask for one, rate-limited."""
        if not self.spec.rebirth:
            return
        if node is None:
            node = self._add_node(key, _Node())
        node.on_hold = True
        if node.last_request is not None and \
                received - node.last_request < self.spec.rebirth_interval_s:
            return
        node.last_request = received
        group, node_id = key.split("/", 1)
        req = (f"{NAMESPACE}/{group}/NCMD/{node_id}", encode_rebirth(int(received * 1000)))
        if len(self.outbound) == self.outbound.maxlen:
            self.counts["rebirth_requests_dropped"] += 1
        self.outbound.append(req)
        self.counts["rebirth_requests"] += 1
        if self.notify is not None:
            self.notify()

    def _add_node(self, key: str, node: _Node) -> _Node:
        if key not in self.nodes and len(self.nodes) >= self.max_nodes:
            old = next(iter(self.nodes))
            del self.nodes[old]
            self.latest.drop(old)
            self.counts["evicted_nodes"] += 1
        self.nodes[key] = node
        return node

    def status(self) -> dict:
        # at most STATUS_NODES nodes in the (retained) status: those on hold or with gaps first
        shown = sorted(self.nodes.items(), key=lambda kv: (not kv[1].on_hold, not kv[1].gaps))
        nodes = {k: {"online": n.born, "seq": n.seq, "on_hold": n.on_hold, "gaps": n.gaps,
                     "devices": len(n.devices)} for k, n in shown[:STATUS_NODES]}
        return {"sources": self.latest.pending_sources, "nodes_total": len(self.nodes),
                "nodes": nodes,
                "last_gap": self.last_gap, **dict(self.counts)}
