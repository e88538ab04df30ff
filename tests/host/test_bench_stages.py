"""The stage breakdown of the daemon's CPU: the classifier on known stacks, and
benchmarks/bench_stages.py run small against the real daemon, broker and models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from edgeml.host.bench.stages import OTHER, WAIT, classify, read_raw, stage_table

ROOT = Path(__file__).resolve().parents[2]


def _frame(func: str, path: str, line: int = 1) -> str:
    return f"{func} ({path}:{line})"


SCORING = _frame("PipelineRuntime._score", "edgeml/core/scoring.py")
ANSWERS = _frame("Egress.answers", "edgeml/core/egress.py")
PAHO = _frame("Client._send_publish", "paho/mqtt/client.py")


def test_a_sample_goes_to_its_innermost_stage() -> None:
    # the answer packer called from the scoring stage is answers, not scoring; the paho
    # publish it makes is transport
    assert classify([SCORING]) == "scoring stage (batches, outcomes)"
    assert classify([SCORING, ANSWERS]) == "answers and records packed"
    assert classify([SCORING, ANSWERS, PAHO]) == "transport (paho, sockets)"
    # numpy under the decoder is the decoder's; session.run is ONNX wherever it is called
    assert classify([_frame("Decoder._check", "edgeml/core/decode.py"),
                     _frame("asarray", "numpy/_core/numeric.py")]) == "decode (msgpack, checks)"
    assert classify([SCORING, _frame("LoadedModel._run", "edgeml/core/model.py")]) == \
        "onnx session.run"
    assert classify([_frame("EpollSelector.select", "selectors.py")]) == WAIT
    assert classify([_frame("main", "somewhere_else.py")]) == OTHER


def test_the_table_shares_the_busy_samples_and_keeps_the_wait_apart() -> None:
    lines = [
        f"thread (1): MainThread;{SCORING} 30\n",
        f"thread (1): MainThread;{SCORING};{ANSWERS} 10\n",
        f"thread (1): MainThread;{_frame('EpollSelector.select', 'selectors.py')} 60\n",
        # start-up imports are not a phase's work
        "thread (1): MainThread;_find_and_load (<frozen importlib._bootstrap>:1) 500\n",
        "garbage without a count\n",
    ]
    counts = read_raw(lines)
    assert counts == Counter({"scoring stage (batches, outcomes)": 30,
                              "answers and records packed": 10, WAIT: 60})
    rows = stage_table(counts, cpu_ms_per_msg=0.4)
    assert [r["stage"] for r in rows] == ["scoring stage (batches, outcomes)",
                                         "answers and records packed", WAIT]
    assert rows[0]["share"] == pytest.approx(0.75) and rows[0]["ms_per_msg"] == pytest.approx(0.3)
    assert rows[1]["ms_per_msg"] == pytest.approx(0.1)
    assert rows[2]["share"] == pytest.approx(0.6) and rows[2]["ms_per_msg"] is None


def _script():
    spec = importlib.util.spec_from_file_location("bench_stages",
                                                  ROOT / "benchmarks" / "bench_stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_script_refuses_a_bad_phase_naming_it(capsys) -> None:
    with pytest.raises(SystemExit):
        _script().parse_args(["--phases", "paced,burst"])
    assert "--phases: burst" in capsys.readouterr().err


def test_the_script_profiles_the_real_daemon(tmp_path: Path) -> None:
    bench = _script()
    out = tmp_path / "stages.json"
    profile = shutil.which("py-spy") is not None
    # the paced phase only: the flood is the same rounds with other figures (and the suite's
    # time is better spent elsewhere)
    argv = ["--phases", "paced", "--rounds", "1", "--paced-messages", "500",
            "--out", str(out)] + ([] if profile else ["--no-profile"])
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["phases"]) == {"paced"}
    for phase in report["phases"].values():
        assert phase["answered_all"], phase["rounds"]
        assert phase["cpu_ms_per_msg"] > 0
        assert phase["sleeps_per_msg"] >= 0
        # the plain script and its durable twin answered the same stream in its place
        refs = phase["references"]
        assert set(refs) == {"plain script", "plain script, durable"}
        for ref in refs.values():
            assert ref["answered_all"], ref["rounds"]
            assert ref["cpu_ms_per_msg"] > 0
    if not profile:
        pytest.skip("py-spy is not installed: the stage table was not checked")
    # the durable twin really kept what it was sent: every payload, every version's result
    work_files = report["phases"]["paced"]["references"]["plain script, durable"]
    assert work_files["kept"] == {"archived": 500, "results": 1500}
    paced = report["phases"]["paced"]
    assert paced["profiled_round"]["answered"] == 500
    stages = {r["stage"]: r for r in paced["stages"]}
    # the daemon's own work shows up where it belongs (a short round on a busy machine
    # may catch no sample of a small stage such as session.run: the large ones are asked)
    assert stages["transport (paho, sockets)"]["samples"] > 0
    busy = [r for r in paced["stages"] if r["stage"] != WAIT]
    named = [r for r in busy if r["samples"] and r["stage"] != "other"]
    assert len(named) >= 4, busy
    assert stages.get("other", {"share": 0.0})["share"] < 0.5, busy
    assert sum(r["share"] for r in busy) == pytest.approx(1.0)
    assert sum(r["ms_per_msg"] for r in busy) == pytest.approx(paced["cpu_ms_per_msg"])
