"""``edgeml bench models|e2e``: measure models per device profile, and the whole MQTT path
side by side with the plain alternatives."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "measure models per device profile, and the whole path against plain alternatives"
DESCRIPTION = """\
Benchmarks on the host (needs the host extra: pip install 'edgeml[host]').

  edgeml bench models BUNDLE... [--profile P] [--batch 1,8,64] [--seconds S] [--json OUT]
      per bundle and batch size: load time, p50/p99 latency per call, rows/s, RSS growth.
      The profile's cpu_cores are applied as a CPU affinity mask and its onnxruntime
      settings build the session: an emulation of that device class on this host.

  edgeml bench e2e [--broker URL] [--rate R | --max] [--messages N] [--versions 1,3]
                   [--models light,heavy] [--out DIR]
      one run, side by side on the same Daphnet stream through one mosquitto:
      (a) raw onnxruntime at batch 1 and the max batch, (b) a raw paho subscriber that only
      counts, (c) the plain paho + session.run script, (d) the edgeml daemon, (e) the
      daemon answering at QoS 0 like the plain script (for parity).
      Without --rate/--max both phases run: paced at 1,000 msg/s (latency) and max (rate).
      Writes report.json, report.md and PNG charts to --out (default
      benchmarks/results/<timestamp>/) and latest.json/latest.md next to it.

  edgeml bench trees [--skip-sessions] [--repeats N] [--out FILE]
      every tree model (IsolationForest, random forests, extra trees, gradient boosting) as
      skl2onnx's graph and, where edgeml lowers it, as edgeml's graph, side by side: nodes,
      load time, us per row at batch 1 and 64, parity with scikit-learn; then session
      settings (memory arena, graph optimisation, threads) for small devices.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)

    m = sub.add_parser("models", help="load time, latency and rows/s per bundle and batch size",
                       description="Time each bundle at each batch size under an emulated "
                       "firmware profile (CPU affinity + the profile's onnxruntime settings).")
    m.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE",
                   help="bundle files (.edgeml) to measure")
    m.add_argument("--profile", default="x86-gateway",
                   help="firmware profile name or path (default: x86-gateway)")
    m.add_argument("--batch", default="1,8,64",
                   help="comma-separated batch sizes (default: 1,8,64)")
    m.add_argument("--seconds", type=float, default=1.0,
                   help="seconds of timed calls per bundle and batch size (default: 1)")
    m.add_argument("--json", type=Path, metavar="OUT",
                   help="also write the report as JSON to OUT")
    m.add_argument("--out", type=Path, metavar="DIR",
                   help="write report.json, report.md and models.png into DIR")

    t = sub.add_parser("trees", help="tree models: skl2onnx's graph vs edgeml's lowering",
                       description="Every tree model converted by skl2onnx and, where edgeml "
                       "lowers it, by edgeml: nodes, load, latency, parity side by side.")
    from edgeml.host.bench.trees import add_arguments as trees_arguments

    trees_arguments(t)

    e = sub.add_parser("e2e", help="the whole MQTT path vs raw subscriber and plain script",
                       description="Side by side in one run: raw onnxruntime, a raw paho "
                       "subscriber, the plain paho + session.run script, and the edgeml daemon.")
    e.add_argument("--broker", metavar="URL",
                   help="use this broker (mqtt://host:port) instead of a private mosquitto")
    e.add_argument("--broker-config", choices=("stock", "tuned"), default="stock",
                   help="the private mosquitto's settings: stock (as installed: queue limits, "
                   "in-flight window 20, Nagle; the default) or tuned (deep queues, no "
                   "in-flight cap, set_tcp_nodelay)")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, metavar="R",
                      help="only the paced phase, at R messages per second")
    mode.add_argument("--max", action="store_true",
                      help="only the as-fast-as-possible phase")
    e.add_argument("--messages", type=int, default=20000, metavar="N",
                   help="messages per max phase (default: 20000)")
    e.add_argument("--paced-seconds", type=float, default=5.0, metavar="S",
                   help="length of each paced phase in seconds (default: 5)")
    e.add_argument("--versions", default="1,3",
                   help="version counts to run, from 1..3 (default: 1,3)")
    e.add_argument("--models", default="light,heavy",
                   help="models to run: light (logistic regression), heavy (IsolationForest)")
    e.add_argument("--variants", default="onnx,raw,plain,edgeml,edgeml-qos0",
                   help="which of onnx, raw, plain, edgeml, edgeml-qos0 (the daemon answering "
                        "at QoS 0 like the plain script, largest version count only) to run "
                        "(default: all)")
    e.add_argument("--profile", default="x86-gateway",
                   help="firmware profile for the daemon and the scoring limit")
    e.add_argument("--format", choices=("msgpack", "json"), default="msgpack",
                   help="payload format of the published samples (default: msgpack)")
    e.add_argument("--qos", type=int, choices=(0, 1), default=0,
                   help="QoS of the published samples (default: 0)")
    e.add_argument("--phase-timeout", type=float, default=20.0, metavar="S",
                   help="cap on one max phase in seconds (default: 20)")
    e.add_argument("--phases", default="burst,samples",
                   help="phases after paced and max: burst (a QoS 1 burst through "
                   "mosquitto_pub -l), samples (the flood with --samples samples per "
                   "message); empty for none (default: burst,samples)")
    e.add_argument("--burst-messages", type=int, default=20000, metavar="N",
                   help="messages in the QoS 1 burst (default: 20000)")
    e.add_argument("--samples", type=int, default=10, metavar="K",
                   help="samples per message in the samples phase (default: 10)")
    e.add_argument("--samples-messages", type=int, default=10000, metavar="N",
                   help="messages in the samples phase (default: 10000, about a second of "
                        "the plain script's work: shorter, start-up and the last batch "
                        "decide the rate)")
    e.add_argument("--no-sync-off", action="store_true",
                   help="skip the daemon's second run with outbox and uplink off (its max and "
                        "samples phases: the sync on/off column)")
    e.add_argument("--affinity", default="split,none",
                   help="CPU placement passes: split (the target alone on the last core, "
                   "broker, load generator and receivers on the others), none (unpinned); "
                   "each is a full pass (default: split,none)")
    e.add_argument("--out", type=Path, metavar="DIR",
                   help="report directory (default: benchmarks/results/<timestamp>)")
    e.add_argument("--no-latest", action="store_true",
                   help="do not update latest.json / latest.md next to the report directory")
    e.add_argument("--no-charts", action="store_true", help="skip the PNG charts")


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from edgeml.errors import BenchError

    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BenchError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def run(args: argparse.Namespace) -> int:
    if args.bench_kind == "models":
        return _run_models(args)
    if args.bench_kind == "trees":
        from edgeml.host.bench.trees import run as run_trees

        return run_trees(args)
    return _run_e2e(args)


