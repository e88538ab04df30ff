"""``edgeml fleet report``: model versions compared across the fleet, from the collector's
database."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HELP = "compare model versions across devices from the fleet database (edgeml collect)"
DESCRIPTION = """\
edgeml fleet report --db URL [--since T] [--until T] [--device ID ...] [--pipeline NAME]

Per model version, across the selected devices and time range (device time of the input):
rows scored, share of the pipeline's answers, agreement with the champion on the same
inputs, answer latency p50/p99, error and fallback rates, accuracy and macro-F1 where the
inputs carried a true label (the pipeline's label_field), and output drift when the devices
report drift windows. As a table, --json, and --png DIR (charts). The definitions are in
docs/fleet.md.

Times: Unix seconds, ISO 8601 (2026-11-30T08:00, UTC unless it names an offset), or a span
before now: 30m, 6h, 7d.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.collect.sink import DEFAULT_DB

    sub = p.add_subparsers(dest="fleet_verb", metavar="ACTION")
    r = sub.add_parser("report", help="per-version figures across devices over a time range",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--db", default=DEFAULT_DB, metavar="URL",
                   help="the fleet database edgeml collect writes, sqlite:///PATH or "
                        "postgresql://... (default: %(default)s)")
    r.add_argument("--since", metavar="TIME",
                   help="only inputs received at or after this time (default: all)")
    r.add_argument("--until", metavar="TIME",
                   help="only inputs received before this time (default: now)")
    r.add_argument("--device", action="append", metavar="ID",
                   help="only this device (repeatable; default: every device)")
    r.add_argument("--pipeline", metavar="NAME", help="only this pipeline")
    r.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    r.add_argument("--png", metavar="DIR",
                   help="also write charts to DIR (fleet-versions.png, fleet-drift.png)")


def parse_time(text: str | None, *, now: float | None = None) -> float | None:
    """Unix seconds, ISO 8601 or a span before now (``30s``, ``15m``, ``6h``, ``7d``)."""
    from datetime import UTC, datetime

    from edgeml.errors import ConfigError

    if text is None:
        return None
    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if t and t[-1] in units:
        try:
            return now - float(t[:-1]) * units[t[-1]]
        except ValueError:
            pass
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"not a time: {text!r} (Unix seconds, ISO 8601, or 30m/6h/7d)",
                          key="--since/--until") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def build_report(db: str, *, since: float | None = None, until: float | None = None,
                 devices: list[str] | None = None, pipeline: str | None = None) -> dict:
    """The whole report as one JSON-able document (what --json prints)."""
    from edgeml.host.collect.evidence import FleetDB, input_drift, version_evidence

    with FleetDB(db) as fdb:
        versions = version_evidence(fdb, devices=devices, pipeline=pipeline, since=since,
                                    until=until)
        drift = input_drift(fdb, devices=devices, pipeline=pipeline, since=since,
                            until=until)
        n_devices = fdb.query("SELECT COUNT(*) FROM devices")[0][0]
    return {"db": _safe(db), "since": since, "until": until, "devices": devices,
            "pipeline": pipeline, "fleet_devices": int(n_devices),
            "versions": [v.as_dict() for v in versions], "input_drift": drift}


