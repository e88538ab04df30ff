"""What the drift watch and the metrics endpoint cost.

Micro (this process, no broker; the fastest of 5 rounds per figure):
  * ``DriftMonitor.on_batch`` per row, on real data: Daphnet single samples (9 channels) and
    BasicMotions windows (100 x 6), at batch 1, 8 and 64;
  * ``on_outcomes`` per row (a version's labels and scores into its output window);
  * ``LatencyRing.add`` with the cumulative histogram /metrics reads (per answer and per
    version batch);
  * one /metrics scrape (``generate_latest`` over a device with one pipeline, one version).

Paced (``--paced``, needs mosquitto): ``python -m edgeml run`` on Daphnet single samples at a
paced 1,000 msg/s, once with ``[drift]`` + ``[metrics]`` on (scraped every second) and once
with both off; the daemon's CPU seconds per message from /proc.

In-process (``--inproc``): the device on the in-memory broker in this process, 20,000 Daphnet
samples, drift on vs off, alternating; process CPU per message (no broker or other process).

Profiled (``--profile``): one in-process run, drift on, under cProfile; the share of the
device's time inside the drift watch's entry points and the latency ring (one run: no
run-to-run noise in the shares).

Daphnet (``--daphnet``): drift figures, no timing. Time splits of the recording (the
reference from a first half, the second half streamed): the whole recording, the walking part
from several start points, shifted copies, a random split; per-window max PSI, alerts at the
defaults, the whole stream at once, the model's score PSI.

Prints a table and writes benchmarks/results/drift.json.

    python benchmarks/bench_drift.py [--seconds 1] [--daphnet] [--profile] [--inproc] [--paced]
        [--rate 1000] [--paced-seconds 10] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from edgeml.config import DriftConfig
from edgeml.core.assemble import Row
from edgeml.core.drift import DriftMonitor, make_reference
from edgeml.core.stats import LatencyRing
from edgeml.host.datasets import (
    BASICMOTIONS_CHANNELS,
    DAPHNET_CHANNELS,
    load_basicmotions,
    load_daphnet,
)

RESULTS = Path(__file__).parent / "results" / "drift.json"


class _M:  # a member as the monitor sees it
    def __init__(self, ref, kind):
        self.name, self.version, self.role = "m", "1", "champion"
        self.manifest = type("Mf", (), {"reference": ref,
                                        "outputs": type("O", (), {"kind": kind})()})()


class _O:  # an outcome
    def __init__(self, labels, scores):
        self.name, self.version, self.labels, self.scores = "m", "1", labels, scores


def _timeit(fn, seconds: float, rounds: int = 5) -> tuple[float, int]:
    """The fastest of ``rounds`` rounds of ``seconds / rounds`` each, as (elapsed, calls):
    a shared host's interruptions only ever add time."""
    best: tuple[float, int] | None = None
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if n % 16 == 0 and time.perf_counter() - t0 > seconds / rounds:
                break
        got = (time.perf_counter() - t0, n)
        if best is None or got[0] / got[1] < best[0] / best[1]:
            best = got
    return best


def _windows(ref: dict, stream: np.ndarray, window: int = 2000) -> tuple[list[float], list]:
    """Max channel PSI of each closed window and the alerts, at the default [drift] settings
    but ``window``; the stream goes in 16 rows at a time."""
    raised: list = []
    mon = DriftMonitor("gait", DriftConfig(window=window), features=DAPHNET_CHANNELS,
                       window=None, hop=None, record=lambda d: None, clock=lambda: 0.0,
                       alert=lambda k, d: raised.append((k, d["state"], d.get("channel"))))
    mon.set_reference(ref, "gait:1")
    psis: list[float] = []
    for j in range(0, len(stream), 16):
        mon.observe_rows(["g"] * len(stream[j:j + 16]), stream[j:j + 16])
        if mon.current and mon.windows > len(psis):
            psis.append(round(max(mon.current["psi"].values()), 3))
    return psis, sorted(set(raised))


