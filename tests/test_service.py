"""Running as a service: the systemd unit, the example configs, and the config reference.

``systemd-analyze verify`` runs where the tool exists (skipped otherwise). The example configs
in deploy/ and examples/ must pass ``edgeml run --check`` once their absolute paths point at
files that exist, and every config key the parser knows must be documented in both the
example /etc/edgeml/edgeml.toml and docs/configuration.md.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeml.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "edgeml.service"
DEPLOY_TOML = ROOT / "deploy" / "edgeml.toml"
EXAMPLE_TOML = ROOT / "examples" / "basicmotions.toml"
UNIT_EXEC = "/opt/edgeml/bin/edgeml"


def _edgeml_executable() -> str:
    exe = shutil.which("edgeml") or str(Path(sys.executable).parent / "edgeml")
    if not Path(exe).is_file():
        pytest.skip("no edgeml console script installed")
    return exe


def _unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's edgeml (verify checks it exists)."""
    text = UNIT.read_text().replace(UNIT_EXEC, _edgeml_executable())
    path = tmp_path / "edgeml.service"
    path.write_text(text)
    return path


def _unit_settings() -> dict[str, dict[str, str]]:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read_string(UNIT.read_text())
    return {s: dict(cp[s]) for s in cp.sections()}


def test_unit_has_the_hardening_and_restart_policy():
    svc = _unit_settings()["Service"]
    expected = {
        "Type": "simple", "User": "edgeml", "Group": "edgeml", "Restart": "on-failure",
        "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/edgeml",
        "StateDirectory": "edgeml", "NoNewPrivileges": "true", "PrivateTmp": "true",
        "ProtectHome": "true", "KillSignal": "SIGTERM",
    }
    assert {k: svc.get(k) for k in expected} == expected
    assert svc["ExecStart"] == f"{UNIT_EXEC} run --config /etc/edgeml/edgeml.toml"
    assert svc["ExecStartPre"].endswith("--check")
    assert "WatchdogSec" not in svc  # the daemon does not speak sd_notify (docs say so)
    assert _unit_settings()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = _unit_here(tmp_path)
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # verify only warns about unknown keys and sections: any such line is a failure here
    assert not re.search(r"unknown|ignoring|invalid|failed", out, re.IGNORECASE), out


def test_unit_exposure_is_low(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = _unit_here(tmp_path)
    proc = subprocess.run([tool, "security", "--offline=true", str(unit)], capture_output=True,
                          text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 and m is None:
        pytest.skip(f"systemd-analyze security --offline not supported: {proc.stderr[:200]}")
    assert m is not None, proc.stdout[-2000:]
    assert float(m.group(1)) <= 2.5  # "OK" on systemd's 0-10 scale (docs quote the figure)


def _check(config: Path, capsys) -> str:
    rc = main(["run", "--config", str(config), "--check"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_deploy_example_config_checks(tmp_path, capsys):
    from edgeml.keys import generate_keypair

    etc, var = tmp_path / "etc", tmp_path / "var"
    text = DEPLOY_TOML.read_text()
    assert "/etc/edgeml/" in text and '"/var/lib/edgeml"' in text
    text = text.replace("/etc/edgeml/", f"{etc}/").replace('"/var/lib/edgeml"', f'"{var}"')
    (etc / "keys").mkdir(parents=True)
    generate_keypair(etc / "keys" / "release")
    (etc / "broker.password").write_text("s3cret\n")
    config = tmp_path / "edgeml.toml"
    config.write_text(text)
    out = _check(config, capsys)
    assert "device gateway-01" in out and "profile pi4" in out

    from edgeml.config import load_config

    cfg = load_config(config)
    assert cfg.broker.password == "s3cret" and cfg.broker.username == "gateway-01"
    assert cfg.pipelines[0].window is not None and cfg.pipelines[0].window.size == 100
    assert cfg.data_dir == var and cfg.groups == ("line-3",)


def test_every_commented_key_of_the_deploy_example_is_valid(tmp_path, capsys):
    """Uncomment every "# key = value" line (except alternatives that exclude each other)
    and the file must still pass --check: the commented defaults are real keys."""
    from edgeml.keys import generate_keypair

    etc, var = tmp_path / "etc", tmp_path / "var"
    lines = []
    # alternatives that exclude each other, or name files that would have to exist
    exclusive = ("field", "password", "bundle", "ca_file", "cert_file", "key_file")
    commented_table = False
    for line in DEPLOY_TOML.read_text().splitlines():
        header = re.match(r"^(# )?\[\[?[a-z_.]+\]\]?", line)
        if header:
            commented_table = bool(header.group(1))
        m = re.match(r"^# ([a-z0-9_]+) = (.+)$", line)
        if m and not commented_table and m.group(1) not in exclusive:
            line = line[2:]
        lines.append(line)
    text = "\n".join(lines).replace("/etc/edgeml/", f"{etc}/")
    text = text.replace('"/var/lib/edgeml"', f'"{var}"')
    (etc / "keys").mkdir(parents=True)
    generate_keypair(etc / "keys" / "release")
    (etc / "broker.password").write_text("x\n")
    config = tmp_path / "all.toml"
    config.write_text(text)
    _check(config, capsys)

    from edgeml.config import load_config

    cfg = load_config(config)
    p = cfg.pipelines[0]
    assert p.shared_group == "activity-workers" and p.subscriptions == (
        "$share/activity-workers/sensors/+/imu",)
    assert cfg.deploy.max_p99_ms == 20.0 and cfg.sync.bandwidth_bytes_per_s == 20000


def test_basicmotions_example_checks(tmp_path, capsys):
    from edgeml.keys import generate_keypair

    shutil.copy(EXAMPLE_TOML, tmp_path / "basicmotions.toml")
    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys" / "release")
    (tmp_path / "bundles").mkdir()
    for v in (1, 2):  # --check looks for the files; the daemon verifies them at start
        (tmp_path / "bundles" / f"activity-{v}.edgeml").write_bytes(b"PK")
    out = _check(tmp_path / "basicmotions.toml", capsys)
    assert "device watch-gw" in out and "2 model slot(s)" in out


def _known_keys() -> dict[str, set[str]]:
    """Every key the config parser accepts, by table, read from edgeml/config.py itself."""
    src = (ROOT / "edgeml" / "config.py").read_text()
    found: dict[str, set[str]] = {}
    for var, body in re.findall(r"(\w+)\.known = \(([^)]*)\)", src):
        found.setdefault(var, set()).update(re.findall(r'"([a-z0-9_]+)"', body))
    assert set(found) >= {"r", "wr", "mr", "dep", "sy"}, found
    return found


def test_every_config_key_is_documented():
    keys = set().union(*_known_keys().values())
    example = DEPLOY_TOML.read_text()
    docs = (ROOT / "docs" / "configuration.md").read_text()
    def in_example(k: str) -> bool:  # "key = ", "# key = ", "{ key = ", "[k]", "[[a.k]]"
        return bool(re.search(rf"(^(# )?|[{{,] ){k} = |^(# )?\[\[?([a-z_]+\.)?{k}\]",
                              example, re.MULTILINE))

    missing_example = sorted(k for k in keys if not in_example(k))
    missing_docs = sorted(k for k in keys if f"`{k}`" not in docs)
    assert not missing_example, f"not in deploy/edgeml.toml: {missing_example}"
    assert not missing_docs, f"not in docs/configuration.md: {missing_docs}"
