"""A QoS 0 flood on a broker whose queue towards the device overflows: the answers keep going.

mosquitto drops every packet for a client whose outgoing queue holds ``max_queued_messages``
packets, PUBACKs included (since 2.0.16, and in distribution builds of 2.0.11). When the
device published its QoS 1 answers on the connection that also carried the flood, the lost
PUBACKs kept its in-flight window full and no answer (nor status) left it again. The small
queue here makes the overflow certain; the stock 1000 makes it a matter of timing."""

from __future__ import annotations

import time

from conftest import Collector, gait_pipeline, write_config

from edgeml.host.bench.baselines import _RawSink


def test_qos0_flood_overflowing_the_broker_queue_does_not_stop_the_answers(
        broker_factory, daemon_factory, tmp_path, gait_bundle):
    import json

    from edgeml.host.datasets import DAPHNET_CHANNELS, load_daphnet

    b = broker_factory("small-queue", tuned=False, extra_config="max_queued_messages 10")
    b.start()
    cfg = write_config(tmp_path / "edgeml.toml", broker=b, data_dir=tmp_path / "data",
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(), device_id="gw-f")
    d = daemon_factory(cfg)
    X = load_daphnet().X
    sink = _RawSink(b.host, b.port, "flood", "sensors/p1/gait")
    # ~3 KB messages for 4 s, faster than the device can take them: the broker's queue
    # towards it stays full (and drops) while the device keeps answering
    pad = "x" * 3000
    payloads = [json.dumps({**dict(zip(DAPHNET_CHANNELS, map(float, X[i]), strict=True)),
                            "id": f"f{i}", "pad": pad}).encode() for i in range(2000)]
    # packed once and sent back to back: the device must not keep up (it scores such
    # messages faster than the broker forwards a lightly paced stream)
    bursts = [[sink.packet(p) for p in payloads[i:i + 100]]
              for i in range(0, len(payloads), 100)]
    t_end = time.monotonic() + 4.0
    while time.monotonic() < t_end:
        for burst in bursts:
            sink.send(burst)
    sink.close()
    # the broker sheds most of the flood (QoS 0, a 10-packet queue); the device scores what
    # it received, and its QoS 1 publications (answers, the retained status every 0.5 s)
    # must still reach the broker: the retained status catches up with the device. Answers
    # the broker cannot take as fast as they come (tens of thousands waiting for their
    # acknowledgement) are refused and counted, never silently lost.
    deadline = time.monotonic() + 60
    last, scored = -1, 0
    while time.monotonic() < deadline:  # until the device has scored what it got
        scored = d.status()["pipelines"]["gait"]["scored"]
        if scored and scored == last:
            break
        last = scored
        time.sleep(1.0)
    assert scored > 100  # the flood did reach the device
    def caught_up(doc: dict) -> bool:
        published = doc.get("pipelines", {}).get("gait", {}).get("published")
        return published is not None and published > 100 and \
            published + doc.get("publish_errors", 0) >= scored  # (errors: alerts too)

    status = Collector(b, "edgeml/gw-f/status")
    try:
        status.wait_for(lambda msgs: any(caught_up(json.loads(m.payload)) for m in msgs),
                        timeout=30)
    finally:
        status.close()
    log = b.log_path.read_text(errors="replace")
    assert "Outgoing messages are being dropped for client edgeml-gw-f" in log
