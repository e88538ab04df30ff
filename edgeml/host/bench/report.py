"""Benchmark reports: terminal table, JSON, markdown summary and PNG charts.

A report is a plain dict (the JSON written to disk) so it can be re-rendered later from the
file alone (``render_markdown(json.load(...))``). matplotlib is a host extra and is imported
only when charts are drawn; without it the other outputs are still written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

MB = 2**20

# The targets the project set itself (2-core host, loopback broker, medians of 3 runs).
P50_OVER_PLAIN_MAX_MS = 0.3   # paced 1,000 msg/s: edgeml p50 at most the plain script's + 0.3 ms
P99_MAX_MS = 5.0              # paced 1,000 msg/s, 3 versions
MAX_VS_PLAIN_MIN = 1.0        # maximum rate, everything on: at least the plain script's
SAMPLES_VS_PLAIN_MIN = 1.0    # 10 samples per message: at least the plain script's samples/s
CPU_VS_PLAIN_MAX = 1.5        # CPU per message at the paced rate
SYNC_ON_VS_OFF_MIN = 0.9      # syncing costs at most 10% of the maximum rate
SYNC_LAG_MAX_S = 2.0          # ... and keeps up: the max phase synced within 2 s of its end
HEAVY_VS_LIGHT_MIN = 0.8      # heavy model's maximum rate within 20% of the light model's
RSS_OVER_BARE_MAX_MB = 25.0   # daemon with 3 versions vs a bare process with the same sessions
FIRST_ANSWER_MAX_S = 1.5


# --- machine ------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mosquitto_version() -> str | None:
    from edgeml.host.broker import mosquitto_path

    exe = mosquitto_path()
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else None


def machine_info() -> dict:
    """Where the numbers were measured: CPU, cores, memory, OS and the versions that matter."""
    from edgeml import __version__

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": allowed,
        "memory_bytes": _mem_total(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "edgeml": __version__,
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "paho-mqtt": _version("paho-mqtt"),
        "msgpack": _version("msgpack"),
        "scikit-learn": _version("scikit-learn"),
        "skl2onnx": _version("skl2onnx"),
        "mosquitto": _mosquitto_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- helpers ------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    body = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    num = [all(_is_num(r[i]) for r in body) and body != [] for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w)
                         for c, w, n in zip(cells, widths, num, strict=True)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[_cell(v) for v in r] for r in rows]
    num = [all(_is_num(r[i]) for r in body) and body != [] for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if n else "---" for n in num) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def _is_num(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return s in ("-", "")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        a = abs(v)
        if a >= 999.5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def _mb(b: Any) -> float | None:
    return None if b is None else b / MB


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


# --- e2e derived figures --------------------------------------------------------------------------
def _run(report: dict, variant: str, model: str | None = None, versions: int | None = None,
         affinity: str | None = None) -> dict:
    """The run of ``variant`` (the first pass's when ``affinity`` is None)."""
    for r in report.get("runs", []):
        if r["variant"] == variant and (variant == "raw" or
                                        (r["model"] == model and r["versions"] == versions)) \
                and (affinity is None or r.get("affinity", "none") == affinity):
            return r
    return {}


def _phase(report: dict, variant: str, model: str | None, versions: int | None,
           mode: str, affinity: str | None = None) -> dict:
    return _run(report, variant, model, versions, affinity).get("phases", {}).get(mode, {})


def _limit(report: dict, model: str, versions: int, batch: int) -> dict:
    for r in report.get("scoring_limit", []):
        if r["model"] == model and r["versions"] == versions and r["batch"] == batch:
            return r
    return {}


def _bare(report: dict, model: str, versions: int) -> dict:
    for b in report.get("bare", []):
        if b["model"] == model and b["versions"] == versions:
            return b
    return {}


def compute_ratios(report: dict) -> list[dict]:
    s = report["settings"]
    out = []
    batches = sorted({r["batch"] for r in report.get("scoring_limit", [])})
    modes = ("paced", "max", "samples", "burst")
    affinities = s.get("affinity") or [None]
    combos = [(a, m, k, mo) for a in affinities for m in s["models"] for k in s["versions"]
              for mo in modes]
    for aff, model, k, mode in combos:
        e = _phase(report, "edgeml", model, k, mode, aff)
        p = _phase(report, "plain", model, k, mode, aff)
        raw = _phase(report, "raw", None, None, mode, aff)
        if not e and not p:
            continue
        nosync = _phase(report, "edgeml-nosync", model, k, mode, aff)
        q0 = _phase(report, "edgeml-qos0", model, k, mode, aff)
        row = {
            "affinity": aff or "none", "model": model, "versions": k, "mode": mode,
            "edgeml_msgs": e.get("msgs_per_s"), "plain_msgs": p.get("msgs_per_s"),
            "raw_msgs": raw.get("msgs_per_s"),
            "edgeml_lost": e.get("lost"), "plain_lost": p.get("lost"),
            "raw_lost": raw.get("lost"),
            "edgeml_p50": e.get("p50_ms"), "plain_p50": p.get("p50_ms"),
            "edgeml_p99": e.get("p99_ms"), "plain_p99": p.get("p99_ms"),
            "edgeml_cpu_per_msg": e.get("cpu_ms_per_msg"),
            "plain_cpu_per_msg": p.get("cpu_ms_per_msg"),
            "sync_on_vs_off": _ratio(e.get("msgs_per_s"), nosync.get("msgs_per_s")),
            "edgeml_vs_plain_msgs": _ratio(e.get("msgs_per_s"), p.get("msgs_per_s")),
            "edgeml_vs_raw_msgs": _ratio(e.get("msgs_per_s"), raw.get("msgs_per_s")),
            "plain_vs_raw_msgs": _ratio(p.get("msgs_per_s"), raw.get("msgs_per_s")),
            "edgeml_vs_plain_p50": _ratio(e.get("p50_ms"), p.get("p50_ms")),
            "edgeml_vs_plain_cpu_per_msg": _ratio(e.get("cpu_ms_per_msg"),
                                                  p.get("cpu_ms_per_msg")),
            # the daemon with QoS 0 answers, as the plain script publishes them
            "qos0_msgs": q0.get("msgs_per_s"), "qos0_p50": q0.get("p50_ms"),
            "qos0_vs_plain_msgs": _ratio(q0.get("msgs_per_s"), p.get("msgs_per_s")),
            "qos0_vs_plain_cpu_per_msg": _ratio(q0.get("cpu_ms_per_msg"),
                                                p.get("cpu_ms_per_msg")),
        }
        if batches:
            row["edgeml_vs_onnx_big_batch"] = _ratio(
                e.get("msgs_per_s"), _limit(report, model, k, batches[-1])
                .get("msgs_per_s_limit"))
            row["plain_vs_onnx_batch1"] = _ratio(
                p.get("msgs_per_s"), _limit(report, model, k, 1).get("msgs_per_s_limit"))
        out.append(row)
    return out


def _check(tid: str, text: str, value: float | None, threshold: float, *, higher: bool,
           unit: str, model: str | None = None, note: str = "") -> dict:
    if value is None:
        met, by = None, "not measured"
    elif higher:
        met = bool(value >= threshold)
        by = "" if met else f"short by {threshold - value:.3g} {unit} ({value / threshold:.0%} " \
                            f"of the target)"
    else:
        met = bool(value <= threshold)
        share = f" ({value / threshold:.2f}x the limit)" if threshold else ""
        by = "" if met else f"over by {value - threshold:.3g} {unit}{share}"
    return {"id": tid, "target": text, "model": model, "value": value, "threshold": threshold,
            "unit": unit, "higher_is_better": higher, "met": met, "missed_by": by, "note": note}


def _sync_lag_check(e: dict) -> dict:
    """The max phase's answers reached upstream (the uplink's sync batches) within
    :data:`SYNC_LAG_MAX_S` of the phase's last answer: sync that merely falls behind is not
    cheap sync. An answered message whose record never arrived misses it whatever the lag."""
    cpu = e.get("cpu_ms_per_msg_with_sync")
    note = "" if e.get("synced") is None else (
        f"{e['synced']:,} of {e.get('answered', 0):,} answered messages synced"
        + (f"; CPU per message counted until then {cpu:.3f} ms" if cpu is not None else ""))
    check = _check("sync_lag", "maximum rate, sync on: the phase's outputs synced upstream "
                   f"within {SYNC_LAG_MAX_S:g} s of its last answer", e.get("sync_lag_s"),
                   SYNC_LAG_MAX_S, higher=False, unit="s", model="light", note=note)
    if e.get("unsynced"):
        check.update(met=False, missed_by=f"{e['unsynced']:,} answered messages never synced")
    return check


def check_targets(report: dict) -> list[dict]:
    """The targets, each met / missed (by how much) / not measured, on the first CPU
    placement pass (the pinned one by default) and the broker configuration of the run."""
    s = report["settings"]
    k = max(s["versions"])
    broker = "external" if s.get("broker_url") else (s.get("broker_config") or "stock")
    out = []
    rate = s.get("paced_rate")
    for model in s["models"]:
        e = _phase(report, "edgeml", model, k, "paced")
        p = _phase(report, "plain", model, k, "paced")
        if rate is not None:
            base = p.get("p50_ms")
            out.append(_check(
                "p50_vs_plain", f"{broker} broker, paced {rate:,.0f} msg/s, {k} versions: edgeml "
                "p50 at most the plain script's + 0.3 ms",
                None if base is None or e.get("p50_ms") is None else e["p50_ms"] - base,
                P50_OVER_PLAIN_MAX_MS, higher=False, unit="ms", model=model,
                note=f"edgeml {_cell(e.get('p50_ms'))} ms, plain {_cell(base)} ms"))
            out.append(_check(
                "p99", f"{broker} broker, paced {rate:,.0f} msg/s, {k} versions: edgeml p99 "
                "under 5 ms", e.get("p99_ms"), P99_MAX_MS, higher=False, unit="ms",
                model=model))
            q0 = _ratio(_phase(report, "edgeml-qos0", model, k, "paced").get("cpu_ms_per_msg"),
                        p.get("cpu_ms_per_msg"))
            out.append(_check(
                "cpu_vs_plain", f"{broker} broker, paced {rate:,.0f} msg/s: edgeml CPU per "
                "message at most 1.5x the plain script's",
                _ratio(e.get("cpu_ms_per_msg"), p.get("cpu_ms_per_msg")), CPU_VS_PLAIN_MAX,
                higher=False, unit="x", model=model,
                note="" if q0 is None else f"with QoS 0 answers {q0:.2f}x"))
    if "light" in s["models"]:
        e = _phase(report, "edgeml", "light", k, "max")
        p = _phase(report, "plain", "light", k, "max")
        off = _phase(report, "edgeml-nosync", "light", k, "max")
        out.append(_check(
            "max_vs_plain", f"maximum rate, {k} light versions, everything on: at least the "
            "plain script's", _ratio(e.get("msgs_per_s"), p.get("msgs_per_s")),
            MAX_VS_PLAIN_MIN, higher=True, unit="x", model="light"))
        out.append(_check(
            "sync_on_vs_off", "maximum rate: sync on at least 90% of sync off",
            _ratio(e.get("msgs_per_s"), off.get("msgs_per_s")), SYNC_ON_VS_OFF_MIN,
            higher=True, unit="x", model="light"))
        out.append(_sync_lag_check(e))
        es = _phase(report, "edgeml", "light", k, "samples")
        ps = _phase(report, "plain", "light", k, "samples")
        out.append(_check(
            "samples_vs_plain", f"{s.get('samples_per_message', 10)} samples per message: at "
            "least the plain script's samples/s",
            _ratio(es.get("msgs_per_s"), ps.get("msgs_per_s")), SAMPLES_VS_PLAIN_MIN,
            higher=True, unit="x", model="light"))
        eb = _phase(report, "edgeml", "light", k, "burst")
        pb = _phase(report, "plain", "light", k, "burst")
        if broker == "stock":
            out.append(_check(
                "burst_lost", "QoS 1 burst on the stock broker: nothing lost", eb.get("lost"),
                0, higher=False, unit="msgs", model="light"))
        else:
            q0 = _ratio(_phase(report, "edgeml-qos0", "light", k, "burst").get("msgs_per_s"),
                        pb.get("msgs_per_s"))
            out.append(_check(
                "burst_vs_plain", "QoS 1 burst on a large-queue broker: drained at least as "
                "fast as the plain QoS 1 script",
                _ratio(eb.get("msgs_per_s"), pb.get("msgs_per_s")), 1.0, higher=True,
                unit="x", model="light",
                note="" if q0 is None else f"with QoS 0 answers {q0:.2f}x"))
    if "heavy" in s["models"] and "light" in s["models"]:
        h = _phase(report, "edgeml", "heavy", k, "max")
        li = _phase(report, "edgeml", "light", k, "max")
        out.append(_check(
            "heavy_vs_light", f"maximum rate, {k} versions: the heavy model within 20% of the "
            "light model", _ratio(h.get("msgs_per_s"), li.get("msgs_per_s")),
            HEAVY_VS_LIGHT_MIN, higher=True, unit="x", model="heavy"))
    for model in s["models"]:
        run = _run(report, "edgeml", model, k)
        bare = _bare(report, model, k)
        steady, when = _edgeml_rss(run) if run else (None, "")
        over = None if not steady or not bare else (steady - bare["rss_bytes"]) / MB
        out.append(_check(
            "rss", f"daemon RSS with {k} versions within 25 MB of a bare onnxruntime process "
            "holding the same sessions", over, RSS_OVER_BARE_MAX_MB, higher=False, unit="MB",
            model=model, note=f"daemon RSS {when}" if when else ""))
        libs = run.get("host_libraries_loaded") if run else None
        out.append({
            "id": "no_sklearn", "target": "no scikit-learn/scipy/skl2onnx loaded in the daemon",
            "model": model, "value": None if libs is None else ", ".join(libs) or "none",
            "threshold": None, "unit": "", "higher_is_better": None,
            "met": None if libs is None else not libs,
            "missed_by": "" if not libs else f"loaded: {', '.join(libs)}",
            "note": "checked in /proc/PID/maps (compiled extension modules)",
        })
        start = run.get("start", {}) if run else {}
        out.append(_check(
            "first_answer", f"start to first answer under 1.5 s ({k} versions)",
            start.get("first_answer_s"), FIRST_ANSWER_MAX_S, higher=False, unit="s",
            model=model))
    return out


def add_derived(report: dict) -> dict:
    """Add ratios and the target checks to an e2e report (in place; returned for chaining)."""
    report["ratios"] = compute_ratios(report)
    report["targets"] = check_targets(report)
    notes = report.setdefault("notes", [])
    for r in report.get("runs", []):
        ph = r.get("phases", {}).get("paced", {})
        if ph.get("saturated"):
            who = " ".join(str(v) for v in (r["variant"], r["model"], r["versions"]) if v)
            notes.append(f"{who} could not keep up with the paced rate (answered "
                         f"{ph['msgs_per_s']:,.0f} msg/s): its paced latency is mostly time "
                         "spent queued")
        for mode, ph in r.get("phases", {}).items():
            if ph.get("lost"):
                who = " ".join(str(v) for v in (r["variant"], r["model"], r["versions"]) if v)
                notes.append(f"{who} {mode}: {ph['lost']} of {ph['sent']} messages unanswered "
                             "(the phase hit its time cap, or messages were lost)")
    return report


# --- e2e rendering ------------------------------------------------------------------------------
_E2E_HEADERS = ("cpus", "variant", "model", "ver", "phase", "msgs/s", "pub msg/s", "p50 ms",
                "p99 ms", "max ms", "lost", "CPU ms/msg", "RSS MB", "1st answer s")


def _e2e_rows(report: dict) -> list[list[Any]]:
    rows = []
    for r in report.get("runs", []):
        for mode, ph in r.get("phases", {}).items():
            rows.append([
                {"split": "pinned"}.get(r.get("affinity"), "unpinned"),
                r["variant"], r["model"] or "-", r["versions"] or "-", mode,
                ph.get("msgs_per_s"), ph.get("publish_rate"), ph.get("p50_ms"),
                ph.get("p99_ms"), ph.get("max_ms"), ph.get("lost"), ph.get("cpu_ms_per_msg"),
                _mb(r.get("rss_bytes") or ph.get("rss_bytes")),
                r.get("start", {}).get("first_answer_s"),
            ])
    return rows


def _limit_rows(report: dict) -> list[list[Any]]:
    return [[r["model"], r["versions"], r["batch"], r["us_per_row"], r["msgs_per_s_limit"],
             r["p50_ms_per_call"], r["p99_ms_per_call"]] for r in report.get("scoring_limit", [])]


_LIMIT_HEADERS = ("model", "ver", "batch", "µs/row (all versions)", "msgs/s limit",
                  "p50 ms/call", "p99 ms/call")
_RATIO_HEADERS = ("cpus", "model", "ver", "phase", "edgeml msg/s", "plain msg/s",
                  "raw msg/s", "edgeml/plain msgs", "edgeml/raw msgs", "edgeml lost",
                  "plain lost", "edgeml p50/p99 ms", "plain p50/p99 ms", "edgeml/plain p50",
                  "edgeml/plain CPU per msg", "sync on/off", "QoS 0 answers: msgs / CPU vs plain")


def _pair(a: Any, b: Any) -> str:
    return "-" if a is None else f"{a:.2f} / {b:.2f}" if b is not None else f"{a:.2f} / -"


def _ratio_rows(report: dict) -> list[list[Any]]:
    return [[{"split": "pinned"}.get(r.get("affinity"), "unpinned"), r["model"], r["versions"],
             r["mode"], r.get("edgeml_msgs"), r.get("plain_msgs"), r.get("raw_msgs"),
             _x(r["edgeml_vs_plain_msgs"]), _x(r["edgeml_vs_raw_msgs"]), r.get("edgeml_lost"),
             r.get("plain_lost"), _pair(r.get("edgeml_p50"), r.get("edgeml_p99")),
             _pair(r.get("plain_p50"), r.get("plain_p99")), _x(r["edgeml_vs_plain_p50"]),
             _x(r["edgeml_vs_plain_cpu_per_msg"]), _x(r.get("sync_on_vs_off")),
             "-" if r.get("qos0_vs_plain_msgs") is None else
             f"{_x(r.get('qos0_vs_plain_msgs'))} / {_x(r.get('qos0_vs_plain_cpu_per_msg'))}"]
            for r in report.get("ratios", [])]


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _target_rows(report: dict) -> list[list[Any]]:
    rows = []
    for t in report.get("targets", []):
        status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = _cell(value) if not isinstance(value, str) else value
        thr = t["threshold"]
        rows.append([t["target"], t["model"] or "-", f"{shown} {t['unit']}".strip(),
                     "-" if thr is None or (isinstance(thr, float) and math.isnan(thr))
                     else f"{'>=' if t['higher_is_better'] else '<='} {_cell(thr)} {t['unit']}",
                     status, "; ".join(x for x in (t["missed_by"], t.get("note")) if x)])
    return rows


_TARGET_HEADERS = ("target", "model", "measured", "required", "status", "how much / note")


def _edgeml_rss(run: dict) -> tuple[int | None, str]:
    """The daemon RSS the memory target is checked on: after the paced phase (models loaded,
    steady normal load), else right after start. The max phase fills the input queue, so the
    RSS after it says more about the queue limit than about the models."""
    paced = run.get("phases", {}).get("paced", {}).get("rss_bytes")
    if paced:
        return paced, "after the paced phase"
    idle = run.get("start", {}).get("idle_rss_bytes")
    return (idle, "after start") if idle else (None, "")


def _bare_rows(report: dict) -> list[list[Any]]:
    rows = []
    for b in report.get("bare", []):
        run = _run(report, "edgeml", b["model"], b["versions"])
        steady, _ = _edgeml_rss(run) if run else (None, "")
        rows.append([b["model"], b["versions"], _mb(b["python_onnxruntime_bytes"]),
                     _mb(b["rss_bytes"]), _mb(run.get("start", {}).get("idle_rss_bytes")),
                     _mb(steady), _mb(steady - b["rss_bytes"]) if steady else None,
                     _mb(run.get("rss_bytes")), _mb(run.get("rss_peak_bytes"))])
    return rows


_BARE_HEADERS = ("model", "ver", "python+ort MB", "bare sessions MB", "edgeml start MB",
                 "edgeml paced MB", "edgeml - bare MB", "edgeml end MB", "edgeml peak MB")


def render_table(report: dict) -> str:
    """The terminal view of a report (models or e2e)."""
    if report.get("kind") == "models":
        return _render_models_text(report)
    parts = []
    if report.get("scoring_limit"):
        parts += ["(a) scoring limit: raw onnxruntime over the same rows, one thread",
                  format_table(_LIMIT_HEADERS, _limit_rows(report)), ""]
    parts += ["(b) raw paho subscriber, (c) plain script, (d) edgeml: publish -> answer",
              format_table(_E2E_HEADERS, _e2e_rows(report)), ""]
    if report.get("ratios"):
        parts += ["ratios", format_table(_RATIO_HEADERS, _ratio_rows(report)), ""]
    if report.get("bare"):
        parts += ["memory", format_table(_BARE_HEADERS, _bare_rows(report)), ""]
    if report.get("targets"):
        parts += ["targets", format_table(_TARGET_HEADERS, _target_rows(report)), ""]
    for e in report.get("errors", []):
        parts.append(f"FAILED {e['variant']} {e['model']} {e['versions']}: {e['error']}")
    return "\n".join(parts).rstrip() + "\n"


def render_markdown(report: dict) -> str:
    if report.get("kind") == "models":
        return _render_models_md(report)
    m, s = report["machine"], report["settings"]
    lines = [
        f"# edgeml bench e2e — {report['created']}",
        "",
        f"Host: {m['cpu_model']}, {m['cpus_allowed']} usable cores, "
        f"{_cell(_mb(m.get('memory_bytes')))} MB RAM; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, numpy {m['numpy']}, paho-mqtt {m['paho-mqtt']}, "
        f"{m.get('mosquitto') or 'broker given by URL'}.",
        "",
        f"Stream: Daphnet single samples as {s['format']} maps (`id`, `t` = publish time in "
        f"ns, 9 features), QoS {s['qos']}, one publisher process; paced phase "
        f"{_cell(s['paced_rate'])} msg/s for {s['paced_messages']} messages, max phase "
        f"{s['messages']} messages as fast as the publisher goes (capped at "
        f"{s['phase_timeout_s']:g} s). Daemon profile `{s['profile']}`. Latency is publish -> "
        "answer received by a separate subscriber process.",
        "",
        "Models: " + "; ".join(f"**{k}**: {v}" for k, v in report.get("models", {}).items())
        + ". Versions: 1 = champion; 3 = champion + challenger + shadow (different seeds).",
        "",
        "Load generator: QoS 0 PUBLISH packets written on a bare TCP socket (not paho), so "
        "it outruns every receiver; the max phase sends bursts of 16 packets. The edgeml "
        "daemon runs with the config defaults (answers at QoS 1, raw-input log and outbox "
        "on); the plain script publishes its answers at QoS 0 and logs nothing.",
        "",
        "Every paho client in the baselines sets TCP_NODELAY in "
        "`on_socket_open` (paho 2.2 does not; the load generator sets it too), so the plain "
        "script is not slowed by delayed "
        f"ACKs. The plain script's sessions use intra_op_num_threads={s['plain_threads']}.",
        "",
        "Broker: " + ("a private mosquitto with its stock settings (queue limits, in-flight "
                      "window 20, no `set_tcp_nodelay`), as users install it."
                      if s.get("broker_config", "tuned") == "stock" and not s.get("broker_url")
                      else "a private mosquitto tuned for tests (deep queues, no in-flight "
                      "cap, `set_tcp_nodelay true`)." if not s.get("broker_url")
                      else f"the broker at {s['broker_url']}."),
        "",
    ]
    if report.get("targets"):
        lines += ["## Targets", "", markdown_table(_TARGET_HEADERS,
                                                               _target_rows(report)), ""]
    if report.get("scoring_limit"):
        lines += ["## (a) Scoring limit: raw onnxruntime, same rows", "",
                  markdown_table(_LIMIT_HEADERS, _limit_rows(report)), ""]
    lines += ["## Side by side: publish -> answer", "",
              markdown_table(_E2E_HEADERS, _e2e_rows(report)), ""]
    if report.get("ratios"):
        lines += ["## Ratios", "", markdown_table(_RATIO_HEADERS, _ratio_rows(report)), ""]
    if report.get("bare"):
        lines += ["## Memory", "", markdown_table(_BARE_HEADERS, _bare_rows(report)), ""]
    if report.get("charts"):
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})"
                                       for c in report["charts"]] + [""]
    for e in report.get("errors", []):
        lines.append(f"- FAILED {e['variant']} {e['model']} {e['versions']}: {e['error']}")
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    lines.append(f"\nRun took {report.get('duration_s', 0):.0f} s.")
    return "\n".join(lines).rstrip() + "\n"


