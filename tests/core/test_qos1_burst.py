"""A QoS 1 burst larger than the scoring queue: nothing is shed on the device; the broker
holds what the device is not ready for (its acknowledgements wait for room in the queue)."""

from __future__ import annotations

import shutil

import msgpack
import pytest
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


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")
def test_qos1_burst_on_a_stock_mosquitto_waits_in_flight_not_in_its_queue(
        tmp_path, daemon_factory, gait_bundle):
    """mosquitto as installed keeps 1000 queued messages per client and drops the rest. With
    MQTT 5 the device lets 65,535 wait in flight instead, so a 5,000-message burst that
    outruns scoring is scored in full, and the broker drops nothing for the device."""
    import subprocess
    import time

    from edgeml.host.broker import MosquittoBroker

    n = 5000
    broker = MosquittoBroker(tmp_path / "broker", tuned=False).start()
    try:
        cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                           models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                           pipeline=gait_pipeline(), device_id="gw-s",
                           extra="[profile_overrides]\nqueue = { max_messages = 20 }\n"
                                 "batching = { max_batch = 1 }\n")
        d = daemon_factory(cfg)
        # mosquitto_pub -l: all lines as fast as the broker acknowledges them (~20k/s here)
        lines = "".join(p.decode() + "\n" for _, p in gait_messages(n))
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-l", "-t",
                        "sensors/p1/gait"], input=lines, text=True, check=True, timeout=120)
        # the device's own count (a stock-config subscriber of the answers would itself be
        # dropped to by the broker: 20 in flight and 1000 queued for a 3.1.1 client)
        deadline = time.monotonic() + 120
        while d.status()["pipelines"]["gait"]["scored"] < n:
            assert time.monotonic() < deadline, d.status()["pipelines"]["gait"]
            time.sleep(0.05)
        gait = d.status()["pipelines"]["gait"]
        assert (gait["accepted"], gait["dropped"], gait["scored"]) == (n, 0, n)
        assert "dropped for client edgeml-gw-s." not in broker.log_path.read_text()
    finally:
        broker.stop()
