#!/usr/bin/env python3
"""One huge message on a subscribed topic: what it costs the daemon's memory, with MQTT 3.1.1
and with MQTT 5 (the device declares its Maximum Packet Size from the profile), side by side
in one run, each against a private mosquitto with its stock packet limits.

    python benchmarks/bench_big_message.py               # 200 MB message
    python benchmarks/bench_big_message.py --mb 50

For each variant: a real daemon process (light Daphnet model), RSS before the message, the
peak while it arrives (sampled every 10 ms), RSS after, and whether a good sample sent
after it is still answered. Prints a table, writes benchmarks/results/big_message.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import paho.mqtt.client as paho
import psutil

from edgeml.host.bench.e2e import build_models
from edgeml.host.broker import MosquittoBroker
from edgeml.host.datasets import DAPHNET_CHANNELS, load_daphnet

RESULTS = Path(__file__).resolve().parent / "results"


def config(path: Path, broker: MosquittoBroker, data: Path, bundle: Path, name: str,
           protocol: str) -> Path:
    path.write_text(f'''device_id = "big-{protocol.replace('.', '')}"
data_dir = "{data}"
status_interval_s = 0.5
[broker]
url = "{broker.url}"
protocol = "{protocol}"
[[pipelines]]
name = "gait"
topics = ["sensors/+/gait"]
features = {json.dumps(list(DAPHNET_CHANNELS))}
deadline_ms = 1000
[[pipelines.models]]
name = "{name}"
version = "1"
bundle = "{bundle}"
''')
    return path


def run_variant(tmp: Path, bundle: Path, name: str, protocol: str, mb: int) -> dict:
    broker = MosquittoBroker(tmp / f"broker-{protocol}")
    broker.start()
    proc = None
    try:
        cfg = config(tmp / f"edgeml-{protocol}.toml", broker, tmp / f"data-{protocol}",
                     bundle, name, protocol)
        device = f"big-{protocol.replace('.', '')}"
        got: list[dict] = []
        online = threading.Event()
        answered = threading.Event()
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{protocol}")

        def on_message(c, u, m):
            if m.topic.endswith("/status") and json.loads(m.payload).get("state") == "online":
                online.set()
            elif m.topic.endswith("/out/gait"):
                got.append(msgpack.unpackb(m.payload))
                answered.set()
        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe([(f"edgeml/{device}/status", 1), (f"edgeml/{device}/out/gait", 1)])
        sub.loop_start()
        proc = subprocess.Popen([sys.executable, "-m", "edgeml", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert online.wait(60), "daemon did not come online"
        p = psutil.Process(proc.pid)
        before = p.memory_info().rss
        peak = before
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, p.memory_info().rss)
                time.sleep(0.01)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"sender-{protocol}")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        t0 = time.monotonic()
        pub.publish("sensors/p1/gait", b"x" * (mb * 2**20), qos=1).wait_for_publish(120)
        x = load_daphnet().X[0]
        body = dict(zip(DAPHNET_CHANNELS, map(float, x), strict=True))
        body["id"] = "after"
        pub.publish("sensors/p1/gait", json.dumps(body), qos=1).wait_for_publish(30)
        ok = answered.wait(120)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let the allocator settle before the "after" figure
        stop.set()
        t.join()
        after = p.memory_info().rss
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
        log = broker.log_path.read_text(errors="replace")
        return {"protocol": protocol, "message_mb": mb, "rss_before_mb": before / 2**20,
                "rss_peak_mb": peak / 2**20, "rss_after_mb": after / 2**20,
                "answered_after": ok, "seconds_to_next_answer": round(elapsed, 2),
                "broker_dropped_it": "Dropping too large outgoing PUBLISH" in log}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="size of the big message (default 200)")
    ap.add_argument("--out", type=Path, default=RESULTS / "big_message.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = build_models(tmp / "models", ["light"], 1)["light"][0]
        rows = [run_variant(tmp, model.bundle, model.name, proto, args.mb)
                for proto in ("3.1.1", "5")]
    print(f"{'protocol':8s} {'MB':>4s} {'RSS before':>10s} {'peak':>8s} {'after':>8s} "
          f"{'answered':>8s} {'broker dropped':>14s}")
    for r in rows:
        print(f"{r['protocol']:8s} {r['message_mb']:4d} {r['rss_before_mb']:9.1f}M "
              f"{r['rss_peak_mb']:7.1f}M {r['rss_after_mb']:7.1f}M {r['answered_after']!s:>8s} "
              f"{r['broker_dropped_it']!s:>14s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "big_message", "results": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
