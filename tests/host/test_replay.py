"""Replay on a real archive: the real daemon scores the BasicMotions TEST stream live (two
watches, labels in the payloads) and archives it; replay must reproduce what it published,
report scikit-learn's own accuracy, and refuse a snapshot whose archive changed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import Collector, DaemonThread, publish_all, write_config

from edgeml.cli import main
from edgeml.config import load_config
from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.errors import ReplayError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.host.replay import (
    ReplayProgress,
    classification_metrics,
    latency_summary,
    open_slots,
    read_labels,
    render_chart,
    render_table,
    replay,
)
from edgeml.profiles import load_profile
from edgeml.storage.rawlog import RawRecord, open_reader, pipeline_dir

OUT = "edgeml/watch-01/out/activity"
RESULTS = "edgeml/watch-01/sync/results"
V1, V2 = "activity:1", "activity:2"


@dataclass(frozen=True)
class Archive:
    base: Path
    data_dir: Path
    config: Path
    answers: dict          # (topic, input_seq) -> output the daemon published (champion v1)
    results: dict          # (version, topic, input_seq) -> output in the synced results
    snapshot: Path
    truth: dict            # seq -> true activity of the sample's series


def _same_output(a: dict, b: dict) -> bool:
    """Same label, same scores up to float32 rounding: onnxruntime may round a batch of one
    row differently from a batch of many, and the live batching depends on timing."""
    return a["label"] == b["label"] and a["scores"].keys() == b["scores"].keys() and all(
        abs(a["scores"][k] - b["scores"][k]) <= 1e-6 for k in a["scores"])


def _stream(test_set):
    """Two watches interleaved, one JSON message per sample with the series' true label."""
    def one(series, topic):
        items = []
        for s in series:
            for i, row in enumerate(test_set.X[s]):
                body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
                body["id"] = f"s{s}-{i}"
                body["label"] = test_set.y[s]
                items.append((topic, json.dumps(body).encode()))
        return items
    a, b = one(range(0, 20), "sensors/w1/imu"), one(range(20, 40), "sensors/w2/imu")
    return [x for pair in zip(a, b, strict=True) for x in pair]


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, test_set, activity_bundle, activity_bundle_v2) -> Archive:
    """The real daemon (v1 champion, v2 challenger) on a real mosquitto scores the stream;
    then `edgeml log snapshot` cites the archive. Built once for the module."""
    from edgeml.host.broker import MosquittoBroker

    base = tmp_path_factory.mktemp("replay")
    broker = MosquittoBroker(base / "broker")
    broker.start()
    try:
        cfg = write_config(
            base / "edgeml.toml", broker=broker, data_dir=base / "data",
            models=[{"name": "activity", "version": "1", "bundle": activity_bundle},
                    {"name": "activity", "version": "2", "role": "challenger",
                     "bundle": activity_bundle_v2}])
        out = Collector(broker, OUT)
        sync = Collector(broker, RESULTS)
        daemon = DaemonThread(cfg).start()
        try:
            publish_all(broker, _stream(test_set))
            published = out.wait_count(40, timeout=60)

            def synced(msgs):
                return {(r["version"], r["topic"], r["input_seq"]): r["output"]
                        for m in msgs for r in msgpack.unpackb(m.payload)["records"]}
            sync.wait_for(lambda msgs: len(synced(msgs)) >= 80, timeout=60)
            results = synced(sync.messages)
        finally:
            daemon.stop()
            out.close()
            sync.close()
    finally:
        broker.stop()
    answers = {}
    for m in published:
        rec = msgpack.unpackb(m.payload)
        answers[(rec["topic"], rec["input_seq"])] = rec["output"]
    snap = base / "snapshot.json"
    assert main(["log", "snapshot", "--data-dir", str(base / "data"), "--pipeline",
                 "activity", "-o", str(snap)]) == 0
    reader = open_reader(pipeline_dir(base / "data", "activity"))
    truth = {r.seq: json.loads(r.payload)["label"] for r in reader.read()}
    assert len(truth) == 4000
    return Archive(base, base / "data", cfg, answers, results, snap, truth)


