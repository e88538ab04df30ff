#!/usr/bin/env python3
"""End-to-end benchmark: edgeml vs raw onnxruntime, a raw paho subscriber and the plain
paho + session.run script, side by side on one Daphnet stream through a private mosquitto.

    python benchmarks/bench_e2e.py                     # full run (paced 1,000 msg/s and max)
    python benchmarks/bench_e2e.py --models light --versions 3 --messages 5000   # quicker
    python benchmarks/bench_e2e.py --help              # every option (same as `edgeml bench e2e`)

Reports go to benchmarks/results/<timestamp>/ (report.json, report.md, throughput.png,
latency.png), benchmarks/results/latest.{json,md} and the "Latest results" block of
benchmarks/README.md, unless --out or --no-latest is given.
Needs the host extra: pip install -e '.[host]'.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgeml.cli import main

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    own_out = "--out" not in args and not any(a.startswith("--out=") for a in args)
    if own_out and not {"-h", "--help"} & set(args):
        args += ["--out", str(RESULTS / time.strftime("%Y%m%d-%H%M%S"))]
    code = main(["bench", "e2e", *args])
    latest = RESULTS / "latest.json"
    if own_out and "--no-latest" not in args and latest.exists() and code in (0, 1):
        from edgeml.host.bench.report import update_readme

        if update_readme(HERE / "README.md", json.loads(latest.read_text(encoding="utf-8"))):
            print(f"[bench] updated {HERE / 'README.md'}", file=sys.stderr)
    sys.exit(code)
