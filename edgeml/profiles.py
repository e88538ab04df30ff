"""Firmware profiles: one TOML file per device class with the knobs that depend on hardware.

A profile says how many threads onnxruntime may use, which execution providers to try, how
large micro-batches get, how deep the input queue is and how much disk the raw log and outbox
may take. The loader checks every key (unknown keys included: a typo must not silently fall
back to a default on a device nobody watches) and names the key and the file when one is wrong.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ModelError, ProfileError
from edgeml.validate import Table, type_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "x86-gateway"
PROFILE_PACKAGE = "firmware_profiles"
CPU_PROVIDER = "CPUExecutionProvider"
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")
QUEUE_POLICIES = ("wait", "drop_oldest", "drop_newest")
_PROVIDER_NAME = re.compile(r"[A-Z][A-Za-z0-9]*ExecutionProvider")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MB = 2**20


# --- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrtSettings:
    """onnxruntime SessionOptions for every model session on the device."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    execution_mode: str = "sequential"
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    allow_spinning: bool = True
    providers: tuple[str, ...] = (CPU_PROVIDER,)


@dataclass(frozen=True)
class BatchingSettings:
    """Micro-batching of messages."""

    max_batch: int = 256
    max_wait_ms: float = 2.0

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


@dataclass(frozen=True)
class QueueSettings:
    """The bounded input queue between MQTT and scoring."""

    max_messages: int = 10000
    #: a full queue: "wait" takes no more input until it has room (the broker holds or drops
    #: the rest by its own limits), "drop_oldest"/"drop_newest" keep reading and shed rows
    policy: str = "wait"
    #: the largest MQTT packet the device accepts; with MQTT 5 it is declared to the broker
    #: (Maximum Packet Size), which then never sends a larger one
    max_packet_kb: int = 1024


@dataclass(frozen=True)
class DiskSettings:
    """Disk budgets for the raw-input log and the outbox, and how often they fsync."""

    rawlog_budget_mb: int = 1024
    rawlog_segment_mb: int = 16
    rawlog_max_age_days: float = 30
    outbox_budget_mb: int = 256
    fsync_interval_ms: float = 1000

    @property
    def rawlog_budget_bytes(self) -> int:
        return int(self.rawlog_budget_mb * _MB)

    @property
    def rawlog_segment_bytes(self) -> int:
        return int(self.rawlog_segment_mb * _MB)

    @property
    def rawlog_max_age_s(self) -> float:
        return float(self.rawlog_max_age_days) * 86400.0

    @property
    def outbox_budget_bytes(self) -> int:
        return int(self.outbox_budget_mb * _MB)

    @property
    def fsync_interval_s(self) -> float:
        """0.0 means fsync after every append."""
        return float(self.fsync_interval_ms) / 1000.0


@dataclass(frozen=True)
class ModelLimits:
    """Caps on what pushes can make active and store (hold with or without trusted keys)."""

    max_active_versions: int = 4   # active versions per pipeline
    max_model_names: int = 2       # distinct model names active per pipeline
    store_budget_mb: int = 1024    # the model store (data_dir/models) on disk

    @property
    def store_budget_bytes(self) -> int:
        return int(self.store_budget_mb * _MB)


