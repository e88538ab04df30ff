"""Where the daemon's CPU goes, stage by stage, from a py-spy profile of the real process.

``py-spy record --format raw`` writes one line per distinct stack: the frames from the thread
down to the innermost one, ``;``-separated, then the sample count. Each sample is put in the
stage of its innermost frame that belongs to one (the answer packer called from the scoring
stage counts as answers, not as scoring). Samples taken while the loop waits in ``epoll``
are kept apart: py-spy cannot always tell an idle thread from a busy one in a VM, and the
shares are of the busy rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

WAIT = "loop waiting in epoll"
#: (a piece of a frame, its stage), most specific first; the first match, searched from the
#: innermost frame outwards, decides
STAGES: tuple[tuple[str, str], ...] = (
    ("LoadedModel._run", "onnx session.run"),
    ("onnxruntime", "onnx session.run"),
    ("edgeml/storage/outbox", "outbox (SQLite)"),
    ("edgeml/core/uplink.py", "uplink"),
    ("edgeml/storage/rawlog", "archive (raw log)"),
    ("edgeml/core/drift.py", "drift and sensor health"),
    ("edgeml/core/health.py", "drift and sensor health"),
    ("edgeml/core/egress.py", "answers and records packed"),
    ("edgeml/core/outputs.py", "answers and records packed"),
    ("edgeml/core/decode.py", "decode (msgpack, checks)"),
    ("edgeml/core/assemble.py", "rows and windows"),
    ("edgeml/core/gaps.py", "ingress (routing, gaps, acks)"),
    ("edgeml/core/ingress.py", "ingress (routing, gaps, acks)"),
    ("edgeml/transport/", "transport (paho, sockets)"),
    ("paho/mqtt/", "transport (paho, sockets)"),
    ("edgeml/core/scoring.py", "scoring stage (batches, outcomes)"),
    ("edgeml/core/rendezvous.py", "scoring stage (batches, outcomes)"),
    ("edgeml/core/model.py", "scoring stage (batches, outcomes)"),
    ("edgeml/core/stats.py", "scoring stage (batches, outcomes)"),
    ("edgeml/core/", "device (status, metrics, other)"),
    ("selectors.py", WAIT),
    ("asyncio/", "asyncio loop"),
    ("concurrent/futures", "thread hand-offs"),
    ("threading.py", "thread hand-offs"),
)
OTHER = "other"
_IMPORTING = "_find_and_load"  # start-up imports: not part of a phase's work


def classify(frames: Iterable[str]) -> str:
    """The stage of one stack (outermost frame first)."""
    for frame in reversed(list(frames)):
        for needle, stage in STAGES:
            if needle in frame:
                return stage
    return OTHER


def read_raw(lines: Iterable[str]) -> Counter[str]:
    """Samples per stage in py-spy's raw output; stacks of module imports are skipped."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit() or _IMPORTING in stack:
            continue
        counts[classify(stack.split(";")[1:])] += int(n)  # [0] is the thread
    return counts


def read_raw_file(path: Path) -> Counter[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return read_raw(fh)


def stage_table(counts: Counter[str], cpu_ms_per_msg: float | None) -> list[dict]:
    """Rows ``{stage, samples, share, ms_per_msg}``, largest first: ``share`` of the busy
    samples (all but the epoll wait), ``ms_per_msg`` that share of the CPU per message
    measured without the profiler (None when not measured). The epoll wait comes last, with
    its share of all samples and no time."""
    busy = sum(v for k, v in counts.items() if k != WAIT)
    rows = []
    for stage, n in counts.most_common():
        if stage == WAIT:
            continue
        share = n / busy if busy else 0.0
        rows.append({"stage": stage, "samples": n, "share": share,
                     "ms_per_msg": share * cpu_ms_per_msg if cpu_ms_per_msg else None})
    if counts.get(WAIT):
        total = busy + counts[WAIT]
        rows.append({"stage": WAIT, "samples": counts[WAIT], "share": counts[WAIT] / total,
                     "ms_per_msg": None})
    return rows
