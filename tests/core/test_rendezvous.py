"""Rendezvous policies on constructed cases (pure logic)."""

from __future__ import annotations

import numpy as np

from edgeml.core.rendezvous import Outcome, decide, ready

CLASSES = ("a", "b")


def oc(name, role, prio, labels=None, scores=None, error=None, done_at=0.0):
    outputs = None if labels is None else [{"label": lab} for lab in labels]
    return Outcome(name, "1", role, prio, outputs=outputs, labels=labels,
                   scores=None if scores is None else np.asarray(scores, dtype=np.float32),
                   classes=CLASSES, error=error, done_at=done_at)


def test_champion_answers_when_present():
    res = decide("champion", [oc("c", "challenger", 10, ["b"]), oc("m", "champion", 0, ["a"])], 1)
    assert (res[0].model, res[0].output["label"], res[0].fallback) == ("m", "a", False)


def test_champion_missing_falls_back_by_priority_never_to_shadow():
    outs = [oc("s", "shadow", 1, ["x"]), oc("c2", "challenger", 20, ["b"]),
            oc("c1", "challenger", 10, ["a"]), oc("m", "champion", 0, error="boom")]
    res = decide("champion", outs, 1)
    assert (res[0].model, res[0].fallback) == ("c1", True)
    only_shadow = decide("champion", [oc("s", "shadow", 1, ["x"])], 1)
    assert only_shadow[0].output is None and only_shadow[0].error


def test_first_takes_earliest():
    outs = [oc("m", "champion", 0, ["a"], done_at=2.0), oc("c", "challenger", 10, ["b"],
                                                           done_at=1.0)]
    assert decide("first", outs, 1)[0].model == "c"


def test_vote_majority_and_tie_by_priority():
    outs = [oc("m", "champion", 0, ["a", "a"]), oc("c1", "challenger", 10, ["b", "b"]),
            oc("c2", "challenger", 20, ["b", "a"])]
    res = decide("vote", outs, 2)
    assert [r.output["label"] for r in res] == ["b", "a"]
    assert res[0].model == "c1" and res[1].model == "m"
    tie = decide("vote", outs[:2], 1)
    assert tie[0].output["label"] == "a"  # champion has the higher priority


def test_mean_of_top_n():
    outs = [oc("m", "champion", 0, ["a"], [[0.6, 0.4]]),
            oc("c1", "challenger", 10, ["b"], [[0.2, 0.8]]),
            oc("c2", "challenger", 20, ["a"], [[1.0, 0.0]])]
    res = decide("mean", outs, 1, top_n=2)
    assert res[0].output["label"] == "b"
    assert abs(res[0].output["scores"]["b"] - 0.6) < 1e-6 and res[0].output["members"] == 2
    res3 = decide("mean", outs, 1, top_n=3)
    assert res3[0].output["label"] == "a"


def test_ready_rules():
    champ = oc("m", "champion", 0, ["a"])
    assert ready("champion", [champ], ["challenger"])
    assert not ready("champion", [oc("c", "challenger", 1, ["a"])], ["champion"])
    assert ready("first", [oc("c", "challenger", 1, ["a"])], ["champion"])
    assert not ready("vote", [champ], ["challenger"])
    assert ready("vote", [champ], ["shadow"])
