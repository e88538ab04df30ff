"""``edgeml status``'s drift column from retained status documents (pure logic; the device
side is tested with a live drift alert in tests/core/test_drift_watch.py)."""

from __future__ import annotations

from edgeml.host.commands.status import drift_summary, render, summarize


def _doc(**pipes) -> dict:
    return {"state": "online", "ts": 100.0, "pipelines": pipes}


def test_a_device_without_a_drift_watch_shows_a_dash():
    row = summarize("old", _doc(activity={"versions": []}), 100.0, 60.0)
    assert row["pipelines"]["activity"]["drift"] is None
    line = render([row]).splitlines()[1]
    assert line.split()[7] == "-"  # DRIFT, before MODELS ("LAST SEEN" is 2 words)


def test_levels_worst_channel_output_psi_and_alerts():
    drift = {"reference": "gait:1", "windows": 3, "level": "moderate",
             "psi": {"ankle_vert": 0.02, "leg_vert": 0.17},
             "outputs": {"gait:1": {"score_psi": 0.31, "score_ks": 0.2, "label_psi": 0.05}},
             "alerts": ["output_drift:gait:1", "sensor_stuck:s/p1/gait|leg_vert"]}
    s = drift_summary(drift)
    assert s["channel"] == "leg_vert" and s["max_psi"] == 0.17 and s["level"] == "moderate"
    assert s["output_psi"] == {"gait:1": 0.31}
    row = summarize("d", _doc(gait={"drift": drift}), 100.0, 60.0)
    assert ("moderate leg_vert 0.17 ALERT output_drift:gait:1,sensor_stuck:s/p1/gait|leg_vert"
            in render([row]))


def test_before_the_first_window_and_without_a_reference():
    waiting = {"reference": "activity:1", "windows": 0, "level": None, "psi": {},
               "alerts": []}
    bare = {"reference": None, "windows": 2, "level": None, "psi": {},
            "alerts": ["sensor_stuck:s/a|gx"]}
    row = summarize("d", _doc(a={"drift": waiting}, b={"drift": bare}), 100.0, 60.0)
    text = render([row])
    assert "a: no window yet; b: no reference ALERT sensor_stuck:s/a|gx" in text


def test_a_drift_watch_turned_off_shows_off():
    off = {"enabled": False, "reference": "gait:1", "windows": 0, "level": None, "psi": {},
           "alerts": []}
    row = summarize("d", _doc(gait={"drift": off}), 100.0, 60.0)
    assert row["pipelines"]["gait"]["drift"]["enabled"] is False
    assert render([row]).splitlines()[1].split()[7] == "off"
