"""Big messages never reach the daemon's memory: with MQTT 5 the device declares its Maximum
Packet Size in CONNECT (from the profile's queue.max_packet_kb) and the broker drops anything
larger on its side; what does arrive and is over the pipeline's max_payload_bytes is a dead
letter with a bounded payload copy."""

from __future__ import annotations

import json

import msgpack
import paho.mqtt.client as paho
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config


def test_mqtt5_max_packet_size_keeps_oversize_messages_at_the_broker(
        broker, daemon_factory, tmp_path, gait_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(max_payload_bytes=32 * 1024), device_id="gw-b",
                       extra="[profile_overrides]\nqueue = { max_packet_kb = 64 }\n")
    cfg.write_text(cfg.read_text().replace("[broker]\n", '[broker]\nprotocol = "5"\n'))
    out = Collector(broker, "edgeml/gw-b/out/gait")
    dlq = Collector(broker, "edgeml/gw-b/dlq")
    d = daemon_factory(cfg)
    try:
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="big-sender")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        # 2 MB: over the declared packet size, dropped by the broker, never sent to us
        pub.publish("sensors/p1/gait", b"x" * (2 * 2**20), qos=1).wait_for_publish(10)
        # 40 kB: under the packet size, over max_payload_bytes: a dead letter
        pub.publish("sensors/p1/gait", b"y" * (40 * 1024), qos=1).wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()
        publish_all(broker, gait_messages(5))
        got = out.wait_count(5)
        assert [msgpack.unpackb(m.payload)["id"] for m in got] == [f"g{i}" for i in range(5)]
        letters = [json.loads(m.payload) for m in dlq.wait_count(1)]
        assert [(x["reason"], x["payload_bytes"], x["truncated"]) for x in letters] == \
            [("too_large", 40 * 1024, True)]
        st = d.status()["pipelines"]["gait"]
        assert (st["received"], st["rejected"]) == (6, 1)  # the 2 MB message never arrived
        log = broker.log_path.read_text(errors="replace")
        assert "Dropping too large outgoing PUBLISH for edgeml-gw-b" in log
    finally:
        out.close()
        dlq.close()
