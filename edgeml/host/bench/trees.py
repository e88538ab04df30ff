"""Tree models as ONNX graphs: skl2onnx's graph vs edgeml's lowering, and session settings.

    edgeml bench trees                    # everything, ~4 min on 2 cores
    edgeml bench trees --skip-sessions    # only the converter table
    python benchmarks/bench_trees.py      # the same, results in benchmarks/results/trees.json

For every tree model (100 trees / iterations, Daphnet samples: 9 channels, or 8 for the
regressors that predict the vertical trunk channel from the others) it converts with skl2onnx
and, where edgeml lowers the model itself (IsolationForest), with edgeml's lowering too, then
measures with onnxruntime on the CPU (intra_op_num_threads=1, inter_op_num_threads=1):

- nodes and ONNX bytes;
- load: InferenceSession creation from bytes;
- µs per row at batch 1 and batch 64: every call is timed on its own, as users make it
  (``session.run(None, {input: rows})``), on C-contiguous float32 batches of consecutive
  Daphnet rows in the recording's order (as a device scoring the stream feeds them; each
  session goes on where its previous block stopped), after a warm-up; a round's figure is
  the median call of a ~40 ms block;
- the converters of one model **take turns**: each round runs one block of each, back to
  back, in rotating order, for ``--repeats`` rounds (load times too). A figure is the median
  over the rounds, printed with its range; a ratio (skl2onnx / edgeml) is computed per round,
  from figures taken a fraction of a second apart, and reported as the median round with its
  quartiles and range (all rounds are in the JSON);
- parity on every Daphnet row: labels identical, max |score - scikit-learn|.

Why: this host is shared. A neighbour that takes the CPU inflates a loop's mean for whichever
side is running (per-call medians ignore it), and a neighbour that streams memory on the other
core slows skl2onnx's 2,710-node graph several times over while the lowered graph barely
moves: timing the sides minutes apart, or best-of-N of each side separately, pairs a quiet
moment of one side with a busy moment of the other.

IsolationForest also gets "edgeml-f32", the 5-node float32 design of the first prototype
(AVERAGE of depth + c(n) leaf weights in float32, then float32 arithmetic), for comparison
only: it is not what edgeml ships (see docs/converters.md, "labels on the threshold").
The lowered IsolationForest is then timed under session options and call styles (arena,
memory pattern, graph optimisation, spinning, output names listed), and with its rows in
other orders (far apart, one repeated), each interleaved against the default in one process.

Then session settings for small devices (the lowered IsolationForest and a RandomForest),
each combination in a fresh process: CPU memory arena on/off, graph optimisation level,
intra-op threads -> RSS after load, RSS after 500 batch-64 runs, peak RSS (all deltas from
the process before the session), and latency at batch 1 and 64 (separate processes run at
different moments: compare converters with the interleaved table, not across these rows).

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


def stream_feeds(X, batch: int) -> list:
    """``X`` cut into C-contiguous float32 batches of ``batch`` consecutive rows, in the
    recording's order: what a device scoring the sensor stream feeds its model. (How far
    apart successive rows are changes what the branch predictor can learn of the lowered
    graph's tree walks; :func:`row_order` measures it.)"""
    import numpy as np

    return [np.ascontiguousarray(X[i:i + batch], dtype=np.float32)
            for i in range(0, len(X) - batch + 1, batch)]


def _block_us(sess, feeds: list, start: int, seconds: float,
              min_calls: int) -> tuple[float, int]:
    """Median µs of one call over a block of calls lasting about ``seconds``, feeding
    ``feeds`` in turn from index ``start``; returns the median and where the next block goes
    on.

    Each call is timed on its own (``session.run(None, {input: rows})``, as users call it):
    the median ignores the calls during which a neighbour took the CPU, which a mean over a
    loop charges to whichever side happened to be running."""
    name = sess.get_inputs()[0].name
    perf = time.perf_counter_ns
    times = []
    end = perf() + int(seconds * 1e9)
    i = start
    while len(times) < min_calls or perf() < end:
        feed = {name: feeds[i % len(feeds)]}
        t = perf()
        sess.run(None, feed)
        times.append(perf() - t)
        i += 1
    return statistics.median(times) / 1e3, i % len(feeds)