@pytest.fixture(scope="module")
def slots(activity_bundle, activity_bundle_v2):
    with open_slots([activity_bundle, activity_bundle_v2], profile=load_profile()) as s:
        yield s


def _assembler(archive: Archive) -> Assembler:
    pcfg = load_config(archive.config).pipeline("activity")
    return Assembler(Decoder.from_pipeline(pcfg), pcfg.window)


def _records(archive: Archive, **filters):
    return open_reader(pipeline_dir(archive.data_dir, "activity")).read(**filters)


def _run(archive: Archive, slots, **kwargs):
    rows: list[dict] = []
    report = replay(_records(archive), _assembler(archive), slots, on_rows=rows.extend,
                    **kwargs)
    return report, rows


@pytest.fixture(scope="module")
def replayed(archive, slots):
    return _run(archive, slots)


@pytest.fixture(scope="module")
def sklearn_truth(test_set):
    """scikit-learn's own predictions and figures for the TEST set, per version."""
    from models import train_activity_model
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y = np.asarray(test_set.y)
    out = {}
    for key, kind in ((V1, "logreg"), (V2, "forest")):
        pred = train_activity_model(kind).predict(test_set.flat())
        labels = sorted(set(y) | set(pred))
        out[key] = {"pred": list(pred), "accuracy": accuracy_score(y, pred),
                    "macro_f1": f1_score(y, pred, average="macro"), "labels": labels,
                    "confusion": confusion_matrix(y, pred, labels=labels).tolist()}
    return out


# ---- (1) the same bundle reproduces what the daemon published ------------------------------
def test_replay_reproduces_live_outputs(archive, replayed):
    report, rows = replayed
    assert report.records == 4000 and report.rejected == 0
    assert report.rows == 40 and len(rows) == 40
    # v1 was the champion: its answers went out on the output topic
    assert {(r["topic"], r["seq"]) for r in rows} == set(archive.answers)
    for r in rows:
        live = archive.answers[(r["topic"], r["seq"])]
        assert _same_output(r["outputs"][V1], live), (r["seq"], r["outputs"][V1], live)
    # v2 was the challenger: its results went upstream through the outbox
    for r in rows:
        assert _same_output(r["outputs"][V2], archive.results[("2", r["topic"], r["seq"])])
        assert _same_output(r["outputs"][V1], archive.results[("1", r["topic"], r["seq"])])
    # each watch was windowed on its own, as live: w1 holds series 0-19, w2 20-39
    w1 = [r for r in rows if r["topic"] == "sensors/w1/imu"]
    assert [r["id"] for r in w1] == [f"s{s}-99" for s in range(20)]


# ---- (2) accuracy equals scikit-learn's on the TEST set ------------------------------------
def test_replay_accuracy_equals_sklearn(replayed, sklearn_truth, test_set):
    report, rows = replayed
    assert report.labels_source == "payload" and report.labelled_rows == 40
    for key in (V1, V2):
        v = report.version(key)
        sk = sklearn_truth[key]
        assert v.labelled_rows == 40
        assert v.accuracy == pytest.approx(sk["accuracy"], abs=1e-12)
        assert v.macro_f1 == pytest.approx(sk["macro_f1"], abs=1e-12)
        assert list(v.confusion.labels) == sk["labels"]
        assert [list(r) for r in v.confusion.matrix] == sk["confusion"]
        # and row by row: the series each window came from got sklearn's label
        by_id = {r["id"]: r["outputs"][key]["label"] for r in rows}
        assert [by_id[f"s{s}-99"] for s in range(40)] == sk["pred"]
        assert sum(v.distribution.values()) == 40
        assert v.distribution == dict(Counter(sk["pred"])) | {}
    # the truth the report used is the payload's label field
    assert Counter(r["label"] for r in rows) == Counter(test_set.y)


