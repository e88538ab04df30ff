"""Firmware profiles: shipped files load and drive real onnxruntime sessions; bad keys and
values are refused by name."""

from __future__ import annotations

import logging
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_bundle import tiny_classifier

from edgeml.errors import ModelError, ProfileError
from edgeml.profiles import (
    FirmwareProfile,
    apply_overrides,
    create_session,
    list_profiles,
    load_profile,
    profile_from_dict,
    resolve_providers,
    session_options,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = ["jetson-orin-nano", "pi-zero-2w", "pi4", "pi5", "x86-gateway"]


def test_shipped_profiles_are_listed_from_the_package() -> None:
    assert list_profiles() == SHIPPED
    pkg = files("firmware_profiles")
    assert all((pkg / f"{n}.toml").is_file() for n in SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_loads_and_scores(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, FirmwareProfile) and p.name == name
    assert p.description and p.cpu_cores >= 1
    # Every key is spelled out in the shipped file, so none silently falls back to a default.
    raw = tomllib.loads((files("firmware_profiles") / f"{name}.toml").read_text())
    assert set(raw) == {"name", "description", "cpu_cores", "memory_mb", "onnxruntime",
                        "batching", "queue", "disk", "models"}
    assert set(raw["onnxruntime"]) == set(p.to_dict()["onnxruntime"])
    assert set(raw["disk"]) == set(p.to_dict()["disk"])
    assert set(raw["models"]) == set(p.to_dict()["models"])  # caps

    model, X, labels, proba, _ = tiny_classifier()
    session = create_session(model, p)
    got_labels, got_proba = session.run(["label", "probabilities"], {"input": X})
    assert list(got_labels) == list(labels)
    np.testing.assert_allclose(got_proba, proba, atol=1e-5)
    assert session.get_providers()[-1] == "CPUExecutionProvider"


def test_session_options_follow_the_profile() -> None:
    p = load_profile("pi-zero-2w")
    opts, providers = session_options(p)
    assert opts.intra_op_num_threads == p.onnxruntime.intra_op_threads
    assert opts.inter_op_num_threads == p.onnxruntime.inter_op_threads
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.enable_cpu_mem_arena is False
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert providers == ["CPUExecutionProvider"]
    custom = profile_from_dict({"name": "t", "onnxruntime": {
        "graph_optimization": "disable", "execution_mode": "parallel"}}, "t.toml")
    opts, _ = session_options(custom)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL


def test_missing_provider_falls_back_to_cpu_with_warning(caplog, tmp_path: Path) -> None:
    p = load_profile("jetson-orin-nano")
    assert p.onnxruntime.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    with caplog.at_level(logging.WARNING, logger="edgeml.profiles"):
        _, providers = session_options(p)
    if have_cuda:  # pragma: no cover - only on a GPU machine
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert providers == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in caplog.text and "jetson-orin-nano" in caplog.text
    # Preference order is kept, CPU always ends the list even when the profile omits it.
    gpu_only = profile_from_dict({"name": "g", "onnxruntime": {
        "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}}, "g.toml")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeml.profiles"):
        got = resolve_providers(gpu_only, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert got == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in caplog.text


def test_custom_profile_file_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[batching]\nmax_batch = 8\nmax_wait_ms = 0\n'
                    '[disk]\nfsync_interval_ms = 0\nrawlog_budget_mb = 10\n'
                    'rawlog_segment_mb = 2\nrawlog_max_age_days = 0.5\n')
    p = load_profile(path)
    assert load_profile(str(path)) == p
    assert (p.batching.max_batch, p.batching.max_wait_s) == (8, 0.0)
    assert p.queue.max_messages == 10000 and p.onnxruntime.providers == ("CPUExecutionProvider",)
    assert p.disk.fsync_interval_s == 0.0
    assert p.disk.rawlog_budget_bytes == 10 * 2**20
    assert p.disk.rawlog_segment_bytes == 2 * 2**20
    assert p.disk.rawlog_max_age_s == 43200.0
    assert p.disk.outbox_budget_bytes == 256 * 2**20


def test_default_profile_matches_dataclass_defaults() -> None:
    p = load_profile("x86-gateway")
    assert p == FirmwareProfile(name="x86-gateway", description=p.description)
    assert load_profile() == p


@pytest.mark.parametrize("doc, key, match", [
    ({"name": "t", "colour": "red"}, "colour", "unknown key"),
    ({"name": "t", "onnxruntime": {"threads": 2}}, "onnxruntime.threads", "unknown key"),
    ({"name": "t", "disk": {"rawlog_budget": 2}}, "disk.rawlog_budget", "unknown key"),
    ({"name": "t", "cpu_cores": "4"}, "cpu_cores", "expected an integer, got string"),
    ({"name": "t", "cpu_cores": 2.5}, "cpu_cores", "expected an integer, got float"),
    ({"name": "t", "batching": {"max_batch": True}}, "batching.max_batch",
     "expected an integer, got boolean"),
    ({"name": "t", "onnxruntime": {"enable_mem_pattern": "yes"}},
     "onnxruntime.enable_mem_pattern", "expected true or false"),
    ({"name": "t", "batching": {"max_wait_ms": "2"}}, "batching.max_wait_ms",
     "expected a number"),
    ({"name": "t", "cpu_cores": 0}, "cpu_cores", "out of range"),
    ({"name": "t", "onnxruntime": {"intra_op_threads": -1}}, "onnxruntime.intra_op_threads",
     "out of range"),
    ({"name": "t", "batching": {"max_wait_ms": -1}}, "batching.max_wait_ms", "out of range"),
    ({"name": "t", "disk": {"rawlog_max_age_days": 0}}, "disk.rawlog_max_age_days",
     "out of range"),
    ({"name": "t", "onnxruntime": {"graph_optimization": "max"}},
     "onnxruntime.graph_optimization", "'max' is not one of disable, basic"),
    ({"name": "t", "queue": {"policy": "drop_random"}}, "queue.policy",
     "'drop_random' is not one of wait, drop_oldest, drop_newest"),
    ({"name": "t", "onnxruntime": {"execution_mode": "async"}}, "onnxruntime.execution_mode",
     "'async' is not one of sequential, parallel"),
    ({"name": "t", "onnxruntime": {"providers": ["cuda"]}}, "onnxruntime.providers[0]",
     "'cuda' is not an onnxruntime provider name"),
    ({"name": "t", "onnxruntime": {"providers": "CPUExecutionProvider"}},
     "onnxruntime.providers", "expected an array"),
    ({"name": "t", "onnxruntime": {"providers": []}}, "onnxruntime.providers",
     "must not be empty"),
    ({"name": "t", "onnxruntime": {"providers": ["CPUExecutionProvider"] * 2}},
     "onnxruntime.providers[1]", "listed twice"),
    ({"name": "t", "batching": 5}, "batching", "expected a table"),
    ({"name": "t", "disk": {"rawlog_budget_mb": 8, "rawlog_segment_mb": 16}},
     "disk.rawlog_segment_mb", "larger than rawlog_budget_mb"),
    ({"description": "no name"}, "name", "missing"),
    ({"name": "../x"}, "name", "not a valid profile name"),
])
def test_bad_keys_and_values_refused_by_name(doc: dict, key: str, match: str) -> None:
    with pytest.raises(ProfileError, match=match) as exc:
        profile_from_dict(doc, "/etc/edgeml/custom.toml")
    assert exc.value.key == key
    assert exc.value.file == "/etc/edgeml/custom.toml"
    assert str(exc.value).startswith(f"/etc/edgeml/custom.toml: {key}: ")


def test_bad_profile_files_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[queue]\nmax_messages = "lots"\n')
    with pytest.raises(ProfileError, match=r"bad\.toml: queue\.max_messages: expected an int"):
        load_profile(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML"):
        load_profile(broken)
    with pytest.raises(ProfileError, match=r"absent\.toml: no such profile file"):
        load_profile(tmp_path / "absent.toml")
    with pytest.raises(ProfileError, match=r"unknown firmware profile 'pi3'.*x86-gateway"):
        load_profile("pi3")


def test_overrides_merge_over_profile_and_are_validated() -> None:
    base = load_profile("pi4")
    p = apply_overrides(base, {"batching": {"max_batch": 8}, "memory_mb": 2048}, "edgeml.toml")
    assert p.batching.max_batch == 8 and p.memory_mb == 2048
    assert p.batching.max_wait_ms == base.batching.max_wait_ms  # untouched keys kept
    assert p.disk == base.disk and p.name == "pi4"
    with pytest.raises(ProfileError) as exc:
        apply_overrides(base, {"batching": {"max_bach": 8}}, "edgeml.toml")
    assert exc.value.key == "profile_overrides.batching.max_bach"
    assert str(exc.value).startswith("edgeml.toml: profile_overrides.batching.max_bach: ")
    with pytest.raises(ProfileError,
                       match=r"profile_overrides\.queue\.policy: 'fifo' is not one of"):
        apply_overrides(base, {"queue": {"policy": "fifo"}}, "edgeml.toml")


def test_create_session_translates_onnxruntime_errors(tmp_path: Path) -> None:
    p = load_profile("x86-gateway")
    with pytest.raises(ModelError, match="onnxruntime cannot load model bytes"):
        create_session(b"definitely not onnx", p)
    with pytest.raises(ModelError, match=r"missing\.onnx"):
        create_session(tmp_path / "missing.onnx", p)
    path = tmp_path / "ok.onnx"
    path.write_bytes(tiny_classifier()[0])
    assert create_session(path, p).get_inputs()[0].name == "input"


def test_provider_order_is_kept_and_cpu_appended() -> None:
    p = profile_from_dict({"name": "c", "onnxruntime": {
        "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"]}}, "c.toml")
    have = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(p, have) == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    only_cuda = profile_from_dict({"name": "g", "onnxruntime": {
        "providers": ["CUDAExecutionProvider"]}}, "g.toml")
    assert resolve_providers(only_cuda, have) == have


def test_scoring_threads_is_accepted_with_a_deprecation_warning(caplog, tmp_path: Path) -> None:
    # It never sized anything (each model version has its own thread); old files still load.
    path = tmp_path / "old.toml"
    path.write_text('name = "old"\n[batching]\nmax_batch = 8\nscoring_threads = 4\n')
    with caplog.at_level(logging.WARNING, logger="edgeml.validate"):
        p = load_profile(path)
    assert p.batching.max_batch == 8 and not hasattr(p.batching, "scoring_threads")
    assert f"{path}: batching.scoring_threads: deprecated and ignored" in caplog.text
    assert "versions each have their own thread" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeml.validate"):
        apply_overrides(load_profile("pi4"), {"batching": {"scoring_threads": 2}}, "edgeml.toml")
    assert "edgeml.toml: profile_overrides.batching.scoring_threads: deprecated" in caplog.text
    # The shipped profiles no longer carry it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeml.validate"):
        for name in SHIPPED:
            load_profile(name)
    assert "scoring_threads" not in caplog.text
