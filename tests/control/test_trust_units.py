"""The trust pieces without a broker: clock-safe raw-log retention, the signed command format,
the output contract, the release order."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest

from edgeml.bundle import default_release, release_of_version
from edgeml.control.signing import (
    DOMAIN,
    CommandRefused,
    CommandVerifier,
    CounterFile,
    canonical_bytes,
    sign_command,
)
from edgeml.keys import generate_keypair, key_id, load_private_key, load_public_key
from edgeml.storage.rawlog import RawLog, open_reader

DAY = 86400.0


class Clocks:
    """A wall clock the test steps, and a monotonic clock that only moves forward."""

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 1000.0

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def fill(log: RawLog, c: Clocks, n_segments: int, per: int = 5) -> int:
    for _ in range(n_segments):
        for _ in range(per):
            c.advance(1.0)
            log.append("sensors/a/imu", b"x" * 64, c.wall)
        log.roll()
    return n_segments * per


def test_a_clock_step_1970_now_and_back_deletes_nothing(tmp_path, caplog):
    now = time.time()
    c = Clocks(wall=1000.0)  # booted without a real-time clock: 1970
    log = RawLog(tmp_path / "rl", segment_bytes=4096, budget_bytes=None, max_age_s=30 * DAY,
                 clock=lambda: c.wall, monotonic=lambda: c.mono)
    total = fill(log, c, 3)
    with caplog.at_level(logging.WARNING, logger="edgeml.storage.rawlog"):
        c.wall = now  # NTP steps the clock 56 years forward
        c.mono += 1.0
        assert log.enforce_retention()["segments"] == 0
        assert "the wall clock stepped by +" in caplog.text and "monotonic time" in caplog.text
        total += fill(log, c, 2)
        assert log.enforce_retention()["segments"] == 0  # stamped by an unset clock: kept
        assert "before the clock was set" in caplog.text
        c.wall = 5000.0  # and back (a bad RTC battery)
        c.mono += 1.0
        assert log.enforce_retention()["segments"] == 0
        total += fill(log, c, 2)
        assert log.enforce_retention()["segments"] == 0
    assert log.stats["segments_removed"] == 0 and log.retention_refusals >= 4
    log.close()
    assert len(list(open_reader(tmp_path / "rl").read())) == total  # no archive loss


def test_age_retention_still_works_on_a_steady_clock(tmp_path):
    now = time.time()
    c = Clocks(wall=now - 40 * DAY)
    log = RawLog(tmp_path / "rl", segment_bytes=4096, budget_bytes=None, max_age_s=30 * DAY,
                 clock=lambda: c.wall, monotonic=lambda: c.mono)
    fill(log, c, 2)  # 40 days ago, by a trusted clock
    c.advance(40 * DAY)  # time passes for real: wall and monotonic agree
    fill(log, c, 1)  # its roll applies retention
    log.enforce_retention()
    assert log.stats["segments_removed"] == 2 and log.retention_refusals == 0
    log.close()


def test_the_signed_command_format(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    key = load_private_key(priv)
    doc = sign_command({"cmd": "promote", "device": "d1", "model": "m", "version": "2",
                        "id": "x"}, key, counter=7)
    # what another tool must produce: the domain line + canonical JSON without "sig"
    body = {k: v for k, v in doc.items() if k != "sig"}
    expected = DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_bytes(doc) == expected
    assert doc["sig"]["key"] == key_id(key) and doc["sig"]["alg"] == "ed25519"
    load_public_key(pub).verify(base64.b64decode(doc["sig"]["value"]), expected)

    clock = [10.0]  # a device clock that says 1970: expiry is not judged
    v = CommandVerifier([load_public_key(pub)], "d1", CounterFile(tmp_path / "c.json"),
                        clock=lambda: clock[0])
    old = sign_command({"cmd": "retire", "device": "d1"}, key, counter=8, expires_in_s=-3600)
    assert v.verify(old) == key_id(key)
    clock[0] = time.time()  # a set clock: expired
    with pytest.raises(CommandRefused, match="expired"):
        v.verify(sign_command({"cmd": "retire", "device": "d1"}, key, counter=9,
                              expires_in_s=-3600))
    # the counter survives a restart (a new verifier on the same file)
    v2 = CommandVerifier([load_public_key(pub)], "d1", CounterFile(tmp_path / "c.json"))
    with pytest.raises(CommandRefused, match="replay"):
        v2.verify(old)
    with pytest.raises(CommandRefused, match="bad counter"):
        v2.verify(sign_command({"cmd": "retire", "device": "d1"}, key, counter=2**70))


def test_release_order():
    assert release_of_version("12") == 12 and release_of_version("1.2") == 0
    assert default_release("3") == 3 and default_release("beta") > 1_700_000_000


@pytest.mark.parametrize("change, key", [
    ({"topics": ["sensors/#/imu"]}, "pipelines[0].topics[0]: invalid topic filter"),
    ({"topics": ["sensors/imu+"]}, "pipelines[0].topics[0]: invalid topic filter"),
    ({"deadline_ms": float("nan")}, "pipelines[0].deadline_ms: must be a finite number"),
    ({"data_dir": "FILE"}, "data_dir: "),
    ({"status_interval_s": float("inf")}, "status_interval_s: must be a finite number"),
])
def test_check_refuses_with_one_line_naming_the_key(tmp_path, capsys, change, key):
    from edgeml.cli import main as cli

    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    top = {k: v for k, v in change.items() if k in ("data_dir", "status_interval_s")}
    pipe = {k: v for k, v in change.items() if k not in top}
    top = {k: (str(a_file) if v == "FILE" else v) for k, v in top.items()}
    lines = ['device_id = "d"', f'data_dir = "{top.pop("data_dir", tmp_path / "data")}"']
    lines += [f"{k} = {v}" for k, v in top.items()]
    p = {"name": "p", "topics": ["sensors/+/imu"], "features": ["x"], **pipe}
    lines += ["[[pipelines]]"] + [f"{k} = {json.dumps(v) if not isinstance(v, float) else v}"
                                  for k, v in p.items()]
    cfg = tmp_path / "c.toml"
    cfg.write_text("\n".join(lines).replace("= NaN", "= nan").replace("= Infinity", "= inf")
                   + "\n")
    assert cli(["run", "--config", str(cfg), "--check"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err


def test_a_huge_integer_in_a_bundle_manifest_is_a_format_error():
    import io
    import zipfile

    from edgeml.bundle import read_bundle
    from edgeml.errors import BundleFormatError

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", b'{"manifest_version": 1, "release": ' + b"7" * 5000 + b"}")
        z.writestr("model.onnx", b"x")
    with pytest.raises(BundleFormatError, match="4300 digits"):
        read_bundle(buf.getvalue())


def test_outputs_that_stop_fitting_the_manifest_are_errors(activity_bundle):
    """At run time: scores that no longer match the class list raise (scoring counts an error
    for the version, and the watch rolls a champion back on its error rate)."""
    import numpy as np

    from edgeml.bundle import read_bundle
    from edgeml.core.model import LoadedModel, Prediction
    from edgeml.errors import ModelError

    m = read_bundle(activity_bundle).manifest
    model = LoadedModel(m, activity_bundle, profile=None)
    k = len(m.outputs.classes)
    ok = Prediction(np.asarray([m.outputs.classes[0]]), np.zeros((1, k), np.float32), 0.1)
    assert model.outputs(ok)[0]["label"] == m.outputs.classes[0]
    bad = Prediction(np.asarray([m.outputs.classes[0]]), np.zeros((1, k - 1), np.float32), 0.1)
    with pytest.raises(ModelError, match="output contract: scores have 3 columns, the "
                                         "manifest has 4 classes"):
        model.outputs(bad)


@pytest.mark.parametrize("value, why", [
    ("9" * 5000, "not valid TOML: a number is too large"),
    ("99999999999999999999999999999", "deploy.max_bundle_bytes: 99999999999999999999... does "
                                      "not fit a 64-bit integer"),
])
def test_check_refuses_huge_integers_in_the_config(tmp_path, capsys, value, why):
    from edgeml.cli import main as cli

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'device_id = "d"\ndata_dir = "{tmp_path / "data"}"\n[deploy]\n'
                   f'max_bundle_bytes = {value}\n[[pipelines]]\nname = "p"\ntopics = ["a"]\n'
                   'features = ["x"]\n')
    assert cli(["run", "--config", str(cfg), "--check"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err


def test_without_trusted_keys_the_command_check_does_not_load_cryptography(tmp_path) -> None:
    """No keys, nothing to verify: the daemon must not map cryptography's OpenSSL (~6 MB)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgeml.control.signing import CommandVerifier, CounterFile\n"
        f"CommandVerifier([], 'dev', CounterFile(Path({str(tmp_path / 'c.json')!r})))\n"
        "print('cryptography' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
