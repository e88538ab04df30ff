"""Outbox and uplink: what syncing costs the daemon, and how fast a backlog drains.

Measures, on this machine's disk, with BasicMotions-like output records (the brief's fields;
~330 bytes of msgpack each; one selected output and two versions' results per input):
  * flush: the daemon's pattern. 10,000 inputs x 4 records (the answer + 3 versions' results)
    written in ``put_many`` flushes of 800 records (one per 50 ms at max rate), then drained
    with next_batch / message encoding / ack (no broker): wall and CPU µs per record, and the
    CPU per scored message;
  * enqueue: ``put_many`` of 64 records (one transaction) into an outbox with room, in µs per
    record and as a share of a 1 ms per-message budget (3 records per scored message);
  * enqueue into a full outbox (drop_oldest evicting as it goes: the state during a long
    outage), and with ``fsync_interval_s=0`` (fsync every commit);
  * enqueue while the uplink drains at full speed in the same process (lock and GIL contention);
  * drain: a prefilled backlog sent by the Uplink to a private loopback mosquitto, QoS 1,
    records/s and MB/s for two batch sizes, and the uplink's CPU time per record;
  * the daemon's budget: (enqueue + drain CPU) per scored message as a share of 1 ms;
  * egress: the daemon's whole sync path in one process, sync on against sync off: scored
    batches of 64 rows (3 versions) through the pipeline's record building, the egress stage
    (ids, packing, the writer thread's transactions) and the uplink draining to a loopback
    upstream that acknowledges at once; CPU us per scored message per thread (event loop,
    outbox writer, uplink), medians of --reps runs, pinned to one CPU like the daemon in
    ``bench e2e --affinity split``. ``--only-egress`` runs just this.

Prints a table and writes benchmarks/results/outbox.json.

    python benchmarks/bench_outbox.py [--records 60000] [--dir /path/on/the/target/disk]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import msgpack

from edgeml.core.uplink import Uplink
from edgeml.host.broker import MosquittoBroker
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.outbox import Outbox, record_id
from edgeml.transport.mqtt import MqttTransport
from edgeml.transport.settings import BrokerSettings

DEVICE = "watch-01"
BUDGET_US = 1000.0  # the per-message budget at 1,000 msg/s
RECORDS_PER_MESSAGE = 3  # one selected output + two versions' results


def make_items(n_inputs: int, start: int = 0,
               versions: tuple[str, ...] = ("1", "2")) -> list[tuple[str, str, dict]]:
    ds = load_basicmotions("TEST")
    classes = sorted(set(ds.y))
    items = []
    for seq in range(start, start + n_inputs):
        label = ds.y[seq % len(ds.y)]
        scores = [round(0.9 if c == label else 0.1 / (len(classes) - 1), 4) for c in classes]
        for stream, vs in (("outputs", versions[-1:]), ("results", versions)):
            for v in vs:
                rec = {"id": f"in-{seq}", "topic": f"sensors/{DEVICE}/imu",
                       "pipeline": "activity", "model": "activity", "version": v,
                       "output": {"label": label, "scores": scores}, "policy": "champion",
                       "fallback": False, "latency_ms": 1.234, "ts": time.time(),
                       "input_seq": seq}
                items.append((stream, record_id(DEVICE, "activity", seq, "activity", v, stream),
                              rec))
    return items


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def bench_put(path: Path, items: list, *, budget: int, fsync_interval_s: float = 1.0,
              prefill: list | None = None) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    with Outbox(path, budget_bytes=budget, fsync_interval_s=fsync_interval_s) as ob:
        for c in chunks(prefill or [], 64):
            ob.put_many(c)
        per_call = []
        t0 = time.perf_counter()
        for c in chunks(items, 64):
            t = time.perf_counter_ns()
            ob.put_many(c)
            per_call.append((time.perf_counter_ns() - t) / 1000 / len(c))
        wall = time.perf_counter() - t0
        st = ob.stats()
    per_call.sort()
    us = wall / len(items) * 1e6
    return {"records": len(items), "us_per_record": round(us, 2),
            "p50_us_per_record": round(per_call[len(per_call) // 2], 2),
            "p99_us_per_record": round(per_call[int(len(per_call) * 0.99)], 2),
            "share_of_1ms_per_message": round(us * RECORDS_PER_MESSAGE / BUDGET_US, 4),
            "dropped": st["dropped"], "bytes_used": st["bytes_used"],
            "file_bytes": st["file_bytes"]}


def bench_flush(path: Path, items: list, *, flush: int = 800, batch: int = 500,
                rounds: int = 3) -> dict:
    """The daemon's write pattern (a put_many per 50 ms flush), then the uplink's read side
    without a broker: next_batch, the message built from the stored bytes, ack. Best of
    ``rounds`` (the figures are CPU-bound; the best run is the least disturbed)."""
    best: dict | None = None
    for _ in range(rounds):
        shutil.rmtree(path, ignore_errors=True)
        with Outbox(path, budget_bytes=1 << 30) as ob:
            up = Uplink(ob, BrokerSettings(url="mqtt://127.0.0.1:1", client_id="bench"),
                        topic_prefix="edgeml", device_id=DEVICE, batch_max_records=batch)
            c0, t0 = time.process_time(), time.perf_counter()
            for c in chunks(items, flush):
                ob.put_many(c)
            c1, t1 = time.process_time(), time.perf_counter()
            rows = ob._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            messages = 0
            for stream in ob.by_priority:
                while True:
                    taken, _, _payload = up._take(stream, messages + 1)
                    if not taken:
                        break
                    messages += 1
                    ob.ack(taken)
            c2, t2 = time.process_time(), time.perf_counter()
            assert ob.stats()["backlog"] == 0
        n = len(items)
        run = {"records": n, "flush_records": flush, "rows": rows, "messages": messages,
               "put_us_per_record": round((t1 - t0) / n * 1e6, 2),
               "put_cpu_us_per_record": round((c1 - c0) / n * 1e6, 2),
               "drain_us_per_record": round((t2 - t1) / n * 1e6, 2),
               "drain_cpu_us_per_record": round((c2 - c1) / n * 1e6, 2)}
        run["cpu_us_per_record"] = round(run["put_cpu_us_per_record"]
                                         + run["drain_cpu_us_per_record"], 2)
        if best is None or run["cpu_us_per_record"] < best["cpu_us_per_record"]:
            best = run
    assert best is not None
    return best


async def drain(ob: Outbox, broker: MosquittoBroker, *, batch: int, client_id: str) -> dict:
    settings = BrokerSettings(url=broker.url, client_id=client_id, clean_start=False)
    backlog = ob.stats()["backlog"]
    async with MqttTransport(settings) as client:
        up = Uplink(ob, client, topic_prefix="edgeml", device_id=DEVICE,
                    batch_max_records=batch, batch_max_wait_s=0.05)
        cpu0, t0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(up.run())
        while ob.stats()["backlog"]:
            await asyncio.sleep(0.005)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        st = up.stats
    return {"records": backlog, "batch_max_records": batch, "seconds": round(wall, 3),
            "records_per_s": round(backlog / wall), "mb_per_s": round(st["bytes_sent"] / wall
                                                                       / 1e6, 2),
            "batches": st["batches_sent"], "cpu_us_per_record": round(cpu / backlog * 1e6, 2)}


def bench_drain(path: Path, items: list, broker: MosquittoBroker, batch: int) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    with Outbox(path) as ob:
        for c in chunks(items, 800):  # chunked as the daemon's 50 ms flushes write them
            ob.put_many(c)
        return asyncio.run(drain(ob, broker, batch=batch, client_id=f"bench-{batch}"))


def bench_put_while_draining(path: Path, backlog: list, items: list,
                             broker: MosquittoBroker) -> dict:
    """The daemon's writer thread keeps putting while the uplink drains a backlog."""
    shutil.rmtree(path, ignore_errors=True)
    with Outbox(path) as ob:
        for c in chunks(backlog, 64):
            ob.put_many(c)
        result: dict = {}

        def writer() -> None:
            t0 = time.perf_counter()
            for c in chunks(items, 64):
                ob.put_many(c)
            result["us"] = (time.perf_counter() - t0) / len(items) * 1e6

        async def main() -> None:
            th = threading.Thread(target=writer)
            th.start()
            await drain(ob, broker, batch=500, client_id="bench-contended")
            await asyncio.to_thread(th.join)

        asyncio.run(main())
    us = result["us"]
    return {"records": len(items), "us_per_record": round(us, 2),
            "share_of_1ms_per_message": round(us * RECORDS_PER_MESSAGE / BUDGET_US, 4)}


