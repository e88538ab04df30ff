"""The collector's throughput: records/s into the fleet database, one and two collectors.

Workload: ``--records`` result records shaped like the daemon's (id, topic, pipeline, model,
version, role, ts, input_seq, late, output with a label and four class scores; ~250 bytes of
msgpack each), from 10 devices, in sync batches of 500 records (what the uplink sends when a
backlog drains).

Rows, per database (SQLite file; PostgreSQL when a private cluster can be started here):
  * plain loop: no broker; for each batch message decode it and
    ``INSERT ... ON CONFLICT (record_id) DO NOTHING`` its records (executemany) into a table
    of the contract's columns, commit per message: the consumer docs/sync.md shows;
  * 1 collector: ``edgeml collect`` (a subprocess, MQTT source on a private mosquitto); the
    batches are queued in the broker for its persistent session while it is stopped, then it
    is started and timed from its "ready" line (its writer starts then) to the moment the
    database holds every record;
  * 2 collectors: the same with ``--group bench`` (``$share/bench/...``): the broker splits
    the queued batches between the two sessions; both write into the same database.

Each figure is the median of ``--repeat`` runs (the machine is shared: compare rows of one
run). Prints a table and writes benchmarks/results/collect.json.

    python benchmarks/bench_collect.py [--records 100000] [--repeat 3] [--no-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import paho.mqtt.client as paho

from edgeml.host.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500
DEVICES = 10


def make_messages(n: int, run: int) -> list[tuple[str, bytes]]:
    msgs = []
    per_dev = n // DEVICES
    for d in range(DEVICES):
        dev = f"bench-{d:02d}"
        for start in range(0, per_dev, BATCH):
            recs = []
            for i in range(start, min(start + BATCH, per_dev)):
                seq = run * 10_000_000 + i
                recs.append({
                    "record_id": f"{dev}/activity/{seq}/activity/2/results",
                    "id": f"in-{seq}", "topic": f"sensors/{dev}/imu", "pipeline": "activity",
                    "model": "activity", "version": "2", "role": "challenger",
                    "ts": 1.7e9 + i * 0.01, "input_seq": seq, "late": False,
                    "output": {"label": "Walking", "scores": {
                        "Badminton": 0.02, "Running": 0.05, "Standing": 0.03, "Walking": 0.9}},
                })
            msgs.append((f"edgeml/{dev}/sync/results", msgpack.packb(
                {"schema": 1, "device": dev, "stream": "results", "batch_seq": start,
                 "sent": time.time(), "records": recs}, use_bin_type=True)))
    return msgs


def count_of(db: str) -> int:
    try:
        if db.startswith("sqlite:///"):
            conn = sqlite3.connect(db[len("sqlite:///"):], timeout=30)
        else:
            import psycopg

            conn = psycopg.connect(db)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        finally:
            conn.close()
    except Exception:
        return 0


# ---- the plain loop ---------------------------------------------------------------------
def plain_loop(db: str, msgs: list[tuple[str, bytes]]) -> float:
    """records/s of the docs' consumer pattern, straight into the database."""
    pg = not db.startswith("sqlite:///")
    if pg:
        import psycopg

        conn = psycopg.connect(db)
        ph = "%s"
        conn.execute("CREATE TABLE IF NOT EXISTS plain (record_id TEXT PRIMARY KEY, device "
                     "TEXT, stream TEXT, pipeline TEXT, model TEXT, version TEXT, ts DOUBLE "
                     "PRECISION, record JSONB)")
    else:
        conn = sqlite3.connect(db[len("sqlite:///"):])
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        ph = "?"
        conn.execute("CREATE TABLE IF NOT EXISTS plain (record_id TEXT PRIMARY KEY, device, "
                     "stream, pipeline, model, version, ts, record)")
    conn.commit()
    sql = (f"INSERT INTO plain VALUES ({', '.join([ph] * 8)}) "
           "ON CONFLICT (record_id) DO NOTHING")
    n = 0
    t0 = time.perf_counter()
    for _topic, payload in msgs:
        batch = msgpack.unpackb(payload)
        rows = [(r["record_id"], batch["device"], batch["stream"], r.get("pipeline"),
                 r.get("model"), r.get("version"), r.get("ts"), json.dumps(r))
                for r in batch["records"]]
        if pg:
            with conn.cursor() as cur:
                cur.executemany(sql, rows)
        else:
            conn.executemany(sql, rows)
        conn.commit()
        n += len(rows)
    dt = time.perf_counter() - t0
    conn.close()
    return n / dt