README_START = "<!-- latest-results:start (written by benchmarks/bench_e2e.py) -->"
README_END = "<!-- latest-results:end -->"


def render_readme_section(report: dict, *, chart_prefix: str = "results/") -> str:
    """The "latest results" block of benchmarks/README.md: targets, side by side, memory."""
    m, s = report["machine"], report["settings"]
    lines = [
        README_START,
        f"Run of {report['created']} on {m['cpu_model']} ({m['cpus_allowed']} cores), "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, paho-mqtt {m['paho-mqtt']}, "
        f"{m.get('mosquitto') or 'external broker'}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in (m.get('load_average') or []))}. Paced "
        f"{_cell(s['paced_rate'])} msg/s x {s['paced_messages']} messages; max phase "
        f"{s['messages']} messages. Full report: [results/latest.md](results/latest.md), "
        "figures: [results/latest.json](results/latest.json).",
        "",
        "### Targets", "", markdown_table(_TARGET_HEADERS, _target_rows(report)), "",
        "### Side by side", "", markdown_table(_E2E_HEADERS, _e2e_rows(report)), "",
    ]
    if report.get("scoring_limit"):
        lines += ["### Scoring limit (raw onnxruntime)", "",
                  markdown_table(_LIMIT_HEADERS, _limit_rows(report)), ""]
    if report.get("ratios"):
        lines += ["### Ratios", "", markdown_table(_RATIO_HEADERS, _ratio_rows(report)), ""]
    if report.get("bare"):
        lines += ["### Memory", "", markdown_table(_BARE_HEADERS, _bare_rows(report)), ""]
    lines += [f"![{Path(c).stem}]({chart_prefix}{Path(c).name})"
              for c in report.get("charts", [])]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, report: dict) -> bool:
    """Replace the marked block of ``readme`` with the latest results; False if no markers."""
    text = readme.read_text(encoding="utf-8")
    a, b = text.find(README_START), text.find(README_END)
    if a < 0 or b < a:
        return False
    new = text[:a] + render_readme_section(report) + text[b + len(README_END):]
    readme.write_text(new, encoding="utf-8")
    return True