def time_interleaved(sessions: dict, X, batch: int, rounds: int, *, block_s: float = 0.04,
                     min_calls: int = 15, warmup_s: float = 0.2,
                     feeds: dict[str, list] | None = None) -> dict[str, list[float]]:
    """µs per row of every session, ``rounds`` times, the sessions taking turns.

    After a warm-up of each session, every round runs one block per session back to back
    (the order rotates round by round, so no session always runs first): the figures of
    one round were taken within a fraction of a second of each other, and their ratio is
    what that round says. Every session walks the same stream (:func:`stream_feeds`, unless
    ``feeds`` gives a session its own), each block going on where its previous one stopped.
    Returns, per session, its per-round medians."""
    stream = stream_feeds(X, batch)
    fed = {label: (feeds or {}).get(label, stream) for label in sessions}
    labels = list(sessions)
    cursor = {}
    for label in labels:
        _, cursor[label] = _block_us(sessions[label], fed[label], 0, warmup_s, 20)
    out: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            us, cursor[label] = _block_us(sessions[label], fed[label], cursor[label], block_s,
                                          min_calls)
            out[label].append(us / batch)
    return out


def load_interleaved(models: dict[str, bytes], rounds: int) -> dict[str, list[float]]:
    """InferenceSession creation from bytes in ms, ``rounds`` times, the models taking
    turns in rotating order (as :func:`time_interleaved`)."""
    labels = list(models)
    out: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            t = time.perf_counter()
            session(models[label])
            out[label].append((time.perf_counter() - t) * 1e3)
    return out


def spread(values: list[float]) -> dict:
    """Median, quartiles and range of per-round figures."""
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3,
            "min": min(values), "max": max(values), "rounds": len(values)}


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


def measure(name, est, X, models: dict, rounds: int) -> list[dict]:
    """One row per entry of ``models`` ({converter: ModelProto}), all timed together:
    session creation, batch 1 and batch 64, each in ``rounds`` interleaved rounds. A figure
    is the median over the rounds; every round is kept in the JSON."""
    blobs = {conv: m.SerializeToString() for conv, m in models.items()}
    sessions = {conv: session(b) for conv, b in blobs.items()}
    loads = load_interleaved(blobs, rounds)
    b1 = time_interleaved(sessions, X, 1, rounds)
    b64 = time_interleaved(sessions, X, 64, rounds)
    rows = []
    for conv, model in models.items():
        rnds = {"load_ms": loads[conv], "us_per_row_b1": b1[conv], "us_per_row_b64": b64[conv]}
        row: dict = {"model": name, "converter": conv, "nodes": len(model.graph.node),
                     "bytes": len(blobs[conv])}
        row.update({k: statistics.median(v) for k, v in rnds.items()})
        row["spread"] = {k: spread(v) for k, v in rnds.items()}
        row["rounds"] = rnds
        row["parity"] = parity(est, sessions[conv], X)
        b1s = row["spread"]["us_per_row_b1"]
        _say(f"{name:32s} {conv:10s} nodes {row['nodes']:5d}  load {row['load_ms']:7.1f} ms  "
             f"b1 {row['us_per_row_b1']:8.1f} us [{b1s['min']:.1f}-{b1s['max']:.1f}]  "
             f"b64 {row['us_per_row_b64']:7.2f} us/row")
        rows.append(row)
    return rows


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
    b1 = time_interleaved({"s": sess}, X, 1, repeats)["s"]
    b64 = time_interleaved({"s": sess}, X, 64, repeats)["s"]
    return {
        "arena": arena, "graph_optimization": opt, "intra_op_threads": threads,
        "rss_load_mb": (after_load - base) / 2**20,
        "rss_after_runs_mb": (after_runs - base) / 2**20,
        "peak_rss_mb": (peak - base) / 2**20,
        "us_per_row_b1": statistics.median(b1),
        "us_per_row_b64": statistics.median(b64),
    }


