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


def test_torn_raw_log_tail_is_cut_reported_and_alerted(broker, daemon_factory, tmp_path,
                                                       gait_bundle):
    """A power cut mid-write leaves half a record at the end of the open segment: the next
    start cuts it, keeps every whole record, and says so in status and as an alert."""
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(), device_id="gw-t")
    out = Collector(broker, "edgeml/gw-t/out/gait")
    d = daemon_factory(cfg)
    publish_all(broker, gait_messages(30))
    out.wait_count(30)
    d.stop()
    out.close()
    seg = sorted((tmp_path / "data" / "rawlog" / "gait").glob("seg-*.log"))[-1]
    whole = seg.read_bytes()
    with open(seg, "ab") as fh:
        fh.write(whole[: len(whole) // 60])  # the first bytes of a record, no more
    alerts = Collector(broker, "edgeml/gw-t/alerts")
    d = daemon_factory(cfg)
    try:
        alert = json.loads(alerts.wait_count(1)[0].payload)
        assert alert["kind"] == "rawlog_recovered" and alert["pipeline"] == "gait"
        assert alert["truncated_bytes"] == len(whole) // 60 and alert["records_kept"] == 30
        assert d.status()["storage"]["events"][0]["kind"] == "rawlog_recovered"
        assert d.status()["pipelines"]["gait"]["rawlog"]["next_seq"] == 30
    finally:
        alerts.close()
