"""Config keys of the extra formats: derived subscriptions, and errors that name the key."""

from __future__ import annotations

import pytest

from edgeml.config import parse_config
from edgeml.errors import ConfigError


def cfg(**pipeline):
    base = {"name": "p", "features": ["ax", "ay"]}
    base.update(pipeline)
    return parse_config({"device_id": "d", "pipelines": [base]}).pipelines[0]


def error(**pipeline) -> str:
    with pytest.raises(ConfigError) as exc:
        cfg(**pipeline)
    return str(exc.value)


def test_value_derives_its_filter_from_the_template():
    p = cfg(format="value", topic_template="plant/{line}/{machine}/{feature}", max_age_s=2)
    assert p.topics == ("plant/+/+/+",) and p.subscriptions == ("plant/+/+/+",)
    assert p.format_spec.max_age_s == 2.0 and p.max_age_s == 2.0
    assert "pipelines[0].shared_group" in error(format="value", topic_template="a/{feature}",
                                                shared_group="g")


def test_sparkplug_derives_the_node_namespace():
    pytest.importorskip("google.protobuf")
    p = cfg(format="sparkplug_b", sparkplug={"group_id": "plant1", "edge_node_id": "gw1",
                                             "metrics": {"imu/ax": "ax"}, "rebirth": True})
    assert p.topics == ("spBv1.0/plant1/+/gw1/#",)
    spec = p.format_spec
    assert (spec.metrics, spec.rebirth, spec.rebirth_interval_s) == \
        ((("imu/ax", "ax"),), True, 30.0)
    assert cfg(format="sparkplug_b", sparkplug={"group_id": "g"}).topics == \
        ("spBv1.0/g/+/+/#",)


@pytest.mark.parametrize(("pipeline", "key", "words"), [
    ({"format": "value"}, "pipelines[0].topic_template", "required"),
    ({"format": "value", "topic_template": "a/{line}"}, "pipelines[0].topic_template",
     "{feature}"),
    ({"format": "value", "topic_template": "a/+/{feature}"}, "pipelines[0].topic_template",
     "literal"),
    ({"format": "value", "topic_template": "a/{feature}", "topics": ["x"]},
     "pipelines[0].topics", "topic_template"),
    ({"format": "json", "topics": ["x"], "topic_template": "a/{feature}"},
     "pipelines[0].topic_template", "only for"),
    ({"format": "json", "topics": ["x"], "max_age_s": 3}, "pipelines[0].max_age_s", "only for"),
    ({"format": "value", "topic_template": "a/{feature}", "max_age_s": 0},
     "pipelines[0].max_age_s", "out of range"),
    ({"format": "senml", "topics": ["x"], "features": None, "field": "values"},
     "pipelines[0].field", "features"),
    ({"format": "influx", "topics": ["x"]}, "pipelines[0].format", "influx_line"),
    ({"format": "value", "topic_template": "a/{feature}", "features": ["ax", "imu/ay"]},
     "pipelines[0].features[1]", "topic level"),
])
def test_bad_keys_are_named(pipeline, key, words):
    msg = error(**pipeline)
    assert key in msg and words in msg, msg


@pytest.mark.parametrize(("sparkplug", "key"), [
    ({}, "pipelines[0].sparkplug.group_id"),
    ({"group_id": "a/b"}, "pipelines[0].sparkplug.group_id"),
    ({"group_id": "g", "edge_node_id": "#"}, "pipelines[0].sparkplug.edge_node_id"),
    ({"group_id": "g", "metrics": {"m": "nope"}}, "pipelines[0].sparkplug.metrics.m"),
    ({"group_id": "g", "rebirt": True}, "pipelines[0].sparkplug.rebirt"),
    ({"group_id": "g", "rebirth": "yes"}, "pipelines[0].sparkplug.rebirth"),
])
def test_bad_sparkplug_keys_are_named(sparkplug, key):
    pytest.importorskip("google.protobuf")
    msg = error(format="sparkplug_b", sparkplug=sparkplug)
    assert key in msg, msg


def test_sparkplug_table_is_required_and_only_for_sparkplug():
    pytest.importorskip("google.protobuf")
    assert "pipelines[0].sparkplug" in error(format="sparkplug_b")
    assert "pipelines[0].sparkplug" in error(format="json", topics=["x"],
                                             sparkplug={"group_id": "g"})