# ---- (3) two bundles: the agreement matrix matches the per-row outputs ---------------------
def test_agreement_matrix_matches_rows(replayed):
    report, rows = replayed
    same = sum(r["outputs"][V1]["label"] == r["outputs"][V2]["label"] for r in rows)
    assert report.agreement[0][1] == report.agreement[1][0] == pytest.approx(same / 40)
    assert report.agreement[0][0] == report.agreement[1][1] == 1.0
    assert report.agreement_rows == ((40, 40), (40, 40))
    for i, key in enumerate((V1, V2)):
        v = report.versions[i]
        assert v.key == key and v.rows == 40 and v.errors == 0
        assert v.distribution == dict(Counter(r["outputs"][key]["label"] for r in rows)) | {}
        assert v.latency_batch_ms.count == report.batches == 1
        assert v.latency_row_ms.count == 40 and v.rows_per_s > 0
    d = report.to_dict()
    assert d["agreement"]["versions"] == [V1, V2]
    assert d["agreement"]["matrix"][0][1] == report.agreement[0][1]
    table = render_table(report)
    assert "agreement" in table and f"{report.agreement[0][1]:.4f}" in table


# ---- (4) a labels file keyed by sequence number --------------------------------------------
def test_labels_file_keyed_by_seq(archive, slots, replayed, tmp_path):
    _, rows = replayed
    flip = {"Standing": "Walking", "Walking": "Running", "Running": "Badminton",
            "Badminton": "Standing"}
    # CSV, every sample labelled; the first five w1 windows' samples get a wrong label
    wrong = {r["seq"] for r in rows if r["topic"] == "sensors/w1/imu"
             and r["id"] in {f"s{s}-99" for s in range(5)}}
    csv_path = tmp_path / "labels.csv"
    lines = ["seq,label"] + [f"{seq},{flip[lab] if seq in wrong else lab}"
                             for seq, lab in sorted(archive.truth.items())]
    csv_path.write_text("\n".join(lines) + "\n")
    labels = read_labels(csv_path)
    assert len(labels) == 4000
    report, got = _run(archive, slots, labels=labels)
    assert report.labels_source == "labels" and report.labelled_rows == 40
    for key in (V1, V2):
        expect = np.mean([r["outputs"][key]["label"] == labels[r["seq"]] for r in got])
        assert report.version(key).accuracy == pytest.approx(expect)
    assert {r["label"] for r in got if r["seq"] in wrong} <= set(flip.values())
    # JSON {seq: label} for the w2 windows only: the w1 rows are unlabelled
    w2 = {str(r["seq"]): archive.truth[r["seq"]] for r in rows
          if r["topic"] == "sensors/w2/imu"}
    json_path = tmp_path / "labels.json"
    json_path.write_text(json.dumps(w2))
    report2, got2 = _run(archive, slots, labels=read_labels(json_path))
    assert report2.labelled_rows == 20
    v1 = report2.version(V1)
    assert v1.labelled_rows == 20 and sum(map(sum, v1.confusion.matrix)) == 20
    expect = np.mean([r["outputs"][V1]["label"] == r["label"] for r in got2
                      if r["label"] is not None])
    assert v1.accuracy == pytest.approx(expect)
    # a broken file is one clear error naming the line
    bad = tmp_path / "bad.csv"
    bad.write_text("seq,label\n12,Walking\nx7,Running\n")
    with pytest.raises(ReplayError, match=r"bad.csv: line 3: .*'x7'"):
        read_labels(bad)


