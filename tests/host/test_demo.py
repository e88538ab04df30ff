"""``edgeml demo`` end to end, as a user runs it: a real subprocess, real brokers, real data.

The demo's own figures are checked against scikit-learn trained independently here (the same
recipe, :func:`models.train_activity_model`), never against what the demo says about itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest

from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

KINDS = {"1": "forest", "2": "mlp", "3": "logreg"}  # edgeml.host.demo.VERSIONS
OUT = "edgeml/edge-demo/out/activity"


@pytest.fixture(scope="module")
def sklearn_truth():
    """Per version: scikit-learn's own labels for the 40 TEST windows, and its accuracy."""
    from models import train_activity_model

    test = load_basicmotions("TEST")
    y = np.asarray(test.y)
    out = {}
    for version, kind in KINDS.items():
        pred = train_activity_model(kind).predict(test.flat())
        out[version] = {"labels": [str(p) for p in pred], "accuracy": float(np.mean(pred == y))}
    return out


def run_demo(args: list[str], *, env: dict | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeml", "demo", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def check_accuracy(summary: dict, sklearn_truth: dict) -> None:
    """Every version's accuracy equals scikit-learn's on the same TEST set: over the whole
    set (the offline replay of the archive) and window by window live (the per-version
    results that came back over the upstream sync topic)."""
    truth = [str(y) for y in load_basicmotions("TEST").y]
    for version, ref in sklearn_truth.items():
        v = summary["versions"][f"activity:{version}"]
        assert v["sklearn_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert v["replay"]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert v["replay"]["rows"] == 40 and v["replay"]["labelled_rows"] == 40
        live = {int(i): lab for i, lab in v["live"]["predictions"].items()}
        assert live, f"version {version} scored nothing live"
        assert live == {i: ref["labels"][i] for i in live}
        hits = sum(ref["labels"][i] == truth[i] for i in live)
        assert v["live"]["correct"] == hits
        assert v["live"]["accuracy"] == pytest.approx(hits / len(live), abs=1e-12)


def test_demo_against_a_private_broker(broker, tmp_path, sklearn_truth):
    out = tmp_path / "demo"
    proc = run_demo(["--broker", broker.url, "--no-pacing", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["broker"] == {"kind": "external", "url": broker.url, "pid": None}
    check_accuracy(summary, sklearn_truth)

    # without pacing the push and the promotion happen at exact points of the stream
    a = summary["answers"]
    assert a["total"] == 40 and a["fallbacks"] == 0
    assert a["by_version"] == {"activity:1": 27, "activity:3": 13}
    v = summary["versions"]
    assert [v[f"activity:{k}"]["live"]["windows"] for k in "123"] == [40, 40, 26]
    assert [v[f"activity:{k}"]["role_at_end"] for k in "123"] == \
        ["challenger", "shadow", "champion"]
    assert v["activity:3"]["delivered"] == "pushed over MQTT"
    kinds = [e["what"] for e in summary["events"]]
    assert kinds.index("push") < kinds.index("active") < kinds.index("promote") < \
        kinds.index("promoted")

    # archived and synced: every accepted sample, every answer and every version's result
    assert summary["archive"]["records"] == 4000
    assert summary["daemon"]["accepted"] == 4000 and summary["daemon"]["rejected"] == 0
    assert summary["sync"]["upstream_records"]["outputs"] == 40
    assert summary["sync"]["upstream_records"]["results"] == 40 + 40 + 26
    assert summary["sync"]["outbox"]["backlog"] == 0
    # the push of activity:3 is in the deployment history (a promotion's watch outlasts the demo)
    assert summary["sync"]["upstream_records"]["deploy"] >= 1
    assert summary["sync"]["uplink"]["records_sent"] == sum(
        summary["sync"]["upstream_records"].values())

    # the live view and the printed summary
    assert proc.stderr.count("window ") >= 40 and "running accuracy" in proc.stderr
    assert "deploy activity 3: active" in proc.stderr
    assert "activity:3" in proc.stdout and "replay" in proc.stdout

    # one folder with everything, and a config that edgeml run accepts as it is
    for rel in ("edgeml.toml", "keys/demo.key", "keys/demo.pub", "daemon.log", "replay.json",
                "bundles/activity-1.edgeml", "bundles/activity-2.edgeml",
                "bundles/activity-3.edgeml", "data/rawlog/activity", "data/models/activity/3"):
        assert (out / rel).exists(), rel
    check = subprocess.run([sys.executable, "-m", "edgeml", "run", "--config",
                            str(out / "edgeml.toml"), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_demo_falls_back_to_the_embedded_broker(tmp_path, sklearn_truth):
    env = {k: v for k, v in os.environ.items() if k != "EDGEML_MOSQUITTO"}
    env["PATH"] = os.path.dirname(sys.executable)  # no mosquitto on it
    out = tmp_path / "demo"
    proc = run_demo(["--no-pacing", "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded amqtt broker" in proc.stderr and "mosquitto not found" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["broker"]["kind"] == "embedded"
    assert summary["answers"]["total"] == 40
    check_accuracy(summary, sklearn_truth)
    assert not (out / "broker").exists()  # no mosquitto was started


def test_demo_paced_keep_then_ctrl_c_stops_everything(tmp_path, sklearn_truth):
    """Default broker choice (mosquitto on PATH), paced stream with the push happening while
    it flows, --keep: the daemon answers after the summary; Ctrl-C stops it and mosquitto."""
    from edgeml.host.broker import mosquitto_path

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeml", "demo", "--speed", "400", "--keep", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waiting = threading.Event()
        lines: list[str] = []

        def read_stderr() -> None:
            for line in proc.stderr:
                lines.append(line)
                if "Ctrl-C stops" in line:
                    waiting.set()
        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        assert waiting.wait(120), "".join(lines[-30:])
        assert any(str(out / "edgeml.toml") in line for line in lines)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["broker"]["kind"] == "mosquitto"
        assert summary["answers"]["total"] == 40
        assert summary["stream"]["pacing"] is True
        check_accuracy(summary, sklearn_truth)

        # still running: one more window gets an answer from the promoted champion
        answer = _one_window(summary["broker"]["url"], series=5)
        assert answer["version"] == "3"
        assert answer["output"]["label"] == sklearn_truth["3"]["labels"][5]

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    with pytest.raises(ProcessLookupError):  # the demo's mosquitto is gone
        os.kill(summary["broker"]["pid"], 0)


def _one_window(url: str, series: int) -> dict:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    test = load_basicmotions("TEST")
    got: list[dict] = []
    done = threading.Event()
    subscribed = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_connect = lambda cl, *a: cl.subscribe(OUT, 1)
    c.on_subscribe = lambda *a: subscribed.set()

    def on_message(cl, userdata, m):
        rec = msgpack.unpackb(m.payload)
        if rec["id"] == f"k{series}-99":
            got.append(rec)
            done.set()
    c.on_message = on_message
    c.connect(host, int(port))
    c.loop_start()
    try:
        assert subscribed.wait(10)
        infos = []
        for i, row in enumerate(test.X[series]):
            body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
            body["id"] = f"k{series}-{i}"
            infos.append(c.publish("sensors/watch-02/imu", json.dumps(body), qos=1))
        for info in infos:
            info.wait_for_publish(10)
        assert done.wait(30), "no answer from the kept daemon"
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def test_bad_options_are_one_line_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = run_demo(["--out", str(tmp_path / "full"), "--no-pacing"])
    assert proc.returncode == 1
    assert "not empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_demo(["--speed", "0", "--out", str(tmp_path / "new")])
    assert proc.returncode == 1 and "--speed" in proc.stderr
    assert not (tmp_path / "new").exists()
    proc = run_demo(["--broker", "http://x", "--out", str(tmp_path / "new")])
    assert proc.returncode == 1 and "mqtt://" in proc.stderr
