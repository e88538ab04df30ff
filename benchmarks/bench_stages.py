#!/usr/bin/env python3
"""Where the daemon's CPU goes per message, stage by stage, in the two loads where it costs
most beside the plain script: a paced single-sample stream and a ten-sample flood.

The real daemon (the bench's config: 3 light versions, everything on) runs on a private
mosquitto (stock configuration unless --broker-config tuned), pinned alone to the last core;
broker, load generator and receiver share the others, as in bench_e2e.py. Per phase:

1. ``--rounds`` unprofiled rounds measure the daemon's CPU per message (user + system, from
   /proc) and its sleeps per message (voluntary context switches: each is a wake-up);
2. one more round runs under ``py-spy record`` (1,000 samples/s); each sample goes to the
   stage of its innermost frame that belongs to one (edgeml.host.bench.stages), and a
   stage's ms per message is its share of the busy samples times the unprofiled CPU;
3. the same rounds measure two references in the daemon's place: the plain script as
   bench_e2e.py runs it (one callback, a session.run per version, answers at QoS 0), and the
   same script made durable the simplest way (each payload appended to a file, every
   version's result into SQLite committed every 50 ms, answers at QoS 1): what the daemon's
   extra work costs when a script does it too.

    python benchmarks/bench_stages.py                       # both phases, 3 rounds each
    python benchmarks/bench_stages.py --phases samples --rounds 5

Prints a table; writes benchmarks/results/stages.json (or --out). Needs the host
extra (pip install -e '.[host]') and, for the stage table, py-spy allowed to attach (root or
ptrace_scope 0); without it only CPU and wake-ups per message are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeml.host.bench import e2e
from edgeml.host.bench.stages import read_raw_file, stage_table
from edgeml.host.broker import MosquittoBroker

HERE = Path(__file__).resolve().parent
PHASES = ("paced", "samples")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=",".join(PHASES),
                   help="which of paced (single samples at --rate) and samples (a flood of "
                        "--samples samples per message) to run (default: both)")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="messages per second in the paced phase (default: 1000)")
    p.add_argument("--paced-messages", type=int, default=3000,
                   help="messages per paced round (default: 3000)")
    p.add_argument("--samples", type=int, default=10,
                   help="samples per message in the samples phase (default: 10)")
    p.add_argument("--flood-messages", type=int, default=2000,
                   help="messages per samples round; keep it within the stock broker's queue "
                        "(default: 2000; bench_e2e.py's samples phase sends 10000)")
    p.add_argument("--rounds", type=int, default=3,
                   help="unprofiled rounds per phase; the CPU figures are their medians "
                        "(default: 3)")
    p.add_argument("--broker-config", choices=("stock", "tuned"), default="stock",
                   help="the private mosquitto's settings (default: stock)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the py-spy round: CPU and wake-ups per message only")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the plain script and the durable plain script")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report path (default: benchmarks/results/stages.json)")
    p.add_argument("--keep-profiles", type=Path, default=None, metavar="DIR",
                   help="also keep py-spy's raw (collapsed-stack) file of each profiled "
                        "round in DIR, as <phase>.pyspy.txt, for a flame graph or a closer "
                        "look than the stage table")
    args = p.parse_args(argv)
    args.phase_list = [x for x in args.phases.split(",") if x]
    bad = [x for x in args.phase_list if x not in PHASES]
    if bad or not args.phase_list:
        p.error(f"--phases: {','.join(bad) or 'none'}: choose from {', '.join(PHASES)}")
    for name in ("rate", "paced_messages", "samples", "flood_messages", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def _sleeps(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: how often it went to sleep."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as fh:
            for line in fh:
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
    return total


def _pyspy() -> str | None:
    return shutil.which("py-spy")


class Rig:
    """The daemon on a private broker, and the roles that feed and count it."""

    def __init__(self, work: Path, broker: MosquittoBroker, models: list) -> None:
        self.work, self.broker = work, broker
        cpus = sorted(os.sched_getaffinity(0))
        self.target_cpus = {cpus[-1]} if len(cpus) > 1 else None
        self.load_cpus = set(cpus[:-1]) if len(cpus) > 1 else None
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        config = work / "edgeml.toml"
        config.write_text(e2e.edgeml_config(
            device="stages", profile="x86-gateway", data_dir=data, broker_url=broker.url,
            in_topic=self.in_topic, models=models, fmt="auto"), encoding="utf-8")
        self.models = models
        self.status = e2e.StatusWatch("127.0.0.1", broker.port, f"{e2e.PREFIX}/stages/status")
        self.daemon = e2e.Child("daemon", [sys.executable, "-m", "edgeml", "run", "--config",
                                           str(config)], log_path=work / "daemon.log")
        self._pin(self.daemon.pid, self.target_cpus)
        if not self.status.online.wait(60):
            raise e2e.BenchError("the daemon never said online" + self.daemon._tail())
        self._round = 0

    in_topic = f"{e2e.PREFIX}/stages/in"
    out_topic = f"{e2e.PREFIX}/stages/out/{e2e.PIPELINE}"

    def plain(self, name: str, **durable: object) -> tuple[e2e.Child, str, str]:
        """A plain script in the daemon's place (which idles meanwhile): the child, its input
        and its answer topic. ``durable``: the plain role's archive / store / out_qos."""
        from edgeml.host.datasets import DAPHNET_CHANNELS

        in_topic, out_topic = f"{e2e.PREFIX}/{name}/in", f"{e2e.PREFIX}/{name}/out"
        spec = {"host": "127.0.0.1", "port": self.broker.port, "topic": in_topic,
                "out_topic": out_topic, "features": list(DAPHNET_CHANNELS), "threads": 1,
                "client_id": f"stages-{name}", **durable,
                "models": [{"name": m.name, "version": m.version, "path": str(m.onnx)}
                           for m in self.models]}
        child = e2e._role("plain", spec, self.work, name)
        self._pin(child.pid, self.target_cpus)
        child.wait_event("ready", 60)
        return child, in_topic, out_topic

    @staticmethod
    def _pin(pid: int, cpus: set[int] | None) -> None:
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, cpus)

    def round(self, *, messages: int, samples: int, rate: float,
              profile_to: Path | None = None,
              target: tuple[e2e.Child, str, str] | None = None) -> dict:
        """One stream through the daemon (or ``target``: a child, its input and answer
        topics); the target's CPU and sleeps per message while it lasted."""
        proc, in_topic, out_topic = target or (self.daemon, self.in_topic, self.out_topic)
        self._round += 1
        name = f"r{self._round}"
        base = {"host": "127.0.0.1", "port": self.broker.port}
        recv = e2e._role("count", dict(base, topic=out_topic, expect=messages,
                                       timeout_s=120, idle_s=10, out=str(self.work / name),
                                       client_id=f"stages-recv-{name}"), self.work, name + ".recv")
        self._pin(recv.pid, self.load_cpus)
        recv.wait_event("ready", 30)
        pub = e2e._role("publish", dict(base, topic=in_topic, messages=messages,
                                        samples=samples, rate=rate,
                                        first_id=self._round * 1_000_000,
                                        out=str(self.work / name), client_id=f"stages-{name}"),
                        self.work, name + ".pub")
        self._pin(pub.pid, self.load_cpus)
        pub.wait_event("ready", 30)
        spy = None
        if profile_to is not None:
            spy = subprocess.Popen(
                [_pyspy() or "py-spy", "record", "-p", str(proc.pid), "-r", "1000",
                 "--format", "raw", "-o", str(profile_to), "--threads", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self._pin(spy.pid, self.load_cpus)
        cpu0, sleeps0 = proc.cpu_seconds(), _sleeps(proc.pid)
        try:
            pub.wait_event("done", 120, also_alive=proc)
            done = recv.wait_event("done", 130, also_alive=proc)
        finally:
            cpu1, sleeps1 = proc.cpu_seconds(), _sleeps(proc.pid)
            pub.stop()
            recv.stop()
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                _, err = spy.communicate(timeout=60)
                if spy.returncode not in (0, -signal.SIGINT) or not profile_to.exists():
                    raise e2e.BenchError(f"py-spy could not profile the daemon: "
                                         f"{err.strip()[-300:]}")
        got = int(done.get("received", 0))
        return {"messages": messages, "answered": got,
                "cpu_ms_per_msg": 1000 * (cpu1 - cpu0) / messages,
                "sleeps_per_msg": (sleeps1 - sleeps0) / messages}

    def close(self) -> None:
        self.daemon.stop()
        self.status.close()


#: the references measured in the daemon's place: the plain script's spec additions
REFERENCES: dict[str, dict] = {
    "plain script": {},
    "plain script, durable": {"archive": "archive.bin", "store": "results.db", "out_qos": 1},
}


def _reference(rig: Rig, name: str, durable: dict, kw: dict, rounds: int, phase: str) -> dict:
    tag = f"{phase}-{name.replace(' ', '-').replace(',', '')}"
    files = {k: str(rig.work / f"{tag}-{v}") for k, v in durable.items()
             if k in ("archive", "store")}
    child, in_topic, out_topic = rig.plain(tag, **{**durable, **files})
    try:
        runs = [rig.round(**kw, target=(child, in_topic, out_topic)) for _ in range(rounds)]
    finally:
        child.stop()
    out = {"rounds": runs,
           "cpu_ms_per_msg": statistics.median(r["cpu_ms_per_msg"] for r in runs),
           "sleeps_per_msg": statistics.median(r["sleeps_per_msg"] for r in runs),
           "answered_all": all(r["answered"] == r["messages"] for r in runs)}
    if files:
        out["kept"] = _kept(Path(files["archive"]), Path(files["store"]))
    return out


def _kept(archive: Path, store: Path) -> dict:
    """What the durable plain script kept: payloads archived, results stored."""
    import sqlite3

    data, archived, at = archive.read_bytes(), 0, 0
    while at + 4 <= len(data):
        at += 4 + int.from_bytes(data[at:at + 4], "big")
        archived += 1
    with contextlib.closing(sqlite3.connect(store)) as db:
        results = db.execute("SELECT count(*) FROM results").fetchone()[0]
    return {"archived": archived, "results": results}


def run(args: argparse.Namespace) -> dict:
    e2e.require_host_extra()
    profile = not args.no_profile and _pyspy() is not None
    if not args.no_profile and not profile:
        print("[stages] py-spy not found: CPU and wake-ups only (pip install py-spy)",
              file=sys.stderr)
    report: dict = {"host": platform.node(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "broker_config": args.broker_config,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}
    with tempfile.TemporaryDirectory(prefix="edgeml-stages-") as tmp:
        work = Path(tmp)
        print("[stages] training and converting 3 light versions", file=sys.stderr)
        models = e2e.build_models(work / "models", ["light"], 3)["light"]
        with MosquittoBroker(work / "broker", tuned=args.broker_config == "tuned") as broker:
            rig = Rig(work, broker, models)
            try:
                for phase in args.phase_list:
                    paced = phase == "paced"
                    kw = dict(messages=args.paced_messages if paced else args.flood_messages,
                              samples=1 if paced else args.samples,
                              rate=args.rate if paced else 0.0)
                    rounds = [rig.round(**kw) for _ in range(args.rounds)]
                    cpu = statistics.median(r["cpu_ms_per_msg"] for r in rounds)
                    entry = {**kw, "rounds": rounds, "cpu_ms_per_msg": cpu,
                             "sleeps_per_msg": statistics.median(
                                 r["sleeps_per_msg"] for r in rounds),
                             "answered_all": all(r["answered"] == r["messages"]
                                                 for r in rounds)}
                    if profile:
                        raw = work / f"{phase}.pyspy.txt"
                        entry["profiled_round"] = rig.round(**kw, profile_to=raw)
                        entry["stages"] = stage_table(read_raw_file(raw), cpu)
                        if args.keep_profiles is not None:
                            args.keep_profiles.mkdir(parents=True, exist_ok=True)
                            shutil.copy(raw, args.keep_profiles / raw.name)
                    if not args.no_reference:
                        entry["references"] = {
                            name: _reference(rig, name, durable, kw, args.rounds, phase)
                            for name, durable in REFERENCES.items()}
                    report["phases"][phase] = entry
                    print(f"[stages] {phase}: {cpu:.3f} ms CPU per message", file=sys.stderr)
            finally:
                rig.close()
    return report


def render(report: dict) -> str:
    lines = []
    for phase, p in report["phases"].items():
        what = (f"paced {p['rate']:g} msg/s, 1 sample per message" if phase == "paced"
                else f"flood, {p['samples']} samples per message")
        lines += ["", f"{phase} ({what}; {report['broker_config']} mosquitto): "
                      f"{p['cpu_ms_per_msg']:.3f} ms CPU per message (median of "
                      f"{len(p['rounds'])}), {p['sleeps_per_msg']:.2f} wake-ups per message"
                      + ("" if p["answered_all"] else "; NOT every message was answered")]
        for name, ref in p.get("references", {}).items():
            lines.append(f"  {name}: {ref['cpu_ms_per_msg']:.3f} ms CPU per message; the "
                         f"daemon takes {p['cpu_ms_per_msg'] / ref['cpu_ms_per_msg']:.2f}x"
                         + ("" if ref["answered_all"] else " (NOT every message answered)"))
        if "stages" in p:
            lines += [f"  {'stage':38s} {'share':>7s} {'ms/msg':>8s}", "  " + "-" * 55]
            for row in p["stages"]:
                ms = f"{row['ms_per_msg']:.4f}" if row["ms_per_msg"] is not None else "-"
                note = " (of all samples)" if row["ms_per_msg"] is None else ""
                lines.append(f"  {row['stage']:38s} {100 * row['share']:6.1f}% {ms:>8s}{note}")
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except e2e.BenchError as exc:
        print(f"bench_stages: {exc}", file=sys.stderr)
        return 1
    out = args.out or HERE / "results" / "stages.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(render(report))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
