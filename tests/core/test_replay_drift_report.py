"""`edgeml replay` reports an archived snapshot's drift against each bundle's reference."""

from __future__ import annotations

import json

import numpy as np

from edgeml.config import PipelineConfig, WindowConfig
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.host.replay import open_slots, render_table, replay
from edgeml.profiles import load_profile
from edgeml.storage.rawlog import RawRecord


def records(scale_ax: float = 1.0):
    test = load_basicmotions("TEST")
    seq = 0
    for w in range(len(test.X)):
        for sample in test.X[w].astype(np.float64):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, sample), strict=True))
            body["ax"] *= scale_ax
            yield RawRecord(seq, 1.0 + seq, "sensors/a/imu", json.dumps(body).encode(), "s")
            seq += 1


def run(bundles, scale_ax=1.0):
    pcfg = PipelineConfig(name="activity", topics=("sensors/+/imu",),
                          features=BASICMOTIONS_CHANNELS, window=WindowConfig(size=100, hop=100))
    with open_slots([str(b) for b in bundles], profile=load_profile()) as slots:
        return replay(records(scale_ax), Assembler(Decoder.from_pipeline(pcfg), pcfg.window),
                      slots)


def test_replay_reports_drift_per_bundle(activity_bundle, activity_bundle_v2):
    calm = run([activity_bundle, activity_bundle_v2])
    for v in calm.versions:
        d = v.drift
        assert d["samples"] == 4000 and set(d["inputs"]) == set(BASICMOTIONS_CHANNELS)
        assert d["max_input_psi"] < 0.1 and not d["input_drift"]
        assert "label_psi" in d["outputs"]
    assert "drift against each bundle's reference" in render_table(calm)
    shifted = run([activity_bundle], scale_ax=3.0)
    d = shifted.versions[0].drift
    assert d["input_drift"] and d["inputs"]["ax"]["psi"] > 0.25
    assert d["inputs"]["ay"]["psi"] < 0.1
    assert shifted.versions[0].to_dict()["drift"]["input_drift"] is True