class LoopbackUpstream:
    """An upstream that has every message at once (PUBACK without a network): what remains
    is the uplink's own work."""

    connected = True

    async def publish(self, topic: str, payload: bytes, qos: int = 1,
                      retain: bool = False) -> None:
        return None


class NoSubscribers:
    """The answers' transport: publishing costs the same with sync on and off, so none."""

    connected = True

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0,
                       retain: bool = False) -> None:
        return None

    def flush(self) -> None:
        return None


def egress_batches(n_batches: int, size: int = 64) -> list[tuple[list, list, list]]:
    """Scored batches as the pipeline hands them on: rows from BasicMotions, the champion's
    answers and 3 versions' outcomes with the real labels and class scores."""
    from edgeml.core.assemble import Row
    from edgeml.core.rendezvous import Answer, Outcome

    ds = load_basicmotions("TEST")
    classes = sorted(set(ds.y))
    out, seq, t = [], 0, time.time()
    for _ in range(n_batches):
        rows = []
        for _ in range(size):
            seq += 1
            rows.append(Row(features=ds.X[seq % len(ds.y)], id=f"in-{seq}",
                            topic=f"sensors/{DEVICE}/imu", seq=seq, received=t))
        outcomes = []
        for v, role in (("1", "champion"), ("2", "challenger"), ("3", "shadow")):
            outputs = [{"label": ds.y[r.seq % len(ds.y)],
                        "scores": {c: (0.9 if c == ds.y[r.seq % len(ds.y)] else 0.05)
                                   for c in classes}} for r in rows]
            outcomes.append(Outcome("activity", v, role, int(v), outputs=outputs,
                                    labels=[o["label"] for o in outputs], elapsed_ms=0.4))
        answers = [Answer(o, "activity", "1", False) for o in outcomes[0].outputs]
        out.append((rows, answers, outcomes))
    return out


