"""Two ways to drive paho under asyncio, measured side by side in one run.

(a) ``thread``: the previous design, paho's network thread (``loop_start``), results crossing
    into the loop in coalesced bursts (a subclass here, :class:`ThreadDrivenTransport`).
(b) ``loop``: :class:`edgeml.transport.mqtt.MqttTransport` as shipped: paho's socket driven by
    the event loop (``add_reader``, ``add_writer`` only while the send buffer is full,
    ``loop_misc`` every second, TCP connect in an executor, own reconnect), reads buffered
    (one ``recv`` per burst), as aiomqtt 2.x and paho's ``examples/loop_asyncio.py`` drive
    paho. Both use the same buffered socket.

Per design, against a private mosquitto on loopback (the load generators are separate
processes using plain paho, identical for both designs):

- ``flood_qos0`` / ``flood_qos1``: a publisher process sends N small messages as fast as it
  can; the transport under test only counts them (QoS 1 with ``manual_ack``, acknowledged
  a burst at a time with ``ack_many``, as the daemon does).
  msgs/s = messages / (last - first arrival); CPU = this process's ``time.process_time`` per
  message (the paho thread included).
- ``rtt``: a requester process publishes at a paced 1,000 msg/s and times each answer; the
  transport under test answers every request with ``publish_nowait`` (QoS 0). p50/p99 in ms.

Usage: ``python benchmarks/bench_transport.py [--n0 100000] [--n1 30000] [--rtt-s 5]
[--rounds 2]``. Prints a table; writes ``benchmarks/results/transport.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from edgeml.host.broker import MosquittoBroker
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings

HERE = Path(__file__).resolve().parent


class ThreadDrivenTransport(MqttTransport):
    """Design (a): the transport's previous design, paho's own network thread (``loop_start``):
    paho reads, writes and reconnects there, and what it learns crosses into the loop through
    ``call_soon_threadsafe``; publishes from the loop wake that thread through paho's socket
    pair."""

    def _post(self, fn) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn)

    def _start_network(self, connect_kwargs: dict) -> None:
        s = self.settings
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive, **connect_kwargs)
        self._client.loop_start()

    def _on_socket_close(self, client, userdata, sock) -> None:
        pass  # paho's thread reconnects by itself

    def _deliver(self, topic, payload, qos, retain, mid) -> None:
        self._quickack()  # per message: no read bursts are visible from here
        super()._deliver(topic, payload, qos, retain, mid)

    async def _stop_network(self) -> None:
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)


DESIGNS = {"thread": ThreadDrivenTransport, "loop": MqttTransport}


# ---- load generators (separate processes, plain paho) ----------------------------------------
def _client(port: int) -> paho.Client:
    import socket

    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_socket_open = lambda cl, ud, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def role_flood(port: int, n: int, qos: int) -> None:
    c = _client(port)
    payload = b"x" * 64
    infos = [c.publish("flood/a", payload, qos) for _ in range(n)]
    infos[-1].wait_for_publish(120)
    if qos:
        for i in infos:
            i.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def role_requester(port: int, seconds: float, rate: float) -> None:
    rtts: list[float] = []
    done = threading.Event()
    total = int(seconds * rate)

    def on_message(cl, ud, msg):
        (sent,) = struct.unpack("!d", msg.payload[:8])
        rtts.append(time.perf_counter() - sent)
        if len(rtts) >= total:
            done.set()

    subscribed = threading.Event()
    c = _client(port)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe("ans/#", 0)
    subscribed.wait(10)
    start = time.perf_counter()
    for i in range(total):
        target = start + i / rate
        while (now := time.perf_counter()) < target:
            time.sleep(max(0.0, min(target - now, 0.0005)))
        c.publish("req/a", struct.pack("!d", time.perf_counter()) + b"y" * 56, 0)
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    rtts.sort()
    print(json.dumps({"answered": len(rtts), "sent": total,
                      "p50_ms": 1e3 * rtts[len(rtts) // 2] if rtts else None,
                      "p99_ms": 1e3 * rtts[int(len(rtts) * 0.99)] if rtts else None,
                      "max_ms": 1e3 * rtts[-1] if rtts else None}))


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env)


# ---- measurements in this process -------------------------------------------------------------
async def flood(design: str, broker: MosquittoBroker, n: int, qos: int) -> dict:
    cls = DESIGNS[design]
    s = BrokerSettings(url=broker.url, client_id=f"bench-{design}-{qos}", clean_start=True)
    async with cls(s, manual_ack=qos > 0) as t:
        await t.subscribe([("flood/#", qos)])
        cpu0 = time.process_time()
        proc = _spawn("--role", "flood", "--port", str(broker.port), "--n", str(n),
                      "--qos", str(qos))
        count, first, last = 0, None, None
        it = t.batches(1024)
        try:
            while count < n:
                batch = await asyncio.wait_for(anext(it), 30)
                now = time.perf_counter()
                first = first or now
                last = now
                count += len(batch)
                if qos:
                    t.ack_many(batch)  # as the daemon acknowledges: a burst at a time
        except TimeoutError:
            pass
        cpu = time.process_time() - cpu0
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    rate = (count - 1) / (last - first) if count > 1 and last > first else None
    return {"received": count, "sent": n, "msgs_per_s": rate,
            "cpu_us_per_msg": 1e6 * cpu / max(count, 1)}


async def rtt(design: str, broker: MosquittoBroker, seconds: float, rate: float) -> dict:
    cls = DESIGNS[design]
    s = BrokerSettings(url=broker.url, client_id=f"bench-{design}-rtt", clean_start=True)
    async with cls(s) as t:
        await t.subscribe([("req/#", 0)])
        cpu0 = time.process_time()
        proc = _spawn("--role", "requester", "--port", str(broker.port), "--seconds",
                      str(seconds), "--rate", str(rate))
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, proc.communicate)
        answered = 0

        async def answer() -> None:
            nonlocal answered
            async for batch in t.batches(1024):
                for m in batch:
                    t.publish_nowait("ans/a", m.payload, 0)
                answered += len(batch)

        task = asyncio.create_task(answer())
        out, _ = await fut
        task.cancel()
        cpu = time.process_time() - cpu0
    res = json.loads(out)
    res["cpu_us_per_msg"] = 1e6 * cpu / max(answered, 1)
    return res


async def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        try:
            rounds: list[dict] = []
            for r in range(args.rounds):
                order = list(DESIGNS) if r % 2 == 0 else list(reversed(DESIGNS))
                for design in order:
                    rounds.append({
                        "round": r, "design": design,
                        "flood_qos0": await flood(design, broker, args.n0, 0),
                        "flood_qos1": await flood(design, broker, args.n1, 1),
                        "rtt": await rtt(design, broker, args.rtt_s, 1000.0),
                    })
                    print(f"  round {r} {design}: done", file=sys.stderr)
        finally:
            broker.stop()
    summary = {}
    for design in DESIGNS:
        rs = [x for x in rounds if x["design"] == design]

        def med(path: tuple[str, str], rs=rs):
            vals = [x[path[0]][path[1]] for x in rs if x[path[0]][path[1]] is not None]
            return statistics.median(vals) if vals else None
        summary[design] = {
            "qos0_msgs_per_s": med(("flood_qos0", "msgs_per_s")),
            "qos0_cpu_us_per_msg": med(("flood_qos0", "cpu_us_per_msg")),
            "qos1_msgs_per_s": med(("flood_qos1", "msgs_per_s")),
            "qos1_cpu_us_per_msg": med(("flood_qos1", "cpu_us_per_msg")),
            "rtt_p50_ms": med(("rtt", "p50_ms")),
            "rtt_p99_ms": med(("rtt", "p99_ms")),
            "rtt_cpu_us_per_msg": med(("rtt", "cpu_us_per_msg")),
        }
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "paho": paho.__version__ if hasattr(paho, "__version__") else None,
            "params": vars(args), "summary": summary, "rounds": rounds}


def table(summary: dict) -> str:
    cols = [("qos0_msgs_per_s", "QoS0 msg/s", "{:,.0f}"),
            ("qos0_cpu_us_per_msg", "QoS0 CPU us/msg", "{:.1f}"),
            ("qos1_msgs_per_s", "QoS1+ack msg/s", "{:,.0f}"),
            ("qos1_cpu_us_per_msg", "QoS1 CPU us/msg", "{:.1f}"),
            ("rtt_p50_ms", "RTT p50 ms", "{:.3f}"), ("rtt_p99_ms", "RTT p99 ms", "{:.3f}"),
            ("rtt_cpu_us_per_msg", "RTT CPU us/msg", "{:.1f}")]
    head = "| design | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for design, row in summary.items():
        cells = ["-" if row[k] is None else fmt.format(row[k]) for k, _, fmt in cols]
        lines.append(f"| {design} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["flood", "requester"])
    ap.add_argument("--port", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--qos", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--n0", type=int, default=100_000)
    ap.add_argument("--n1", type=int, default=30_000)
    ap.add_argument("--rtt-s", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "transport.json")
    args = ap.parse_args()
    if args.role == "flood":
        return role_flood(args.port, args.n, args.qos)
    if args.role == "requester":
        return role_requester(args.port, args.seconds, args.rate)
    for k in ("role", "port", "n", "qos", "seconds", "rate"):
        delattr(args, k)
    out = args.out
    del args.out
    report = asyncio.run(run(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["summary"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
