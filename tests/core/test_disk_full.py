"""A full disk under a running daemon: nothing is acknowledged before it is archived, the
device says so (status, alert), stays controllable, and carries on by itself when space
returns. On a real 8 MB tmpfs (needs root to mount; skipped otherwise), a real mosquitto
and real models."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import msgpack
import pytest
from conftest import basicmotions_window, publish_all, write_config

from edgeml.host.datasets import load_basicmotions
from edgeml.storage.rawlog import open_reader

DEVICE = "watch-df"


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "8m"):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Take every free byte of the file system at ``path``."""
    filler = path / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (2**20, 2**14, 2**10, 64, 1):
            block = b"\0" * chunk
            while True:
                try:
                    fh.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
        with contextlib.suppress(OSError):
            os.fsync(fh.fileno())
    return filler


def answer(m) -> dict:
    return msgpack.unpackb(m.payload, raw=False)


def window(test, w: int) -> list[tuple[str, bytes]]:
    return basicmotions_window(test.X[w], f"sensors/s{w}/imu", f"w{w}")


def test_disk_full_pauses_input_unacknowledged_and_resumes_by_itself(
        broker, collector, daemon_factory, tmp_path, activity_bundle, activity_bundle_v2):
    test = load_basicmotions("TEST")
    with tmpfs(tmp_path / "disk") as disk:
        cfg = write_config(tmp_path / "edgeml.toml", broker=broker, data_dir=disk / "data",
                           device_id=DEVICE, models=[
                               {"name": "activity", "version": "1", "bundle": activity_bundle},
                               {"name": "activity", "version": "2",
                                "bundle": activity_bundle_v2, "role": "challenger"}])
        alerts = collector(f"edgeml/{DEVICE}/alerts")
        answers = collector(f"edgeml/{DEVICE}/out/activity")
        replies = collector(f"edgeml/{DEVICE}/cmd/reply")
        d = daemon_factory(cfg)
        publish_all(broker, window(test, 0))
        answers.wait_count(1)

        filler = fill(disk)
        sent = window(test, 1) + window(test, 2)
        publish_all(broker, sent)
        alerts.wait_for(lambda ms: any(json.loads(m.payload)["kind"] == "archive_paused"
                                       for m in ms))
        st = d.status()
        assert st["storage"]["archive"]["paused"] is True
        assert st["storage"]["archive"]["held"] > 0
        # nothing of the stalled windows was answered: it was never archived
        assert len(answers.messages) == 1

        # the device stays controllable while paused
        publish_all(broker, [(f"edgeml/{DEVICE}/cmd", json.dumps(
            {"id": "p1", "cmd": "promote", "model": "activity", "version": "2"}).encode())])
        reply = json.loads(replies.wait_count(1)[0].payload)
        assert reply["ok"] and reply["id"] == "p1"

        filler.unlink()  # space returns: the device carries on by itself
        alerts.wait_for(lambda ms: any(json.loads(m.payload)["kind"] == "archive_resumed"
                                       for m in ms), timeout=30)
        got = answers.wait_count(3, timeout=60)
        assert [answer(m)["id"] for m in got[1:]] == ["w1-99", "w2-99"]
        assert all(answer(m)["version"] == "2" for m in got[1:])
        st = d.status()
        assert st["storage"]["archive"]["paused"] is False
        assert st["storage"]["archive"]["held_dropped"] == 0
        d.stop()
        # every message sent while the disk was full is in the archive, once, in order
        ids = [json.loads(r.payload)["id"] for r in
               open_reader(disk / "data" / "rawlog" / "activity").read()]
        assert ids[100:] == [json.loads(p)["id"] for _, p in sent]
