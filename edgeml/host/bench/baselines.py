"""The plain alternatives edgeml is measured against, and the load generator, as processes.

Run as ``python -m edgeml.host.bench.baselines ROLE SPEC_JSON``; each role prints JSON event lines
on stdout (``{"event": "ready", ...}`` once it can work, ``{"event": "done", ...}`` at the end)
and writes its arrays next to ``spec["out"]``. Roles:

- ``publish``: replays Daphnet samples at a fixed rate or as fast as possible, one msgpack/JSON
  map per message with an ``id`` and the publish time ``t`` (``time.time_ns()``), or
  ``samples`` of them per message (``{"samples": [...], "id", "t"}``).
- ``burst``: a QoS 1 burst of JSON lines through ``mosquitto_pub -l``.
- ``count``: a raw paho subscriber that only counts and time-stamps messages (the transport
  limit); payloads are decoded after the run, never in the hot path.
- ``collect``: the same on an answer topic; the harness times edgeml and the plain script by it.
- ``plain``: the script a data scientist writes: paho ``on_message`` -> decode ->
  ``session.run`` per model version -> publish the answer.
- ``bare``: imports onnxruntime, holds the same sessions, reports its RSS and exits.

paho is used directly on purpose: these processes ARE the plain alternatives. Every client sets
TCP_NODELAY in ``on_socket_open`` (paho 2.2 does not), so the baselines are not handicapped by
delayed ACKs. Each role runs in its own interpreter so no thread pool, GIL or allocator is shared
with the process being measured.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("publish", "burst", "count", "collect", "plain", "bare")


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout for the harness (stdout is a pipe; flush every line)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size in kB from /proc (no psutil needed on a device)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # websockets / unix sockets
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _client(client_id: str) -> Any:
    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.on_socket_open = _nodelay
    return c


def _receiver(client_id: str) -> tuple[Any, dict]:
    """The harness's receivers (the raw subscriber, the answer collector): MQTT 5 with the
    largest Receive Maximum, so that on a stock broker a burst of QoS 1 answers waits in
    flight to the receiver instead of in the broker's queue, where mosquitto would drop part
    of it: the receiver measures the target, it must not be what loses messages."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv5)
    c.on_socket_open = _nodelay
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 65535
    return c, {"clean_start": True, "properties": props}


def _encode(fmt: str):
    if fmt == "json":
        return lambda d: json.dumps(d, separators=(",", ":")).encode()
    import msgpack

    return msgpack.Packer().pack


def _decode(payload: bytes) -> Any:
    import msgpack

    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return json.loads(payload)


def daphnet_rows() -> tuple[np.ndarray, tuple[str, ...]]:
    from edgeml.host.datasets import load_daphnet

    data = load_daphnet()
    return data.X, data.channels