def _safe(url: str) -> str:
    from edgeml.host.collect.sink import _safe as safe

    return safe(url)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def render_table(report: dict) -> str:
    head = ("pipeline", "version", "role", "devices", "rows", "answers", "agree", "p50 ms",
            "p99 ms", "score p99", "errors", "fallback", "labelled", "accuracy", "macro-F1",
            "out PSI")
    rows: list[tuple[str, ...]] = []
    for v in report["versions"]:
        drift = v["drift"]
        psi = drift.get("label_psi_mean", drift.get("score_psi_mean"))
        rows.append((v["pipeline"], f"{v['model']}:{v['version']}",
                     ",".join(v["roles"]) or "-", str(v["devices"]), f"{v['rows']:,}",
                     _pct(v["answer_share"]), _pct(v["agreement"]),
                     _num(v["latency_p50_ms"]), _num(v["latency_p99_ms"]),
                     _num(v.get("scoring_p99_ms")), _pct(v["error_rate"]),
                     _pct(v["fallback_rate"]), f"{v['labelled']:,}",
                     _pct(v["accuracy"]), _num(v["macro_f1"], ".3f"), _num(psi, ".3f")))
    if not rows:
        return "no records in the selection"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    for p, d in report["input_drift"].items():
        lines.append(f"input drift {p}: {d['windows']} windows from {d['devices']} device(s), "
                     f"worst-channel PSI mean {_num(d['worst_psi_mean'], '.3f')} "
                     f"max {_num(d['worst_psi_max'], '.3f')}, out of range max "
                     f"{_pct(d['out_of_range_max'])}")
    return "\n".join(lines)


def write_charts(report: dict, out_dir: Path) -> list[Path]:
    from edgeml.errors import ChartUnavailableError

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ChartUnavailableError(
            "charts need matplotlib: pip install 'edgeml[host]'") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    vs = report["versions"]
    written = []
    names = [f"{v['pipeline']}\n{v['model']}:{v['version']}" for v in vs]
    panels: list[tuple[str, list[Any], tuple[str, ...]]] = [
        ("answer share", [v["answer_share"] for v in vs], ()),
        ("agreement with champion", [v["agreement"] for v in vs], ()),
        ("accuracy", [v["accuracy"] for v in vs], ()),
        ("macro-F1", [v["macro_f1"] for v in vs], ()),
        ("answer latency (ms)", [(v["latency_p50_ms"], v["latency_p99_ms"]) for v in vs],
         ("p50", "p99")),
        ("error and fallback rates", [(v["error_rate"], v["fallback_rate"]) for v in vs],
         ("errors", "fallbacks")),
    ]
    fig = Figure(figsize=(12, 7), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, values, pair) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        xs = range(len(vs))
        if pair:
            a = [x[0] or 0.0 for x in values]
            b = [x[1] or 0.0 for x in values]
            ax.bar([x - 0.2 for x in xs], a, width=0.4, label=pair[0])
            ax.bar([x + 0.2 for x in xs], b, width=0.4, label=pair[1])
            ax.legend(fontsize=8)
            if "rates" in title:
                ax.set_ylim(0, max(1e-3, *a, *b) * 1.1)
        else:
            ax.bar(list(xs), [x or 0.0 for x in values])
            ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(list(xs), names, fontsize=7)
    fig.suptitle("edgeml fleet report: model versions across devices")
    path = out_dir / "fleet-versions.png"
    fig.savefig(path, dpi=100)
    written.append(path)
    drifted = [v for v in vs if v["drift"]]
    if drifted or report["input_drift"]:
        fig = Figure(figsize=(8, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"{v['model']}:{v['version']} output" for v in drifted] + \
                 [f"{p} input" for p in report["input_drift"]]
        vals = [v["drift"].get("label_psi_mean", v["drift"].get("score_psi_mean")) or 0.0
                for v in drifted] + [d["worst_psi_mean"] or 0.0
                                     for d in report["input_drift"].values()]
        ax.bar(range(len(vals)), vals)
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.set_ylabel("mean PSI over windows")
        ax.set_title("drift reported by the devices")
        path = out_dir / "fleet-drift.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    if args.fleet_verb != "report":
        print("usage: edgeml fleet report --db URL [...] (edgeml fleet report --help)")
        return 2
    now = time.time()
    since = parse_time(args.since, now=now)
    until = parse_time(args.until, now=now)
    report = build_report(args.db, since=since, until=until, devices=args.device,
                          pipeline=args.pipeline)
    if args.png:
        report["charts"] = [str(p) for p in write_charts(report, Path(args.png))]
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print(render_table(report))
        for p in report.get("charts", []):
            print(f"chart: {p}")
    return 0
