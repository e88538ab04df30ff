"""A real daemon on a real mosquitto counts the gaps in its senders' own numbering: in the
status document and on /metrics (edgeml.core.gaps defines the counts)."""

from __future__ import annotations

import json

from conftest import Collector, gait_messages, gait_pipeline, publish_all, write_config
from test_metrics_http import scrape, value

OUT = "edgeml/watch-01/out/gait"


def numbered(topic: str, ids: list) -> list[tuple[str, bytes]]:
    """Real Daphnet samples on ``topic`` carrying ``ids`` in this order."""
    out = []
    for (_, payload), i in zip(gait_messages(len(ids), topic=topic), ids, strict=True):
        body = json.loads(payload)
        body["id"] = i
        out.append((topic, json.dumps(body).encode()))
    return out


def batches(topic: str, ids: list) -> list[tuple[str, bytes]]:
    """Two real samples per message, the message numbered as a whole."""
    samples = [json.loads(p) for _, p in gait_messages(2 * len(ids), topic=topic)]
    for s in samples:
        del s["id"]
    return [(topic, json.dumps({"samples": samples[2 * k:2 * k + 2], "id": i}).encode())
            for k, i in enumerate(ids)]


def test_daemon_counts_sequence_gaps_in_status_and_metrics(broker, daemon_factory, tmp_path,
                                                           gait_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "gait", "version": "1", "bundle": gait_bundle}],
                       pipeline=gait_pipeline(), extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    # p1: 10, 11 and 50 never sent; 20 sent twice; 70 sent after 72 (reordered)
    p1 = [i for i in range(1, 101) if i not in (10, 11, 50, 70)]
    p1.insert(p1.index(20) + 1, 20)
    p1.insert(p1.index(72) + 1, 70)
    # p2: the sender restarts at 1 (not a gap); p3: ids that are not numbers
    p2 = [*range(1, 31), *range(1, 11)]
    p3 = [f"g{i}" for i in range(5)]
    # p4: batches of two samples numbered as a whole; batch 5 never sent
    p4 = [1, 2, 3, 4, 6, 7]
    items = (numbered("sensors/p1/gait", p1) + numbered("sensors/p2/gait", p2)
             + numbered("sensors/p3/gait", p3) + batches("sensors/p4/gait", p4))
    out = Collector(broker, OUT)
    try:
        d = daemon_factory(cfg)
        publish_all(broker, items)
        out.wait_count(len(items), timeout=60)  # every message answered: archived
        seq = d.status()["pipelines"]["gait"]["sequence"]
        fams = scrape(d.daemon.http.port)
    finally:
        out.close()
    assert seq["numbered"] == len(p1) + len(p2) + len(p4) and seq["unnumbered"] == len(p3)
    assert seq["sources"] == 3
    assert seq["gaps"] == 4            # p1: 9 -> 12, 49 -> 51, 69 -> 71; p4: 4 -> 6
    assert seq["skipped"] == 5         # p1: 10, 11, 50, 70; p4: 5
    assert seq["late"] == 1            # 70 filled its gap
    assert seq["missing"] == 4 and seq["open"] == 4 and seq["lost"] == 0
    assert seq["duplicates"] == 1      # the second 20
    assert seq["resets"] == 1          # p2 started again at 1
    p = {"pipeline": "gait"}
    assert value(fams, "edgeml_sequence_gaps", **p) == 4
    assert value(fams, "edgeml_sequence_missing_open", **p) == 4
    assert value(fams, "edgeml_sequence_lost", **p) == 0
    assert value(fams, "edgeml_sequence_late", **p) == 1
    assert value(fams, "edgeml_sequence_duplicates", **p) == 1
    assert value(fams, "edgeml_sequence_resets", **p) == 1
    assert value(fams, "edgeml_sequence_sources", **p) == 3
    assert value(fams, "edgeml_sequence_sources_evicted", **p) == 0