def _thread_cpu() -> dict[str, float]:
    cpu = {}
    for th in threading.enumerate():
        with contextlib.suppress(Exception):
            cpu[th.name] = time.clock_gettime(time.pthread_getcpuclockid(th.ident))
    return cpu


async def egress_run(path: Path, batches: list, *, sync: bool) -> dict:
    """One pass of ``batches`` through record building, egress, outbox and uplink."""
    from edgeml.config import PipelineConfig
    from edgeml.core.egress import Egress
    from edgeml.core.scoring import PipelineRuntime, ScoringSettings
    from edgeml.storage.outbox import DEFAULT_STREAMS, StreamPolicy

    shutil.rmtree(path, ignore_errors=True)
    ob = (Outbox(path, budget_bytes=256 * 2**20,
                 streams={**DEFAULT_STREAMS, "drift": StreamPolicy("drift", 2, "drop_oldest")})
          if sync else None)
    eg = Egress(device=DEVICE, topic=lambda *parts: "edgeml/" + "/".join(parts), outbox=ob,
                record_results=True, out_formats={"activity": "msgpack"},
                out_qos={"activity": 1}, on_status_changed=lambda: None)
    eg.transport = NoSubscribers()  # type: ignore[assignment]
    rt = PipelineRuntime(PipelineConfig(name="activity", topics=("sensors/+/imu",)),
                         emitter=eg, batching=ScoringSettings())
    tasks = [asyncio.create_task(eg.run_writer())]
    if sync:
        up = Uplink(ob, LoopbackUpstream(), topic_prefix="edgeml",  # type: ignore[arg-type]
                    device_id=DEVICE)
        eg.uplink = up
        tasks.append(asyncio.create_task(up.run()))
    await asyncio.sleep(0.1)
    before, c0 = _thread_cpu(), time.process_time()
    for i, (rows, answers, outcomes) in enumerate(batches):
        rt._emit_answers(rows, answers)  # what _score does after the rendezvous
        rt._results(rows, outcomes, late=False)
        if i % 2:  # the loop also serves the writer and the uplink between batches
            await asyncio.sleep(0.0005)
    eg.close_writer()
    await tasks[0]
    if ob is not None:
        while ob.pending("outputs")[0] or ob.pending("results")[0]:
            await asyncio.sleep(0.005)
    after, c1 = _thread_cpu(), time.process_time()  # before the uplink's thread ends
    if ob is not None:
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[1]
    n = sum(len(b[0]) for b in batches)
    per = {name: round((v - before.get(name, 0.0)) / n * 1e6, 2) for name, v in after.items()}
    threads = {"event loop": per.get("MainThread", 0.0),
               "outbox writer": sum(v for k, v in per.items() if k.startswith("outbox")),
               "uplink": sum(v for k, v in per.items() if k.startswith("edgeml-uplink"))}
    eg.shutdown()
    if ob is not None:
        ob.close()
    return {"cpu_us_per_message": round((c1 - c0) / n * 1e6, 2), "threads": threads}


