"""BasicMotions TEST streamed in every payload format through a real Device (in-memory
broker, real models, raw log and outbox on disk): the answers are the JSON stream's, in
order, and the raw-input archive rebuilds the same samples with the daemon's own code."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json

import numpy as np
import pytest
from _formats_streams import (
    CH,
    GROUP,
    NODE,
    SPARKPLUG_METRICS_TOML,
    SparkplugNode,
    influx_messages,
    json_messages,
    senml_messages,
    sparkplug_messages,
    value_messages,
)
from test_device_stages import Rig as StagesRig
from test_device_stages import _until

from edgeml.cli import main
from edgeml.config import load_config
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.errors import DecodeError
from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import open_reader

DEVICE = "watch-01"
OUT = f"edgeml/{DEVICE}/out/activity"

FORMATS = {
    "senml": ({"format": "senml", "topics": ["sensors/+/senml"]}, senml_messages),
    "influx_line": ({"format": "influx_line", "topics": ["sensors/lp"]}, influx_messages),
    "value": ({"format": "value", "topics": None,
               "topic_template": "plant/{line}/{machine}/{feature}"}, value_messages),
    "sparkplug_b": ({"format": "sparkplug_b", "topics": None,
                     "sparkplug": {"group_id": GROUP, "edge_node_id": NODE,
                                   "metrics": SPARKPLUG_METRICS_TOML}}, sparkplug_messages),
}


def sync(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return run


class Rig(StagesRig):
    """The stage tests' in-memory device, one activity bundle, this pipeline table."""

    def __init__(self, path, bundle, pipeline: dict) -> None:
        super().__init__(path, [{"name": "activity", "version": "1", "bundle": str(bundle)}],
                         pipeline=pipeline)

    def fmt_status(self) -> dict:
        return self.device.status()["pipelines"]["activity"]["format"]


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


@pytest.fixture(scope="module")
def json_answers(tmp_path_factory, activity_bundle, test_set):
    """The reference: the JSON stream's answers, in order."""
    @sync
    async def run():
        async with Rig(tmp_path_factory.mktemp("json"), activity_bundle, {}) as rig:
            rig.send(json_messages(test_set, range(len(test_set.X))))
            await _until(lambda: len(rig.answers()) == len(test_set.X), "the JSON answers")
            return rig.answers()
    return run()


def same_answers(got: list[dict], want: list[dict]) -> None:
    """Same labels in the same order; same scores up to float32 rounding (onnxruntime's sums
    can differ in the last bits with the micro-batch a row happened to be scored in)."""
    assert [a["output"]["label"] for a in got] == [a["output"]["label"] for a in want]
    for a, b in zip(got, want, strict=True):
        assert a["output"]["scores"].keys() == b["output"]["scores"].keys()
        np.testing.assert_allclose(list(a["output"]["scores"].values()),
                                   list(b["output"]["scores"].values()), rtol=1e-5, atol=1e-6)


def _rebuild(path, pcfg) -> list:
    """The rows the archive gives the daemon's own decoder and assembler (as replay does)."""
    asm = Assembler(Decoder.from_pipeline(pcfg), pcfg.window)
    rows = []
    for rec in open_reader(path / "data" / "rawlog" / "activity").read():
        with contextlib.suppress(DecodeError):
            rows += asm.feed(rec.topic, rec.payload, rec.seq, rec.received)
    return rows


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_answers_like_the_json_stream(fmt, tmp_path, activity_bundle, test_set,
                                                   json_answers):
    if fmt == "sparkplug_b":
        pytest.importorskip("google.protobuf")
    pipeline, make = FORMATS[fmt]
    n = len(test_set.X)

    @sync
    async def run():
        async with Rig(tmp_path, activity_bundle, pipeline) as rig:
            rig.send(make(test_set, range(n)))
            await _until(lambda: len(rig.answers()) == n, f"{n} {fmt} answers")
            assert rig.broker.payloads(f"edgeml/{DEVICE}/dlq") == []
            return rig.answers(), rig.fmt_status() if fmt in ("value", "sparkplug_b") else {}
    answers, st = run()
    same_answers(answers, json_answers)
    if st:
        assert st["samples"] == n * 100 and not st.get("stale") and not st.get("seq_gaps")
    # the archive rebuilds the same rows, for the same input_seq, in the same order
    rows = _rebuild(tmp_path, load_config(tmp_path / "edgeml.toml").pipeline("activity"))
    assert [r.seq for r in rows] == [a["input_seq"] for a in answers]
    for r, w in zip(rows, range(n), strict=True):
        np.testing.assert_array_equal(r.features, test_set.X[w].astype(np.float32).ravel())
    # and `edgeml replay` over the archive gives every answer again, for the same input_seq
    out = tmp_path / "rows.jsonl"
    assert main(["replay", str(activity_bundle), "--config", str(tmp_path / "edgeml.toml"),
                 "--pipeline", "activity", "--rows", str(out), "--quiet"]) == 0
    replayed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seq"], next(iter(r["outputs"].values()))["label"]) for r in replayed] == \
        [(a["input_seq"], a["output"]["label"]) for a in answers]