def session_settings(models: dict[str, object], repeats: int, rounds: int) -> list[dict]:
    """Every model x setting in its own process, ``rounds`` times in interleaved order; every
    figure is the median over the processes (each process's latency being itself a median
    over ``repeats`` blocks). Separate processes measure at different moments: compare
    converters with the interleaved table, not across the rows of this one."""
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
        for k in ("rss_load_mb", "rss_after_runs_mb", "peak_rss_mb", "us_per_row_b1",
                  "us_per_row_b64"):
            row[k] = statistics.median(r[k] for r in rs)
        for k in ("us_per_row_b1", "us_per_row_b64"):
            row[k + "_rounds"] = [r[k] for r in rs]
        rows.append(row)
    return rows


# --- the lowered graph's call cost under session options, one process, interleaved ----------
class _NamedOutputs:
    """A session called with its output names listed once (``run(names, feed)``) instead of
    ``run(None, feed)``, which rebuilds the list at every call."""

    def __init__(self, sess) -> None:
        self._sess = sess
        self._names = [o.name for o in sess.get_outputs()]

    def get_inputs(self):
        return self._sess.get_inputs()

    def run(self, _output_names, feed):
        return self._sess.run(self._names, feed)


def reference_graphs(model_bytes: bytes) -> dict[str, bytes]:
    """Two graphs that bound what a call of ``model_bytes`` can cost: an ``Identity`` of its
    input (onnxruntime's and Python's fixed cost per call) and its first ``TreeEnsemble*``
    node alone (the tree walk, plus that fixed cost)."""
    import onnx
    from onnx import helper

    m = onnx.load_from_string(model_bytes)
    inp = m.graph.input[0]

    def graph(node, out_name: str, out_type: int, name: str) -> bytes:
        g = helper.make_graph([node], name, [inp],
                              [helper.make_tensor_value_info(out_name, out_type, None)])
        return helper.make_model(g, opset_imports=list(m.opset_import),
                                 ir_version=m.ir_version).SerializeToString()

    out = {"Identity graph": graph(helper.make_node("Identity", [inp.name], ["copy"]), "copy",
                                   inp.type.tensor_type.elem_type, "identity")}
    trees = [n for n in m.graph.node if n.op_type.startswith("TreeEnsemble")]
    if trees:
        out["TreeEnsemble node alone"] = graph(trees[0], trees[0].output[0],
                                               onnx.TensorProto.FLOAT, "tree_ensemble")
    return out