def bench_egress(base: Path, *, n_batches: int = 300, reps: int = 5) -> dict:
    """Sync on and off alternately, ``reps`` times each; medians."""
    cpus = sorted(os.sched_getaffinity(0))
    home = set(cpus)
    if len(cpus) >= 2:  # the daemon's placement in bench e2e --affinity split
        os.sched_setaffinity(0, {cpus[-1]})
    try:
        batches = egress_batches(n_batches)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for _ in range(reps):
            for key in ("off", "on"):
                runs[key].append(asyncio.run(egress_run(base / f"egress-{key}", batches,
                                                        sync=key == "on")))
    finally:
        os.sched_setaffinity(0, home)

    def med(key: str) -> dict:
        rs = runs[key]
        return {"cpu_us_per_message": round(statistics.median(
                    r["cpu_us_per_message"] for r in rs), 2),
                "threads": {t: round(statistics.median(r["threads"][t] for r in rs), 2)
                            for t in rs[0]["threads"]}}
    on, off = med("on"), med("off")
    return {"messages": n_batches * 64, "versions": 3, "reps": reps, "pinned": len(cpus) >= 2,
            "sync_on": on, "sync_off": off,
            "sync_cost_us_per_message": round(on["cpu_us_per_message"]
                                              - off["cpu_us_per_message"], 2)}