# ---- (5) the CLI end to end: table, JSON, PNG, rows ----------------------------------------
def test_cli_writes_table_json_and_chart(archive, activity_bundle_v2, replayed, tmp_path,
                                         capsys):
    out_json, out_png, out_rows = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.jsonl"
    # v1 from the device's model store by NAME:VERSION, v2 from its bundle file
    rc = main(["replay", "--data-dir", str(archive.data_dir), "--pipeline", "activity",
               "activity:1", str(activity_bundle_v2), "--json", str(out_json),
               "--chart", str(out_png), "--rows", str(out_rows), "--batch", "16"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    api, _ = replayed
    doc = json.loads(out_json.read_text())
    assert doc["format"] == "edgeml-replay-report"
    assert doc["records"] == 4000 and doc["rows"] == 40 and doc["batches"] == 3
    assert doc["source"]["settings_from"] == "manifest"
    assert doc["source"]["window"] == {"size": 100, "hop": 100}
    assert [v["key"] for v in doc["versions"]] == [V1, V2]
    for i, v in enumerate(doc["versions"]):
        assert v["accuracy"] == api.versions[i].accuracy
        assert v["distribution"] == api.versions[i].distribution
        assert set(v["latency_row_ms"]) == {"count", "mean", "p50", "p90", "p99", "max"}
    assert doc["agreement"]["matrix"] == [list(r) for r in api.agreement]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    lines = out_rows.read_text().splitlines()
    assert len(lines) == 40 and set(json.loads(lines[0])["outputs"]) == {V1, V2}
    # the table: one aligned line per version under its header
    table = cap.out.splitlines()
    head = next(i for i, line in enumerate(table) if line.lstrip().startswith("VERSION"))
    assert table[head + 1].lstrip().startswith(V1) and table[head + 2].lstrip().startswith(V2)
    assert len({len(table[head]), len(table[head + 1]), len(table[head + 2])}) == 1
    assert f"{api.versions[0].accuracy:.4f}" in table[head + 1]
    assert "edgeml replay: 4,000 records, 40 rows, 2 version(s)" in cap.err
    # with the daemon's config the settings come from the pipeline; --quiet keeps stderr clean
    rc = main(["replay", "--config", str(archive.config), "--pipeline", "activity",
               "--from-seq", "2000", str(activity_bundle_v2), "--json", str(out_json),
               "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == ""
    doc = json.loads(out_json.read_text())
    assert doc["source"]["settings_from"] == "config" and doc["first_seq"] == 2000
    assert doc["rows"] == 20 and doc["versions"][0]["labelled_rows"] == 20
    # --label-field "" ignores the labels in the payloads
    rc = main(["replay", "--config", str(archive.config), "--pipeline", "activity",
               "--label-field", "", str(activity_bundle_v2), "--json", str(out_json),
               "--quiet"])
    doc = json.loads(out_json.read_text())
    assert rc == 0 and doc["labels_source"] is None and doc["versions"][0]["accuracy"] is None
    assert "ACCURACY" not in capsys.readouterr().out


def test_cli_refuses_bundle_that_does_not_fit(archive, activity_bundle, tmp_path, capsys):
    text = archive.config.read_text().replace("size = 100, hop = 100", "size = 50, hop = 50")
    cfg = tmp_path / "edgeml.toml"
    cfg.write_text(text)
    rc = main(["replay", "--config", str(cfg), "--pipeline", "activity", str(activity_bundle)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "expects windows of 100" in err and "pipeline settings from the config" in err
    rc = main(["replay", "--data-dir", str(archive.data_dir), "--pipeline", "activity",
               "activity:7"])
    assert rc == 1 and "activity 7 is not installed" in capsys.readouterr().err


# ---- (6) snapshots: the exact data version, and a changed archive is refused ---------------
def test_snapshot_replays_exactly_and_refuses_changed_archive(archive, activity_bundle,
                                                              tmp_path, capsys):
    snap = json.loads(archive.snapshot.read_text())
    out_json = tmp_path / "r.json"
    rc = main(["replay", "--data-dir", str(archive.data_dir), "--snapshot",
               str(archive.snapshot), str(activity_bundle), "--json", str(out_json), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out_json.read_text())
    assert doc["records"] == snap["records"] == 4000
    assert (doc["first_seq"], doc["last_seq"]) == (snap["first_seq"], snap["last_seq"])
    assert doc["source"]["snapshot_id"] == snap["id"] and doc["source"]["pipeline"] == "activity"
    # a copy of the archive with one payload byte changed after the snapshot was taken
    copy = tmp_path / "data"
    shutil.copytree(archive.data_dir / "rawlog", copy / "rawlog")
    seg = copy / "rawlog" / "activity" / snap["segments"][0]["file"]
    data = bytearray(seg.read_bytes())
    pos = data.index(b'"ax": ') + 7
    data[pos] = ord("9") if data[pos] != ord("9") else ord("8")
    seg.write_bytes(bytes(data))
    out_json.unlink()
    rc = main(["replay", "--data-dir", str(copy), "--snapshot", str(archive.snapshot),
               str(activity_bundle), "--json", str(out_json)])
    err = capsys.readouterr().err
    assert rc == 1 and not out_json.exists()
    assert "replay refused" in err and snap["segments"][0]["file"] in err and "changed" in err


# ---- the parts the daemon never sees: rejected records, progress, no matplotlib -----------
def test_rejected_records_are_counted_and_skipped(archive, slots, replayed):
    _, clean = replayed
    recs = [r for r in _records(archive, end_seq=399) if r.topic == "sensors/w1/imu"]
    assert len(recs) == 200
    bad = [RawRecord(10_000, recs[0].received, "sensors/w1/imu", b"{not json", "x"),
           RawRecord(10_001, recs[0].received, "sensors/w1/imu",
                     json.dumps(dict.fromkeys(BASICMOTIONS_CHANNELS, "x")).encode(), "x")]
    mixed = recs[:50] + bad + recs[50:]
    seen: list[ReplayProgress] = []
    rows: list[dict] = []
    report = replay(mixed, _assembler(archive), slots, batch=1, progress=seen.append,
                    on_rows=rows.extend)
    assert report.records == 202 and report.rejected == 2
    assert report.rejected_by_reason == {"bad_value": 1, "malformed": 1}
    assert report.rows == 2 and report.batches == 2
    live = {(r["topic"], r["seq"]): r["outputs"] for r in clean}
    for r in rows:
        for key in (V1, V2):
            assert _same_output(r["outputs"][key], live[("sensors/w1/imu", r["seq"])][key])
    assert seen[-1].done and seen[-1].records == 202 and seen[-1].rejected == 2
    with pytest.raises(ReplayError, match="given twice"):
        replay([], _assembler(archive), [slots[0], slots[0]])
    with pytest.raises(ReplayError, match="batch must be"):
        replay([], _assembler(archive), slots, batch=0)


def test_progress_lines_and_bar():
    from edgeml.host.commands.replay import ProgressPrinter

    now = [0.0]
    buf = io.StringIO()
    p = ProgressPrinter(buf, 1000, tty=False, clock=lambda: now[0])
    p(ReplayProgress(100, 1, 0, 1.0, 99))
    assert buf.getvalue() == ""  # not 2 s yet
    now[0] = 2.5
    p(ReplayProgress(400, 4, 0, 2.5, 399))
    p(ReplayProgress(500, 5, 0, 2.6, 499))
    now[0] = 5.0
    p(ReplayProgress(1000, 10, 3, 5.0, 999, done=True))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("replay: 400/1,000 records, 4 rows") and "(40%)" in lines[0]
    assert "ETA" in lines[0] and "3 rejected" in lines[1] and len(lines) == 2
    tty = io.StringIO()
    bar = ProgressPrinter(tty, 1000, tty=True, clock=lambda: now[0])
    now[0] = 6.0
    bar(ReplayProgress(250, 2, 0, 1.0, 249))
    assert tty.getvalue().startswith("\r[#######.......................]  25.0% 250/1,000")


def test_chart_skipped_without_matplotlib(archive, activity_bundle, tmp_path):
    """In a Python where matplotlib cannot be imported the chart is skipped, not fatal."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "shadow"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeml", "replay", "--data-dir", str(archive.data_dir),
         "--pipeline", "activity", str(activity_bundle), "--to-seq", "999",
         "--json", str(out_json), "--chart", str(out_png)],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed" in proc.stderr and "chart skipped" in proc.stderr
    assert not out_png.exists() and json.loads(out_json.read_text())["rows"] == 10


# ---- the numpy metrics against scikit-learn ------------------------------------------------
def test_metrics_equal_sklearn_on_uneven_labels():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(7)
    y = rng.choice(["a", "b", "c", "d"], size=500, p=[0.5, 0.3, 0.15, 0.05])
    p = np.where(rng.random(500) < 0.7, y, rng.choice(["a", "b", "c", "e"], size=500))
    acc, f1, cm = classification_metrics(Counter(zip(y.tolist(), p.tolist(), strict=True)))
    labels = sorted(set(y) | set(p))
    assert acc == pytest.approx(accuracy_score(y, p))
    assert f1 == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert list(cm.labels) == labels
    assert [list(r) for r in cm.matrix] == confusion_matrix(y, p, labels=labels).tolist()
    vals, weights = rng.random(50), rng.integers(1, 300, size=50)
    s = latency_summary(vals.tolist(), weights.tolist())
    rep = np.repeat(vals, weights)
    for q, got in ((50, s.p50), (90, s.p90), (99, s.p99)):
        assert got == np.percentile(rep, q, method="inverted_cdf")
    assert s.count == weights.sum() and s.mean == pytest.approx(rep.mean())


def test_render_chart_writes_png_for_one_version(replayed, tmp_path):
    report, _ = replayed
    from dataclasses import replace

    one = replace(report, versions=report.versions[:1], agreement=((1.0,),),
                  agreement_rows=((40,),))
    path = render_chart(one, tmp_path / "one.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---- single-sample models, integer labels ---------------------------------------------------
def test_anomaly_model_on_single_samples_with_int_labels(tmp_path):
    """Daphnet samples (no windows) through the IsolationForest bundle: labels are ints
    (1 / -1) and match scikit-learn; a CSV labels file ("1", "-1") compares equal to them."""
    from models import build_gait_anomaly_bundle, train_gait_anomaly_model

    from edgeml.host.datasets import load_daphnet

    data = load_daphnet()
    x = data.X[:2000]
    bundle = build_gait_anomaly_bundle(tmp_path)
    recs = [RawRecord(i, 1000.0 + i, "gait/p1", json.dumps(
        dict(zip(data.channels, map(float, row), strict=True))).encode(), "seg")
        for i, row in enumerate(x)]
    sk = train_gait_anomaly_model().predict(x)
    truth = np.where(np.arange(len(x)) % 3 == 0, -1, 1)  # made-up truth: a known accuracy
    labels_csv = tmp_path / "truth.csv"
    labels_csv.write_text("".join(f"{i},{t}\n" for i, t in enumerate(truth)))
    rows: list[dict] = []
    with open_slots([bundle], profile=load_profile()) as gait:
        report = replay(recs, Assembler(Decoder(features=tuple(data.channels)), None), gait,
                        batch=100, labels=read_labels(labels_csv), on_rows=rows.extend)
    assert report.rows == 2000 and report.batches == 20
    assert 0 < (sk == -1).sum() < 2000
    assert [r["outputs"]["gait:1"]["label"] for r in rows] == sk.tolist()
    v = report.version("gait:1")
    assert v.kind == "anomaly"
    assert v.distribution == {"-1": int((sk == -1).sum()), "1": int((sk == 1).sum())}
    assert v.accuracy == pytest.approx(float(np.mean(sk == truth)))
    assert v.confusion.labels == ("-1", "1")
