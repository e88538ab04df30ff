"""examples/README.md followed step by step, with its own commands and config, against a
private mosquitto with the stock configuration (as installed): every one of the 40 windows
is answered, and each answer is scikit-learn's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import Collector

from edgeml.host.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]
README = REPO / "examples" / "README.md"


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def block(blocks: list[str], *needles: str) -> str:
    hits = [b for b in blocks if all(n in b for n in needles)]
    assert len(hits) == 1, f"examples/README.md: one sh block with {needles}, found {len(hits)}"
    return hits[0]


def bash(script: str, cwd: Path, env: dict, timeout: float = 300) -> str:
    r = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{script}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto-clients")
def test_examples_readme_answers_every_window_on_a_stock_broker(tmp_path):
    blocks = sh_blocks(README.read_text())
    # the commands as a user runs them: `edgeml` and `python` from this tree
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, cmd in (("edgeml", f'"{sys.executable}" -m edgeml'),
                      ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    here = tmp_path / "examples"

    # 1. the key and the two bundles (the block starts with `cd examples`)
    out = bash(block(blocks, "edgeml keygen", "edgeml convert"), tmp_path, env)
    assert ("basicmotions.toml: OK (device watch-gw, profile x86-gateway, 1 pipeline(s), "
            "2 model slot(s))") in out

    broker = MosquittoBroker(tmp_path / "broker", tuned=False).start()
    answers = Collector(broker, "edgeml/watch-gw/out/activity", "edgeml/watch-gw/status")
    daemon = None
    try:
        # 2. run it (the README's --broker, pointing at this broker)
        run_cmd = "edgeml run --config basicmotions.toml"
        assert run_cmd in [b.strip() for b in blocks]
        daemon = subprocess.Popen([*run_cmd.split(), "--broker", broker.url], cwd=here, env=env,
                                  stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        log: list[str] = []

        def follow() -> None:
            for line in daemon.stderr:  # type: ignore[union-attr]
                log.append(line)
                if "ready:" in line:
                    ready.set()
        threading.Thread(target=follow, daemon=True).start()
        assert ready.wait(60), "".join(log)

        # 3. feed it: the single sample by hand, then the TEST set
        one = block(blocks, "mosquitto_pub -t sensors/watch-00/imu")
        one = "\n".join(line for line in one.splitlines() if "mosquitto_sub" not in line)
        bash(one.replace("mosquitto_pub ", f"mosquitto_pub -p {broker.port} "), here, env)
        stream = block(blocks, "with open(\"watch.jsonl\"", "edgeml feed")
        assert "mosquitto_pub" not in stream
        fed = bash(stream.replace("edgeml feed watch.jsonl --topic sensors/watch-01/imu",
                                  "edgeml feed watch.jsonl --topic sensors/watch-01/imu "
                                  f"--broker {broker.url}"), here, env)
        assert "sent 4000 message(s) to sensors/watch-01/imu" in fed

        got = answers.wait_count(40, topic="edgeml/watch-gw/out/activity", timeout=90)
        docs = [json.loads(m.payload) for m in got if m.topic.endswith("/out/activity")]

        def sequence(msgs):
            st = [json.loads(m.payload) for m in msgs if m.topic.endswith("/status")]
            seq = st[-1]["pipelines"]["activity"]["sequence"] if st else {}
            return seq.get("numbered", 0) >= 4001
        last = answers.wait_for(sequence, timeout=30)
    finally:
        answers.close()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        broker.stop()

    import joblib

    data = np.load(here / "test.npz", allow_pickle=True)
    expected = joblib.load(here / "activity-1.joblib").predict(data["X"])
    assert len(docs) == 40
    by_window = {d["id"] // 100: d for d in docs}
    assert sorted(by_window) == list(range(40))
    for s, d in by_window.items():
        assert d["version"] == "1" and d["id"] == s * 100 + 99
        assert d["output"]["label"] == expected[s], (s, d)
    status = [json.loads(m.payload) for m in last if m.topic.endswith("/status")][-1]
    seq = status["pipelines"]["activity"]["sequence"]
    assert seq["gaps"] == 0 and seq["missing"] == 0 and seq["sources"] == 2
    assert "dropped" not in broker.log_path.read_text()
