"""Tree models as ONNX graphs: skl2onnx's graph vs edgeml's lowering, and session settings.

    edgeml bench trees                    # everything, ~3-5 min on 2 cores
    edgeml bench trees --skip-sessions    # only the converter table
    python benchmarks/bench_trees.py      # the same, results in benchmarks/results/trees.json

For every tree model (100 trees / iterations, Daphnet samples: 9 channels, or 8 for the
regressors that predict the vertical trunk channel from the others) it converts with skl2onnx
and, where edgeml lowers the model itself (IsolationForest), with edgeml's lowering too, then
measures with onnxruntime on the CPU (intra_op_num_threads=1, inter_op_num_threads=1):

- nodes and ONNX bytes;
- load: InferenceSession creation from bytes, median of several;
- µs per row at batch 1 and batch 64: each repeat times a loop of calls (after a warm-up),
  a round's figure is the median over the repeats;
- load and latency are the best of 3 rounds (all rounds are in the JSON);
- parity on every Daphnet row: labels identical, max |score - scikit-learn|.

IsolationForest also gets "edgeml-f32", the 5-node float32 design of the first prototype
(AVERAGE of depth + c(n) leaf weights in float32, then float32 arithmetic), for comparison
only: it is not what edgeml ships (see docs/converters.md, "labels on the threshold").

Then session settings for small devices (the lowered IsolationForest and a RandomForest),
each combination in a fresh process: CPU memory arena on/off, graph optimisation level,
intra-op threads -> RSS after load, RSS after 500 batch-64 runs, peak RSS (all deltas from
the process before the session), and latency at batch 1 and 64.

Writes benchmarks/results/trees.json and prints tables. Needs the host extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_TREES = 100


def _say(msg: str) -> None:
    print(f"[bench_trees] {msg}", file=sys.stderr, flush=True)


# --- models ----------------------------------------------------------------------------------
def build_models():
    """(name, fitted estimator, X, label kind) on Daphnet."""
    import numpy as np
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        ExtraTreesRegressor,
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        IsolationForest,
        RandomForestClassifier,
        RandomForestRegressor,
    )

    from edgeml.host.datasets import load_daphnet

    X = load_daphnet().X
    s = X[:, 1] + X[:, 7]
    y = (s > np.median(s)).astype(np.int64)
    others = [i for i in range(9) if i != 7]
    Xr, yr = X[:, others], X[:, 7]
    n = N_TREES
    specs = [
        ("IsolationForest", IsolationForest(n_estimators=n, random_state=0), X, None),
        ("RandomForestClassifier", RandomForestClassifier(n_estimators=n, random_state=0), X, y),
        ("ExtraTreesClassifier", ExtraTreesClassifier(n_estimators=n, random_state=0), X, y),
        ("GradientBoostingClassifier",
         GradientBoostingClassifier(n_estimators=n, random_state=0), X, y),
        ("HistGradientBoostingClassifier",
         HistGradientBoostingClassifier(max_iter=n, early_stopping=False, random_state=0), X, y),
        ("RandomForestRegressor", RandomForestRegressor(n_estimators=n, random_state=0), Xr, yr),
        ("ExtraTreesRegressor", ExtraTreesRegressor(n_estimators=n, random_state=0), Xr, yr),
        ("GradientBoostingRegressor",
         GradientBoostingRegressor(n_estimators=n, random_state=0), Xr, yr),
        ("HistGradientBoostingRegressor",
         HistGradientBoostingRegressor(max_iter=n, early_stopping=False, random_state=0), Xr, yr),
    ]
    out = []
    for name, est, Xm, ym in specs:
        t = time.perf_counter()
        est.fit(Xm) if ym is None else est.fit(Xm[::2], ym[::2])
        _say(f"fitted {name} in {time.perf_counter() - t:.1f}s")
        out.append((name, est, Xm))
    return out


def convert(est, n_features: int, converter: str):
    from converters.export import analyse, to_onnx_model

    return to_onnx_model(est, analyse(est), n_inputs=n_features, window=None,
                         n_features=n_features, input_shape="flat", converter=converter)


def prototype_f32_model(forest, n_features: int):
    """The first prototype's 5-node float32 design (for comparison only, not shipped)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from converters.trees import isolation_forest_tables

    t = isolation_forest_tables(forest, n_features)
    weights = t.leaf_values[t.target_weights.astype(np.int64)].astype(np.float32)
    den = np.float32(t.denominator / t.n_trees)  # mean depth / c(max_samples)
    inits = [numpy_helper.from_array(np.array([v], np.float32), k) for k, v in (
        ("neg_c", -den), ("two", 2.0), ("neg_offset", -t.offset), ("zero", 0.0))]
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "m1"),
              numpy_helper.from_array(np.array([1], np.int64), "p1")]
    nodes = [
        helper.make_node(
            "TreeEnsembleRegressor", ["input"], ["mean_depth"], domain="ai.onnx.ml",
            n_targets=1, aggregate_function="AVERAGE",
            nodes_treeids=t.nodes_treeids.tolist(), nodes_nodeids=t.nodes_nodeids.tolist(),
            nodes_featureids=t.nodes_featureids.tolist(),
            nodes_values=t.nodes_values.tolist(), nodes_modes=t.nodes_modes,
            nodes_truenodeids=t.nodes_truenodeids.tolist(),
            nodes_falsenodeids=t.nodes_falsenodeids.tolist(),
            target_treeids=t.target_treeids.tolist(), target_nodeids=t.target_nodeids.tolist(),
            target_ids=[0] * len(weights), target_weights=weights.tolist()),
        helper.make_node("Div", ["mean_depth", "neg_c"], ["e"]),
        helper.make_node("Pow", ["two", "e"], ["p"]),
        helper.make_node("Sub", ["neg_offset", "p"], ["scores"]),
        helper.make_node("Less", ["scores", "zero"], ["neg"]),
        helper.make_node("Where", ["neg", "m1", "p1"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes, "prototype_f32",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None, 1]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("ai.onnx.ml", 3)])


