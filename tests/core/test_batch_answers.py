"""A message carrying a batch of samples gets one answer message: an array of its rows'
answers, in row order, even when its rows are more than one scoring batch. Real daemon, real
mosquitto, the Daphnet gait model."""

from __future__ import annotations

import json

import msgpack
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config

OUT = "edgeml/watch-01/out/gait"
PER_MESSAGE = 7  # rows per batch message: more than max_batch (4) below


def test_a_batch_message_is_answered_once_with_its_rows_in_order(broker, daemon_factory,
                                                                 tmp_path, gait_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(),
                       extra="[profile_overrides]\nbatching = { max_batch = 4 }\n")
    n_batches = 20
    singles = gait_messages(n_batches * PER_MESSAGE, topic="sensors/one/gait")
    samples = [json.loads(p) for _, p in singles]
    batch_msgs = []
    for k in range(n_batches):
        rows = [{f: v for f, v in s.items() if f != "id"}
                for s in samples[k * PER_MESSAGE:(k + 1) * PER_MESSAGE]]
        batch_msgs.append(("sensors/many/gait", json.dumps({"id": f"b{k}", "samples": rows})
                           .encode()))
    out = Collector(broker, OUT)
    try:
        daemon_factory(cfg)
        publish_all(broker, batch_msgs + singles)
        msgs = out.wait_count(len(batch_msgs) + len(singles), timeout=60)
    finally:
        out.close()
    answers = [msgpack.unpackb(m.payload, raw=False) for m in msgs]
    by_topic: dict[str, list] = {"sensors/many/gait": [], "sensors/one/gait": []}
    for a in answers:
        first = a[0] if isinstance(a, list) else a
        by_topic[first["topic"]].append(a)
    # every single sample: one map; every batch message: one array of its 7 rows, in order
    assert len(by_topic["sensors/one/gait"]) == len(singles)
    assert all(isinstance(a, dict) for a in by_topic["sensors/one/gait"])
    batched = by_topic["sensors/many/gait"]
    assert len(batched) == n_batches
    single_out = {a["id"]: a["output"] for a in by_topic["sensors/one/gait"]}
    for ans in batched:
        assert isinstance(ans, list) and len(ans) == PER_MESSAGE
        k = int(str(ans[0]["id"]).split(":")[0].removeprefix("b"))
        assert [r.get("row", 0) for r in ans] == list(range(PER_MESSAGE))
        assert len({r["input_seq"] for r in ans}) == 1
        # each row answered as the same sample sent alone is
        for i, r in enumerate(ans):
            assert r["output"] == single_out[f"g{k * PER_MESSAGE + i}"]