def call_options(model_bytes: bytes, X, rounds: int) -> dict:
    """Batch 1 and 64 of one graph with the firmware profiles' settings (arena on, graph
    optimisation all, one thread) against one change at a time, and the
    :func:`reference_graphs`, interleaved in this process: per round, each variant's µs per
    row over the default's, so the shared host's drift cancels out. Differences under ~3%
    are within what rounds disagree on."""
    import onnxruntime as ort

    def opts(**kw) -> object:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        for k, v in kw.items():
            if k == "config":
                for ck, cv in v:
                    so.add_session_config_entry(ck, cv)
            else:
                setattr(so, k, v)
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

    variants = {
        "default": opts(),
        "output names listed": _NamedOutputs(opts()),
        "arena off": opts(enable_cpu_mem_arena=False),
        "memory pattern off": opts(enable_mem_pattern=False),
        "graph optimisation off": opts(
            graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        "spinning off": opts(config=[("session.intra_op.allow_spinning", "0"),
                                     ("session.inter_op.allow_spinning", "0")]),
    }
    variants.update({k: session(b) for k, b in reference_graphs(model_bytes).items()})
    out = {}
    for batch in (1, 64):
        t = time_interleaved(variants, X, batch, rounds)
        out[f"batch{batch}"] = {
            v: {"us_per_row": statistics.median(t[v]),
                "over_default": spread([a / d for a, d in zip(t[v], t["default"], strict=True)]),
                "rounds": t[v]}
            for v in variants}
    return out


def row_order(model_bytes: bytes, X, rounds: int) -> dict:
    """Batch 1 and 64 of one graph fed the same batches in three orders, interleaved in this
    process: the recording's order (the stream, what the tables use); the same batches
    shuffled so that successive calls are 64 batches apart (no two calls alike); one batch
    repeated (tree walks the branch predictor learns). Per round, each order's µs per row
    over the recording order's."""
    import numpy as np

    sess = session(model_bytes)
    out = {}
    for batch in (1, 64):
        stream = stream_feeds(X, batch)
        apart = np.argsort(np.arange(len(stream)) % 64, kind="stable")
        feeds = {"recording order": stream,
                 "64 batches apart": [stream[i] for i in apart],
                 "one batch repeated": stream[:1]}
        t = time_interleaved({k: sess for k in feeds}, X, batch, rounds, feeds=feeds)
        out[f"batch{batch}"] = {
            k: {"us_per_row": statistics.median(t[k]),
                "over_recording_order": spread([a / d for a, d in zip(
                    t[k], t["recording order"], strict=True)]),
                "rounds": t[k]}
            for k in feeds}
    return out


# --- report ----------------------------------------------------------------------------------
RATIO_FIGURES = (("batch1_speedup", "us_per_row_b1"), ("batch64_speedup", "us_per_row_b64"),
                 ("load_speedup", "load_ms"))


def ratios(rows: list[dict]) -> dict:
    """skl2onnx / edgeml for every model with both: per interleaved round, the skl2onnx
    figure over the edgeml figure of the same round; the median round and the spread."""
    out = {}
    by = {(r["model"], r["converter"]): r for r in rows}
    for (model, conv), r in by.items():
        if conv != "edgeml" or (model, "skl2onnx") not in by:
            continue
        s = by[(model, "skl2onnx")]
        out[model] = {"nodes": s["nodes"] / r["nodes"]}
        for name, key in RATIO_FIGURES:
            per_round = [a / b for a, b in zip(s["rounds"][key], r["rounds"][key], strict=True)]
            out[model][name] = statistics.median(per_round)
            out[model][name + "_spread"] = spread(per_round)
            out[model][name + "_rounds"] = per_round
    return out


def _with_range(values: dict, digits: int) -> str:
    return (f"{values['median']:.{digits}f} ({values['min']:.{digits}f}-"
            f"{values['max']:.{digits}f})")


def table(rows: list[dict]) -> str:
    lines = [f"{'model':31s} {'converter':10s} {'nodes':>5s} {'bytes':>9s} "
             f"{'load ms':>8s} {'us/row b1 (range)':>22s} {'us/row b64 (range)':>22s}  parity"]
    for r in rows:
        p = r["parity"]
        sp = r["spread"]
        par = (f"labels differ {p['labels_differ']}, max |score diff| "
               f"{p['max_abs_score_diff']:.2g}" if "labels_differ" in p
               else f"max rel diff {p['max_rel_diff']:.2g}")
        lines.append(f"{r['model']:31s} {r['converter']:10s} {r['nodes']:5d} {r['bytes']:9d} "
                     f"{r['load_ms']:8.1f} {_with_range(sp['us_per_row_b1'], 1):>22s} "
                     f"{_with_range(sp['us_per_row_b64'], 2):>22s}  {par}")
    return "\n".join(lines)


def ratio_lines(ratios_: dict) -> list[str]:
    lines = []
    for model, r in ratios_.items():
        parts = []
        for name, label in (("batch1_speedup", "batch 1"), ("batch64_speedup", "batch 64"),
                            ("load_speedup", "load")):
            s = r[name + "_spread"]
            parts.append(f"{label} x{s['median']:.1f} (quartiles {s['q1']:.1f}-{s['q3']:.1f}, "
                         f"range {s['min']:.1f}-{s['max']:.1f})")
        lines.append(f"{model}: skl2onnx / edgeml, median of {r['batch1_speedup_spread']['rounds']}"
                     f" interleaved rounds: nodes x{r['nodes']:.0f}, " + ", ".join(parts))
    return lines


def _steal_ticks() -> int | None:
    """CPU time the hypervisor gave to other guests (the 'steal' column of /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=15, metavar="N",
                   help="interleaved timing rounds per figure; the median is reported with "
                        "its range (default: 15)")
    p.add_argument("--skip-sessions", action="store_true",
                   help="only the converter table, not the session-settings grid")
    p.add_argument("--rounds", type=int, default=2, metavar="N",
                   help="session-settings processes per combination, the median is kept "
                        "(default: 2)")
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


def _print_interleaved(table: dict, key: str, what: str) -> None:
    """One interleaved comparison of the lowered IsolationForest: per batch and variant, µs per
    row and its ratio (median and range over the rounds)."""
    if not table:
        return
    print(f"\nlowered IsolationForest, one process, interleaved: {what}")
    for batch, variants in table.items():
        for v, r in variants.items():
            o = r[key]
            print(f"  {batch:8s} {v:24s} {r['us_per_row']:8.2f}  x{o['median']:.3f} "
                  f"({o['min']:.3f}-{o['max']:.3f})")


def run(args: argparse.Namespace) -> int:

    import onnxruntime
    import skl2onnx
    import sklearn

    if args.repeats < 3:
        raise SystemExit("--repeats: give at least 3 rounds (a spread needs them)")
    steal0, load0 = _steal_ticks(), os.getloadavg()
    rows = []
    options = orders = None
    iforest = iforest_skl = rf = None
    for name, est, X in build_models():
        n_features = X.shape[1]
        skl = convert(est, n_features, "skl2onnx")
        models = {"skl2onnx": skl}
        if name == "IsolationForest":
            iforest, iforest_skl = convert(est, n_features, "edgeml"), skl
            models["edgeml"] = iforest
            models["edgeml-f32"] = prototype_f32_model(est, n_features)
        if name == "RandomForestClassifier":
            rf = skl
        rows.extend(measure(name, est, X, models, args.repeats))
        if name == "IsolationForest":
            options = call_options(iforest.SerializeToString(), X, args.repeats)
            orders = row_order(iforest.SerializeToString(), X, args.repeats)
    steal1 = _steal_ticks()
    result = {
        "benchmark": "trees",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_at_start": load0,
                    "load_average_after_tables": os.getloadavg(),
                    "steal_ticks_during_tables": (None if steal0 is None or steal1 is None
                                                  else steal1 - steal0)},
        "versions": {"onnxruntime": onnxruntime.__version__, "skl2onnx": skl2onnx.__version__,
                     "scikit-learn": sklearn.__version__},
        "settings": {"trees": N_TREES, "session_rounds": args.rounds,
                     "data": "Daphnet (7040 samples; 9 channels, 8 for the regressors)",
                     "intra_op_threads": 1, "repeats": args.repeats,
                     "timing": "per call (session.run(None, {input: rows}), batches of "
                               "consecutive rows in the recording's order); "
                               "a round's figure is the median call of a ~40 ms block; the "
                               "converters of one model take turns round by round; a figure "
                               "is the median over the rounds"},
        "results": rows,
        "ratios_skl2onnx_over_edgeml": ratios(rows),
        "lowered_call_options": options,
        "lowered_row_order": orders,
    }
    print(table(rows))
    for line in ratio_lines(result["ratios_skl2onnx_over_edgeml"]):
        print(line)
    _print_interleaved(options, "over_default", "us per row (variant / default, median and "
                       "range over rounds)")
    _print_interleaved(orders, "over_recording_order", "us per row by the order the rows come "
                       "in (over the recording order, median and range over rounds)")
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