@dataclass(frozen=True)
class FirmwareProfile:
    """Everything hardware-dependent about running edgeml on one class of device."""

    name: str
    description: str = ""
    cpu_cores: int = 2
    memory_mb: int = 4096
    onnxruntime: OrtSettings = field(default_factory=OrtSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    disk: DiskSettings = field(default_factory=DiskSettings)
    models: ModelLimits = field(default_factory=ModelLimits)

    def to_dict(self) -> dict:
        """The TOML shape (providers as a list), e.g. to merge overrides over it."""
        d = asdict(self)
        d["onnxruntime"]["providers"] = list(self.onnxruntime.providers)
        return d


# --- validation -----------------------------------------------------------------------------
_PROFILE_NAME_RULE = "a valid profile name (1-64 of A-Z a-z 0-9 . _ -)"
_PROVIDER_RULE = ("an onnxruntime provider name (they look like 'CPUExecutionProvider', "
                  "'CUDAExecutionProvider')")
_SCORING_THREADS_GONE = "versions each have their own thread"


def _ort(t: Table) -> OrtSettings:
    d = OrtSettings()
    providers = t.list_of_str("providers", d.providers, nonempty=True, unique=True,
                              pattern=_PROVIDER_NAME, what=_PROVIDER_RULE)
    s = OrtSettings(
        intra_op_threads=t.int("intra_op_threads", d.intra_op_threads, min=0, max=1024),
        inter_op_threads=t.int("inter_op_threads", d.inter_op_threads, min=0, max=1024),
        graph_optimization=t.choice("graph_optimization", GRAPH_OPTIMIZATIONS,
                                    d.graph_optimization),
        execution_mode=t.choice("execution_mode", EXECUTION_MODES, d.execution_mode),
        enable_cpu_mem_arena=t.bool("enable_cpu_mem_arena", d.enable_cpu_mem_arena),
        enable_mem_pattern=t.bool("enable_mem_pattern", d.enable_mem_pattern),
        allow_spinning=t.bool("allow_spinning", d.allow_spinning),
        providers=providers,
    )
    t.finish()
    return s


def _batching(t: Table) -> BatchingSettings:
    d = BatchingSettings()
    t.deprecated("scoring_threads", _SCORING_THREADS_GONE)
    s = BatchingSettings(
        max_batch=t.int("max_batch", d.max_batch, min=1, max=1_000_000),
        max_wait_ms=t.number("max_wait_ms", d.max_wait_ms, min=0, max=60_000),
    )
    t.finish()
    return s


def _queue(t: Table) -> QueueSettings:
    d = QueueSettings()
    s = QueueSettings(
        max_messages=t.int("max_messages", d.max_messages, min=1, max=100_000_000),
        policy=t.choice("policy", QUEUE_POLICIES, d.policy),
        max_packet_kb=t.int("max_packet_kb", d.max_packet_kb, min=16, max=262_144),
    )
    t.finish()
    return s


def _disk(t: Table) -> DiskSettings:
    d = DiskSettings()
    s = DiskSettings(
        rawlog_budget_mb=t.int("rawlog_budget_mb", d.rawlog_budget_mb, min=1, max=100_000_000),
        rawlog_segment_mb=t.int("rawlog_segment_mb", d.rawlog_segment_mb, min=1, max=4096),
        rawlog_max_age_days=t.number("rawlog_max_age_days", d.rawlog_max_age_days, min=0,
                                     max=36500, min_open=True),
        outbox_budget_mb=t.int("outbox_budget_mb", d.outbox_budget_mb, min=1, max=100_000_000),
        fsync_interval_ms=t.number("fsync_interval_ms", d.fsync_interval_ms, min=0,
                                   max=3_600_000),
    )
    t.finish()
    if s.rawlog_segment_mb > s.rawlog_budget_mb:
        raise t.error("rawlog_segment_mb", f"{s.rawlog_segment_mb} is larger than "
                                           f"rawlog_budget_mb ({s.rawlog_budget_mb})")
    return s


def _models(t: Table) -> ModelLimits:
    d = ModelLimits()
    s = ModelLimits(
        max_active_versions=t.int("max_active_versions", d.max_active_versions, min=1,
                                  max=64),
        max_model_names=t.int("max_model_names", d.max_model_names, min=1, max=64),
        store_budget_mb=t.int("store_budget_mb", d.store_budget_mb, min=1, max=100_000_000),
    )
    t.finish()
    return s


_SECTIONS = ("onnxruntime", "batching", "queue", "disk", "models")


def profile_from_dict(
    d: Mapping[str, Any], source: str, *, key_prefix: str = ""
) -> FirmwareProfile:
    """Validate a profile given as a dict (a parsed TOML file, or a profile merged with a
    config's ``[profile_overrides]``). ``source`` names the file in errors; ``key_prefix``
    is put before every key name in errors (e.g. ``"profile_overrides"``)."""
    t = Table(d, key_prefix, file=str(source), error=ProfileError)
    dflt = FirmwareProfile(name="-")
    profile = FirmwareProfile(
        name=t.str("name", pattern=_PROFILE_NAME, what=_PROFILE_NAME_RULE),
        description=t.str("description", dflt.description),
        cpu_cores=t.int("cpu_cores", dflt.cpu_cores, min=1, max=1024),
        memory_mb=t.int("memory_mb", dflt.memory_mb, min=16, max=16 * 2**20),
        onnxruntime=_ort(t.table("onnxruntime", {})),
        batching=_batching(t.table("batching", {})),
        queue=_queue(t.table("queue", {})),
        disk=_disk(t.table("disk", {})),
        models=_models(t.table("models", {})),
    )
    t.finish()
    return profile


def apply_overrides(
    profile: FirmwareProfile, overrides: Mapping[str, Any], source: str,
    *, key_prefix: str = "profile_overrides",
) -> FirmwareProfile:
    """Merge a config's ``[profile_overrides]`` table over ``profile`` and validate the result.
    Errors name the override key (``profile_overrides.batching.max_batch``) and ``source``."""
    if not isinstance(overrides, Mapping):
        raise ProfileError(f"expected a table, got {type_name(overrides)}", key=key_prefix,
                           file=str(source))
    merged = profile.to_dict()
    for k, v in overrides.items():
        if k in _SECTIONS and isinstance(v, Mapping):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    # The base profile is valid, so any error in the merge comes from an override key.
    return profile_from_dict(merged, source, key_prefix=key_prefix)


# --- loading --------------------------------------------------------------------------------
def _shipped_dir():
    return files(PROFILE_PACKAGE)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with this edgeml, sorted."""
    return sorted(
        p.name[: -len(".toml")] for p in _shipped_dir().iterdir()
        if p.name.endswith(".toml") and p.is_file()
    )


def _looks_like_path(s: str | Path) -> bool:
    if isinstance(s, Path):
        return True
    return "/" in s or "\\" in s or s.endswith(".toml")


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> FirmwareProfile:
    """A shipped profile by name (``"pi4"``) or a profile file by path (``"./my.toml"``)."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ProfileError("no such profile file", file=source) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read profile: {exc}", file=source) from exc
    else:
        name = str(name_or_path)
        shipped = list_profiles()
        if name not in shipped:
            raise ProfileError(
                f"unknown firmware profile {name!r} (shipped: {', '.join(shipped)}; or give "
                "a path to a .toml file)"
            )
        resource = _shipped_dir() / f"{name}.toml"
        source = f"{PROFILE_PACKAGE}/{name}.toml"
        text = resource.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"not valid TOML: {exc}", file=source) from exc
    return profile_from_dict(data, source)


