"""BasicMotions windows as messages in each payload format (shared by the formats tests)."""

from __future__ import annotations

import json
import struct

from edgeml.host.datasets import BASICMOTIONS_CHANNELS

CH = tuple(BASICMOTIONS_CHANNELS)
GROUP, NODE = "plant1", "gw1"


def json_messages(test, windows) -> list[tuple[str, bytes]]:
    out = []
    for w in windows:
        for i, sample in enumerate(test.X[w]):
            body = dict(zip(CH, map(float, sample), strict=True))
            body["id"] = f"w{w}-{i}"
            out.append((f"sensors/w{w}/imu", json.dumps(body).encode()))
    return out


def senml_messages(test, windows, per_pack: int = 10) -> list[tuple[str, bytes]]:
    out = []
    for w in windows:
        x = test.X[w]
        for start in range(0, len(x), per_pack):
            recs: list[dict] = []
            for i in range(start, min(start + per_pack, len(x))):
                for c, v in zip(CH, map(float, x[i]), strict=True):
                    r = {"n": c, "v": v, "t": i - start}
                    if not recs:
                        r.update(bn=f"urn:dev:basicmotions:w{w}:", bt=1.7e9 + start)
                    recs.append(r)
            out.append((f"sensors/w{w}/senml", json.dumps(recs).encode()))
    return out


def influx_messages(test, windows, per_msg: int = 10) -> list[tuple[str, bytes]]:
    out = []
    for w in windows:
        x = test.X[w]
        for start in range(0, len(x), per_msg):
            lines = []
            for i in range(start, min(start + per_msg, len(x))):
                fields = ",".join(f"{c}={float(v)!r}" for c, v in zip(CH, x[i], strict=True))
                lines.append(f"imu,series=w{w},site=lab\\ 1 {fields} {1700000000000 + i}")
            out.append(("sensors/lp", "\n".join(lines).encode()))
    return out


def value_messages(test, windows) -> list[tuple[str, bytes]]:
    return [(f"plant/line1/w{w}/{c}", repr(float(v)).encode())
            for w in windows for sample in test.X[w] for c, v in zip(CH, sample, strict=True)]


# ---- Sparkplug B, hand-encoded from the field numbers of Tahu's sparkplug_b.proto ----------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def spb_metric(name=None, alias=None, datatype=None, *, double=None, int32=None, long=None,
               boolean=None, string=None, historical=False, null=False, timestamp=None
               ) -> bytes:
    """Payload.Metric: name=1 alias=2 timestamp=3 datatype=4 is_historical=5 is_null=7
    int_value=10 long_value=11 double_value=13 boolean_value=14 string_value=15."""
    b = b""
    if name is not None:
        raw = name.encode()
        b += _key(1, 2) + _varint(len(raw)) + raw
    if alias is not None:
        b += _key(2, 0) + _varint(alias)
    if timestamp is not None:
        b += _key(3, 0) + _varint(timestamp)
    if datatype is not None:
        b += _key(4, 0) + _varint(datatype)
    if historical:
        b += _key(5, 0) + b"\x01"
    if null:
        b += _key(7, 0) + b"\x01"
    if int32 is not None:
        b += _key(10, 0) + _varint(int32 & 0xFFFFFFFF)
    if long is not None:
        b += _key(11, 0) + _varint(long & 0xFFFFFFFFFFFFFFFF)
    if double is not None:
        b += _key(13, 1) + struct.pack("<d", double)
    if boolean is not None:
        b += _key(14, 0) + (b"\x01" if boolean else b"\x00")
    if string is not None:
        raw = string.encode()
        b += _key(15, 2) + _varint(len(raw)) + raw
    return b


def spb_payload(metrics: list[bytes], seq: int | None = None, timestamp: int = 1700000000000
                ) -> bytes:
    """Payload: timestamp=1 metrics=2 seq=3."""
    b = _key(1, 0) + _varint(timestamp)
    for m in metrics:
        b += _key(2, 2) + _varint(len(m)) + m
    if seq is not None:
        b += _key(3, 0) + _varint(seq)
    return b




def _metric(name: str | None, alias: int, datatype: int | None, value: float | int
            ) -> bytes:
    if isinstance(value, int):
        return spb_metric(name, alias, datatype, long=value)
    return spb_metric(name, alias, datatype, double=value)


def spb(metrics: list[bytes], seq: int | None) -> bytes:
    return spb_payload(metrics, seq)


class SparkplugNode:
    """An edge node: NBIRTH, a DBIRTH per device, DDATA with aliases; seq over all."""

    def __init__(self, group: str = GROUP, node: str = NODE) -> None:
        self.group, self.node = group, node
        self.seq = 0
        self.bdseq = 0

    def topic(self, kind: str, device: str | None = None) -> str:
        t = f"spBv1.0/{self.group}/{kind}/{self.node}"
        return t if device is None else f"{t}/{device}"

    def _next(self) -> int:
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def nbirth(self) -> tuple[str, bytes]:
        self.seq = 0
        self.bdseq += 1
        return self.topic("NBIRTH"), spb([_metric("bdSeq", 0, 8, self.bdseq)], self._next())

    def dbirth(self, device: str) -> tuple[str, bytes]:
        ms = [_metric(f"imu/{c}", k + 1, 10, 0.0) for k, c in enumerate(CH)]
        return self.topic("DBIRTH", device), spb(ms, self._next())

    def ddata(self, device: str, sample) -> tuple[str, bytes]:
        ms = [_metric(None, k + 1, None, float(v)) for k, v in enumerate(sample)]
        return self.topic("DDATA", device), spb(ms, self._next())

    def skip(self) -> None:
        self._next()  # a message the host never sees


def sparkplug_messages(test, windows, node: SparkplugNode | None = None,
                       birth: bool = True) -> list[tuple[str, bytes]]:
    node = node or SparkplugNode()
    out = [node.nbirth()] if birth else []
    for w in windows:
        out.append(node.dbirth(f"w{w}"))
        out += [node.ddata(f"w{w}", s) for s in test.X[w]]
    return out


SPARKPLUG_METRICS = {f"imu/{c}": c for c in CH}
#: the same, with the keys quoted for conftest.write_config's inline TOML tables
SPARKPLUG_METRICS_TOML = {f'"{k}"': v for k, v in SPARKPLUG_METRICS.items()}
