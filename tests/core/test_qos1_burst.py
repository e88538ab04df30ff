"""A QoS 1 burst larger than the scoring queue: nothing is shed on the device; the broker
holds what the device is not ready for (its acknowledgements wait for room in the queue)."""

from __future__ import annotations

import msgpack
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config


def test_qos1_burst_beyond_the_queue_is_answered_in_full(broker, daemon_factory, tmp_path,
                                                         gait_bundle):
    n = 3000
    models = [{"name": "gait", "version": str(v), "bundle": gait_bundle, "role": role}
              for v, role in ((1, "champion"), (2, "challenger"), (3, "shadow"))]
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=models[:1], pipeline=gait_pipeline(), device_id="gw-q",
                       # a queue of 20 rows scored 4 at a time: the burst outruns scoring
                       extra="[profile_overrides]\nqueue = { max_messages = 20 }\n"
                             "batching = { max_batch = 4 }\n")
    out = Collector(broker, "edgeml/gw-q/out/gait")
    d = daemon_factory(cfg)
    try:
        publish_all(broker, gait_messages(n))  # as fast as paho and the broker go
        got = out.wait_count(n, timeout=120)
        ids = [msgpack.unpackb(m.payload)["id"] for m in got]
        assert sorted(ids, key=lambda s: int(s[1:])) == [f"g{i}" for i in range(n)]
        st = d.status()
        gait = st["pipelines"]["gait"]
        assert (gait["accepted"], gait["dropped"], gait["scored"]) == (n, 0, n)
        archive = st["storage"]["archive"]
        assert archive["ack_holds"] >= 1  # the queue filled, and acks waited for room
        assert archive["acks_waiting_for_queue"] == 0
    finally:
        out.close()
