#!/usr/bin/env python3
"""Per-model benchmark under emulated device profiles: load time, p50/p99 per call, rows/s and
RSS growth at batch 1, 8 and 64.

    python benchmarks/bench_models.py                       # the bench's own models, every
                                                            # shipped profile
    python benchmarks/bench_models.py my.edgeml --profile pi4 --batch 1,32
    python benchmarks/bench_models.py --help

Without bundles it builds the e2e models (gait-light: logistic regression, gait-heavy:
IsolationForest, both on Daphnet samples) and an activity model on BasicMotions windows, then
runs each shipped firmware profile in its own process (the CPU affinity of one profile must
not leak into the next). Reports go to benchmarks/results/models-<timestamp>/<profile>/.
Needs the host extra: pip install -e '.[host]'.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def build_default_bundles(work: Path) -> list[Path]:
    """One version each of the e2e models, plus a BasicMotions window classifier."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from converters import WindowFeatures, convert_estimator
    from edgeml.host.bench.e2e import build_models
    from edgeml.host.datasets import BASICMOTIONS_CHANNELS, BASICMOTIONS_WINDOW, load_basicmotions

    models = build_models(work, ("light", "heavy"), 1, progress=_say)
    train, test = load_basicmotions("TRAIN"), load_basicmotions("TEST")
    est = make_pipeline(WindowFeatures(n_channels=len(BASICMOTIONS_CHANNELS)), StandardScaler(),
                        LogisticRegression(max_iter=2000))
    est.fit(train.flat(), np.asarray(train.y))
    activity = convert_estimator(
        est, test.flat(), name="activity", version="1", features=BASICMOTIONS_CHANNELS,
        window=BASICMOTIONS_WINDOW, out=work / "activity-1.edgeml", training_data=train.flat(),
        labels=np.asarray(test.y), description="BasicMotions activity on raw 100 x 6 windows",
    ).path
    return [Path(activity), *(m[0].bundle for m in models.values())]


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    from edgeml.profiles import list_profiles

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", type=Path, help="bundles (default: build the bench's)")
    p.add_argument("--profile", action="append",
                   help="profile(s) to emulate (repeatable; default: every shipped profile)")
    p.add_argument("--batch", default="1,8,64", help="batch sizes (default: 1,8,64)")
    p.add_argument("--seconds", default="1", help="seconds per bundle and batch (default: 1)")
    p.add_argument("--out", type=Path, help="report directory (one sub-directory per profile)")
    args = p.parse_args()
    out = args.out or RESULTS / f"models-{time.strftime('%Y%m%d-%H%M%S')}"
    bundles = args.bundles or build_default_bundles(out / "bundles")
    code = 0
    for profile in args.profile or list_profiles():
        _say(f"profile {profile}")
        cmd = [sys.executable, "-m", "edgeml", "bench", "models", *map(str, bundles),
               "--profile", profile, "--batch", args.batch, "--seconds", args.seconds,
               "--out", str(out / profile)]
        code |= subprocess.call(cmd)
    return code


if __name__ == "__main__":
    sys.exit(main())
