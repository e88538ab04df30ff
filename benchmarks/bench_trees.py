#!/usr/bin/env python3
"""Tree models as ONNX graphs: skl2onnx's graph vs edgeml's lowering, and session settings
(the same as ``edgeml bench trees``; see its --help). Results go to
benchmarks/results/trees.json unless --out is given. Needs the host extra."""

from __future__ import annotations

import sys
from pathlib import Path

from edgeml.host.bench.trees import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "trees.json")]
    sys.exit(main(args))
