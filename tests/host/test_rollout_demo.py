"""``edgeml demo --fleet 3`` as a user runs it: a real subprocess, a private mosquitto, three
daemons, a collector, real data. The rollout's figures are recomputed here from the raw
records in fleet.db, never taken from what the demo says about itself."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys


def test_fleet_demo_halts_the_bad_version_and_rolls_out_the_good_one(broker, tmp_path):
    out = tmp_path / "fleet"
    proc = subprocess.run([sys.executable, "-m", "edgeml", "demo", "--fleet", "3", "--broker",
                           broker.url, "--out", str(out)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    bad, good = summary["rollouts"]["bad"], summary["rollouts"]["good"]
    devices = summary["devices"]
    assert len(devices) == 3

    # the shuffled-label version: one wave, one device, halted on disagreement, retired
    assert bad["version"] == "3" and bad["state"] == "halted"
    (wave,) = bad["waves_detail"]
    (first,) = wave["devices"]
    assert bad["devices"][first]["state"] == "rolled_back"
    (breach,) = wave["verdict"]["breaches"]
    assert breach["figure"] == "disagreement" and breach["devices"] == [first]
    # the good version: every wave passed, every device runs it; v3 runs nowhere
    assert good["version"] == "2" and good["state"] == "done"
    assert sorted(d for w in good["waves_detail"] for d in w["devices"]) == sorted(devices)
    assert all(w["verdict"]["passed"] for w in good["waves_detail"])
    assert summary["active_at_end"] == {d: ["1:champion", "2:canary"] for d in devices}

    # recompute the halting figure from the raw result records the collector stored
    ev = wave["verdict"]["evidence"]["devices"][first]
    since = bad["devices"][first]["active_at"]
    db = sqlite3.connect(out / "fleet.db")
    rows = [json.loads(r[0]) for r in db.execute(
        "SELECT record FROM records WHERE stream = 'results' AND device = ?", (first,))]
    label = {}
    for r in rows:
        if r["ts"] >= since and r["ts"] <= ev["last_ts"]:
            label.setdefault((r["input_seq"], r.get("row")), {})[
                (r["version"], r["role"])] = r["output"]["label"]
    pairs = [(v[("3", "canary")], v[("1", "champion")]) for v in label.values()
             if ("3", "canary") in v and ("1", "champion") in v]
    assert len(pairs) == ev["compared"] >= 400
    assert sum(a != b for a, b in pairs) == ev["disagreed"]
    assert ev["disagreed"] / ev["compared"] > 0.25

    # what the user sees: the report, the halt and why, the final state
    assert "fleet report" in proc.stderr and "motion:1" in proc.stdout
    assert "HALT: disagreement with the champion" in proc.stderr
    assert f"{first}: rolled back" in proc.stderr
    assert "rollout of motion 3: halted after 1 wave(s)" in proc.stdout
    assert "rollout of motion 2: done after 3 wave(s)" in proc.stdout