def daphnet_split() -> list[dict]:
    """Daphnet time splits: the reference from a first half, the second half streamed twice
    (enough windows for k = 2), max channel PSI per 2,000-sample window and the alerts at the
    defaults; the whole second half at once; the model's output (IsolationForest score) PSI;
    shifted copies of the walking split's second half."""
    from sklearn.ensemble import IsolationForest

    from edgeml.core.drift import SnapshotDrift
    from edgeml.host.datasets import DAPHNET_HZ, daphnet_walking_start

    X = load_daphnet().X.astype(np.float64)
    start = daphnet_walking_start(X)
    out = []

    def case(label: str, ref_x: np.ndarray, stream: np.ndarray, *, ref_from=None) -> dict:
        est = IsolationForest(n_estimators=25, random_state=0).fit(ref_x)
        ref = make_reference(ref_x if ref_from is None else ref_from, DAPHNET_CHANNELS, None,
                             kind="anomaly", labels=est.predict(ref_x),
                             scores=est.decision_function(ref_x))
        psis, raised = _windows(ref, np.concatenate([stream] * 2))
        whole = SnapshotDrift(ref, DAPHNET_CHANNELS, "anomaly", None)
        whole.add_rows(stream)
        whole.add_outputs(est.predict(stream).tolist(), est.decision_function(stream))
        fig = whole.figures()
        row = {"case": label, "reference_samples": len(ref_x), "stream_samples": len(stream),
               "window_max_psi": psis, "alerts": [list(a) for a in raised],
               "whole_max_psi": round(fig["max_input_psi"], 3),
               "whole_mean_psi": round(float(np.mean([v["psi"] for v in
                                                      fig["inputs"].values()])), 3),
               "output_score_psi": (round(fig["outputs"]["score_psi"], 3)
                                    if "score_psi" in fig["outputs"] else None)}
        out.append(row)
        return ref

    half = len(X) // 2
    case("whole recording: first half -> second half", X[:half], X[half:])
    for t0 in (start // DAPHNET_HZ, 20, 24, 28, 32):
        s0 = t0 * DAPHNET_HZ if t0 != start // DAPHNET_HZ else start
        mid = s0 + (len(X) - s0) // 2
        case(f"walking from {s0 / DAPHNET_HZ:g} s: first half -> second half", X[s0:mid],
             X[mid:])
    mid = start + (len(X) - start) // 2
    rest = X[mid:]
    ref_w = X[start:mid]
    for ch, k in (("leg_vert", 0.25), ("leg_vert", 0.5), ("ankle_horiz_fwd", 0.25),
                  ("trunk_horiz_lateral", 1.0)):
        i = DAPHNET_CHANNELS.index(ch)
        shifted = rest.copy()
        shifted[:, i] += k * ref_w[:, i].std()
        case(f"walking split, second half with {ch} + {k:g} std", ref_w, shifted)
    case("walking split, second half + 100 milli-g on every channel", ref_w, rest + 100.0)
    perm = np.random.default_rng(0).permutation(len(X))
    case("random split (not a time split)", X[perm[:half]], X[perm[half:]])
    return out


def micro(seconds: float) -> list[dict]:
    out = []
    dap = load_daphnet().X
    ref_d = make_reference(dap, DAPHNET_CHANNELS, None, kind="anomaly",
                           labels=np.ones(len(dap), int), scores=np.zeros((len(dap), 1)))
    bm = load_basicmotions("TRAIN")
    ref_b = make_reference(bm.flat(), BASICMOTIONS_CHANNELS, 100, kind="classifier",
                           labels=np.asarray(bm.y), scores=np.full((40, 4), 0.25))
    cases = [("daphnet 9 ch, single samples", dap, DAPHNET_CHANNELS, None, ref_d, "anomaly"),
             ("basicmotions 100x6 windows", bm.flat(), BASICMOTIONS_CHANNELS, 100, ref_b,
              "classifier")]
    for name, X, feats, window, ref, kind in cases:
        for batch in (1, 8, 64):
            mon = DriftMonitor("p", DriftConfig(), features=feats, window=window,
                               hop=window, alert=lambda k, d: None, record=lambda d: None,
                               clock=time.time)
            members = (_M(ref, kind),)
            mon.follow(members)
            rows = [Row(np.asarray(X[i % len(X)], np.float32), i, "sensors/a", i, 0.0)
                    for i in range(batch)]
            x = np.stack([r.features for r in rows])
            elapsed, n = _timeit(lambda m=mon, r=rows, x=x, ms=members: m.on_batch(r, x, ms),
                                 seconds)
            labels = [1] * batch if kind == "anomaly" else ["Walking"] * batch
            scores = np.zeros((batch, 1 if kind == "anomaly" else 4), np.float32)
            oc = [_O(labels, scores)]
            e2, n2 = _timeit(lambda m=mon, oc=oc: m.on_outcomes(oc), seconds)
            out.append({"case": name, "batch": batch,
                        "inputs_us_per_row": elapsed / (n * batch) * 1e6,
                        "outputs_us_per_row": e2 / (n2 * batch) * 1e6,
                        "windows_closed": mon.windows})
    ring = LatencyRing()
    e3, n3 = _timeit(lambda: ring.add(1.7), seconds)
    lat = {"latency_ring_add_us": e3 / n3 * 1e6}
    return out, lat


def scrape_cost(seconds: float) -> dict:
    """One /metrics exposition of a real device (activity bundle) that has not connected."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import build_activity_bundle

    from edgeml.config import parse_config
    from edgeml.core import metrics
    from edgeml.core.device import Device

    with tempfile.TemporaryDirectory() as d:
        bundle = build_activity_bundle(Path(d))
        cfg = parse_config({
            "device_id": "bench", "data_dir": str(Path(d) / "data"),
            "pipelines": [{"name": "activity", "topics": ["s/+"], "features":
                           list(BASICMOTIONS_CHANNELS), "window": {"size": 100, "hop": 100},
                           "models": [{"name": "activity", "version": "1",
                                       "bundle": str(bundle)}]}]})

        async def run() -> dict:
            from edgeml.core.ingress import Ingress

            async with Device(cfg) as dev:
                dev.ingress = getattr(dev, "ingress", None) or Ingress([], device="b",
                                                                       dlq_topic="x")
                reg = metrics.make_registry(dev)
                body = metrics.exposition(reg)
                elapsed, n = _timeit(lambda: metrics.exposition(reg), seconds)
                return {"scrape_ms": elapsed / n * 1e3, "bytes": len(body),
                        "series": sum(1 for line in body.splitlines()
                                      if line and not line.startswith(b"#"))}
        return asyncio.run(run())


# ---- paced CPU: drift + metrics on vs off -----------------------------------------------------
def paced(rate: float, seconds: float, repeats: int = 1) -> list[dict]:
    import paho.mqtt.client as paho

    from edgeml.host.broker import MosquittoBroker

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import build_gait_anomaly_bundle

    results = []
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        bundle = build_gait_anomaly_bundle(base)
        X = load_daphnet().X
        broker = MosquittoBroker(base / "broker")
        broker.start()
        try:
            order = [("drift+metrics off", False), ("drift+metrics on", True)] * repeats
            for label, on in [*order, ("drift+metrics off", False)]:
                results.append(_paced_run(base, broker, bundle, X, rate, seconds, label, on,
                                          paho))
        finally:
            broker.stop()
    return results


def inproc(n: int, repeats: int, profile: bool = False) -> list[dict]:
    """The device on the in-memory broker in this process (no broker, no other process):
    process CPU per message for ``n`` Daphnet JSON samples on 4 topics, drift on vs off,
    alternating. Includes this loop's own publishing."""
    from edgeml.config import parse_config
    from edgeml.core.device import Device
    from edgeml.transport.fake import FakeBroker
    from edgeml.transport.settings import BrokerSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import build_gait_anomaly_bundle

    X = load_daphnet().X
    payloads = [json.dumps(dict(zip(DAPHNET_CHANNELS, map(float, r), strict=True))).encode()
                for r in X[:5000]]
    out = []
    with tempfile.TemporaryDirectory() as d:
        bundle = build_gait_anomaly_bundle(Path(d))

        async def run(on: bool, k: int, prof=None) -> float:
            fb = FakeBroker()
            cfg = parse_config({
                "device_id": "x", "data_dir": str(Path(d) / f"data{k}"),
                "metrics": {"listen": ""},
                "drift": {"enabled": on, "rate_interval_s": 1.0},
                "pipelines": [{"name": "gait", "topics": ["s/+/g"], "qos": 0,
                               "features": list(DAPHNET_CHANNELS),
                               "models": [{"name": "gait", "version": "1",
                                           "bundle": str(bundle)}]}]})
            dev = Device(cfg, connector=fb.connector)
            sensor = fb.client(BrokerSettings(client_id="s", clean_start=True))
            await sensor.__aenter__()
            async with dev:
                task = asyncio.create_task(dev.run())
                await dev.ready.wait()
                st = dev.pipelines["gait"].stats
                c0 = time.process_time()
                if prof is not None:
                    prof.enable()
                for i in range(n):
                    sensor.publish_nowait(f"s/p{i % 4}/g", payloads[i % len(payloads)], qos=0)
                    if i % 4 == 3:
                        await asyncio.sleep(0.001)
                while st.scored < n:
                    await asyncio.sleep(0.01)
                if prof is not None:
                    prof.disable()
                cpu = time.process_time() - c0
                dev.request_stop()
                await task
            await sensor.close()
            return cpu / n * 1e6

        if profile:
            return [_profiled(lambda prof: asyncio.run(run(True, 0, prof)), n)]
        k = 0
        for _ in range(repeats):
            for on in (False, True):
                k += 1
                out.append({"variant": "drift on" if on else "drift off", "messages": n,
                            "cpu_us_per_msg": round(asyncio.run(run(on, k)), 1)})
    return out


#: the drift watch's entry points on the device (DriftMonitor) and the /metrics latency
#: histogram's per-value update (LatencyRing.add, also on when [metrics] is off)
_HOOKS = {("drift.py", "on_batch"): "drift inputs", ("drift.py", "on_outcomes"): "drift outputs",
          ("drift.py", "tick"): "drift rate ticks", ("stats.py", "add"): "latency ring + histogram"}


def _profiled(run, n: int) -> dict:
    """One in-process run, drift on, under cProfile: the share of the profiled time spent
    inside the drift watch's entry points (their callees included) and the latency
    histogram. cProfile slows every Python call, so the shares are approximate, but they
    come from one run: no run-to-run noise in the on/off difference."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    run(prof)
    st = pstats.Stats(prof)
    total = st.total_tt
    parts: dict[str, float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        label = _HOOKS.get((Path(file).name, func))
        if label and ("edgeml" in file):
            parts[label] = parts.get(label, 0.0) + ct
    return {"variant": "drift on, profiled", "messages": n,
            "profiled_s": round(total, 3),
            "shares": {k: round(v / total, 4) for k, v in sorted(parts.items())},
            "us_per_msg_profiled": {k: round(v / n * 1e6, 2) for k, v in sorted(parts.items())},
            "total_us_per_msg_profiled": round(total / n * 1e6, 1)}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _mean_batch(client, topic: str) -> float | None:
    """Rows per scoring batch over the run, from the daemon's retained status: CPU per
    message falls as batches grow, so a run that fell behind looks cheaper."""
    got = threading.Event()
    box: list[dict] = []

    def on_message(_c, _u, msg) -> None:
        try:
            doc = json.loads(msg.payload)
            vs = doc["pipelines"]["gait"]["versions"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            return
        if vs.get("batches"):
            box.append(vs)
            got.set()

    client.on_message = on_message
    client.subscribe(topic, qos=0)
    got.wait(3.0)
    client.unsubscribe(topic)
    return round(box[-1]["rows"] / box[-1]["batches"], 2) if box else None


def _paced_run(base, broker, bundle, X, rate, seconds, label, on, paho) -> dict:
    tag = label.split()[1] + str(time.monotonic_ns())
    feats = ", ".join(f'"{c}"' for c in DAPHNET_CHANNELS)
    cfg = base / f"{tag}.toml"
    cfg.write_text("\n".join([
        f'device_id = "b{tag[-6:]}"', f'data_dir = "{base / tag}"', 'profile = "x86-gateway"',
        "status_interval_s = 1.0",  # the last status (rows and batches) is fresh at the end
        "[metrics]", 'listen = "127.0.0.1:0"' if on else 'listen = ""',
        "[drift]", f"enabled = {'true' if on else 'false'}", "rate_interval_s = 1.0",
        "[broker]", f'url = "{broker.url}"', "[[pipelines]]", 'name = "gait"',
        'topics = ["sensors/+/gait"]', f"features = [{feats}]", "deadline_ms = 50", "qos = 0",
        "[[pipelines.models]]", 'name = "gait"', 'version = "1"', f'bundle = "{bundle}"',
    ]) + "\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "-v", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    port = None
    lines: list[str] = []
    try:
        t_end = time.monotonic() + 60
        for line in proc.stdout:  # wait for "ready" (and the metrics port)
            lines.append(line)
            if "metrics on http://" in line:
                port = int(line.rsplit(":", 1)[1].split("/")[0])
            if "ready:" in line:
                break
            if time.monotonic() > t_end:
                raise RuntimeError("daemon not ready: " + "".join(lines[-20:]))
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        client.connect(broker.host, broker.port)
        client.loop_start()
        payloads = [json.dumps(dict(zip(DAPHNET_CHANNELS, map(float, r), strict=True))).encode()
                    for r in X[:5000]]
        n = int(rate * seconds)
        cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
        scrapes = 0
        next_scrape = t0 + 1.0
        for i in range(n):
            target = t0 + i / rate
            while True:
                now = time.perf_counter()
                if now >= target:
                    break
                time.sleep(min(target - now, 0.001))
            client.publish(f"sensors/p{i % 4}/gait", payloads[i % len(payloads)], qos=0)
            if port and now >= next_scrape:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                scrapes += 1
                next_scrape += 1.0
        time.sleep(1.0)  # let the daemon finish the tail before reading its CPU
        cpu = _cpu_s(proc.pid) - cpu0
        span = time.perf_counter() - t0
        batch = _mean_batch(client, f"edgeml/b{tag[-6:]}/status")
        client.loop_stop()
        client.disconnect()
        return {"variant": label, "messages": n, "rate": rate, "span_s": round(span, 2),
                "cpu_s": round(cpu, 3), "cpu_us_per_msg": round(cpu / n * 1e6, 1),
                "cpu_share": round(cpu / span, 3), "scrapes": scrapes, "mean_batch": batch}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def on_off_summary(runs: list[dict]) -> dict:
    """Medians and spread (min..max) of CPU per message, drift on vs off, and the paired
    differences: each "on" run minus the mean of the "off" runs either side of it (the runs
    alternate, so a pair shares the host's load of that minute)."""
    seq = [(("on" in r["variant"].split()[1]), r["cpu_us_per_msg"]) for r in runs]
    off = [v for on, v in seq if not on]
    on = [v for o, v in seq if o]
    diffs = []
    for i, (is_on, v) in enumerate(seq):
        if is_on:
            near = [seq[j][1] for j in (i - 1, i + 1) if 0 <= j < len(seq) and not seq[j][0]]
            if near:
                diffs.append(round(v - float(np.mean(near)), 1))

    def stats(vals: list[float]) -> dict:
        return {"n": len(vals), "median": round(float(np.median(vals)), 1),
                "min": round(min(vals), 1), "max": round(max(vals), 1)} if vals else {"n": 0}

    out = {"off": stats(off), "on": stats(on), "paired_diff": stats(diffs),
           "paired_diffs": diffs}
    batch = [r.get("mean_batch") for r in runs]
    if len(runs) >= 4 and all(batch) and len(set(batch)) > 1:
        # CPU per message falls as batches grow (the per-wake-up cost is shared), and a run
        # with the watch on batches a little more: fit cpu = a + d * on + c / rows_per_batch
        # over all runs; d is the on/off difference at equal batching
        y = np.asarray([v for _, v in seq])
        a = np.c_[np.ones(len(y)), [1.0 if o else 0.0 for o, _ in seq], 1.0 / np.asarray(batch)]
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ coef
        cov = (resid @ resid) / (len(y) - 3) * np.linalg.inv(a.T @ a)
        out["batch_adjusted_diff"] = {"us_per_msg": round(float(coef[1]), 1),
                                      "stderr": round(float(np.sqrt(cov[1, 1])), 1),
                                      "per_batch_us": round(float(coef[2]), 1)}
    return out


def _print_summary(s: dict) -> None:
    for k in ("off", "on"):
        v = s[k]
        print(f"  {k:3}: median {v['median']:.1f} us/msg, range {v['min']:.1f}..{v['max']:.1f} "
              f"over {v['n']}")
    d = s["paired_diff"]
    print(f"  on - off (paired): median {d['median']:+.1f} us/msg, range {d['min']:+.1f}.."
          f"{d['max']:+.1f} over {d['n']} pairs")
    adj = s.get("batch_adjusted_diff")
    if adj:
        print(f"  on - off at equal rows per batch (least squares): {adj['us_per_msg']:+.1f} "
              f"+- {adj['stderr']:.1f} us/msg (standard error)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per micro case")
    ap.add_argument("--paced", action="store_true", help="also the paced daemon CPU test")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1, help="off/on pairs, alternating")
    ap.add_argument("--daphnet", action="store_true",
                    help="also the Daphnet time-split drift figures (no timing)")
    ap.add_argument("--inproc", action="store_true",
                    help="also the device on the in-memory broker, drift on vs off")
    ap.add_argument("--profile", action="store_true",
                    help="also one in-process run under cProfile: the share of the device's "
                         "time in the drift watch and the latency histogram")
    args = ap.parse_args()
    rows, lat = micro(args.seconds)
    print(f"{'case':34} {'batch':>5} {'inputs us/row':>14} {'outputs us/row':>15}")
    for r in rows:
        print(f"{r['case']:34} {r['batch']:>5} {r['inputs_us_per_row']:>14.2f} "
              f"{r['outputs_us_per_row']:>15.2f}")
    print(f"LatencyRing.add with the /metrics histogram: {lat['latency_ring_add_us']:.3f} us")
    scrape = scrape_cost(args.seconds)
    print(f"/metrics exposition: {scrape['scrape_ms']:.2f} ms per scrape, "
          f"{scrape['bytes']} bytes, {scrape['series']} series (1 pipeline, 1 version)")
    doc = {"host": platform.node(), "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(),
           "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "micro": rows, **lat, "scrape": scrape}
    if args.daphnet:
        rows_d = daphnet_split()
        print(f"\n{'Daphnet split (window 2,000, defaults)':58} {'per-window max PSI':24} "
              f"{'whole':>6} {'out':>6}  alerts")
        for r in rows_d:
            alerts = ", ".join(f"{a[0]}({a[2]})" for a in r["alerts"] if a[1] == "raised")
            print(f"{r['case']:58} {r['window_max_psi']!s:24} {r['whole_max_psi']:>6.3f} "
                  f"{r['output_score_psi'] or 0:>6.3f}  {alerts or 'none'}")
        doc["daphnet_split"] = rows_d
    if args.inproc:
        runs = inproc(20_000, max(args.repeats, 2))
        print(f"\n{'in-process device':28} {'msgs':>6} {'us/msg':>8}")
        for r in runs:
            print(f"{r['variant']:28} {r['messages']:>6} {r['cpu_us_per_msg']:>8.1f}")
        doc["inproc"] = runs
        doc["inproc_summary"] = on_off_summary(runs)
        _print_summary(doc["inproc_summary"])
    if args.profile:
        prof = inproc(20_000, 1, profile=True)[0]
        print(f"\nin-process device under cProfile, drift on, {prof['messages']} messages: "
              f"{prof['total_us_per_msg_profiled']} us/msg profiled")
        for k, v in prof["shares"].items():
            print(f"  {k:20} {v * 100:6.2f} %  {prof['us_per_msg_profiled'][k]:7.2f} us/msg")
        doc["profile"] = prof
    if args.paced:
        runs = paced(args.rate, args.paced_seconds, args.repeats)
        print(f"\n{'paced daemon':28} {'msgs':>6} {'CPU s':>7} {'us/msg':>8} {'CPU share':>9} "
              f"{'rows/batch':>10}")
        for r in runs:
            print(f"{r['variant']:28} {r['messages']:>6} {r['cpu_s']:>7.2f} "
                  f"{r['cpu_us_per_msg']:>8.1f} {r['cpu_share']:>9.3f} "
                  f"{r['mean_batch'] if r['mean_batch'] is not None else '-':>10}")
        doc["paced"] = runs
        doc["paced_summary"] = on_off_summary(runs)
        try:  # earlier paced summaries: the run-to-run picture across sessions
            prev = json.loads(RESULTS.read_text())
            doc["paced_history"] = [*prev.get("paced_history", []),
                                    *([{"ts": prev.get("section_ts", {}).get("paced",
                                                                             prev.get("ts")),
                                        **prev["paced_summary"]}]
                                      if "paced_summary" in prev else [])]
        except (OSError, ValueError):
            pass
        _print_summary(doc["paced_summary"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    try:  # sections not run this time stay as they were, with the time they were measured
        old = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        old = {}
    sections = ("micro", "daphnet_split", "inproc", "paced", "profile")
    ts = {**old.get("section_ts", {}),
          **dict.fromkeys([k for k in doc if k in sections], doc["ts"])}
    doc = {**{k: v for k, v in old.items() if k not in doc}, **doc, "section_ts": ts}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