# --- onnxruntime ----------------------------------------------------------------------------
_GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_EXEC_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}


def resolve_providers(profile: FirmwareProfile, available: list[str] | None = None) -> list[str]:
    """The profile's providers that this onnxruntime has, in the profile's order, always
    including CPU (appended when the profile does not list it). Each missing one is logged
    as a WARNING (a Jetson image without the CUDA build of onnxruntime must not be silently
    slow)."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen = []
    for p in profile.onnxruntime.providers:
        if p in available:
            chosen.append(p)
        else:
            log.warning(
                "firmware profile %s lists %s, which this onnxruntime does not provide "
                "(available: %s); falling back to the next provider",
                profile.name, p, ", ".join(available),
            )
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


def session_options(profile: FirmwareProfile) -> tuple[ort.SessionOptions, list[str]]:
    """SessionOptions and the provider list (see :func:`resolve_providers`) for one model
    session under ``profile``."""
    import onnxruntime as ort

    s = profile.onnxruntime
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = s.intra_op_threads
    opts.inter_op_num_threads = s.inter_op_threads
    opts.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _GRAPH_LEVELS[s.graph_optimization]
    )
    opts.execution_mode = getattr(ort.ExecutionMode, _EXEC_MODES[s.execution_mode])
    opts.enable_cpu_mem_arena = s.enable_cpu_mem_arena
    opts.enable_mem_pattern = s.enable_mem_pattern
    spin = "1" if s.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts, resolve_providers(profile, ort.get_available_providers())


def create_session(model: Path | bytes, profile: FirmwareProfile) -> ort.InferenceSession:
    """An InferenceSession for ``model`` (a file or the ONNX bytes) configured by ``profile``;
    onnxruntime's errors become ModelError."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as _state

    ort_errors = tuple(
        v for v in vars(_state).values() if isinstance(v, type) and issubclass(v, Exception)
    )
    opts, providers = session_options(profile)
    what = "model bytes" if isinstance(model, (bytes, bytearray)) else str(model)
    source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers)
    except (*ort_errors, RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"onnxruntime cannot load {what}: {exc}") from exc