# --- publish ------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _RawSink:
    """QoS 0 publishing on a bare TCP socket (MQTT 3.1.1 packets built by hand).

    The load generator must not be the bottleneck of the as-fast-as-possible phase: paho
    spends ~30 µs of Python per publish, a hand-built PUBLISH packet a fraction of that.
    It is only the load generator; every measured receiver is a normal client.
    """

    def __init__(self, host: str, port: int, client_id: str, topic: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        # CONNECT: protocol "MQTT" level 4, clean session, keepalive 0 (off: we never idle)
        var = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
        self.sock.sendall(b"\x10" + _varint(len(var)) + var)
        ack = b""
        while len(ack) < 4:
            chunk = self.sock.recv(4 - len(ack))
            if not chunk:
                raise SystemExit("publisher: broker closed the connection before CONNACK")
            ack += chunk
        if ack[0] != 0x20 or ack[3] != 0:
            raise SystemExit(f"publisher: CONNACK refused ({ack.hex()})")
        self.sock.settimeout(None)
        t = topic.encode()
        self.topic = len(t).to_bytes(2, "big") + t

    def packet(self, payload: bytes) -> bytes:
        return b"\x30" + _varint(len(self.topic) + len(payload)) + self.topic + payload

    def send(self, packets: list[bytes]) -> None:
        self.sock.sendall(b"".join(packets))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT: the broker drops no queued message
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        self.sock.close()


class _PahoSink:
    """QoS 1 publishing with paho (PUBACKs need a real client). No network thread: without
    it ``publish()`` writes straight to the socket."""

    def __init__(self, host: str, port: int, client_id: str, topic: str, qos: int) -> None:
        self.client = _client(client_id)
        self.topic, self.qos = topic, qos
        connected = threading.Event()
        self.acked = 0
        self.sent = 0

        def on_publish(c: Any, u: Any, mid: Any, rc: Any, p: Any = None) -> None:
            self.acked += 1

        self.client.on_connect = lambda c, u, f, rc, p=None: connected.set()
        self.client.on_publish = on_publish
        self.client.connect(host, port, keepalive=60)
        deadline = time.monotonic() + 10
        while not connected.is_set():
            if time.monotonic() > deadline:
                raise SystemExit("publisher: no CONNACK within 10 s")
            self.client.loop(timeout=0.05)

    def packet(self, payload: bytes) -> bytes:
        return payload

    def send(self, packets: list[bytes]) -> None:
        for p in packets:
            self.client.publish(self.topic, p, qos=self.qos)
            self.sent += 1
        self.client.loop(timeout=0)  # PUBACKs

    def close(self) -> None:
        deadline = time.monotonic() + 30
        while (self.acked < self.sent or self.client.want_write()) and \
                time.monotonic() < deadline:
            self.client.loop(timeout=0.05)
        self.client.disconnect()


def publish(spec: dict) -> None:
    """Publish ``messages`` Daphnet samples; ``rate`` 0 means as fast as the broker takes them
    (then packets go out in bursts of ``burst``, default 16, each stamped just before it is
    written). SIGTERM stops early (the start-up probe)."""
    X, channels = daphnet_rows()
    rows = [dict(zip(channels, (float(v) for v in r), strict=True)) for r in X]
    per_msg = max(1, int(spec.get("samples", 1)))  # > 1: {"samples": [...], "id", "t"}
    n = int(spec["messages"])
    rate = float(spec.get("rate") or 0)
    first_id = int(spec.get("first_id", 0))
    qos = int(spec.get("qos", 0))
    pack = _encode(spec.get("format", "msgpack"))
    pub_ns = np.zeros(n, dtype=np.int64)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cid = spec.get("client_id", f"bench-pub-{os.getpid()}")
    sink: Any = (_RawSink(spec["host"], int(spec["port"]), cid, spec["topic"]) if qos == 0
                 else _PahoSink(spec["host"], int(spec["port"]), cid, spec["topic"], qos))
    emit("ready")
    interval = 1.0 / rate if rate > 0 else 0.0
    burst = 1 if interval else max(1, int(spec.get("burst", 16)))
    t0 = time.perf_counter()
    progress_every = max(1, n // 10)
    next_progress = progress_every
    i = 0
    while i < n and not stop.is_set():
        if interval:
            wait = t0 + i * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        packets = []
        t = time.time_ns()
        for j in range(i, min(n, i + burst)):
            if per_msg > 1:
                msg = {"samples": [rows[(j * per_msg + k) % len(rows)] for k in range(per_msg)]}
            else:
                msg = rows[j % len(rows)].copy()
            msg["id"] = first_id + j
            msg["t"] = t
            pub_ns[j] = t
            packets.append(sink.packet(pack(msg)))
        sink.send(packets)
        i += len(packets)
        if i >= next_progress:
            next_progress += progress_every
            emit("progress", sent=i)
    sink.close()
    elapsed = time.perf_counter() - t0
    np.save(spec["out"] + ".pub_ns.npy", pub_ns[:i])
    emit("done", sent=i, seconds=elapsed, rate=i / elapsed if elapsed > 0 else 0.0)


def burst(spec: dict) -> None:
    """A QoS 1 burst the way people feed a file: ``messages`` JSON lines (one sample each)
    through ``mosquitto_pub -l -q 1``, as fast as it and the broker go. Every message's
    publish time is the burst's start (the harness reports how long the burst takes to drain)."""
    import shutil
    import subprocess

    exe = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    if not Path(exe).exists():
        raise SystemExit("burst: mosquitto_pub is not installed (apt install mosquitto-clients)")
    X, channels = daphnet_rows()
    n = int(spec["messages"])
    first_id = int(spec.get("first_id", 0))
    lines = Path(spec["out"] + ".lines")
    with open(lines, "w", encoding="utf-8") as fh:
        for j in range(n):
            d = dict(zip(channels, (float(v) for v in X[j % len(X)]), strict=True))
            d["id"] = first_id + j
            fh.write(json.dumps(d, separators=(",", ":")) + "\n")
    argv = [exe, "-h", spec["host"], "-p", str(spec["port"]), "-t", spec["topic"],
            "-q", str(int(spec.get("qos", 1))), "-l",
            "-i", spec.get("client_id", f"bench-burst-{os.getpid()}")]
    emit("ready")
    t0 = time.time_ns()
    with open(lines, "rb") as fh:
        rc = subprocess.run(argv, stdin=fh, check=False).returncode
    elapsed = (time.time_ns() - t0) / 1e9
    np.save(spec["out"] + ".pub_ns.npy", np.full(n, t0, dtype=np.int64))
    lines.unlink()
    emit("done", sent=n, seconds=elapsed, rate=n / elapsed if elapsed > 0 else 0.0,
         returncode=rc)


# --- count / collect ----------------------------------------------------------------------
def count(spec: dict) -> None:
    """Receive on ``topic`` until ``expect`` messages (0: no limit), ``timeout_s`` overall,
    ``idle_s`` without a message (counted from the first message, or from the start when
    ``idle_from_start``; 0: off), or SIGTERM.

    The callback only appends the receive time and the payload reference; ids are decoded after
    the run so the hot path is paho's own cost and nothing else.
    """
    expect = int(spec.get("expect", 0))
    timeout_s = float(spec.get("timeout_s", 60))
    idle_s = float(spec.get("idle_s", 0))
    recv_ns: list[int] = []
    payloads: list[bytes] = []
    done = threading.Event()
    subscribed = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_message(client, userdata, msg):  # the whole hot path of the raw subscriber
        recv_ns.append(time.time_ns())
        payloads.append(msg.payload)
        if len(recv_ns) >= expect > 0:
            done.set()

    client, connect_kw = _receiver(spec.get("client_id", f"bench-sub-{os.getpid()}"))
    qos = int(spec.get("qos", 0))
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(spec["topic"], qos)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect(spec["host"], int(spec["port"]), keepalive=60, **connect_kw)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("subscriber: no SUBACK within 10 s")
    cpu_ready = time.process_time()
    emit("ready", cpu_s=cpu_ready)
    started = time.time_ns()
    deadline = time.monotonic() + timeout_s
    last_report = 0
    tick = min(0.25, idle_s / 3) if idle_s else 0.25
    while not (done.is_set() or stop.is_set()) and time.monotonic() < deadline:
        done.wait(tick)
        n = len(recv_ns)
        if expect and n - last_report >= max(1, expect // 10):
            last_report = n
            emit("progress", received=n)
        if idle_s and (n or spec.get("idle_from_start")):
            last = recv_ns[-1] if n else started
            if time.time_ns() - last > idle_s * 1e9:
                break
    cpu_done = time.process_time()
    client.loop_stop()
    client.disconnect()
    n = len(recv_ns)
    if spec.get("sync"):  # the uplink's batches: one entry per record, not per message
        _save_synced(spec["out"], recv_ns[:n], payloads[:n])
        emit("done", received=n, complete=False, cpu_s=cpu_done, sample=None)
        return
    ids = np.full(n, -1, dtype=np.int64)
    for i, p in enumerate(payloads[:n]):
        try:
            rec = _decode(p)
            if isinstance(rec, list) and rec:  # a batch message's answer: its rows' answers
                rec = rec[0]
            # a batch message's rows are answered as "<id>:<row>": counted for the message
            ids[i] = int(str(rec["id"]).split(":")[0]) if isinstance(rec, dict) else -1
        except (ValueError, KeyError, TypeError):
            pass
    np.save(spec["out"] + ".recv_ns.npy", np.asarray(recv_ns[:n], dtype=np.int64))
    np.save(spec["out"] + ".ids.npy", ids)
    sample = _decode(payloads[0]) if payloads else None
    emit("done", received=n, complete=bool(expect and n >= expect), cpu_s=cpu_done,
         sample=jsonable(sample))


def _save_synced(out: str, recv_ns: list[int], payloads: list[bytes]) -> None:
    """The records in the uplink's sync messages (``{"records": [...]}``): each record's
    ``id`` (a grouped record's: its first row's) and the time its message arrived. Records
    without an integer id get -1."""
    times: list[int] = []
    ids: list[int] = []
    for t, p in zip(recv_ns, payloads, strict=True):
        try:
            records = _decode(p).get("records") or []
        except (ValueError, AttributeError, TypeError):
            continue
        for rec in records:
            try:  # a batch message's rows are one grouped record: its first row's id
                rows = rec.get("rows")
                first = rows[0] if isinstance(rows, list) and rows else rec
                rid = int(str(first.get("id")).split(":")[0])
            except (ValueError, AttributeError):
                rid = -1
            times.append(t)
            ids.append(rid)
    np.save(out + ".recv_ns.npy", np.asarray(times, dtype=np.int64))
    np.save(out + ".ids.npy", np.asarray(ids, dtype=np.int64))


def jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return repr(v)


# --- the plain script ---------------------------------------------------------------------
def plain(spec: dict) -> None:
    """What a data scientist writes: one callback, one session.run per model, one publish.

    ``threads`` sets intra_op_num_threads (1 by default: a single row gains nothing from more
    threads, and spinning workers would only steal CPU from the broker on a small device).

    The same script made durable the simplest way, for a like-for-like reference (all off by
    default, as the frozen spec has it): ``archive``, a file each payload is appended to
    (length-prefixed, one write per message, as the daemon's raw log); ``store``, an SQLite
    file every version's result goes into (WAL, ``synchronous=NORMAL``, committed at most
    every 50 ms, as the daemon's outbox); ``out_qos`` 1, answers at QoS 1.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if spec.get("threads"):
        opts.intra_op_num_threads = int(spec["threads"])
        opts.inter_op_num_threads = 1
    sessions = []
    for m in spec["models"]:
        s = ort.InferenceSession(m["path"], opts, providers=["CPUExecutionProvider"])
        sessions.append((m["name"], m["version"], s, s.get_inputs()[0].name))
    features = list(spec["features"])
    out_topic = spec["out_topic"]
    pack = _encode(spec.get("format", "msgpack"))
    import msgpack

    unpack = functools.partial(msgpack.unpackb, raw=False, strict_map_key=False)
    out_qos = int(spec.get("out_qos", 0))
    archive_fd = (os.open(spec["archive"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                  if spec.get("archive") else None)
    store = _PlainStore(spec["store"]) if spec.get("store") else None

    def on_message(client, userdata, msg):
        try:  # msgpack; JSON lines (the QoS 1 burst, as mosquitto_pub -l sends them)
            p = msg.payload
            d = json.loads(p) if p[:1] == b"{" else unpack(p)
            samples = d.get("samples")
            x = np.array([[s[f] for f in features] for s in samples] if samples is not None
                         else [[d[f] for f in features]], dtype=np.float32)
        except Exception:  # a plain script that survives bad input, nothing more
            client.ack(msg.mid, msg.qos)
            return
        if archive_fd is not None:
            os.write(archive_fd, len(p).to_bytes(4, "big") + p)
        results = []
        for name, version, sess, input_name in sessions:
            outs = sess.run(None, {input_name: x})
            results.append({
                "model": name, "version": version, "label": outs[0].tolist(),
                "scores": outs[1].tolist() if len(outs) > 1 else None,
            })
        answer = {"id": d.get("id"), "model": results[0]["model"],
                  "version": results[0]["version"], "output": results[0], "all": results}
        client.publish(out_topic, pack(answer), qos=out_qos)
        if store is not None:
            store.add(d.get("id"), results)
        client.ack(msg.mid, msg.qos)  # QoS 1: acknowledged after scoring

    client = _client(spec.get("client_id", f"bench-plain-{os.getpid()}"))
    client.manual_ack_set(True)
    qos = int(spec.get("qos", 0))
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(spec["topic"], qos)
    client.on_subscribe = lambda *a: emit("ready", rss_kb=rss_kb())
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect(spec["host"], int(spec["port"]), keepalive=60)
    client.loop_forever()
    if store is not None:
        store.close()
    if archive_fd is not None:
        os.close(archive_fd)
    emit("done", rss_kb=rss_kb())


class _PlainStore:
    """The durable plain script's results table: rows gathered, written in one transaction
    at most every 50 ms."""

    def __init__(self, path: str) -> None:
        import sqlite3

        import msgpack

        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS results (id, model, version, result BLOB)")
        self._rows: list[tuple] = []
        self._due = time.monotonic() + 0.05

    def add(self, msg_id: Any, results: list[dict]) -> None:
        pack = self._pack
        self._rows += [(msg_id, r["model"], r["version"], pack(r)) for r in results]
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", self._rows)
            self._db.execute("COMMIT")
            self._rows = []
        self._due = time.monotonic() + 0.05

    def close(self) -> None:
        self.flush()
        self._db.close()


# --- bare sessions ------------------------------------------------------------------------
def bare(spec: dict) -> None:
    """onnxruntime plus the same sessions, built with the same profile settings as the
    daemon and warmed at batch 1 and the max batch, and nothing else."""
    import onnxruntime as ort

    from edgeml.profiles import load_profile, session_options

    base_kb = rss_kb()
    opts, providers = session_options(load_profile(spec.get("profile", "x86-gateway")))
    sessions = [ort.InferenceSession(m["path"], opts, providers=providers)
                for m in spec["models"]]
    for s in sessions:
        inp = s.get_inputs()[0]
        width = int(inp.shape[-1])
        for batch in (1, int(spec.get("max_batch", 64))):
            s.run(None, {inp.name: np.zeros((batch, width), dtype=np.float32)})
    emit("done", rss_kb=rss_kb(), python_onnxruntime_kb=base_kb, sessions=len(sessions))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ROLES:
        print(f"usage: python -m edgeml.host.bench.baselines {{{','.join(ROLES)}}} SPEC_JSON",
              file=sys.stderr)
        return 2
    role, raw = argv
    spec = json.loads(Path(raw[1:]).read_text() if raw.startswith("@") else raw)
    roles = {"publish": publish, "burst": burst, "count": count, "collect": count,
             "plain": plain, "bare": bare}
    roles[role](spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