# --- models rendering ---------------------------------------------------------------------------
_MODEL_HEADERS = ("model", "version", "batch", "p50 ms", "p99 ms", "rows/s", "µs/row",
                  "load ms", "RSS +MB load", "RSS +MB run")


def _model_rows(report: dict) -> list[list[Any]]:
    rows = []
    for r in report["results"]:
        for b in r["batches"]:
            rows.append([r["name"], r["version"], b["batch"], b["p50_ms"], b["p99_ms"],
                         b["rows_per_s"], b["us_per_row"], r["load_ms"],
                         _mb(r["rss_load_growth_bytes"]), _mb(b["rss_growth_bytes"])])
    return rows


def _render_models_text(report: dict) -> str:
    parts = [report["emulation"]["note"], ""]
    for r in report["results"]:
        parts.append(f"{r['name']} {r['version']} ({r['kind']}, {r['model_bytes']:,} bytes): "
                     f"{r['data']}")
    parts += ["", format_table(_MODEL_HEADERS, _model_rows(report))]
    return "\n".join(parts) + "\n"


def _render_models_md(report: dict) -> str:
    m = report["machine"]
    lines = [f"# edgeml bench models — {report['created']}", "",
             f"Host: {m['cpu_model']}, {m['cpus_allowed']} usable cores; onnxruntime "
             f"{m['onnxruntime']}.", "", f"> {report['emulation']['note']}", ""]
    for r in report["results"]:
        lines.append(f"- **{r['name']} {r['version']}** ({r['kind']}, {r['model_bytes']:,} "
                     f"bytes): {r['data']}")
    lines += ["", markdown_table(_MODEL_HEADERS, _model_rows(report)), ""]
    if report.get("charts"):
        lines += [f"![{Path(c).stem}]({Path(c).name})" for c in report["charts"]]
    return "\n".join(lines).rstrip() + "\n"


