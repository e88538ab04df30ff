"""The four extra payload formats, decoded from the specifications' own examples: RFC 8428
section 5 (SenML JSON; the examples checked against a public copy), the InfluxDB line
protocol reference (syntax, data types, special characters), and Sparkplug B payloads
encoded here by hand from the field numbers in Eclipse Tahu's sparkplug_b.proto (an encoder
independent of the device's descriptor)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _formats_streams import spb_metric, spb_payload

from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.core.formats.value import TopicTemplate, ValueSpec
from edgeml.errors import DecodeError


def senml(features, **kw) -> Decoder:
    return Decoder(format="senml", features=tuple(features), n_features=len(features), **kw)


def reason(decoder: Decoder, payload: bytes) -> str:
    with pytest.raises(DecodeError) as exc:
        decoder.decode(payload)
    return exc.value.reason


# ---- SenML: the examples of RFC 8428 section 5, by their titles ----------------------------------
RFC_MULTIPLE_DATA_POINTS = b'''[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]'''
RFC_POINTS_AND_TIME = b'''[
  {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
   "bu":"A","bver":5,
   "n":"voltage","u":"V","v":120.1},
  {"n":"current","t":-5,"v":1.2},
  {"n":"current","t":-4,"v":1.3},
  {"n":"current","t":-3,"v":1.4},
  {"n":"current","t":-2,"v":1.5},
  {"n":"current","t":-1,"v":1.6},
  {"n":"current","v":1.7}
]'''
# not from the RFC: "Multiple Data Points" resolved by hand (section 4.6 rules) with a time
RESOLVED_BY_HAND = b'''[
  {"n":"urn:dev:ow:10e2073a01080063:voltage","u":"V","v":120.1,"t":1.320078429e+09},
  {"n":"urn:dev:ow:10e2073a01080063:current","u":"A","v":1.2,"t":1.320078429e+09}
]'''
RFC_DATA_TYPES = b'''[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
  {"n":"label","vs":"Machine Room"},
  {"n":"open","vb":false},
  {"n":"nfc-reader","vd":"aGkgCg"}
]'''
RFC_COLLECTION_OF_RESOURCES = b'''[
  {"bn":"2001:db8::2/","bt":1.320078429e+09,
   "n":"temperature","u":"Cel","v":25.2},
  {"n":"humidity","u":"%RH","v":30},
  {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
  {"n":"humidity","u":"%RH","v":67}
]'''
RFC_SETTING_AN_ACTUATOR = b'''[
  {"bn":"urn:dev:ow:10e2073a01080063:"},
  {"n":"temp","u":"Cel","v":23.1},
  {"n":"heat","u":"/","v":1},
  {"n":"fan","u":"/","v":0}
]'''
RFC_SYNCHRONIZED_LIGHTS_OFF = b'''[
  {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":0.5},
  {"n":"2001:db8::4","v":0.5},
  {"n":"2001:db8::3","t":0.1,"v":0},
  {"n":"2001:db8::4","t":0.1,"v":0}
]'''


def test_senml_base_name_splits_source_and_feature():
    d = senml(["voltage", "current"]).decode(RFC_MULTIPLE_DATA_POINTS)
    np.testing.assert_array_equal(d.samples, np.float32([[120.1, 1.2]]))
    assert d.sources == ("urn:dev:ow:10e2073a01080063:",)
    # the same pack resolved names the same source and features
    r = senml(["voltage", "current"]).decode(RESOLVED_BY_HAND)
    np.testing.assert_array_equal(r.samples, d.samples)
    assert r.sources == d.sources


def test_senml_base_time_and_relative_times_order_the_samples():
    d = senml(["current"]).decode(RFC_POINTS_AND_TIME)  # voltage names no feature: not ours
    np.testing.assert_allclose(d.samples[:, 0], [1.2, 1.3, 1.4, 1.5, 1.6, 1.7], rtol=1e-6)
    first = b'{"n":"current","t":-5,"v":1.2}'
    shuffled = RFC_POINTS_AND_TIME.replace(first + b",", b"").replace(
        b'{"n":"current","v":1.7}', b'{"n":"current","v":1.7},' + first)
    d2 = senml(["current"]).decode(shuffled)
    np.testing.assert_array_equal(d2.samples, d.samples)  # time order, not record order
    # voltage exists only at bt: the samples at bt-5 .. bt-1 lack it
    assert reason(senml(["voltage", "current"]), RFC_POINTS_AND_TIME) == "missing_field"


def test_senml_value_kinds_label_and_refusals():
    d = senml(["temp", "open"]).decode(RFC_DATA_TYPES)
    np.testing.assert_array_equal(d.samples, np.float32([[23.1, 0.0]]))  # vb false -> 0.0
    assert d.labels == ("Machine Room",)
    assert reason(senml(["temp", "nfc-reader"]), RFC_DATA_TYPES) == "bad_value"  # vd
    assert reason(senml(["temp", "label"], label_field=None), RFC_DATA_TYPES) == "bad_value"


def test_senml_records_without_a_feature_name_are_not_ours_and_times_group_samples():
    d = senml(["temp", "heat", "fan"]).decode(RFC_SETTING_AN_ACTUATOR)  # the bn-only record
    np.testing.assert_array_equal(d.samples, np.float32([[23.1, 1, 0]]))
    d = senml(["2001:db8::3", "2001:db8::4"]).decode(RFC_SYNCHRONIZED_LIGHTS_OFF)
    np.testing.assert_array_equal(d.samples, np.float32([[0.5, 0.5], [0, 0]]))  # bt, bt+0.1
    assert d.sources == ("", "")


def test_senml_collection_of_resources_is_one_sample_per_base_name():
    d = senml(["temperature", "humidity"]).decode(RFC_COLLECTION_OF_RESOURCES)
    np.testing.assert_array_equal(d.samples, np.float32([[25.2, 30], [12.3, 67]]))
    assert d.sources == ("2001:db8::2/", "2001:db8::1/")


@pytest.mark.parametrize(("payload", "why"), [
    (b'[{"n":"a","v":1', "malformed"),
    (b'{"n":"a","v":1}', "malformed"),
    (b"[]", "wrong_shape"),
    (b'[{"n":"a","v":1,"foo_":2}]', "malformed"),       # must-understand field
    (b'[{"bver":11,"n":"a","v":1}]', "malformed"),      # a newer version
    (b'[{"n":"a","v":"1.5"}]', "bad_value"),            # a numeric string
    (b'[{"n":"a","vs":"1.5"}]', "bad_value"),
    (b'[{"n":"a"}]', "missing_field"),
    (b'[{"n":"b","v":1}]', "missing_field"),            # names no feature
    (b'[{"n":"a","v":1e999}]', "non_finite"),
    (b'[{"bn":7,"n":"a","v":1}]', "malformed"),
    (b"\xff\xfe", "malformed"),
])
def test_senml_bad_packs_are_dead_letters_with_a_reason(payload, why):
    assert reason(senml(["a"]), payload) == why


# ---- InfluxDB line protocol ----------------------------------------------------------------
def influx(features, **kw) -> Decoder:
    return Decoder(format="influx_line", features=tuple(features), n_features=len(features),
                   **kw)


def test_influx_tags_make_the_source_fields_the_features():
    # the "home" sample data of the InfluxDB get-started guide
    payload = (b"home,room=Living\\ Room temp=21.1,hum=35.9,co=0i 1641024000\n"
               b"home,room=Kitchen temp=21.0,hum=35.9,co=0i 1641024000\n"
               b"home,room=Living\\ Room temp=21.4,hum=35.9,co=0i 1641027600\n")
    d = influx(["temp", "hum", "co"]).decode(payload)
    np.testing.assert_array_equal(d.samples, np.float32([[21.1, 35.9, 0], [21.0, 35.9, 0],
                                                         [21.4, 35.9, 0]]))
    assert d.sources == ("home,room=Living\\ Room", "home,room=Kitchen",
                         "home,room=Living\\ Room")


def test_influx_data_types_from_the_reference():
    lines = {b"myMeasurement fieldKey=1.0": 1.0, b"myMeasurement fieldKey=1": 1.0,
             b"myMeasurement fieldKey=-1.234456e+78": -np.inf,  # beyond float32: refused
             b"myMeasurement fieldKey=1i": 1.0, b"myMeasurement fieldKey=12485903u": 12485903,
             b"myMeasurement fieldKey=true": 1.0, b"myMeasurement fieldKey=F": 0.0}
    for line, want in lines.items():
        if np.isinf(want):
            assert reason(influx(["fieldKey"]), line) == "non_finite"
            continue
        assert influx(["fieldKey"]).decode(line).samples[0, 0] == np.float32(want), line
    assert reason(influx(["fieldKey"]), b'myMeasurement fieldKey="this is a string"') == \
        "bad_value"


def test_influx_special_characters_and_string_fields():
    from edgeml.core.formats.influx import parse_lines

    text = ('my\\ Measurement fieldKey="string value"\n'
            'myMeasurement fieldKey="\\"string\\" within a string"\n'
            "myMeasurement,tag\\ Key1=tag\\ Value1,tag\\ Key2=tag\\ Value2 fieldKey=100\n"
            'myMeasurement,tagKey=🍭 fieldKey="Launch 🚀" 1556813561098000000\n'
            "# a comment\n\n"
            'myMeasurement fieldKey="a\\\\b, c=d e"\n'
            "my\\,Measurement,a\\=b=c\\,d f\\ k=1\n")
    pts = parse_lines(text)
    assert pts[0] == ("my Measurement", {}, {"fieldKey": "string value"}, None)
    assert pts[1][2] == {"fieldKey": '"string" within a string'}
    assert pts[2][1] == {"tag Key1": "tag Value1", "tag Key2": "tag Value2"}
    assert pts[3] == ("myMeasurement", {"tagKey": "🍭"}, {"fieldKey": "Launch 🚀"},
                      1556813561098000000)
    assert pts[4][2] == {"fieldKey": "a\\b, c=d e"}
    assert pts[5] == ("my,Measurement", {"a=b": "c,d"}, {"f k": 1.0}, None)


def test_influx_examples_of_the_influxdb_docs_and_readme():
    from edgeml.core.formats.influx import parse_lines

    # docs.influxdata.com line protocol reference (v2) and influxdb's tsdb/README.md
    assert parse_lines('measurementName,tagKey=tagValue fieldKey="fieldValue" '
                       "1465839830100400200") == \
        [("measurementName", {"tagKey": "tagValue"}, {"fieldKey": "fieldValue"},
          1465839830100400200)]
    d = influx(["value"], label_field="msg").decode(
        b'cpu,host=server\\ 01,region=uswest value=1.0,msg="all systems nominal"')
    assert d.samples.tolist() == [[1.0]] and d.labels == ("all systems nominal",)
    assert d.sources == ("cpu,host=server\\ 01,region=uswest",)


def test_influx_label_field_same_timestamp_merges_and_time_order():
    payload = (b'imu,s=w1 ax=2,ay=2 20\nimu,s=w1 ax=1,ay=1,label="Walking" 10\n'
               b"imu,s=w1 az=3 20\nimu,s=w1 az=1 10\n")
    d = influx(["ax", "ay", "az"]).decode(payload)
    np.testing.assert_array_equal(d.samples, np.float32([[1, 1, 1], [2, 2, 3]]))
    assert d.labels == ("Walking", None)


@pytest.mark.parametrize(("payload", "why"), [
    (b"m", "malformed"), (b"m f=", "malformed"), (b"m f=1 abc", "malformed"),
    (b'm f="open', "malformed"), (b"m,t f=1", "malformed"), (b"m f=1x", "malformed"),
    (b"m f=-1u", "malformed"), (b"m g=1", "missing_field"), (b"m f=1 2 3", "malformed"),
    (b"\n# only a comment\n", "wrong_shape"), (b"m f=\xff", "malformed"),
])
def test_influx_bad_lines_are_dead_letters_with_a_reason(payload, why):
    assert reason(influx(["f"]), payload) == why


# ---- value: one number per topic ---------------------------------------------------------
def test_topic_template_filter_and_split():
    t = TopicTemplate.parse("plant/{line}/{machine}/{feature}")
    assert t.topic_filter == "plant/+/+/+"
    assert t.split("plant/l1/m3/ax") == ("plant/l1/m3", "ax")
    assert t.split("plant/l1/m3") is None and t.split("other/l1/m3/ax") is None
    assert TopicTemplate.parse("{feature}/dev/{id}").split("ax/dev/7") == ("dev/7", "ax")
    for bad in ("plant/{line}", "a/{feature}/{feature}", "a/+/{feature}", "a/x{y}/{feature}",
                "a/#/{feature}"):
        with pytest.raises(ValueError):
            TopicTemplate.parse(bad)


def test_value_payloads():
    d = Decoder(format="value", features=("a",))
    assert d.decode(b" -1.5e-3\n").parsed.value == -1.5e-3
    assert d.decode(b"7").parsed.value == 7.0
    for bad, why in ((b"abc", "bad_value"), (b"nan", "non_finite"), (b"1e999", "non_finite"),
                     (b'"1.5"', "bad_value"), (b"1_000", "bad_value"), (b"", "malformed"),
                     (b"true", "bad_value"), (b"\xff", "malformed")):
        assert reason(d, bad) == why, bad


def test_value_assembly_waits_for_every_feature_and_bounds_staleness():
    spec = ValueSpec(TopicTemplate.parse("plant/{line}/{machine}/{feature}"), max_age_s=1.0)
    dec = Decoder(format="value", features=("a", "b"), spec=spec)
    asm = Assembler(dec)
    feed = lambda topic, v, t: asm.feed(topic, v, int(t * 10), t)  # noqa: E731
    assert feed("plant/1/m/a", b"1", 0.0) == []
    assert feed("plant/1/m/zz", b"9", 0.1) == []          # not a feature: counted
    assert feed("plant/2/m/b", b"5", 0.2) == []           # another source
    rows = feed("plant/1/m/b", b"2", 0.3)
    assert [(r.topic, list(r.features)) for r in rows] == [("plant/1/m/b", [1.0, 2.0])]
    assert feed("plant/1/m/a", b"3", 0.4) == []           # a fresh round starts
    assert feed("plant/1/m/a", b"4", 0.5) == []           # overwritten: latest wins
    assert feed("plant/1/m/b", b"6", 2.0) == []           # a=4 is 1.5 s old: stale
    assert list(feed("plant/1/m/a", b"7", 2.1)[0].features) == [7.0, 6.0]
    st = asm.status()
    assert (st["unknown_feature"], st["overwritten"], st["stale"], st["samples"]) == \
        (1, 1, 1, 2)


def test_sparkplug_payload_parses_per_the_published_field_numbers():
    pytest.importorskip("google.protobuf")
    from edgeml.core.formats.sparkplug import numeric, parse_payload

    raw = spb_payload([spb_metric("bdSeq", 0, 8, long=3),
                       spb_metric("Temp", 1, 10, double=21.5, timestamp=5),
                       spb_metric("Offset", 2, 3, int32=-7),
                       spb_metric("On", 3, 11, boolean=True, historical=True),
                       spb_metric("Name", 4, 12, string="x"), spb_metric(alias=1, null=True)],
                      seq=0)
    p = parse_payload(raw)
    assert (p.seq, p.timestamp, len(p.metrics)) == (0, 1700000000000, 6)
    bd, temp, off, on, name, nul = p.metrics
    assert (temp.name, temp.alias, temp.timestamp, numeric(temp, 10)) == ("Temp", 1, 5, 21.5)
    assert numeric(off, 3) == -7.0 and numeric(bd, 8) == 3.0
    assert on.is_historical and numeric(on, 11) == 1.0
    assert numeric(name, 12) is None
    assert nul.is_null and nul.name is None and nul.alias == 1
    d = Decoder(format="sparkplug_b", features=("Temp",))
    assert reason(d, b"\xff\xff\xff") == "malformed"
    assert reason(d, b"") == "malformed"


def test_the_device_runs_without_protobuf_for_the_other_formats(tmp_path):
    code = r'''
import sys
sys.modules["google.protobuf"] = None          # as if the sparkplug extra were not installed
from edgeml.core.decode import Decoder
import edgeml.core.device                      # the device imports fine
for fmt, payload in (("senml", b'[{"n":"a","v":1}]'), ("influx_line", b"m a=1"),
                     ("value", b"1")):
    Decoder(format=fmt, features=("a",)).decode(payload)
from edgeml.config import parse_config
from edgeml.errors import ConfigError
try:
    parse_config({"device_id": "d", "pipelines": [{"name": "p", "format": "sparkplug_b",
                  "features": ["a"], "sparkplug": {"group_id": "g"}}]})
except ConfigError as exc:
    print("ERR", exc)
assert "google.protobuf" not in sys.modules or sys.modules["google.protobuf"] is None
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pipelines[0].format" in out.stdout and "edgeml[sparkplug]" in out.stdout


def test_a_failing_session_is_counted_not_raised(monkeypatch):
    spec = ValueSpec(TopicTemplate.parse("a/{feature}"))
    asm = Assembler(Decoder(format="value", features=("x",), spec=spec))

    def boom(*_a):
        raise RuntimeError("a bug")
    monkeypatch.setattr(asm.session, "feed", boom)
    assert asm.feed("a/x", b"1", 0, 0.0) == []
    assert asm.status()["errors"] == 1