def _run_models(args: argparse.Namespace) -> int:
    import json

    from edgeml.host.bench.models import parse_batches, run_models_bench
    from edgeml.host.bench.report import json_default, render_table, write_report

    report = run_models_bench(args.bundles, profile=args.profile,
                              batches=parse_batches(args.batch), seconds=args.seconds,
                              progress=_progress)
    if args.out:
        for kind, path in write_report(report, args.out).items():
            _progress(f"wrote {kind}: {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=json_default) + "\n",
                             encoding="utf-8")
        _progress(f"wrote {args.json}")
    print(render_table(report), end="")
    return 0


def _run_e2e(args: argparse.Namespace) -> int:
    from edgeml.host.bench.e2e import E2ESettings, require_host_extra, run_e2e
    from edgeml.host.bench.report import default_out_dir, render_table, write_report

    require_host_extra()
    out = args.out or default_out_dir()
    paced = args.rate if args.rate is not None else (None if args.max else 1000.0)
    settings = E2ESettings(
        out_dir=out, broker_url=args.broker, broker_config=args.broker_config,
        paced_rate=paced,
        max_rate=args.max or args.rate is None, messages=args.messages,
        paced_seconds=args.paced_seconds, versions=_ints(args.versions, "--versions"),
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        profile=args.profile, format=args.format, qos=args.qos,
        phase_timeout_s=args.phase_timeout,
        extra_phases=() if args.rate is not None or args.max else
        tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        burst_messages=args.burst_messages, samples_per_message=args.samples,
        samples_messages=args.samples_messages,
        sync_off=not args.no_sync_off,
        affinity=tuple(a.strip() for a in args.affinity.split(",") if a.strip()),
    )
    report = run_e2e(settings, progress=_progress)
    latest = None if args.no_latest else out.parent
    for kind, path in write_report(report, out, latest_dir=latest,
                                   charts=not args.no_charts).items():
        _progress(f"wrote {kind}: {path}")
    print(render_table(report), end="")
    return 1 if report.get("errors") else 0
