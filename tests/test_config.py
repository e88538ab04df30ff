"""Config validation: every bad key, value or type is one line naming the key and the file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgeml.cli import main
from edgeml.config import load_config
from edgeml.errors import ConfigError

GOOD = """
device_id = "watch-01"
profile = "x86-gateway"
data_dir = "data"
topic_prefix = "edgeml"

[broker]
url = "mqtt://127.0.0.1:1883"

[[pipelines]]
name = "activity"
topics = ["sensors/+/imu"]
format = "auto"
features = ["ax", "ay", "az", "gx", "gy", "gz"]
window = { size = 100, hop = 100 }
policy = "champion"
deadline_ms = 50

[[pipelines.models]]
name = "activity"
version = "1"
role = "champion"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "edgeml.toml"
    p.write_text(text)
    return p


def test_good_config_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.device_id == "watch-01"
    assert cfg.data_dir == tmp_path / "data"  # relative to the config file
    p = cfg.pipelines[0]
    assert p.window.size == 100 and p.window.hop == 100
    assert p.models[0].role == "champion" and p.models[0].version == "1"
    assert cfg.broker.client_id == "edgeml-watch-01" and not cfg.broker.clean_start
    assert cfg.broker.max_inflight is None  # unset: the device sizes it to the batch
    assert cfg.topic("out", "activity") == "edgeml/watch-01/out/activity"
    assert p.subscriptions == ("sensors/+/imu",)


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), broker_url="mqtt://127.0.0.1:1999",
                      data_dir=tmp_path / "other")
    assert cfg.broker.port == 1999 and cfg.data_dir == tmp_path / "other"


@pytest.mark.parametrize("change, key", [
    (("device_id = \"watch-01\"", "device_id = 5"), "device_id"),
    (("device_id = \"watch-01\"", "device_id = \"../evil\""), "device_id"),
    (("profile = \"x86-gateway\"", "profile = \"x86-gateway\"\nbogus = 1"), "bogus"),
    (("url = \"mqtt://127.0.0.1:1883\"", "url = \"http://x\""), "broker.url"),
    (("url = \"mqtt://127.0.0.1:1883\"", "url = \"mqtt://127.0.0.1:1883\"\nkeepalive = 1"),
     "broker.keepalive"),
    (("url = \"mqtt://127.0.0.1:1883\"", "url = \"mqtt://127.0.0.1:1883\"\nmax_inflight = 0"),
     "broker.max_inflight"),
    (("format = \"auto\"", "format = \"xml\""), "pipelines[0].format"),
    (("policy = \"champion\"", "policy = \"best\""), "pipelines[0].policy"),
    (("deadline_ms = 50", "deadline_ms = -1"), "pipelines[0].deadline_ms"),
    (("deadline_ms = 50", "deadline_ms = \"fast\""), "pipelines[0].deadline_ms"),
    (("{ size = 100, hop = 100 }", "{ size = 100, hop = 200 }"), "pipelines[0].window.hop"),
    (("{ size = 100, hop = 100 }", "{ size = 0 }"), "pipelines[0].window.size"),
    (("role = \"champion\"", "role = \"king\""), "pipelines[0].models[0].role"),
    (("role = \"champion\"", "role = \"champion\"\nbundle = \"nope.edgeml\""),
     "pipelines[0].models[0].bundle"),
    (("topics = [\"sensors/+/imu\"]", "topics = []"), "pipelines[0].topics"),
    (("features = [\"ax\", \"ay\", \"az\", \"gx\", \"gy\", \"gz\"]", ""),
     "pipelines[0].features"),
    (("name = \"activity\"\ntopics", "name = \"activity\"\nwindo = 3\ntopics"),
     "pipelines[0].windo"),
])
def test_bad_key_is_named(tmp_path, change, key):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert info.value.key == key, msg
    assert str(path) in msg and key in msg and "\n" not in msg


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("deadline_ms = 50", "deadline = 50"))
    with pytest.raises(ConfigError, match="did you mean deadline_ms"):
        load_config(path)


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "device_id = "))


def test_run_check_cli(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    assert main(["run", "--check", "--config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("policy = \"champion\"", "policy = 3"))
    assert main(["run", "--check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipelines[0].policy" in err[0]
    bad.write_text(GOOD.replace("profile = \"x86-gateway\"", "profile = \"toaster\""))
    assert main(["run", "--check", "--config", str(bad)]) == 1
    assert "toaster" in capsys.readouterr().err


def test_profile_overrides(tmp_path, capsys):
    from edgeml.config import load_device_profile

    text = GOOD.replace("[broker]", "[profile_overrides]\nbatching = { max_batch = 8 }\n\n[broker]")
    cfg = load_config(write(tmp_path, text))
    assert load_device_profile(cfg).batching.max_batch == 8
    table = "[profile_overrides]\nbatching = { max_batch = -1 }\n\n[broker]"
    bad = write(tmp_path, GOOD.replace("[broker]", table))
    assert main(["run", "--check", "--config", str(bad)]) == 1
    assert "profile_overrides.batching.max_batch" in capsys.readouterr().err


@pytest.mark.parametrize("change, key, match", [
    (("deadline_ms = 50", "deadline_ms = nan"), "pipelines[0].deadline_ms", "finite"),
    (("deadline_ms = 50", "deadline_ms = inf"), "pipelines[0].deadline_ms", "finite"),
    (("deadline_ms = 50", "deadline_ms = true"), "pipelines[0].deadline_ms",
     "expected a number, got boolean true"),
    (("deadline_ms = 50", "deadline_ms = 50\ntop_n = true"), "pipelines[0].top_n",
     "expected an integer, got boolean true"),
    (("version = \"1\"", "version = true"), "pipelines[0].models[0].version",
     "expected a string or integer, got boolean true"),
    (("deadline_ms = 50", "deadline_ms = 50\nqos = 2"), "pipelines[0].qos", "2 is out of range"),
])
def test_bad_value_is_named_with_the_value(tmp_path, change, key, match):
    old, new = change
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert match in str(info.value).replace("True", "true")


def test_integer_model_version_is_a_name(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("version = \"1\"", "version = 7")))
    assert cfg.pipelines[0].models[0].version == "7"


def test_broker_override_replaces_the_file_url_unchecked(tmp_path):
    # --broker wins over [broker] url, whatever the file holds there (as before)
    path = write(tmp_path, GOOD.replace("url = \"mqtt://127.0.0.1:1883\"", "url = 5"))
    cfg = load_config(path, broker_url="mqtt://127.0.0.1:1999")
    assert cfg.broker.port == 1999


def test_deprecated_profile_override_warns_and_starts(tmp_path, capsys, caplog):
    table = "[profile_overrides]\nbatching = { scoring_threads = 4 }\n\n[broker]"
    path = write(tmp_path, GOOD.replace("[broker]", table))
    with caplog.at_level(logging.WARNING, logger="edgeml.validate"):
        assert main(["run", "--check", "--config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert (f"{path.resolve()}: profile_overrides.batching.scoring_threads: deprecated and "
            "ignored") in caplog.text
