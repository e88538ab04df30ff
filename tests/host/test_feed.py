"""``edgeml feed``: reading JSON lines and CSV, pacing, progress, and the verb against a
private mosquitto with the stock configuration."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Collector

from edgeml.errors import ConfigError
from edgeml.host.broker import MosquittoBroker
from edgeml.host.feed import (
    DEFAULT_RATE,
    Progress,
    count_messages,
    detect_format,
    feed,
    read_messages,
)

REPO = Path(__file__).resolve().parents[2]


def test_json_lines_go_out_as_they_are_and_blank_lines_are_skipped():
    text = '{"ax": 1, "id": 1}\n\n  {"ax": 2, "id": 2}  \n'
    assert list(read_messages(io.StringIO(text), "jsonl")) == [b'{"ax": 1, "id": 1}',
                                                               b'{"ax": 2, "id": 2}']


def test_a_bad_json_line_is_named():
    text = '{"ax": 1}\n{"ax": \n'
    with pytest.raises(ConfigError, match=r"watch.jsonl: line 2: not valid JSON"):
        list(read_messages(io.StringIO(text), "jsonl", name="watch.jsonl"))


def test_csv_rows_become_json_objects_with_numbers():
    text = "ax,ay,id,label\n0.5,-1,7,Walking\n1e-3,2,8,\n"
    docs = [json.loads(m) for m in read_messages(io.StringIO(text), "csv")]
    assert docs == [{"ax": 0.5, "ay": -1, "id": 7, "label": "Walking"},
                    {"ax": 0.001, "ay": 2, "id": 8}]  # an empty cell is left out


def test_csv_errors_name_the_line():
    with pytest.raises(ConfigError, match="line 3: 1 cells, the header has 2"):
        list(read_messages(io.StringIO("a,b\n1,2\n3\n"), "csv", name="x.csv"))
    with pytest.raises(ConfigError, match="distinct, non-empty column names"):
        list(read_messages(io.StringIO("a,a\n1,2\n"), "csv"))


def test_format_detection_and_counting(tmp_path):
    assert detect_format("rec.CSV") == "csv" and detect_format("rec.jsonl") == "jsonl"
    assert detect_format("rec.csv", "jsonl") == "jsonl"
    with pytest.raises(ConfigError, match="--format"):
        detect_format("x", "xml")
    f = tmp_path / "rec.csv"
    f.write_text("a,b\n1,2\n\n3,4\n")
    assert count_messages(f, "csv") == 2


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place():
    out, clock = io.StringIO(), Clock()
    p = Progress(4000, out=out, tty=True, clock=clock)
    clock.t = 2.0
    p.update(1000)
    clock.t = 2.05
    p.update(1100)  # within 0.1 s: not redrawn
    clock.t = 8.0
    p.update(4000, final=True)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "[#######.......................] sent 1000/4000 (25%), 500 msg/s, 6.0 s left" in text
    assert "sent 4000/4000 (100%)" in text


def test_progress_elsewhere_is_a_plain_line_every_tenth():
    out, clock = io.StringIO(), Clock()
    p = Progress(1000, out=out, tty=False, clock=clock)
    for n in range(1, 1001):
        clock.t = n / 500
        p.update(n)
    p.update(1000, final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue() and "#" not in out.getvalue()
    assert lines[0].startswith("sent 100/1000 (10%)") and lines[-1].startswith("sent 1000/1000")


class Recorder:
    """Records when each QoS 1 publish was made (pure pacing logic; no broker)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def publish(self, topic, payload, qos=1):
        self.times.append(time.monotonic())
        await asyncio.sleep(0.002)  # a PUBACK's round trip


def test_feed_paces_never_ahead_of_the_rate():
    rec = Recorder()
    msgs = (b"{}" for _ in range(100))
    start = time.monotonic()
    result = asyncio.run(feed(rec, msgs, topic="t", rate=500, qos=1))
    assert result.sent == 100 and len(rec.times) == 100
    for n, t in enumerate(rec.times):  # the n-th message not before n / rate
        assert t - start >= n / 500 - 0.002, (n, t - start)
    assert result.seconds >= 99 / 500


def test_feed_refuses_a_negative_rate():
    with pytest.raises(ConfigError, match="--rate"):
        asyncio.run(feed(Recorder(), iter(()), topic="t", rate=-1))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edgeml", "feed", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_feed_verb_on_a_stock_mosquitto(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker", tuned=False).start()
    sub = Collector(broker, "sensors/#")
    try:
        # 1000 messages: within the stock queue of the collector's own session, so however
        # slowly this test's subscriber reads, the broker drops none of them for it
        lines = [json.dumps({"ax": i * 0.5, "id": i}) for i in range(1000)]
        src = tmp_path / "rec.jsonl"
        src.write_text("\n".join(lines) + "\n")
        r = cli(str(src), "--topic", "sensors/w1/imu", "--rate", "2000", "--broker", broker.url)
        assert r.returncode == 0, r.stderr
        assert "sent 1000 message(s) to sensors/w1/imu" in r.stderr
        assert "all acknowledged" in r.stderr
        assert "sent 100/1000 (10%)" in r.stderr  # not a terminal: plain progress lines
        got = sub.wait_count(1000, timeout=60)
        assert [m.payload.decode() for m in got] == lines  # all of them, in order
        csv_file = tmp_path / "rec.csv"
        csv_file.write_text("ax,id\n" + "".join(f"{i / 4},{i}\n" for i in range(10)))
        r = cli(str(csv_file), "-t", "sensors/w2/imu", "--skip", "2", "--count", "5",
                "--quiet", "--broker", broker.url)
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("\n") == 1  # --quiet: the summary only
        got = sub.wait_count(1005, timeout=60)
        assert [json.loads(m.payload) for m in got[1000:]] == \
            [{"ax": i / 4, "id": i} for i in range(2, 7)]
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"ax": 1}\nnot json\n')
        r = cli(str(bad), "--topic", "sensors/w3/imu", "--broker", broker.url)
        assert r.returncode == 1 and "line 2: not valid JSON" in r.stderr
    finally:
        sub.close()
        broker.stop()


def test_default_rate_fits_a_stock_queue_with_two_seconds_to_spare():
    assert DEFAULT_RATE * 2 <= 1000  # mosquitto's stock max_queued_messages
