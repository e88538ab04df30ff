#!/usr/bin/env python3
"""End-to-end benchmark: edgeml vs raw onnxruntime, a raw paho subscriber and the plain
paho + session.run script, side by side on one Daphnet stream through a private mosquitto.

    python benchmarks/bench_e2e.py                     # full run (paced 1,000 msg/s and max)
    python benchmarks/bench_e2e.py --models light --versions 3 --messages 5000   # quicker
    python benchmarks/bench_e2e.py --help              # every option (same as `edgeml bench e2e`)

Reports go to benchmarks/results/<timestamp>/ (report.json, report.md, throughput.png,
latency.png) and benchmarks/results/latest.{json,md} unless --out is given.
Needs the host extra: pip install -e '.[host]'.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from edgeml.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args and not any(a.startswith("--out=") for a in args) \
            and not {"-h", "--help"} & set(args):
        args += ["--out", str(RESULTS / time.strftime("%Y%m%d-%H%M%S"))]
    sys.exit(main(["bench", "e2e", *args]))
