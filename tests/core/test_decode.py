"""Payload decoding: each kind of bad input gets its own reason; good shapes decode exactly."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest

from edgeml.config import WindowConfig
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.errors import DecodeError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

CH = BASICMOTIONS_CHANNELS


def sample(values, **extra):
    vals = [float(v) if isinstance(v, (int, float, np.floating)) else v for v in values]
    return {**dict(zip(CH, vals, strict=True)), **extra}


@pytest.fixture(scope="module")
def series():
    return load_basicmotions("TEST").X[0]  # [100, 6] real IMU samples


def test_json_and_msgpack_single_sample(series):
    d = Decoder(features=CH)
    for payload in (json.dumps(sample(series[0], id="a")).encode(),
                    msgpack.packb(sample(series[0], id="a"))):
        out = d.decode(payload)
        assert out.samples.dtype == np.float32 and out.samples.shape == (1, 6)
        np.testing.assert_array_equal(out.samples[0], series[0])
        assert out.ids == ("a",)


def test_batch_shapes(series):
    d = Decoder(features=CH)
    body = {"samples": [sample(s, label="Walking") for s in series[:5]], "id": "b"}
    out = d.decode(json.dumps(body).encode())
    np.testing.assert_array_equal(out.samples, series[:5])
    assert out.ids == ("b:0", "b:1", "b:2", "b:3", "b:4") and out.labels == ("Walking",) * 5
    out = d.decode(msgpack.packb([sample(s) for s in series[:3]]))
    assert out.samples.shape == (3, 6) and out.labels is None
    arr = Decoder(field="values", n_features=6)
    out = arr.decode(json.dumps({"values": series[:4].tolist(), "id": 7}).encode())
    np.testing.assert_allclose(out.samples, series[:4])
    out = arr.decode(json.dumps({"values": series[0].tolist()}).encode())
    assert out.samples.shape == (1, 6)


@pytest.mark.parametrize("payload, reason", [
    (b"\x00\xffgarbage\x13", "malformed"),
    (b"", "malformed"),
    (b'{"ax": 1', "malformed"),
    (json.dumps({"bx": 1.0}).encode(), "missing_field"),
    (json.dumps(sample([1, 2, 3, 4, 5, "x"])).encode(), "bad_value"),
    (json.dumps({**sample([1] * 6), "gz": None}).encode(), "bad_value"),
    (json.dumps({**sample([1] * 6), "gz": True}).encode(), "bad_value"),
    (json.dumps(sample([1, 2, 3, 4, 5, math.nan])).encode(), "non_finite"),
    (json.dumps(sample([1, 2, 3, 4, 5, math.inf])).encode(), "non_finite"),
    (b"x" * (10 * 2**20), "too_large"),
    (json.dumps([]).encode(), "wrong_shape"),
    (json.dumps(42).encode(), "malformed"),
    # hostile shapes that used to escape as other exceptions and cost a whole burst
    (b"[" * 5000 + b"]" * 5000, "malformed"),                      # RecursionError
    (b"\x81\x91\x01\x01", "malformed"),                            # msgpack list as map key
    (json.dumps({**sample([1] * 6), "gz": 10**400}).encode(), "bad_value"),  # OverflowError
    (json.dumps(sample([1, 2, 3, 4, 5, "0.25"])).encode(), "bad_value"),     # numeric string
    (msgpack.packb({**sample([1] * 6), "gz": b"\x01"}), "bad_value"),
    (json.dumps({**sample([1] * 6), "id": 2**70}).encode(), "bad_id"),
    (json.dumps({**sample([1] * 6), "id": {"a": [1]}}).encode(), "bad_id"),
    (json.dumps({**sample([1] * 6), "id": "x" * 300}).encode(), "bad_id"),
    (json.dumps({"samples": [sample([1] * 6, id=-(2**64))]}).encode(), "bad_id"),
])
def test_rejections(payload, reason):
    with pytest.raises(DecodeError) as info:
        Decoder(features=CH).decode(payload)
    assert info.value.reason == reason


@pytest.mark.parametrize("bad, reason, says", [
    (True, "bad_value", "boolean True is not a number"),
    ("0.25", "bad_value", "'0.25' is a string"),
    (b"\x01", "bad_value", "is a string"),
    (None, "bad_value", "null is not a number"),
    ([1.0], "bad_value", "non-numeric value [1.0]"),
    ({"v": 1}, "bad_value", "non-numeric value {'v': 1}"),
    (10**400, "bad_value", "too large for float32"),
    (math.nan, "non_finite", "NaN or infinite"),
])
def test_one_bad_value_in_a_batch_of_samples_is_named(series, bad, reason, says):
    """The fast path for a batch of maps checks every value's type at once; a bad one is
    still rejected with the same reason and text as the sample-by-sample check gives."""
    samples = [sample(series[i]) for i in range(5)]
    samples[3]["gz"] = bad
    payloads = [] if bad == 10**400 else [msgpack.packb({"samples": samples}, use_bin_type=True)]
    if not isinstance(bad, bytes):
        payloads.append(json.dumps({"samples": samples}).encode())
    for payload in payloads:
        with pytest.raises(DecodeError) as info:
            Decoder(features=CH).decode(payload)
        assert info.value.reason == reason and says in info.value.detail, info.value.detail
    good = Decoder(features=CH).decode(msgpack.packb({"samples": samples[:3]}))
    assert good.samples.shape == (3, 6) and good.samples.dtype == np.float32


def test_wrong_feature_count_with_array_field():
    with pytest.raises(DecodeError) as info:
        Decoder(field="values", n_features=6).decode(b'{"values": [1, 2, 3]}')
    assert info.value.reason == "wrong_shape" and "3 features, expected 6" in str(info.value)


def test_json_where_msgpack_expected(series):
    with pytest.raises(DecodeError, match="looks like JSON"):
        Decoder(format="msgpack", features=CH).decode(json.dumps(sample(series[0])).encode())


def test_windows_per_topic_sample_major(series):
    a = Assembler(Decoder(features=CH), WindowConfig(size=100, hop=50))
    rows = []
    for i, s in enumerate(series):
        for topic in ("sensors/w1/imu", "sensors/w2/imu"):
            rows += a.feed(topic, json.dumps(sample(s, id=i)).encode(), i, float(i))
    assert [r.topic for r in rows] == ["sensors/w1/imu", "sensors/w2/imu"]
    np.testing.assert_array_equal(rows[0].features, series.reshape(-1))  # sample-major
    assert rows[0].id == 99 and rows[0].seq == 99
    more = []
    for i, s in enumerate(series[:50]):
        more += a.feed("sensors/w1/imu", json.dumps(sample(s)).encode(), 100 + i, 0.0)
    assert len(more) == 1  # hop 50: a new window after 50 more samples
    np.testing.assert_array_equal(more[0].features[:300], series[50:].reshape(-1))


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_a_batch_of_maps_decodes_as_its_samples_do_one_by_one(series, fmt):
    """The column-at-a-time batch path gives what decoding each sample alone gives: the same
    floats, each sample's own id or ``<batch id>:<i>``, labels with the batch's label filling
    the gaps; and a batch it cannot take (a sample without a feature, a bad id) is refused with
    the same reason and sample as before."""
    dec = Decoder(features=CH, n_features=len(CH))
    enc = (lambda d: json.dumps(d).encode()) if fmt == "json" else msgpack.packb
    cases = [
        ({"id": "b7"}, [sample(series[i]) for i in range(10)]),
        ({}, [sample(series[i]) for i in range(5)]),
        ({"id": 42, "label": "Walking"},
         [sample(series[i], **({"id": f"s{i}"} if i % 2 else {}),
                 **({"label": "Running"} if i == 3 else {})) for i in range(8)]),
        ({"id": "b8", "label": "Walking"}, [sample(series[i]) for i in range(4)]),
        ({"id": "b9"}, [sample(series[i], t=i) for i in range(4)]),  # a key of its own
    ]
    for head, items in cases:
        got = dec.decode(enc({**head, "samples": items}))
        alone = [dec.decode(enc(item)) for item in items]
        np.testing.assert_array_equal(got.samples, np.concatenate([a.samples for a in alone]))
        base = head.get("id")
        assert got.ids == tuple(it.get("id", None if base is None else f"{base}:{i}")
                                for i, it in enumerate(items))
        want = tuple(it.get("label", head.get("label")) for it in items)
        assert got.labels == (want if any(v is not None for v in want) else None)
    missing = [sample(series[i]) for i in range(4)]
    del missing[2][CH[1]]
    with pytest.raises(DecodeError, match=r"samples\[2\] lacks") as exc:
        dec.decode(enc({"samples": missing}))
    assert exc.value.reason == "missing_field"
    bad_id = [sample(series[i], **({"id": [1]} if i == 1 else {})) for i in range(3)]
    with pytest.raises(DecodeError) as exc:
        dec.decode(enc({"samples": bad_id}))
    assert exc.value.reason == "bad_id"