# --- measurements ----------------------------------------------------------------------------
def session(model_bytes: bytes, *, arena: bool = True, opt: str = "all", threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt]
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def time_per_row(sess, X, batch: int, repeats: int, budget_s: float = 0.25) -> float:
    """Median over ``repeats`` of the mean µs per row of a loop of calls."""
    feed = {sess.get_inputs()[0].name: X[:batch]}
    t = time.perf_counter()
    calls = 0
    while time.perf_counter() - t < 0.05 or calls < 3:  # warm-up, and calibrate the loop
        sess.run(None, feed)
        calls += 1
    per_call = (time.perf_counter() - t) / calls
    loop = max(3, int(budget_s / max(per_call, 1e-7) / repeats))
    figures = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(loop):
            sess.run(None, feed)
        figures.append((time.perf_counter() - t) / loop / batch * 1e6)
    return statistics.median(figures)


def load_ms(model_bytes: bytes, repeats: int) -> float:
    figures = []
    for _ in range(repeats):
        t = time.perf_counter()
        session(model_bytes)
        figures.append((time.perf_counter() - t) * 1e3)
    return statistics.median(figures)


def parity(est, sess, X) -> dict:
    import numpy as np

    from converters.export import analyse
    from converters.parity import reference_outputs

    a = analyse(est)
    ref = reference_outputs(est, a, X)
    outs = sess.run(None, {sess.get_inputs()[0].name: X})
    if a.spec.kind == "regressor":
        pred = np.asarray(outs[0], np.float64).reshape(len(X))
        diff = np.abs(pred - ref.labels)
        return {"rows": len(X), "max_abs_diff": float(diff.max()),
                "max_rel_diff": float((diff / np.maximum(1, np.abs(ref.labels))).max())}
    labels, scores = outs
    differ = int((np.asarray(labels).reshape(-1) != ref.labels).sum())
    sc = np.asarray(scores, np.float64).reshape(len(X), -1)
    return {"rows": len(X), "labels_differ": differ,
            "max_abs_score_diff": float(np.abs(sc - ref.scores).max())}


