"""``edgeml bench trees``: how the converters are timed side by side, on a small real forest.

Structure and consistency only (rounds paired, ratios computed per round from the figures
shown, spreads ordered), never the speed: the machine is shared.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from edgeml.host.bench.trees import (
    convert,
    measure,
    ratio_lines,
    ratios,
    reference_graphs,
    session,
    spread,
    stream_feeds,
    table,
)
from edgeml.host.datasets import load_daphnet


@pytest.fixture(scope="module")
def daphnet_x() -> np.ndarray:
    return load_daphnet().X


def test_feeds_are_the_recording_in_its_order(daphnet_x) -> None:
    ones = stream_feeds(daphnet_x, 1)
    sixty_fours = stream_feeds(daphnet_x, 64)
    assert len(ones) == len(daphnet_x) and len(sixty_fours) == len(daphnet_x) // 64
    for f in (*ones, *sixty_fours):
        assert f.dtype == np.float32 and f.flags["C_CONTIGUOUS"]
    assert np.array_equal(np.vstack(ones), daphnet_x)
    assert np.array_equal(sixty_fours[1], daphnet_x[64:128])


def test_converters_of_one_model_are_timed_in_paired_rounds(daphnet_x) -> None:
    X = daphnet_x[::20]
    forest = IsolationForest(n_estimators=5, random_state=0).fit(X)
    models = {c: convert(forest, 9, c) for c in ("skl2onnx", "edgeml")}
    rows = measure("IsolationForest", forest, X, models, rounds=3)
    assert [r["converter"] for r in rows] == ["skl2onnx", "edgeml"]
    for r in rows:
        assert r["parity"]["labels_differ"] == 0
        for key in ("load_ms", "us_per_row_b1", "us_per_row_b64"):
            assert len(r["rounds"][key]) == 3
            assert r[key] == statistics.median(r["rounds"][key])
            s = r["spread"][key]
            assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    skl, low = rows
    ratio = ratios(rows)["IsolationForest"]
    per_round = [a / b for a, b in zip(skl["rounds"]["us_per_row_b1"],
                                       low["rounds"]["us_per_row_b1"], strict=True)]
    assert ratio["batch1_speedup_rounds"] == per_round
    assert ratio["batch1_speedup"] == statistics.median(per_round)
    assert ratio["nodes"] == skl["nodes"] / low["nodes"]
    shown = table(rows) + "\n".join(ratio_lines(ratios(rows)))
    assert f"({low['spread']['us_per_row_b1']['min']:.1f}-" in shown
    assert f"batch 1 x{ratio['batch1_speedup']:.1f} (quartiles" in shown


def test_spread_of_one_value_and_of_several() -> None:
    assert spread([2.0]) == {"median": 2.0, "q1": 2.0, "q3": 2.0, "min": 2.0, "max": 2.0,
                             "rounds": 1}
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"]) == (1.0, 2.0, 3.0, 4.0, 5.0)


def test_reference_graphs_copy_the_input_and_walk_the_same_trees(daphnet_x) -> None:
    X = daphnet_x[::20]
    forest = IsolationForest(n_estimators=5, random_state=0).fit(X)
    refs = reference_graphs(convert(forest, 9, "edgeml").SerializeToString())
    assert list(refs) == ["Identity graph", "TreeEnsemble node alone"]
    (copied,) = session(refs["Identity graph"]).run(None, {"input": X[:3]})
    assert np.array_equal(copied, X[:3])
    (leaves,) = session(refs["TreeEnsemble node alone"]).run(None, {"input": X[:3]})
    assert leaves.shape == (3, 5)  # one leaf number per tree
    assert np.array_equal(leaves, np.round(leaves))
