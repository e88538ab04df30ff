"""Raw-input archive throughput: can the archive keep up with the daemon?

Measures, on this machine's disk, with 100-byte payloads (BasicMotions samples as JSON):
  * append() one record at a time, default fsync interval (1 s, fsynced by a background
    thread like the daemon's), with per-call latency percentiles (the worst case is a segment
    roll: flush + fsync + sha256 of the finished segment + a new file);
  * append_many() bursts of 100 (what the daemon does per MQTT burst), same fsync policy;
  * fsync per record (``fsync_interval_s = 0``): the durable-but-slow setting;
  * read() of everything written.

Prints a table and writes benchmarks/results/rawlog.json.

    python benchmarks/bench_rawlog.py [--seconds 3] [--dir /path/on/the/target/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import RawLog

TOPIC = "sensors/watch-01/imu"


def payloads(n_distinct: int = 4000, size: int = 100) -> list[bytes]:
    """BasicMotions samples as JSON, padded with whitespace to exactly ``size`` bytes."""
    ds = load_basicmotions("TRAIN")
    rows = ds.X.reshape(-1, ds.X.shape[2])[:n_distinct]
    out = []
    for row in rows:
        text = json.dumps(dict(zip(ds.channels, (round(float(v), 4) for v in row),
                                   strict=True)), separators=(",", ":"))
        raw = text.encode()[: size - 1]
        if not raw.endswith(b"}"):  # too long: fewer digits
            text = json.dumps(dict(zip(ds.channels, (round(float(v), 2) for v in row),
                                       strict=True)), separators=(",", ":"))
            raw = text.encode()
        out.append(raw[:-1] + b" " * (size - len(raw)) + b"}")
    assert all(len(p) == size for p in out)
    return out


class Syncer:
    """Calls sync() every ``interval`` seconds from a thread, like the daemon's fsync loop."""

    def __init__(self, log: RawLog, interval: float):
        self.log, self.interval = log, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.log.sync()

    def __enter__(self) -> Syncer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def pct(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def bench_append(base: Path, pl: list[bytes], seconds: float) -> dict:
    """Long enough (``seconds``) that the 1 s fsyncs and several segment rolls are included."""
    d = base / "append"
    log = RawLog(d, budget_bytes=None)
    now = time.time()
    k = len(pl)
    lat: list[int] = []
    clock = time.perf_counter_ns
    n = 0
    with Syncer(log, log.fsync_interval_s):
        t0 = time.perf_counter()
        c0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            for i in range(n, n + 10_000):
                a = clock()
                log.append(TOPIC, pl[i % k], now)
                lat.append(clock() - a)
            n += 10_000
        log.flush()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
    st = log.stats
    log.close()
    lat.sort()
    return {"records": n, "seconds": wall, "records_per_s": n / wall,
            "mb_per_s": st["bytes_appended"] / wall / 1e6, "cpu_us_per_record": cpu / n * 1e6,
            "latency_us": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                           "p99.9": pct(lat, 0.999), "max": lat[-1] / 1000.0},
            "segments": st["segments"], "fsyncs": st["fsyncs"],
            "bytes_per_record": st["bytes_appended"] / n}


def bench_append_many(base: Path, pl: list[bytes], seconds: float, burst: int = 100) -> dict:
    d = base / "append_many"
    log = RawLog(d, budget_bytes=None)
    now = time.time()
    k = len(pl)
    bursts = [[(TOPIC, pl[(b * burst + j) % k], now) for j in range(burst)] for b in range(50)]
    with Syncer(log, log.fsync_interval_s):
        t0 = time.perf_counter()
        b = 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(100):
                log.append_many(bursts[b % len(bursts)])
                b += 1
        wall = time.perf_counter() - t0
    st = log.stats
    log.close()
    shutil.rmtree(d)
    return {"records": st["records_appended"], "burst": burst, "seconds": wall,
            "records_per_s": st["records_appended"] / wall,
            "mb_per_s": st["bytes_appended"] / wall / 1e6, "fsyncs": st["fsyncs"]}