# --- charts -------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_charts(report: dict, out_dir: Path) -> list[Path]:
    """PNG charts; an empty list (and a note in the report) when matplotlib is missing."""
    try:
        plt = _pyplot()
    except ImportError:
        report.setdefault("notes", []).append(
            "charts skipped: matplotlib is not installed (pip install 'edgeml[host]')")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (_models_charts if report.get("kind") == "models" else _e2e_charts)(
        report, out_dir, plt)
    plt.close("all")
    return paths


def _e2e_charts(report: dict, out_dir: Path, plt: Any) -> list[Path]:
    s = report["settings"]
    paths = []
    groups = [(m, k) for m in s["models"] for k in s["versions"]]
    big = max((r["batch"] for r in report.get("scoring_limit", [])), default=None)
    series = [
        ("raw subscriber", lambda m, k: _phase(report, "raw", None, None, "max")
         .get("msgs_per_s")),
        ("plain script", lambda m, k: _phase(report, "plain", m, k, "max").get("msgs_per_s")),
        ("edgeml", lambda m, k: _phase(report, "edgeml", m, k, "max").get("msgs_per_s")),
        ("onnxruntime batch 1", lambda m, k: _limit(report, m, k, 1).get("msgs_per_s_limit")),
    ]
    if big and big != 1:
        series.append((f"onnxruntime batch {big}",
                       lambda m, k: _limit(report, m, k, big).get("msgs_per_s_limit")))
    if groups and s.get("max_rate"):
        fig, ax = plt.subplots(figsize=(9, 4.8))
        width = 0.8 / len(series)
        for i, (label, fn) in enumerate(series):
            vals = [fn(m, k) or 0 for m, k in groups]
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=label)
            for b, v in zip(bars, vals, strict=True):
                if v:
                    ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=6, rotation=90)
        top = max((fn(m, k) or 0 for _, fn in series for m, k in groups), default=0)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}, {k} version{'s' if k > 1 else ''}" for m, k in groups])
        ax.set_yscale("log")
        if top:
            ax.set_ylim(top=top * 6)
        ax.set_ylabel("messages (rows) per second, log scale")
        ax.set_title("Throughput by variant (as fast as possible; onnxruntime = scoring limit)")
        ax.legend(fontsize=8, loc="upper right", ncol=3)
        fig.tight_layout()
        p = out_dir / "throughput.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    if s.get("paced_rate") is not None:
        fig, axes = plt.subplots(1, max(1, len(s["models"])), figsize=(11, 4.2), squeeze=False)
        for ax, model in zip(axes[0], s["models"], strict=False):
            curves = [("raw subscriber", _phase(report, "raw", None, None, "paced"))]
            for k in s["versions"]:
                curves.append((f"plain, {k}v", _phase(report, "plain", model, k, "paced")))
                curves.append((f"edgeml, {k}v", _phase(report, "edgeml", model, k, "paced")))
            for label, ph in curves:
                qd = ph.get("quantiles")
                if not qd or not qd["ms"]:
                    continue
                ax.plot([max(v, 1e-3) for v in qd["ms"]], [q / 100 for q in qd["q"]],
                        label=label, drawstyle="steps-post")
            ax.axvline(P99_MAX_MS, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("publish -> answer latency, ms (log)")
            ax.set_ylabel("fraction of messages")
            ax.set_title(f"{model} model, paced {s['paced_rate']:,.0f} msg/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "latency.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def _models_charts(report: dict, out_dir: Path, plt: Any) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in report["results"]:
        xs = [b["batch"] for b in r["batches"]]
        ax.plot(xs, [b["rows_per_s"] for b in r["batches"]], marker="o",
                label=f"{r['name']} {r['version']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("rows per second")
    ax.set_title(f"Throughput by batch size ({report['emulation']['profile']} emulation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "models.png"
    fig.savefig(p, dpi=110)
    return [p]


# --- writing ------------------------------------------------------------------------------------
def json_default(v: Any) -> Any:
    """numpy scalars and arrays become plain JSON values (a numpy bool must stay a bool)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def default_out_dir(base: Path = Path("benchmarks/results")) -> Path:
    return base / time.strftime("%Y%m%d-%H%M%S")


def write_report(report: dict, out_dir: Path, *, latest_dir: Path | None = None,
                 charts: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the charts into ``out_dir``; with
    ``latest_dir``, also ``latest.json`` / ``latest.md`` (and the charts, as ``latest-*.png``)
    there, so the README can always point at the newest run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if charts:
        report["charts"] = [p.name for p in write_charts(report, out_dir)]
    j = out_dir / "report.json"
    j.write_text(json.dumps(report, indent=2, default=json_default) + "\n", encoding="utf-8")
    md = out_dir / "report.md"
    md.write_text(render_markdown(report), encoding="utf-8")
    written.update(json=j, markdown=md)
    for c in report.get("charts", []):
        written[f"chart:{c}"] = out_dir / c
    if latest_dir is not None:
        latest_dir = Path(latest_dir)
        latest_dir.mkdir(parents=True, exist_ok=True)
        kind = report.get("kind", "e2e")
        stem = "latest" if kind == "e2e" else f"latest-{kind}"
        latest = dict(report, charts=[f"{stem}-{c}" for c in report.get("charts", [])])
        for c in report.get("charts", []):
            shutil.copyfile(out_dir / c, latest_dir / f"{stem}-{c}")
        lj = latest_dir / f"{stem}.json"
        lj.write_text(json.dumps(latest, indent=2, default=json_default) + "\n", encoding="utf-8")
        lm = latest_dir / f"{stem}.md"
        lm.write_text(render_markdown(latest), encoding="utf-8")
        written.update(latest_json=lj, latest_markdown=lm)
    return written
