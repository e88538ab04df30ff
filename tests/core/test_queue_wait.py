"""Queue policy ``wait`` (the default): a device flooded faster than it scores reads no
further until its queue has room, so nothing it read is shed; ``drop_oldest`` reads on and
sheds rows. Real daemon, real mosquitto (deep queues: the broker holds what the device does
not read yet), Daphnet samples."""

from __future__ import annotations

import pytest
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config

OUT = "edgeml/watch-01/out/gait"
N = 3000


def config(tmp_path, broker, gait_bundle, policy: str):
    return write_config(
        tmp_path / f"{policy}.toml", broker=broker, data_dir=tmp_path / f"data-{policy}",
        models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
        pipeline=gait_pipeline(qos=0),
        extra=f'[profile_overrides]\nqueue = {{ max_messages = 8, policy = "{policy}" }}\n'
              'batching = { max_batch = 2, max_wait_ms = 0.0 }\n')


def test_wait_reads_no_further_than_scoring_and_sheds_nothing(broker, daemon_factory,
                                                               tmp_path, gait_bundle):
    out = Collector(broker, OUT)
    try:
        d = daemon_factory(config(tmp_path, broker, gait_bundle, "wait"))
        publish_all(broker, gait_messages(N))  # QoS 1 to the broker, QoS 0 to the device
        out.wait_count(N, timeout=120)  # every message answered: none read and shed
        st = d.status()["pipelines"]["gait"]
    finally:
        out.close()
    assert st["dropped"] == 0 and st["scored"] == st["rows"] == st["accepted"] == N
    assert st["queue_waits"] > 0  # it did stop reading while the queue was full


def test_drop_oldest_reads_on_and_sheds_rows(broker, daemon_factory, tmp_path, gait_bundle):
    out = Collector(broker, OUT)
    try:
        d = daemon_factory(config(tmp_path, broker, gait_bundle, "drop_oldest"))
        publish_all(broker, gait_messages(N))
        out.wait_for(lambda msgs: d.status()["pipelines"]["gait"]["accepted"] == N, timeout=120)
        st = d.status()["pipelines"]["gait"]
    finally:
        out.close()
    assert st["queue_waits"] == 0 and st["accepted"] == N  # it read the whole flood
    if st["dropped"] == 0:
        pytest.skip("the device kept up with the flood on this machine: nothing to shed")
