"""Smoke tests of ``edgeml bench``: tiny run sizes, real broker, real models, real data.

They check the structure and consistency of the reports (every message answered, percentiles
ordered, ratios computed from the figures shown), never the speed: the machine is shared.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from models import build_activity_bundle, build_gait_anomaly_bundle

from edgeml.cli import main
from edgeml.errors import BenchError
from edgeml.host.bench.e2e import E2ESettings, require_host_extra, run_e2e
from edgeml.host.bench.models import emulate_profile, parse_batches, run_models_bench
from edgeml.host.bench.report import render_markdown, render_table, write_report
from edgeml.profiles import load_profile


def test_models_bench_reports_each_bundle_and_batch(tmp_path: Path) -> None:
    bundles = [build_activity_bundle(tmp_path), build_gait_anomaly_bundle(tmp_path)]
    before = os.sched_getaffinity(0)
    report = run_models_bench(bundles, profile="x86-gateway", batches=(1, 4), seconds=0.05)
    assert os.sched_getaffinity(0) == before  # the emulation is undone afterwards
    assert report["kind"] == "models"
    assert "emulation" in report["emulation"]["note"]
    assert report["machine"]["onnxruntime"]
    activity, gait = report["results"]
    assert activity["data"].startswith("BasicMotions TEST: 40 windows of 100")
    assert gait["data"].startswith("Daphnet")
    for r in report["results"]:
        assert r["load_ms"] > 0 and r["model_bytes"] > 0
        assert [b["batch"] for b in r["batches"]] == [1, 4]
        for b in r["batches"]:
            assert b["calls"] >= 20
            assert 0 < b["p50_ms"] <= b["p99_ms"] <= b["max_ms"]
            assert b["rows_per_s"] == pytest.approx(b["batch"] * b["calls"] / b["seconds"])
    written = write_report(report, tmp_path / "out")
    assert json.loads(written["json"].read_text())["results"][0]["name"] == "activity"
    assert "| activity |" in written["markdown"].read_text()
    assert "gait" in render_table(report)


def test_emulation_pins_to_profile_cores() -> None:
    prof = load_profile("x86-gateway")
    one = type(prof)(**{**prof.__dict__, "cpu_cores": 1})
    with emulate_profile(one) as emu:
        assert len(os.sched_getaffinity(0)) == 1
        assert emu.affinity == (min(os.sched_getaffinity(0)),)
    assert len(os.sched_getaffinity(0)) == emu.host_cores


def test_parse_batches_refuses_bad_values() -> None:
    assert parse_batches("1, 8,64") == (1, 8, 64)
    with pytest.raises(BenchError, match="--batch: 'x'"):
        parse_batches("1,x")
    with pytest.raises(BenchError, match="at least 1"):
        parse_batches("0")


def test_e2e_side_by_side_small(tmp_path: Path, broker) -> None:
    settings = E2ESettings(
        out_dir=tmp_path / "run", broker_url=broker.url, paced_rate=400.0, paced_seconds=0.5,
        messages=300, versions=(1,), models=("light",), onnx_seconds=0.05,
        phase_timeout_s=20.0, burst_messages=300, samples_per_message=10, samples_messages=30,
        affinity=("split",),
    )
    lines: list[str] = []
    report = run_e2e(settings, progress=lines.append)
    assert not report["errors"], report["errors"]
    assert any("first answer" in s for s in lines)  # progress is shown while it runs
    variants = {r["variant"] for r in report["runs"]}
    assert variants == {"raw", "plain", "edgeml", "edgeml-nosync", "edgeml-qos0"}
    assert {r["affinity"] for r in report["runs"]} == {"split"}
    sent = {"paced": 200, "max": 300, "burst": 300, "samples": 30}
    for run in report["runs"]:
        want = ([m for m in sent if m in ("max", "samples")]
                if run["variant"] == "edgeml-nosync" else list(sent))
        assert list(run["phases"]) == want
        for mode, ph in run["phases"].items():
            assert ph["sent"] == sent[mode]
            assert ph["answered"] == ph["sent"], (run["variant"], mode, ph)
            assert ph["pinned"] and ph["qos"] == (1 if mode == "burst" else 0)
            if mode == "samples":  # 10 samples per message
                assert ph["rows_per_s"] == pytest.approx(10 * ph["msgs_per_s"])
            assert ph["msgs_per_s"] > 0 and ph["cpu_s"] >= 0
            assert 0 <= ph["p50_ms"] <= ph["p99_ms"] <= ph["max_ms"]
    edgeml = next(r for r in report["runs"] if r["variant"] == "edgeml")
    assert 0 < edgeml["start"]["first_answer_s"] < settings.start_timeout_s
    assert edgeml["host_libraries_loaded"] == []  # no scikit-learn on the device path
    assert edgeml["rss_bytes"] > report["bare"][0]["python_onnxruntime_bytes"] > 0
    limits = {r["batch"]: r for r in report["scoring_limit"]}
    max_batch = load_profile("x86-gateway").batching.max_batch  # the profile's batch beside 1
    assert set(limits) == {1, max_batch} and all(r["rows_per_s"] > 0 for r in limits.values())
    ratio = next(r for r in report["ratios"] if r["mode"] == "max")
    nosync = next(r for r in report["runs"] if r["variant"] == "edgeml-nosync")
    assert ratio["sync_on_vs_off"] == pytest.approx(
        edgeml["phases"]["max"]["msgs_per_s"] / nosync["phases"]["max"]["msgs_per_s"])
    assert {r["mode"] for r in report["ratios"]} == set(sent)
    if "samples" in sent:  # what syncing costs a flood of ten-sample messages
        sratio = next(r for r in report["ratios"] if r["mode"] == "samples")
        assert sratio["sync_on_vs_off"] == pytest.approx(
            edgeml["phases"]["samples"]["msgs_per_s"]
            / nosync["phases"]["samples"]["msgs_per_s"])
    plain_max = next(r for r in report["runs"] if r["variant"] == "plain")["phases"]["max"]
    assert ratio["edgeml_vs_plain_msgs"] == pytest.approx(
        edgeml["phases"]["max"]["msgs_per_s"] / plain_max["msgs_per_s"])
    # the parity variant: the same daemon answering at QoS 0, as the plain script does
    q0 = next(r for r in report["runs"] if r["variant"] == "edgeml-qos0")
    assert "output_qos = 0" in q0["config"] and "output_qos" not in edgeml["config"]
    assert ratio["qos0_vs_plain_msgs"] == pytest.approx(
        q0["phases"]["max"]["msgs_per_s"] / plain_max["msgs_per_s"])
    # sync on keeps up: the max phase's outputs reached upstream, each answered one once
    emax = edgeml["phases"]["max"]
    assert emax["synced"] == emax["answered"] and emax["unsynced"] == 0
    assert emax["sync_lag_s"] is not None and emax["sync_lag_s"] >= 0
    assert emax["cpu_ms_per_msg_with_sync"] >= emax["cpu_ms_per_msg"]
    assert "synced" not in nosync["phases"]["max"] and "synced" not in edgeml["phases"]["paced"]
    targets = {t["id"]: t for t in report["targets"]}
    assert {"p99", "rss", "first_answer", "no_sklearn", "p50_vs_plain", "cpu_vs_plain",
            "max_vs_plain", "sync_on_vs_off", "sync_lag", "samples_vs_plain",
            "burst_vs_plain"} <= set(targets)
    assert targets["sync_lag"]["value"] == emax["sync_lag_s"]
    assert targets["sync_lag"]["met"] == (emax["sync_lag_s"] <= 2.0)
    assert targets["max_vs_plain"]["value"] == pytest.approx(ratio["edgeml_vs_plain_msgs"])
    assert targets["sync_on_vs_off"]["value"] == pytest.approx(ratio["sync_on_vs_off"])
    assert targets["sync_on_vs_off"]["met"] == (ratio["sync_on_vs_off"] >= 0.9)
    assert all(t["met"] in (True, False, None) for t in report["targets"])
    written = write_report(report, tmp_path / "run", latest_dir=tmp_path, charts=True)
    reread = json.loads(written["latest_json"].read_text())
    assert [t["met"] for t in reread["targets"]] == [t["met"] for t in report["targets"]]
    assert written["latest_markdown"].exists()
    assert (tmp_path / "run" / "throughput.png").stat().st_size > 1000
    md = render_markdown(report)
    assert "## Targets" in md and "TCP_NODELAY" in md
    assert "plain" in render_table(report)


def test_cli_bench_refuses_bad_flag_with_one_line(capsys) -> None:
    assert main(["bench", "e2e", "--versions", "5", "--out", "/nonexistent/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--versions: 5" in err[0]


def test_e2e_names_the_missing_host_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # import skl2onnx -> ImportError
    with pytest.raises(BenchError, match=r"host extra \(missing: skl2onnx\).*edgeml\[host\]"):
        require_host_extra()


def test_a_target_of_zero_is_checked_without_a_ratio() -> None:
    from edgeml.host.bench.report import _check

    lost = _check("burst_lost", "nothing lost", 12, 0, higher=False, unit="msgs")
    assert lost["met"] is False and lost["missed_by"] == "over by 12 msgs"
    assert _check("burst_lost", "nothing lost", 0, 0, higher=False, unit="msgs")["met"] is True
    assert "1.20x the limit" in _check("p99", "p99", 6.0, 5.0, higher=False,
                                       unit="ms")["missed_by"]


def test_the_sync_watch_counts_a_grouped_record_for_its_message(tmp_path):
    """The bench's upstream watch reads each record's input id; a batch message's rows arrive
    as one grouped record, counted once under its first row's id."""
    import msgpack
    import numpy as np

    from edgeml.host.bench.baselines import _save_synced

    batch = {"schema": 1, "records": [
        {"record_id": "d/gait/1/m/1/outputs", "id": 1000005, "output": 1},
        {"record_id": "d/gait/2.0-1/m/1/outputs", "input_seq": 2,
         "rows": [{"row": 0, "id": "2000001:0"}, {"row": 1, "id": "2000001:1"}]},
        {"record_id": "d/gait/3/m/1/outputs", "id": "not a number"}]}
    _save_synced(str(tmp_path / "s"), [7, 9], [msgpack.packb(batch), b"\xc1 garbage"])
    assert np.load(tmp_path / "s.ids.npy").tolist() == [1000005, 2000001, -1]
    assert np.load(tmp_path / "s.recv_ns.npy").tolist() == [7, 7, 7]