def measure(name, est, X, converter, model, repeats, rounds: int = 3) -> dict:
    """Timings are the best of ``rounds`` medians: the host is shared, and a busy neighbour
    only ever makes a round slower."""
    b = model.SerializeToString()
    sess = session(b)
    rnds = [(load_ms(b, max(3, repeats // 2)), time_per_row(sess, X, 1, repeats),
             time_per_row(sess, X, 64, repeats)) for _ in range(rounds)]
    row = {
        "model": name, "converter": converter, "nodes": len(model.graph.node), "bytes": len(b),
        "load_ms": min(r[0] for r in rnds),
        "us_per_row_b1": min(r[1] for r in rnds),
        "us_per_row_b64": min(r[2] for r in rnds),
        "rounds": {"load_ms": [r[0] for r in rnds], "us_per_row_b1": [r[1] for r in rnds],
                   "us_per_row_b64": [r[2] for r in rnds]},
        "parity": parity(est, sess, X),
    }
    _say(f"{name:32s} {converter:9s} nodes {row['nodes']:5d}  load {row['load_ms']:7.1f} ms  "
         f"b1 {row['us_per_row_b1']:8.1f} us  b64 {row['us_per_row_b64']:7.2f} us/row")
    return row


# --- session settings, one process per combination -----------------------------------------
SESSION_GRID = [  # (arena, opt, threads)
    (True, "all", 1), (False, "all", 1), (True, "basic", 1), (True, "disable", 1),
    (False, "disable", 1), (True, "all", 2), (False, "all", 2),
]


def _vm_hwm() -> int:
    """Peak RSS of this process in bytes (VmHWM; ru_maxrss would carry the parent's peak
    across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _probe(model_path: str, arena: bool, opt: str, threads: int, repeats: int) -> dict:
    """Runs in a child process: RSS deltas and latency for one combination."""
    import numpy as np
    import psutil

    from edgeml.host.datasets import load_daphnet

    X = np.ascontiguousarray(load_daphnet().X[:, : int(Path(model_path).stem.split("_")[-1])])
    b = Path(model_path).read_bytes()
    proc = psutil.Process()
    import onnxruntime  # noqa: F401  (imported before the baseline)

    base = proc.memory_info().rss
    sess = session(b, arena=arena, opt=opt, threads=threads)
    after_load = proc.memory_info().rss
    feed = {sess.get_inputs()[0].name: X[:64]}
    for _ in range(500):
        sess.run(None, feed)
    after_runs = proc.memory_info().rss
    peak = _vm_hwm()
    return {
        "arena": arena, "graph_optimization": opt, "intra_op_threads": threads,
        "rss_load_mb": (after_load - base) / 2**20,
        "rss_after_runs_mb": (after_runs - base) / 2**20,
        "peak_rss_mb": (peak - base) / 2**20,
        "us_per_row_b1": time_per_row(sess, X, 1, repeats),
        "us_per_row_b64": time_per_row(sess, X, 64, repeats),
    }


def session_settings(models: dict[str, object], repeats: int, rounds: int) -> list[dict]:
    """Every model x setting in its own process, ``rounds`` times in interleaved order; the
    latency reported is the best round's median (the host is shared: a busy neighbour only
    ever makes a round slower), RSS figures the median over rounds."""
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for label, (model, n_features) in models.items():
            paths[label] = Path(tmp) / f"{label}_{n_features}.onnx"
            paths[label].write_bytes(model.SerializeToString())
        for rnd in range(rounds):
            for label in models:
                for arena, opt, threads in SESSION_GRID:
                    cmd = [sys.executable, "-m", "edgeml.host.bench.trees", "--probe",
                           str(paths[label]), str(int(arena)), opt, str(threads), str(repeats)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    runs.setdefault((label, arena, opt, threads), []).append(r)
                    _say(f"round {rnd + 1}: {label:24s} arena {arena!s:5s} opt {opt:7s} "
                         f"threads {threads}: rss load {r['rss_load_mb']:5.1f} MB, peak "
                         f"{r['peak_rss_mb']:5.1f} MB, b1 {r['us_per_row_b1']:7.1f} us, "
                         f"b64 {r['us_per_row_b64']:6.2f} us/row")
    rows = []
    for (label, arena, opt, threads), rs in runs.items():
        row: dict = {"model": label, "arena": arena, "graph_optimization": opt,
                     "intra_op_threads": threads, "rounds": len(rs)}
        for k in ("rss_load_mb", "rss_after_runs_mb", "peak_rss_mb"):
            row[k] = statistics.median(r[k] for r in rs)
        for k in ("us_per_row_b1", "us_per_row_b64"):
            row[k] = min(r[k] for r in rs)
            row[k + "_rounds"] = [r[k] for r in rs]
        rows.append(row)
    return rows


# --- report ----------------------------------------------------------------------------------
def ratios(rows: list[dict]) -> dict:
    """skl2onnx / edgeml for every model with both."""
    out = {}
    by = {(r["model"], r["converter"]): r for r in rows}
    for (model, conv), r in by.items():
        if conv != "edgeml" or (model, "skl2onnx") not in by:
            continue
        s = by[(model, "skl2onnx")]
        out[model] = {
            "nodes": s["nodes"] / r["nodes"],
            "batch1_speedup": s["us_per_row_b1"] / r["us_per_row_b1"],
            "batch64_speedup": s["us_per_row_b64"] / r["us_per_row_b64"],
            "load_speedup": s["load_ms"] / r["load_ms"],
        }
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'model':31s} {'converter':9s} {'nodes':>6s} {'bytes':>9s} {'load ms':>8s} "
             f"{'us/row b1':>10s} {'us/row b64':>10s}  parity"]
    for r in rows:
        p = r["parity"]
        par = (f"labels differ {p['labels_differ']}, max |score diff| "
               f"{p['max_abs_score_diff']:.2g}" if "labels_differ" in p
               else f"max rel diff {p['max_rel_diff']:.2g}")
        lines.append(f"{r['model']:31s} {r['converter']:9s} {r['nodes']:6d} {r['bytes']:9d} "
                     f"{r['load_ms']:8.1f} {r['us_per_row_b1']:10.1f} "
                     f"{r['us_per_row_b64']:10.2f}  {par}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=7, metavar="N",
                   help="timing repeats per figure, the median is taken (default: 7)")
    p.add_argument("--skip-sessions", action="store_true",
                   help="only the converter table, not the session-settings grid")
    p.add_argument("--rounds", type=int, default=2, metavar="N",
                   help="session-settings rounds, the best is kept (default: 2)")
    p.add_argument("--out", type=Path, default=Path("trees.json"), metavar="FILE",
                   help="where the JSON report goes (default: ./trees.json)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        _, path, arena, opt, threads, repeats = argv
        print(json.dumps(_probe(path, arena == "1", opt, int(threads), int(repeats))))
        return 0
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:

    import onnxruntime
    import skl2onnx
    import sklearn

    rows = []
    iforest = iforest_skl = rf = None
    for name, est, X in build_models():
        n_features = X.shape[1]
        skl = convert(est, n_features, "skl2onnx")
        rows.append(measure(name, est, X, "skl2onnx", skl, args.repeats))
        if name == "IsolationForest":
            iforest, iforest_skl = convert(est, n_features, "edgeml"), skl
            rows.append(measure(name, est, X, "edgeml", iforest, args.repeats))
            rows.append(measure(name, est, X, "edgeml-f32",
                                prototype_f32_model(est, n_features), args.repeats))
        if name == "RandomForestClassifier":
            rf = skl
    result = {
        "benchmark": "trees",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "versions": {"onnxruntime": onnxruntime.__version__, "skl2onnx": skl2onnx.__version__,
                     "scikit-learn": sklearn.__version__},
        "settings": {"trees": N_TREES, "session_rounds": args.rounds,
                     "data": "Daphnet (7040 samples; 9 channels, 8 for the regressors)",
                     "intra_op_threads": 1, "repeats": args.repeats},
        "results": rows,
        "ratios_skl2onnx_over_edgeml": ratios(rows),
    }
    print(table(rows))
    for model, r in result["ratios_skl2onnx_over_edgeml"].items():
        print(f"{model}: skl2onnx / edgeml = nodes x{r['nodes']:.0f}, batch 1 "
              f"x{r['batch1_speedup']:.1f}, batch 64 x{r['batch64_speedup']:.1f}, load "
              f"x{r['load_speedup']:.1f}")
    if not args.skip_sessions:
        result["session_settings"] = session_settings(
            {"IsolationForest-edgeml": (iforest, 9), "IsolationForest-skl2onnx": (iforest_skl, 9),
             "RandomForestClassifier": (rf, 9)},
            args.repeats, args.rounds)
        print(f"\n{'model':24s} {'arena':5s} {'opt':8s} {'thr':>3s} {'RSS load':>9s} "
              f"{'RSS runs':>9s} {'peak':>7s} {'b1 us':>7s} {'b64 us/row':>10s}")
        for r in result["session_settings"]:
            print(f"{r['model']:24s} {r['arena']!s:5s} {r['graph_optimization']:8s} "
                  f"{r['intra_op_threads']:3d} {r['rss_load_mb']:8.1f}M "
                  f"{r['rss_after_runs_mb']:8.1f}M {r['peak_rss_mb']:6.1f}M "
                  f"{r['us_per_row_b1']:7.1f} {r['us_per_row_b64']:10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