@sync
async def test_sparkplug_gap_is_reported_and_one_rebirth_resumes_answers(
        tmp_path, activity_bundle, test_set, json_answers):
    pytest.importorskip("google.protobuf")
    from edgeml.core.formats.sparkplug import REBIRTH_METRIC, parse_payload

    pipeline = {"format": "sparkplug_b", "topics": None,
                "sparkplug": {"group_id": GROUP, "edge_node_id": NODE,
                              "metrics": SPARKPLUG_METRICS_TOML, "rebirth": True}}
    node = SparkplugNode()
    ncmd = f"spBv1.0/{GROUP}/NCMD/{NODE}"
    async with Rig(tmp_path, activity_bundle, pipeline) as rig:
        rig.send(sparkplug_messages(test_set, [0], node))
        await _until(lambda: len(rig.answers()) == 1, "the first answer")
        # window 1: half of it, then a message lost on the way (a real gap), then the rest
        rig.send([node.dbirth("w1")] + [node.ddata("w1", s) for s in test_set.X[1][:50]])
        node.skip()
        rig.send([node.ddata("w1", s) for s in test_set.X[1][50:]])
        await _until(lambda: rig.broker.payloads(ncmd), "a rebirth request")
        await _until(lambda: rig.fmt_status().get("held", 0) == 50, "the held data")
        st = rig.fmt_status()
        assert st["seq_gaps"] == 1
        assert st["last_gap"]["node"] == f"{GROUP}/{NODE}"
        gap = st["last_gap"]
        assert (gap["expected"], gap["got"]) == ((1 + 1 + 100 + 1 + 50) % 256,
                                                 (1 + 1 + 100 + 1 + 50 + 1) % 256)
        assert st["nodes"][f"{GROUP}/{NODE}"]["on_hold"] is True
        reqs = rig.broker.payloads(ncmd)
        assert len(reqs) == 1  # exactly one request, however much data was held
        req = parse_payload(reqs[0])
        assert [(m.name, m.value) for m in req.metrics] == [(REBIRTH_METRIC, True)]
        assert len(rig.answers()) == 1  # nothing from the held data
        # the node answers the request: a new NBIRTH, its DBIRTHs, and the data
        rig.send(sparkplug_messages(test_set, [1, 2], node))
        await _until(lambda: len(rig.answers()) == 3, "answers after the rebirth")
        same_answers(rig.answers(), json_answers[:3])
        st = rig.fmt_status()
        assert st["nodes"][f"{GROUP}/{NODE}"]["on_hold"] is False
        assert (st["seq_gaps"], st["rebirth_requests"], st["rebirth_sent"]) == (1, 1, 1)
        assert len(rig.broker.payloads(ncmd)) == 1


@sync
async def test_sparkplug_historical_death_and_duplicates(tmp_path, activity_bundle, test_set):
    pytest.importorskip("google.protobuf")
    from _formats_streams import _metric, spb

    pipeline = {"format": "sparkplug_b", "topics": None,
                "sparkplug": {"group_id": GROUP, "edge_node_id": NODE,
                              "metrics": SPARKPLUG_METRICS_TOML}}
    node = SparkplugNode()
    async with Rig(tmp_path, activity_bundle, pipeline) as rig:
        first = [node.nbirth(), node.dbirth("w0")] + [node.ddata("w0", s)
                                                      for s in test_set.X[0][:48]]
        rig.send(first)
        rig.send([first[-1]])  # a redelivered duplicate (same seq): ignored
        hist = [_metric(None, k + 1, None, 9.0) + b"\x28\x01" for k in range(len(CH))]
        rig.send([(node.topic("DDATA", "w0"), spb(hist, node._next()))])  # is_historical
        rig.send([node.ddata("w0", s) for s in test_set.X[0][48:]])
        await _until(lambda: len(rig.answers()) == 1, "the answer")
        st = rig.fmt_status()
        assert (st["duplicates"], st["historical"], st.get("seq_gaps", 0)) == (1, 6, 0)
        # NDEATH: the node's partial state goes; its data is not used until a new NBIRTH
        rig.send([node.ddata("w0", s) for s in test_set.X[0][:10]])
        rig.send([(node.topic("NDEATH"), spb([_metric("bdSeq", 0, 8, node.bdseq)], None))])
        rig.send([node.ddata("w0", s) for s in test_set.X[0][10:]])
        await _until(lambda: rig.fmt_status().get("no_birth", 0) == 90, "data after death")
        st = rig.fmt_status()
        assert st["deaths"] == 1 and st["nodes"][f"{GROUP}/{NODE}"]["online"] is False
        assert len(rig.answers()) == 1
        assert rig.broker.payloads(f"spBv1.0/{GROUP}/NCMD/{NODE}") == []  # rebirth is opt-in
