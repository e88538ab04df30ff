"""A data directory written by the previous release opens and keeps working: installed
bundles, the persisted active set and policy, the raw-input archive and the outbox backlog.

The fixture was made by that release's own daemon (tests/fixtures/make_release_datadir.py):
v1 installed from the config, v2 pushed as a challenger and promoted, policy set to ``vote``,
3 BasicMotions windows scored while the upstream was unreachable, then a clean stop."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import msgpack
from conftest import Collector, basicmotions_window, publish_all, write_config

from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import open_reader

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "datadir-previous-release.tar.gz"
OLD_WINDOWS = 3




def test_previous_release_data_dir_opens_and_keeps_working(broker, daemon_factory, tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "data"
    old = list(open_reader(data / "rawlog" / "activity").read())
    assert len(old) == OLD_WINDOWS * 100

    sync = Collector(broker, "edgeml/watch-01/sync/#")
    answers = Collector(broker, "edgeml/watch-01/out/activity")
    # the same model list as the config that wrote it: the persisted active set applies
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=data,
                       models=[{"name": "activity", "version": "1"}])
    d = daemon_factory(cfg)
    try:
        status = d.status()
        deploy = status["deploy"]["pipelines"]["activity"]
        assert [(m["version"], m["role"]) for m in deploy["active"]] == \
            [("2", "champion"), ("1", "challenger")]
        assert deploy["policy"] == "vote"
        assert deploy["previous_champions"] == ["activity:1"]
        assert status["pipelines"]["activity"]["rawlog"]["next_seq"] == OLD_WINDOWS * 100

        # the backlog the old release could not send goes upstream now, by record id
        def old_outputs(msgs):
            seqs = set()
            for m in msgs:
                doc = msgpack.unpackb(m.payload, raw=False)
                if doc["stream"] == "outputs":
                    seqs |= {r["input_seq"] for r in doc["records"]}
            return {99, 199, 299} <= seqs
        sync.wait_for(old_outputs)

        # new input: archived after the old records, answered by the restored champion
        test = load_basicmotions("TEST")
        publish_all(broker, basicmotions_window(test.X[5], "sensors/new/imu", "new5"))
        got = answers.wait_count(1)
        rec = json.loads(got[0].payload) if got[0].payload[:1] == b"{" else \
            msgpack.unpackb(got[0].payload, raw=False)
        assert rec["input_seq"] == OLD_WINDOWS * 100 + 99
        assert rec["policy"] == "vote" and rec["id"] == "new5-99"
    finally:
        d.stop()
        sync.close()
        answers.close()
    after = list(open_reader(data / "rawlog" / "activity").read())
    assert [(r.seq, r.topic, r.payload) for r in after[:len(old)]] == \
        [(r.seq, r.topic, r.payload) for r in old]
    assert [r.seq for r in after[len(old):]] == list(range(300, 400))
