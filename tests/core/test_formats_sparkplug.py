"""The Sparkplug B host session on its own: sequence numbers (wrap, duplicates, real gaps),
deaths, aliases, datatypes, rebirth rate limit. Payloads are hand-encoded from the field
numbers of Tahu's sparkplug_b.proto (tests/core/_formats_streams.py)."""

from __future__ import annotations

import json

import pytest
from _formats_streams import _metric, _varint, spb

pytest.importorskip("google.protobuf")

from edgeml.core.formats.sparkplug import (
    REBIRTH_METRIC,
    SparkplugSession,
    SparkplugSpec,
    parse_payload,
)

G, N = "g", "n1"


def session(**kw) -> SparkplugSession:
    spec = SparkplugSpec(group_id=G, edge_node_id=N, metrics=(("m/a", "a"), ("m/b", "b")),
                         **kw)
    return SparkplugSession(spec, ("a", "b"))


def feed(s: SparkplugSession, kind: str, metrics, seq, t=0.0, device=None):
    topic = f"spBv1.0/{G}/{kind}/{N}" + (f"/{device}" if device else "")
    return s.feed(topic, parse_payload(spb(metrics, seq)), t)


BIRTH = [_metric("bdSeq", 0, 8, 1), _metric("m/a", 1, 10, 0.0), _metric("m/b", 2, 3, 0)]


def data(a, b):
    """m/a as a double, m/b (an Int32 in the BIRTH) as int_value = 10, two's complement."""
    return [_metric(None, 1, None, float(a)), b"\x10\x02\x50" + _varint(b & 0xFFFFFFFF)]


def test_node_metrics_by_alias_signed_ints_and_the_wrap_is_no_gap():
    s = session()
    assert feed(s, "NBIRTH", BIRTH, 250) == []
    out = []
    for k in range(10):  # seq 251 .. 255, 0 .. 4
        out += feed(s, "NDATA", data(k, -k), (251 + k) % 256)
    assert [(src, list(v)) for src, v in out][:2] == [(f"{G}/{N}", [0.0, 0.0]),
                                                    (f"{G}/{N}", [1.0, -1.0])]
    assert len(out) == 10 and "seq_gaps" not in s.counts
    json.dumps(s.status())  # the status document is JSON


def test_duplicates_gaps_and_rebirth_rate_limit():
    s = session(rebirth=True, rebirth_interval_s=10)
    feed(s, "NBIRTH", BIRTH, 0)
    assert len(feed(s, "NDATA", data(1, 1), 1)) == 1
    assert feed(s, "NDATA", data(1, 1), 1) == []          # redelivered: ignored
    assert s.counts["duplicates"] == 1 and "seq_gaps" not in s.counts
    assert feed(s, "NDATA", data(2, 2), 5, t=1.0) == []   # 2, 3, 4 lost: a gap, on hold
    assert feed(s, "NDATA", data(3, 3), 6, t=2.0) == []   # held
    assert feed(s, "NDATA", data(3, 3), 9, t=3.0) == []   # another gap: no second request
    assert (s.counts["seq_gaps"], s.counts["rebirth_requests"], len(s.outbound)) == (2, 1, 1)
    topic, payload = s.outbound[0]
    assert topic == f"spBv1.0/{G}/NCMD/{N}"
    assert [(m.name, m.value) for m in parse_payload(payload).metrics] == \
        [(REBIRTH_METRIC, True)]
    feed(s, "NDATA", data(3, 3), 10, t=12.0)               # still held, interval passed
    assert s.counts["rebirth_requests"] == 2
    feed(s, "NCMD", [], None)                              # commands never count in the seq
    feed(s, "NBIRTH", BIRTH, 0, t=13.0)
    assert len(feed(s, "NDATA", data(4, 4), 1, t=13.1)) == 1
    assert s.status()["nodes"][f"{G}/{N}"]["on_hold"] is False


def test_without_rebirth_a_gap_is_only_reported():
    s = session()
    feed(s, "NBIRTH", BIRTH, 0)
    assert len(feed(s, "NDATA", data(1, 1), 3, t=5.0)) == 1
    assert s.last_gap == {"node": f"{G}/{N}", "expected": 1, "got": 3, "at": 5.0}
    assert not s.outbound


def test_devices_deaths_and_stale_wills():
    s = session()
    feed(s, "NBIRTH", BIRTH, 0)
    feed(s, "DBIRTH", [_metric("m/a", 7, 10, 0.0), _metric("m/b", 8, 10, 0.0)], 1, device="d1")
    dd = [_metric(None, 7, None, 1.0), _metric(None, 8, None, 2.0)]
    assert [src for src, _ in feed(s, "DDATA", dd, 2, device="d1")] == [f"{G}/{N}/d1"]
    feed(s, "DDATA", [_metric(None, 7, None, 5.0)], 3, device="d1")  # half a sample
    feed(s, "DDEATH", [], 4, device="d1")
    assert s.counts["dropped"] == 1                                   # the half sample went
    assert feed(s, "DDATA", dd, 5, device="d1") == [] and s.counts["no_birth"] == 1
    feed(s, "NDEATH", [_metric("bdSeq", 0, 8, 0)], None)              # an older session's will
    assert s.counts["stale_deaths"] == 1 and s.nodes[f"{G}/{N}"].born
    feed(s, "NDEATH", [_metric("bdSeq", 0, 8, 1)], None)
    assert s.counts["deaths"] == 2 and not s.nodes[f"{G}/{N}"].born
    assert feed(s, "NDATA", data(1, 1), 6) == []


def test_unknown_aliases_historical_nulls_and_unmapped_metrics():
    s = session()
    feed(s, "NBIRTH", [*BIRTH, _metric("other", 3, 10, 0.0)], 0)
    hist = _metric(None, 1, None, 9.0) + b"\x28\x01"                  # is_historical = 5
    null = _metric(None, 2, None, 0) + b"\x38\x01"                    # is_null = 7
    assert feed(s, "NDATA", [hist, null, _metric(None, 3, None, 1.0),
                             _metric(None, 99, None, 1.0)], 1) == []
    assert (s.counts["historical"], s.counts["nulls"], s.counts["unmapped"],
            s.counts["unknown_alias"]) == (1, 1, 1, 1)
    assert not s.outbound  # rebirth is opt-in


def test_node_and_device_tables_are_bounded():
    s = SparkplugSession(SparkplugSpec(group_id=G), ("a", "b"), max_nodes=2, max_devices=2)
    for node in ("n1", "n2", "n3"):
        s.feed(f"spBv1.0/{G}/NBIRTH/{node}", parse_payload(spb(BIRTH, 0)), 0.0)
    for k, dev in enumerate(("d1", "d2", "d3")):
        s.feed(f"spBv1.0/{G}/DBIRTH/n3/{dev}", parse_payload(spb(BIRTH, k + 1)), 0.0)
    assert list(s.nodes) == [f"{G}/n2", f"{G}/n3"] and list(s.nodes[f"{G}/n3"].devices) == \
        ["d2", "d3"]
    st = s.status()
    assert (st["evicted_nodes"], st["evicted_devices"], st["nodes_total"]) == (1, 1, 2)
