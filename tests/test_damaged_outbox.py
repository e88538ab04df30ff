"""A damaged outbox under a real daemon: found at start, moved aside with what it held
counted, shown in status and alerted; a fresh outbox takes over and new records still reach
upstream (the documented way out, done by the daemon itself)."""

from __future__ import annotations

import json
import os
import random

import msgpack
from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config

from edgeml.storage.outbox import DB_NAME, Outbox, record_id

PAGE = 4096


def test_damaged_outbox_is_quarantined_reported_and_replaced(broker, daemon_factory, tmp_path,
                                                             gait_bundle):
    data = tmp_path / "data"
    box = data / "outbox"
    with Outbox(box, chunk_max_records=10) as ob:  # an outbox with a real backlog
        for start in range(0, 2000, 100):
            ob.put_many([("outputs", record_id("gw-d", "gait", i, "gait", "1", "outputs"),
                          {"input_seq": i, "output": {"label": 1}}) for i in
                         range(start, start + 100)], marks={"gait": start + 99})
    db = box / DB_NAME
    size = db.stat().st_size
    rnd = random.Random(7)
    with open(db, "r+b") as fh:  # three pages of noise in the middle
        fh.seek((size // PAGE // 2) * PAGE)
        fh.write(bytes(rnd.getrandbits(8) for _ in range(3 * PAGE)))
        os.fsync(fh.fileno())

    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=data,
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(), device_id="gw-d",
                       extra="[sync]\nbatch_max_wait_s = 0.05\n")
    alerts = Collector(broker, "edgeml/gw-d/alerts")
    sync = Collector(broker, "edgeml/gw-d/sync/outputs")
    d = daemon_factory(cfg)
    try:
        alert = json.loads(alerts.wait_count(1)[0].payload)
        assert alert["kind"] == "outbox_quarantined" and alert["problems"]
        moved = alert["moved_to"]
        assert os.path.exists(moved) and DB_NAME + ".damaged-" in moved
        event = d.status()["storage"]["events"][0]
        assert event["kind"] == "outbox_quarantined" and event["moved_to"] == moved
        # the device answers and syncs as before, from a fresh outbox
        publish_all(broker, gait_messages(20))
        want = {record_id("gw-d", "gait", i, "gait", "1", "outputs") for i in range(20)}

        def ids(msgs):
            return {r["record_id"] for m in msgs
                    for r in msgpack.unpackb(m.payload, raw=False)["records"]}
        sync.wait_for(lambda ms: want <= ids(ms))
        assert d.status()["outbox"]["write_errors"] == 0
    finally:
        alerts.close()
        sync.close()
