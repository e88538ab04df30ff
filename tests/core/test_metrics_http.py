"""/metrics, /healthz and /readyz on a running daemon (real mosquitto): the exposition parses
with prometheus_client's own parser and its counters match what was streamed."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from conftest import Collector, publish_all, write_config
from prometheus_client.parser import text_string_to_metric_families

from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions

OUT = "edgeml/watch-01/out/activity"
EXPECTED = {
    "edgeml_build_info", "edgeml_ready", "edgeml_messages_received", "edgeml_messages_accepted",
    "edgeml_dead_letters", "edgeml_rows", "edgeml_queue_dropped_rows", "edgeml_queue_waits",
    "edgeml_queue_depth_rows",
    "edgeml_rows_answered", "edgeml_fallbacks", "edgeml_unanswered",
    "edgeml_answers_published", "edgeml_pipeline_errors", "edgeml_input_gaps",
    "edgeml_sequence_gaps", "edgeml_sequence_lost", "edgeml_sequence_missing_open",
    "edgeml_sequence_late", "edgeml_sequence_duplicates", "edgeml_sequence_resets",
    "edgeml_sequence_sources", "edgeml_sequence_sources_evicted",
    "edgeml_windows_evicted", "edgeml_batch_size_rows", "edgeml_answer_latency_seconds",
    "edgeml_rows_scored", "edgeml_scoring_errors", "edgeml_deadline_misses",
    "edgeml_rows_skipped", "edgeml_version_answers", "edgeml_version_fallbacks",
    "edgeml_scoring_seconds",
    "edgeml_archive_bytes", "edgeml_archive_segments", "edgeml_archive_records_appended",
    "edgeml_archive_write_errors", "edgeml_archive_records_lost",
    "edgeml_archive_records_removed", "edgeml_drift_psi", "edgeml_drift_ks",
    "edgeml_drift_out_of_range_ratio", "edgeml_output_drift_psi", "edgeml_drift_windows",
    "edgeml_drift_alerts_active", "edgeml_drift_alerts_raised",
    "edgeml_sensor_stuck_channels", "edgeml_source_rate_samples_per_second",
    "edgeml_dead_letters_published", "edgeml_publish_errors",
    "edgeml_outbox_backlog_records", "edgeml_outbox_oldest_unsynced_age_seconds",
    "edgeml_outbox_dropped_records", "edgeml_outbox_refused_records", "edgeml_outbox_bytes",
    "edgeml_outbox_budget_bytes", "edgeml_outbox_overflow_dropped_records",
    "edgeml_uplink_connected", "edgeml_uplink_records_sent", "edgeml_uplink_batches_sent",
    "edgeml_uplink_bytes_sent", "edgeml_uplink_errors", "edgeml_uplink_in_flight_records",
    "edgeml_mqtt_connected", "edgeml_mqtt_connects", "edgeml_mqtt_disconnects",
    "edgeml_deploy_events", "edgeml_rollbacks",
}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict:
    status, text = get(port, "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return fams


def value(fams, name: str, sample: str | None = None, **labels) -> float:
    fam = fams[name]
    want = sample or (name + "_total" if fam.type == "counter" else name)
    hits = [s.value for s in fam.samples if s.name == want
            and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, fam.samples[:5])
    return hits[0]


@pytest.fixture(scope="module")
def test_set():
    return load_basicmotions("TEST")


def test_metrics_endpoint_counts_what_was_streamed(broker, daemon_factory, tmp_path, test_set,
                                                   activity_bundle):
    cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=tmp_path / "data",
                       models=[{"name": "activity", "version": "1", "bundle": activity_bundle}],
                       extra='[metrics]\nlisten = "127.0.0.1:0"\n[drift]\nwindow = 1000\n'
                             'min_window_s = 0\n')
    out = Collector(broker, OUT)
    try:
        d = daemon_factory(cfg)
        port = d.daemon.http.port
        assert get(port, "/healthz")[0] == 200
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert get(port, "/nope")[0] == 404
        items = []
        for s in range(40):
            for i, row in enumerate(test_set.X[s]):
                body = dict(zip(BASICMOTIONS_CHANNELS, map(float, row), strict=True))
                body["id"] = f"s{s}-{i}"
                items.append(("sensors/w1/imu", json.dumps(body).encode()))
        bad = [("sensors/w1/imu", b'{"ax": 1')] * 3
        publish_all(broker, bad + items)
        out.wait_count(40, timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the outbox writer and uplink run on their own ~50 ms cadence
            fams = scrape(port)
            if value(fams, "edgeml_uplink_records_sent") >= 80 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        out.close()
    assert set(fams) >= EXPECTED, EXPECTED - set(fams)
    p = {"pipeline": "activity"}
    v = {**p, "model": "activity", "version": "1", "role": "champion"}
    assert value(fams, "edgeml_messages_received", **p) == 4003
    assert value(fams, "edgeml_messages_accepted", **p) == 4000
    assert value(fams, "edgeml_dead_letters", reason="malformed", **p) == 3
    assert value(fams, "edgeml_dead_letters_published") == 3
    assert value(fams, "edgeml_rows", **p) == 40
    assert value(fams, "edgeml_rows_answered", **p) == 40
    assert value(fams, "edgeml_rows_scored", **v) == 40
    assert value(fams, "edgeml_version_answers", **v) == 40
    assert value(fams, "edgeml_scoring_errors", **v) == 0
    assert value(fams, "edgeml_version_fallbacks", **v) == 0
    assert value(fams, "edgeml_answers_published", **p) == 40
    assert value(fams, "edgeml_answer_latency_seconds",
                 "edgeml_answer_latency_seconds_count", **p) == 40
    assert value(fams, "edgeml_batch_size_rows", "edgeml_batch_size_rows_sum", **p) == 40
    assert value(fams, "edgeml_archive_records_appended", **p) == 4000
    assert value(fams, "edgeml_drift_windows", **p) == 4  # 4,000 samples / window 1,000
    assert set(s.labels["channel"] for s in fams["edgeml_drift_psi"].samples) == \
        set(BASICMOTIONS_CHANNELS)
    # the TEST series arrive sorted by class, so 1,000-sample windows do drift; the gauge
    # says what the device's watch says
    active = d.call(lambda: d.daemon.monitors["activity"].active_alerts())
    assert value(fams, "edgeml_drift_alerts_active", kind="input_drift", **p) == \
        active.count("input_drift")
    assert value(fams, "edgeml_uplink_records_sent") >= 80  # 40 outputs + 40 results (+drift)
    assert value(fams, "edgeml_mqtt_connected") == 1
    assert value(fams, "edgeml_ready") == 1


def test_metrics_off_or_port_taken_never_stops_the_device(tmp_path, activity_bundle):
    import asyncio
    import socket

    from test_device_stages import Rig

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def check(listen: str, sub: str) -> None:
        (tmp_path / sub).mkdir()
        async with Rig(tmp_path / sub, [
                {"name": "activity", "version": "1", "bundle": str(activity_bundle)}],
                extra=f'[metrics]\nlisten = "{listen}"\n') as rig:
            assert rig.device.http is None and rig.device.readiness()[0]
    try:
        asyncio.run(check("", "off"))
        asyncio.run(check(f"127.0.0.1:{port}", "taken"))
    finally:
        taken.close()