def bench_fsync_each(base: Path, pl: list[bytes], max_records: int, max_s: float) -> dict:
    d = base / "fsync_each"
    log = RawLog(d, budget_bytes=None, fsync_interval_s=0)
    now = time.time()
    lat: list[int] = []
    t0 = time.perf_counter()
    n = 0
    while n < max_records and time.perf_counter() - t0 < max_s:
        a = time.perf_counter_ns()
        log.append(TOPIC, pl[n % len(pl)], now)
        lat.append(time.perf_counter_ns() - a)
        n += 1
    wall = time.perf_counter() - t0
    st = log.stats
    log.close()
    shutil.rmtree(d)
    lat.sort()
    return {"records": n, "seconds": wall, "records_per_s": n / wall, "fsyncs": st["fsyncs"],
            "latency_us": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": lat[-1] / 1e3}}


def bench_read(base: Path) -> dict:
    d = base / "append"
    log = RawLog(d, budget_bytes=None)
    t0 = time.perf_counter()
    n = nbytes = 0
    for rec in log.read():
        n += 1
        nbytes += len(rec.payload)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    m = sum(1 for _ in log.read(topic="other/topic"))  # parse + CRC, no record objects
    wall_filtered = time.perf_counter() - t1
    log.close()
    return {"records": n, "seconds": wall, "records_per_s": n / wall,
            "payload_mb_per_s": nbytes / wall / 1e6,
            "scan_records_per_s": n / wall_filtered, "scan_matched": m}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="duration of each buffered append run (default 3 s: includes the "
                    "1 s fsyncs and several segment rolls)")
    ap.add_argument("--fsync-records", type=int, default=3000,
                    help="at most this many records with fsync per record (default 3000)")
    ap.add_argument("--fsync-seconds", type=float, default=5.0,
                    help="...or at most this long (default 5 s)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write (default: a temporary directory); put it on the "
                    "disk you want to measure")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "rawlog.json",
                    help="JSON results file (default benchmarks/results/rawlog.json)")
    args = ap.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work skews the numbers
    base = Path(tempfile.mkdtemp(prefix="bench-rawlog-", dir=args.dir))
    pl = payloads()
    try:
        res = {
            "append": bench_append(base, pl, args.seconds),
            "append_many": bench_append_many(base, pl, args.seconds),
            "fsync_each": bench_fsync_each(base, pl, args.fsync_records, args.fsync_seconds),
        }
        res["read"] = bench_read(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = {
        "benchmark": "rawlog", "payload_bytes": 100, "topic": TOPIC,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "dir": str(args.dir or tempfile.gettempdir()),
                    "load_average_at_start": load_at_start},
        "settings": {"segment_bytes": 16 * 2**20, "fsync_interval_s": 1.0,
                     "buffer_bytes": 64 * 1024},
        "results": res,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")

    a, m, f, r = res["append"], res["append_many"], res["fsync_each"], res["read"]
    rows = [
        ("append(), fsync every 1 s", f"{a['records_per_s']:,.0f}", f"{a['mb_per_s']:.1f}",
         f"p50 {a['latency_us']['p50']:.1f} / p99.9 {a['latency_us']['p99.9']:.1f} / "
         f"max {a['latency_us']['max']:,.0f} us; {a['fsyncs']} fsyncs, "
         f"{a['segments']} segments"),
        ("append_many(100), fsync every 1 s", f"{m['records_per_s']:,.0f}",
         f"{m['mb_per_s']:.1f}", f"{m['fsyncs']} fsyncs"),
        ("append(), fsync per record", f"{f['records_per_s']:,.0f}", "",
         f"p50 {f['latency_us']['p50']:,.0f} / p99 {f['latency_us']['p99']:,.0f} us"),
        ("read() all records", f"{r['records_per_s']:,.0f}", f"{r['payload_mb_per_s']:.1f}",
         f"scan without matches: {r['scan_records_per_s']:,.0f}/s"),
    ]
    print(f"raw-input archive, 100-byte payloads, {a['bytes_per_record']:.0f} bytes/record "
          f"on disk, {os.cpu_count()} CPUs, load average at start {load_at_start[0]}")
    w = [max(len(x[i]) for x in rows) for i in range(4)]
    print(f"{'':{w[0]}}  {'records/s':>{w[1]}}  {'MB/s':>{max(w[2], 4)}}  notes")
    for row in rows:
        print(f"{row[0]:{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{max(w[2], 4)}}  {row[3]}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