# ---- collectors ---------------------------------------------------------------------------
class Running:
    """A collector subprocess; ``ready_at``: when it said it was subscribed (its writer starts
    then: nothing is stored before)."""

    def __init__(self, broker: MosquittoBroker, db: str, cid: str, group: str | None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-m", "edgeml", "collect", "--source", broker.url, "--db", db,
                "--client-id", cid, "--status-interval", "3600"]
        if group:
            args += ["--group", group]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.ready_at: float | None = None

    def wait_ready(self) -> Running:
        line = self.proc.stdout.readline()
        self.ready_at = time.perf_counter()
        if "ready" not in line:
            self.proc.kill()
            raise RuntimeError(f"collector did not start: {line!r}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain
        return self

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def start(broker: MosquittoBroker, db: str, cids: list[str], group: str | None):
    procs = [Running(broker, db, c, group) for c in cids]  # all start at once
    return [p.wait_ready() for p in procs]


def stop(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(60)


def publish(broker: MosquittoBroker, msgs) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.max_inflight_messages_set(100)
    c.connect(broker.host, broker.port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def forget_sessions(broker: MosquittoBroker, cids: list[str]) -> None:
    """End the collectors' persistent sessions (connect once with a clean session): an
    offline member of a share group keeps getting its share queued, and an offline plain
    subscriber a copy of everything, which would leak into the next run."""
    for cid in cids:
        connected = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        c.on_connect = lambda *a, ev=connected: ev.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        connected.wait(10)
        c.disconnect()
        c.loop_stop()


def collectors_run(broker: MosquittoBroker, db: str, msgs, n_collectors: int,
                   run: int) -> float:
    """records/s of ``n_collectors`` draining a backlog queued in the broker: from the first
    "ready" line (a collector's writer starts then) to the moment the database holds every
    record (sampled every 10 ms)."""
    group = "bench" if n_collectors > 1 else None
    cids = [f"bench-collect-{n_collectors}-{run}-{i}" for i in range(n_collectors)]
    stop(start(broker, db, cids, group))  # the sessions exist, offline
    base = count_of(db)
    want = base + sum(len(msgpack.unpackb(p)["records"]) for _, p in msgs)
    publish(broker, msgs)  # queued for the offline sessions (split by the share group)
    procs = start(broker, db, cids, group)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            n = count_of(db)
            if n >= want:
                end = time.perf_counter()
                if n != want:
                    raise RuntimeError(f"{n - want} records more than were published")
                break
            time.sleep(0.01)  # sampling the database, not synchronising
        else:
            raise RuntimeError(f"collectors stored {count_of(db) - base} of {want - base}")
        return (want - base) / (end - min(p.ready_at for p in procs))
    finally:
        stop(procs)
        forget_sessions(broker, cids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000,
                    help="records per run (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    ap.add_argument("--no-postgres", action="store_true",
                    help="only SQLite (no private PostgreSQL cluster)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "collect.json"),
                    help="where to write the JSON results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    broker = MosquittoBroker(work / "broker").start()
    pg = None
    try:
        if not args.no_postgres:
            try:
                from edgeml.host.collect.postgres import PostgresCluster

                pg = PostgresCluster().start()
            except Exception as exc:
                print(f"(no PostgreSQL row: {exc})")
        results: dict[str, dict[str, list[float]]] = {}
        for run in range(args.repeat):
            names = ["sqlite"] + (["postgresql"] if pg else [])
            for name in names:
                r = results.setdefault(name, {"plain loop": [], "1 collector": [],
                                              "2 collectors": []})
                for k, (row, n_col) in enumerate((("plain loop", 0), ("1 collector", 1),
                                                  ("2 collectors", 2))):
                    tag = f"r{run}k{k}"
                    if name == "sqlite":
                        db = f"sqlite:///{work}/{tag}.db"
                    else:
                        db = pg.create_database(tag)
                    msgs = make_messages(args.records, run * 3 + k)
                    if n_col == 0:
                        rate = plain_loop(db, msgs)
                    else:
                        rate = collectors_run(broker, db, msgs, n_col, run)
                    r[row].append(rate)
                    print(f"  run {run + 1} {name:10s} {row:13s} {rate:10,.0f} records/s",
                          flush=True)
        table = {name: {row: statistics.median(v) for row, v in rows.items()}
                 for name, rows in results.items()}
        print()
        print(f"{'database':12s} {'plain loop':>14s} {'1 collector':>14s} {'2 collectors':>14s}"
              "   (records/s, median of %d; %d records in batches of %d)"
              % (args.repeat, args.records, BATCH))
        for name, row in table.items():
            print(f"{name:12s} {row['plain loop']:14,.0f} {row['1 collector']:14,.0f} "
                  f"{row['2 collectors']:14,.0f}")
        doc = {"records": args.records, "batch": BATCH, "devices": DEVICES,
               "repeat": args.repeat, "median_records_per_s": table, "runs": results,
               "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "load": os.getloadavg()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    finally:
        broker.stop()
        if pg is not None:
            pg.destroy()


if __name__ == "__main__":
    main()
