"""``edgeml fleet report`` against figures computed independently from the raw answers.

Two real daemons (two devices) score labelled BasicMotions windows with a champion (logistic
regression) and a challenger (random forest); the test subscribes to the answers on ``out/``
and to the synced results, computes every figure itself (scikit-learn's macro-F1, numpy's
percentiles), and compares with the report the collector's database gives.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from collect_helpers import ROOT, CollectProcess, kill_leftovers, wait_db
from conftest import publish_all, write_config

from edgeml.host.collect.batch import decode_payload
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

DEVICES = ("watch-01", "watch-02")


@pytest.fixture(autouse=True)
def _no_leftover_collectors():
    yield
    kill_leftovers()


def labelled_windows(device: str, series_idx, test) -> list[tuple[str, bytes]]:
    out = []
    for w in series_idx:
        for i, s in enumerate(test.X[w]):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, s), strict=True))
            body["id"] = f"{device}-w{w}-{i}"
            body["label"] = test.y[w]
            out.append((f"sensors/{device}/imu", json.dumps(body).encode()))
    return out


def fleet_report(db: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "edgeml", "fleet", "report", "--db", db,
                           *args], capture_output=True, text=True, env=env, timeout=60,
                          check=True)


def test_report_equals_figures_from_the_raw_answers(broker, collector, daemon_factory,
                                                   tmp_path, activity_bundle,
                                                   activity_bundle_v2):
    from sklearn.metrics import f1_score

    db = f"sqlite:///{tmp_path}/fleet.db"
    col = CollectProcess("--source", broker.url, "--db", db, "--client-id", "report-test")
    out = collector("edgeml/+/out/activity")
    sync = collector("edgeml/+/sync/results")
    drift = collector("edgeml/+/sync/drift")
    for dev in DEVICES:
        cfg = write_config(
            tmp_path / f"{dev}.toml", broker=broker, data_dir=tmp_path / dev,
            models=[{"name": "activity", "version": "1", "bundle": activity_bundle},
                    {"name": "activity", "version": "2", "role": "challenger",
                     "bundle": activity_bundle_v2}],
            device_id=dev, pipeline={"topics": [f"sensors/{dev}/imu"]},
            extra='\n[metrics]\nlisten = ""\n[drift]\noutput_window = 10\nmin_window_s = 0\n'
                  '[sync]\nbatch_max_wait_s = 0.05\n')
        daemon_factory(cfg)
    test = load_basicmotions("TEST")
    publish_all(broker, labelled_windows("watch-01", range(0, 20), test)
                + labelled_windows("watch-02", range(20, 40), test))
    answers = [decode_payload(m.payload) | {"device": m.topic.split("/")[1]}
               for m in out.wait_count(40, timeout=60)]

    def all_results(msgs):
        recs = {}
        for m in msgs:
            for r in msgpack.unpackb(m.payload)["records"]:
                recs[r["record_id"]] = r
        return recs
    sync.wait_for(lambda m: len(all_results(m)) >= 80, timeout=60)
    results = all_results(sync.messages)
    # drift windows: every result scored without error feeds its version's output windows of
    # 10 rows (a busy machine may skip a version for a batch: "skipped: version busy"), plus
    # one input window (2,000 samples) per device
    ok = collections.Counter((r["record_id"].split("/")[0], r["version"])
                             for r in results.values() if "error" not in r)
    n_drift = sum(n // 10 for n in ok.values()) + len(DEVICES)

    def drift_records(msgs):
        return {r["record_id"]: r for m in msgs for r in msgpack.unpackb(m.payload)["records"]}
    drifts = drift_records(drift.wait_for(lambda m: len(drift_records(m)) >= n_drift,
                                          timeout=60))
    assert len(drifts) == n_drift
    want = set(results) | set(drifts) | {
        f"{a['device']}/activity/{a['input_seq']}/{a['model']}/{a['version']}/outputs"
        for a in answers}
    assert len(want) == 40 + 80 + n_drift
    assert want <= wait_db(db, want)

    # ---- the figures, computed here from what the devices published ----------------------
    expect = {}
    champ = {(r["record_id"].rsplit("/", 3)[0]): r["output"]["label"]
             for r in results.values() if r["role"] == "champion" and "error" not in r}
    for v in ("1", "2"):
        mine = [r for r in results.values() if r["version"] == v]
        good = [r for r in mine if "error" not in r]
        both = [r for r in good if r["record_id"].rsplit("/", 3)[0] in champ]
        ans = [a for a in answers if a["version"] == v]
        truth = [r["true_label"] for r in good]
        pred = [r["output"]["label"] for r in good]
        lat = [a["latency_ms"] for a in ans]
        scoring = [r["latency_ms"] for r in mine if r.get("latency_ms") is not None]
        expect[v] = {
            "rows": len(mine), "answers": len(ans), "answer_share": len(ans) / len(answers),
            "agreement": np.mean([r["output"]["label"] == champ[r["record_id"].rsplit("/", 3)[0]]
                                  for r in both]),
            "labelled": len(truth),
            "accuracy": np.mean([t == p for t, p in zip(truth, pred, strict=True)]),
            "macro_f1": f1_score(truth, pred, average="macro"),
            "latency_p50_ms": np.percentile(lat, 50) if lat else None,
            "latency_p99_ms": np.percentile(lat, 99) if lat else None,
            "scoring_p50_ms": np.percentile(scoring, 50),
            "scoring_p99_ms": np.percentile(scoring, 99),
            "error_rate": (len(mine) - len(good)) / len(mine),
            "fallback_rate": np.mean([bool(a.get("fallback")) for a in ans]) if ans else None,
            "devices": 2,
        }
        windows = sorted((d for d in drifts.values()
                          if d["kind"] == "output" and d["version"] == f"activity:{v}"),
                         key=lambda d: d["ts"])
        expect[v]["drift"] = {
            "windows": len(windows), **{f"{f}_{agg}": fn([d[f] for d in windows])
                             for f in ("label_psi", "score_psi", "score_ks")
                             for agg, fn in (("mean", np.mean), ("max", max),
                                             ("last", lambda x: x[-1]))}}
        assert len(windows) == sum(ok[(d, v)] // 10 for d in DEVICES)
    inputs = [d for d in drifts.values() if d["kind"] == "input"]
    worst = [max(d["psi"].values()) for d in inputs]
    expect_input = {"windows": 2, "devices": 2, "worst_psi_mean": np.mean(worst),
                    "worst_psi_max": max(worst),
                    "out_of_range_max": max(max(d["out_of_range"].values()) for d in inputs)}
    assert expect["1"]["rows"] == expect["2"]["rows"] == 40
    # the champion answers (a challenger only where the champion was skipped as busy)
    assert expect["1"]["answer_share"] + expect["2"]["answer_share"] == pytest.approx(1.0)
    assert expect["1"]["answer_share"] >= 0.9
    assert all(r["true_label"] in set(test.y) for r in results.values())  # labels carried

    report = json.loads(fleet_report(db, "--json").stdout)
    got = {v["version"]: v for v in report["versions"] if v["pipeline"] == "activity"}
    assert set(got) == {"1", "2"}
    for v, e in expect.items():
        for k, want_v in e.items():
            assert got[v][k] == (pytest.approx(want_v) if want_v is not None else None), (v, k)
    assert report["input_drift"] == {"activity": pytest.approx(expect_input)}
    assert got["1"]["roles"] == ["champion"] and got["2"]["roles"] == ["challenger"]

    # one device, and a time range with nothing in it
    one = json.loads(fleet_report(db, "--json", "--device", "watch-01").stdout)
    assert {v["version"]: v["rows"] for v in one["versions"]} == {"1": 20, "2": 20}
    assert json.loads(fleet_report(db, "--json", "--until", "2000-01-01").stdout
                      )["versions"] == []
    # the table and the charts
    charts = tmp_path / "charts"
    text = fleet_report(db, "--png", str(charts)).stdout
    assert "activity:1" in text and "activity:2" in text and "champion" in text
    assert (charts / "fleet-versions.png").stat().st_size > 10_000
    assert col.terminate() == 0


def test_evidence_api_selects_rows_after_a_mark(tmp_path):
    """What a staged rollout reads: figures per version since a records.id mark."""
    from edgeml.host.collect.evidence import last_record_id, version_evidence
    from edgeml.host.collect.sink import Incoming, Sink

    db = f"sqlite:///{tmp_path}/fleet.db"

    def batch(start, n, label_v2):
        recs = []
        for i in range(start, start + n):
            for v, role, lab in (("1", "champion", "A"), ("2", "canary", label_v2)):
                recs.append({"record_id": f"d1/p/{i}/m/{v}/results", "pipeline": "p",
                             "model": "m", "version": v, "role": role, "ts": float(i),
                             "output": {"label": lab}, "true_label": "A"})
        return Incoming("edgeml/d1/sync/results", msgpack.packb(
            {"schema": 1, "device": "d1", "stream": "results", "sent": 0.0,
             "records": recs}))

    with Sink(db) as sink:
        sink.store([batch(0, 10, "A")])
        mark = last_record_id(db)
        sink.store([batch(10, 10, "B")])
    before = {e.version: e for e in version_evidence(db)}
    after = {e.version: e for e in version_evidence(db, after_id=mark)}
    assert before["2"].rows == 20 and before["2"].agreement == pytest.approx(0.5)
    assert after["2"].rows == 10 and after["2"].agreement == 0.0
    assert after["2"].accuracy == 0.0 and after["1"].accuracy == 1.0
    assert after["2"].last_id == last_record_id(db)
    assert version_evidence(db, devices=["nobody"]) == []
    assert {e.version for e in version_evidence(db, since=15.0)} == {"1", "2"}
    assert version_evidence(db, since=15.0)[0].rows == 5


def test_report_times():
    from edgeml.errors import ConfigError
    from edgeml.host.commands.fleet import parse_time

    now = 1_800_000_000.0
    assert parse_time("30m", now=now) == now - 1800
    assert parse_time("7d", now=now) == now - 7 * 86400
    assert parse_time("1764460800", now=now) == 1764460800.0
    assert parse_time("2025-11-30T00:00", now=now) == 1764460800.0  # UTC when no offset
    assert parse_time("2025-11-30T01:00+01:00", now=now) == 1764460800.0
    assert parse_time(None) is None
    with pytest.raises(ConfigError, match="not a time"):
        parse_time("yesterday")
