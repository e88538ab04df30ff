"""Through a real mosquitto and a real daemon. Sparkplug B: BasicMotions windows as DDATA, a
lost message (a real sequence gap), exactly one rebirth request published by the daemon on
the broker, and answers again after the node's new BIRTH. One value per topic: the
subscription derived from the topic template."""

from __future__ import annotations

import msgpack
import pytest
from _formats_streams import (
    GROUP,
    NODE,
    SPARKPLUG_METRICS_TOML,
    SparkplugNode,
    sparkplug_messages,
    value_messages,
)
from conftest import publish_all, write_config

from edgeml.host.datasets import load_basicmotions


def test_one_value_per_topic_over_mosquitto(tmp_path, broker, collector, daemon_factory,
                                            activity_bundle):
    from models import train_activity_model

    test = load_basicmotions("TEST")
    want = list(train_activity_model("logreg").predict(test.flat()[:2]))
    cfg = write_config(
        tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
        models=[{"name": "activity", "version": "1", "bundle": str(activity_bundle)}],
        pipeline={"format": "value", "topics": None,
                  "topic_template": "plant/{line}/{machine}/{feature}"})
    out = "edgeml/watch-01/out/activity"
    c = collector(out)
    d = daemon_factory(cfg)
    publish_all(broker, value_messages(test, [0, 1]))
    msgs = c.wait_count(2, topic=out)
    answers = [msgpack.unpackb(m.payload, raw=False) for m in msgs]
    assert [a["output"]["label"] for a in answers] == want
    assert [a["topic"] for a in answers] == ["plant/line1/w0/gz", "plant/line1/w1/gz"]
    st = d.status()["pipelines"]["activity"]
    assert (st["accepted"], st["format"]["samples"]) == (1200, 200)


def test_sparkplug_gap_and_rebirth_over_mosquitto(tmp_path, broker, collector, daemon_factory,
                                                 activity_bundle):
    pytest.importorskip("google.protobuf")
    from models import train_activity_model

    from edgeml.core.formats.sparkplug import REBIRTH_METRIC, parse_payload

    test = load_basicmotions("TEST")
    want = list(train_activity_model("logreg").predict(test.flat()[:3]))
    cfg = write_config(
        tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
        models=[{"name": "activity", "version": "1", "bundle": str(activity_bundle)}],
        pipeline={"format": "sparkplug_b", "topics": None,
                  "sparkplug": {"group_id": GROUP, "edge_node_id": NODE,
                                "metrics": SPARKPLUG_METRICS_TOML, "rebirth": True}})
    out, ncmd = "edgeml/watch-01/out/activity", f"spBv1.0/{GROUP}/NCMD/{NODE}"
    c = collector(out, ncmd)
    d = daemon_factory(cfg)
    node = SparkplugNode()
    publish_all(broker, sparkplug_messages(test, [0], node))
    c.wait_count(1, topic=out)
    publish_all(broker, [node.dbirth("w1")] + [node.ddata("w1", s) for s in test.X[1][:50]])
    node.skip()  # lost on the way
    publish_all(broker, [node.ddata("w1", s) for s in test.X[1][50:]])
    msgs = c.wait_count(1, topic=ncmd)
    req = parse_payload(next(m.payload for m in msgs if m.topic == ncmd))
    assert [(m.name, m.value) for m in req.metrics] == [(REBIRTH_METRIC, True)]
    st = d.status()["pipelines"]["activity"]["format"]
    assert st["seq_gaps"] == 1 and st["nodes"][f"{GROUP}/{NODE}"]["on_hold"]
    # the node rebirths and goes on: windows 1 and 2 are answered
    publish_all(broker, sparkplug_messages(test, [1, 2], node))
    msgs = c.wait_count(3, topic=out)
    answers = [msgpack.unpackb(m.payload, raw=False) for m in msgs if m.topic == out]
    assert [a["output"]["label"] for a in answers] == want
    assert sum(1 for m in c.messages if m.topic == ncmd) == 1
    st = d.status()["pipelines"]["activity"]["format"]
    assert (st["seq_gaps"], st["rebirth_requests"], st["rebirth_sent"]) == (1, 1, 1)
    assert d.status()["pipelines"]["activity"]["rejected"] == 0