def print_egress(r: dict) -> None:
    print(f"egress path, {r['messages']} messages x {r['versions']} versions, medians of "
          f"{r['reps']} ({'pinned to one CPU' if r['pinned'] else 'unpinned'}):")
    print(f"  {'CPU us per scored message':30} {'total':>7} {'loop':>7} {'writer':>7} "
          f"{'uplink':>7}")
    for key in ("sync_off", "sync_on"):
        t = r[key]["threads"]
        print(f"  {key.replace('_', ' '):30} {r[key]['cpu_us_per_message']:7.1f} "
              f"{t['event loop']:7.1f} {t['outbox writer']:7.1f} {t['uplink']:7.1f}")
    print(f"  syncing costs {r['sync_cost_us_per_message']:.1f} us CPU per scored message")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=60000,
                    help="records per phase (3 per input: outputs + 2 versions' results)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the outbox files go (default: a temp dir; use the target disk)")
    ap.add_argument("--only-flush", action="store_true",
                    help="only the flush phase (no broker; seconds)")
    ap.add_argument("--only-egress", action="store_true",
                    help="only the egress path, sync on against off (no broker; seconds)")
    ap.add_argument("--reps", type=int, default=5, help="runs of the egress path per mode")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "outbox.json",
                    help="the JSON report")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-outbox-", dir=args.dir))
    if args.only_egress:
        print_egress(bench_egress(base, reps=args.reps))
        shutil.rmtree(base, ignore_errors=True)
        return
    n_inputs = max(64, args.records // RECORDS_PER_MESSAGE)
    items = make_items(n_inputs)
    more = make_items(n_inputs, start=n_inputs)
    size = statistics.mean(len(msgpack.packb(r)) for _, _, r in items[:300])
    flush_items = make_items(10000, versions=("1", "2", "3"))  # 4 records per input
    flush = bench_flush(base / "ob0", flush_items)
    flush["records_per_message"] = 4
    flush["cpu_us_per_message"] = round(4 * flush["cpu_us_per_record"], 1)
    print(f"flushes of 800 (4 records per input, {flush['records']} records, "
          f"{flush['rows']} rows, {flush['messages']} messages): "
          f"put {flush['put_us_per_record']:.2f} us/record "
          f"(CPU {flush['put_cpu_us_per_record']:.2f}), "
          f"drain {flush['drain_us_per_record']:.2f} us/record "
          f"(CPU {flush['drain_cpu_us_per_record']:.2f}); "
          f"{flush['cpu_us_per_message']:.1f} us CPU per scored message")
    if args.only_flush:
        shutil.rmtree(base, ignore_errors=True)
        return
    egress = bench_egress(base, reps=args.reps)
    print_egress(egress)
    broker = MosquittoBroker(base / "broker").start()
    try:
        res = {
            "egress": egress,
            "flush_800": flush,
            "put_room": bench_put(base / "ob1", items, budget=1 << 30),
            "put_full": bench_put(base / "ob2", more, budget=8 << 20, prefill=items),
            "put_fsync_each_commit": bench_put(base / "ob3", items[:6000], budget=1 << 30,
                                               fsync_interval_s=0),
            "put_while_draining": bench_put_while_draining(base / "ob4", items, more, broker),
            "drain_batch_500": bench_drain(base / "ob5", items, broker, 500),
            "drain_batch_100": bench_drain(base / "ob6", items, broker, 100),
        }
    finally:
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)
    # the daemon's pattern: 800-record flushes, 4 records per scored message (3 versions)
    per_msg_us = 4 * (flush["put_cpu_us_per_record"] + res["drain_batch_500"]["cpu_us_per_record"])
    res["daemon_share"] = {
        "records_per_message": 4,
        "us_per_message": round(per_msg_us, 1),
        "share_of_1ms_per_message": round(per_msg_us / BUDGET_US, 4),
        "note": "enqueue CPU (flushes of 800) + uplink CPU (batches of 500 to mosquitto) per "
                "scored message with 3 versions; the daemon's own CPU is not included",
    }
    report = {
        "benchmark": "outbox", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "settings": {"records": len(items), "record_bytes_msgpack": round(size),
                     "put_batch": 64, "broker": "mosquitto 2.0 on loopback, QoS 1, no subscriber",
                     "sqlite": __import__("sqlite3").sqlite_version},
        "results": res,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"records: {len(items)} x ~{size:.0f} B msgpack; load average {os.getloadavg()[0]:.2f}")
    print(f"{'enqueue (put_many of 64)':38} {'us/record':>10} {'p99':>8} {'% of 1 ms/msg':>14}")
    for key, label in (("put_room", "outbox with room"), ("put_full", "full, drop_oldest evicting"),
                       ("put_fsync_each_commit", "fsync every commit"),
                       ("put_while_draining", "while the uplink drains")):
        r = res[key]
        p99 = f"{r['p99_us_per_record']:8.1f}" if "p99_us_per_record" in r else f"{'':8}"
        print(f"  {label:36} {r['us_per_record']:10.1f} {p99} "
              f"{100 * r['share_of_1ms_per_message']:13.1f}%")
    print(f"{'drain to loopback mosquitto':38} {'records/s':>10} {'MB/s':>8} {'CPU us/rec':>14}")
    for key in ("drain_batch_500", "drain_batch_100"):
        r = res[key]
        print(f"  batches of {r['batch_max_records']:<25} {r['records_per_s']:10d} "
              f"{r['mb_per_s']:8.2f} {r['cpu_us_per_record']:14.1f}")
    d = res["daemon_share"]
    print(f"syncing per scored message (4 records): {d['us_per_message']:.0f} us CPU = "
          f"{100 * d['share_of_1ms_per_message']:.1f}% of a 1 ms budget")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
