"""The daemon's TOML config: parsed once at start, validated key by key, frozen.

Every error names the key (``pipelines[0].window.size``) and the file, so an operator can fix
it from the one line ``edgeml run --check`` prints.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.transport.settings import BrokerSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROLES = ("champion", "challenger", "shadow", "canary")
POLICIES = ("champion", "first", "vote", "mean")
FORMATS = ("auto", "json", "msgpack")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ROLE_PRIORITY = {"champion": 0, "challenger": 10, "canary": 20, "shadow": 30}


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    size: int
    hop: int


@dataclass(frozen=True, kw_only=True)
class ModelSlotConfig:
    """One model version in a pipeline. Lower ``priority`` wins ties and fallbacks."""

    name: str
    version: str
    role: str = "champion"
    priority: int = 0
    bundle: Path | None = None


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    name: str
    topics: tuple[str, ...]
    format: str = "auto"
    features: tuple[str, ...] | None = None
    field: str | None = None
    window: WindowConfig | None = None
    policy: str = "champion"
    deadline_ms: float = 50.0
    top_n: int = 2
    models: tuple[ModelSlotConfig, ...] = ()
    qos: int = 1
    output_format: str = "msgpack"
    output_qos: int = 1
    id_field: str = "id"
    label_field: str | None = "label"
    max_payload_bytes: int = 256 * 1024
    max_batch_samples: int = 1024
    shared_group: str | None = None
    canary_window: int = 200
    canary_threshold: float = 0.8

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """Topic filters as subscribed: ``$share/<group>/<filter>`` when the stream is shared."""
        if self.shared_group:
            return tuple(f"$share/{self.shared_group}/{t}" for t in self.topics)
        return self.topics


@dataclass(frozen=True, kw_only=True)
class DeployConfig:
    max_bundle_bytes: int = 64 * 2**20
    keep_versions: int = 3
    watch_window_s: float = 60.0
    max_error_rate: float = 0.05
    max_p99_ms: float | None = None
    min_canary_agreement: float | None = None


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    enabled: bool = True
    batch_max_records: int = 500
    batch_max_wait_s: float = 0.5
    bandwidth_bytes_per_s: float | None = None
    record_results: bool = True


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Path | None
    device_id: str
    profile: str = "x86-gateway"
    profile_overrides: dict = field(default_factory=dict)
    data_dir: Path = Path("/var/lib/edgeml")
    topic_prefix: str = "edgeml"
    trusted_keys: tuple[Path, ...] = ()
    groups: tuple[str, ...] = ()
    status_interval_s: float = 10.0
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    upstream: BrokerSettings | None = None
    pipelines: tuple[PipelineConfig, ...] = ()
    deploy: DeployConfig = field(default_factory=DeployConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    def topic(self, *parts: str) -> str:
        return "/".join((self.topic_prefix, self.device_id, *parts))

    def pipeline(self, name: str) -> PipelineConfig:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise ConfigError(f"no pipeline named {name!r}", key="pipelines", file=_src(self.source))


def _src(path: Path | None) -> str | None:
    return str(path) if path else None


class _Reader:
    """Pops typed values out of one TOML table; leftovers are unknown keys."""

    def __init__(self, table: Mapping[str, Any], prefix: str, file: str | None):
        if not isinstance(table, Mapping):
            raise ConfigError("must be a table", key=prefix or None, file=file)
        self.table = dict(table)
        self.prefix = prefix
        self.file = file

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, key=self.key(name), file=self.file)

    def take(self, name: str, types: type | tuple[type, ...], default: Any = ..., *,
             required: bool = False) -> Any:
        if name not in self.table:
            if required or default is ...:
                raise self.error(name, "is required")
            return default
        value = self.table.pop(name)
        types_t = types if isinstance(types, tuple) else (types,)
        if float in types_t and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types_t:
            raise self.error(name, f"must be {_tname(types_t)}, not a boolean")
        if not isinstance(value, types_t):
            raise self.error(name, f"must be {_tname(types_t)}, not {type(value).__name__} "
                                   f"{value!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def positive(self, name: str, types: type | tuple[type, ...], default: Any, *,
                 zero_ok: bool = False) -> Any:
        value = self.take(name, types, default)
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            raise self.error(name, f"must be {'>= 0' if zero_ok else '> 0'}; got {value!r}")
        return value

    def finish(self) -> None:
        if self.table:
            bad = sorted(self.table)[0]
            raise self.error(bad, "unknown key" + (
                f" (did you mean {_close(bad, self.known)}?)" if _close(bad, self.known) else ""))

    known: tuple[str, ...] = ()


def _tname(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _close(word: str, candidates: tuple[str, ...]) -> str | None:
    import difflib
    hits = difflib.get_close_matches(word, candidates, n=1)
    return hits[0] if hits else None


def _name(r: _Reader, key: str, value: str) -> str:
    if not _NAME.match(value):
        raise r.error(key, f"{value!r} must be 1-64 characters of letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit")
    return value


def _str_list(r: _Reader, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    value = r.take(key, list, list(default))
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise r.error(f"{key}[{i}]", f"must be a non-empty string, not {item!r}")
    return tuple(value)


def _resolve(base: Path | None, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or base is None else (base.parent / p)


def _broker(table: Mapping[str, Any], prefix: str, file: str | None, base: Path | None,
            default_client_id: str) -> BrokerSettings:
    r = _Reader(table, prefix, file)
    r.known = ("url", "client_id", "username", "password", "password_file", "ca_file",
               "cert_file", "key_file", "tls_insecure", "keepalive", "protocol", "max_inflight")
    url = r.take("url", str, "mqtt://127.0.0.1:1883")
    client_id = r.take("client_id", str, default_client_id)
    username = r.take("username", str, None)
    password = r.take("password", str, None)
    password_file = r.take("password_file", str, None)
    if password_file is not None:
        try:
            password = _resolve(base, password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise r.error("password_file", f"cannot read {password_file}: {exc.strerror}") from exc
    files = {}
    for k in ("ca_file", "cert_file", "key_file"):
        v = r.take(k, str, None)
        if v is not None:
            path = _resolve(base, v)
            if not path.is_file():
                raise r.error(k, f"no such file: {path}")
            files[k] = str(path)
    tls_insecure = r.take("tls_insecure", bool, False)
    keepalive = r.take("keepalive", int, 30)
    protocol = r.choice("protocol", ("3.1.1", "5"), "3.1.1")
    max_inflight = r.take("max_inflight", int, 20)
    r.finish()
    try:
        return BrokerSettings(
            url=url, client_id=client_id, username=username, password=password,
            tls_insecure=tls_insecure, keepalive=keepalive, protocol=protocol,
            max_inflight=max_inflight, clean_start=False, **files,
        )
    except ConfigError as exc:
        key = (exc.key or "").replace("broker.", f"{prefix}.")
        raise ConfigError(str(exc).split(": ", 1)[-1], key=key, file=file) from None


def _pipeline(table: Mapping[str, Any], idx: int, file: str | None,
              base: Path | None) -> PipelineConfig:
    r = _Reader(table, f"pipelines[{idx}]", file)
    r.known = ("name", "topics", "format", "features", "field", "window", "policy",
               "deadline_ms", "top_n", "models", "qos", "output_format", "output_qos",
               "id_field", "label_field", "max_payload_bytes", "max_batch_samples",
               "shared_group", "canary_window", "canary_threshold")
    name = _name(r, "name", r.take("name", str, required=True))
    topics = _str_list(r, "topics")
    if not topics:
        raise r.error("topics", "needs at least one topic filter")
    for i, t in enumerate(topics):
        if t.startswith("$share/"):
            raise r.error(f"topics[{i}]", "use shared_group instead of writing $share/ yourself")
    fmt = r.choice("format", FORMATS, "auto")
    features = r.take("features", list, None)
    field_ = r.take("field", str, None)
    if features is not None:
        features = tuple(features)
        if not features or not all(isinstance(f, str) and f for f in features):
            raise r.error("features", "must be a non-empty list of field names")
        if len(set(features)) != len(features):
            raise r.error("features", "has duplicate names")
    if (features is None) == (field_ is None):
        raise r.error("features", "give exactly one of 'features' (field names) or 'field' "
                                  "(one array field)")
    window = None
    wt = r.take("window", dict, None)
    if wt is not None:
        wr = _Reader(wt, r.key("window"), file)
        wr.known = ("size", "hop")
        size = wr.positive("size", int, None)
        if size is None:
            raise wr.error("size", "is required")
        hop = wr.positive("hop", int, size)
        wr.finish()
        if hop > size:
            raise wr.error("hop", f"must be <= size ({size}); got {hop}")
        window = WindowConfig(size=size, hop=hop)
    policy = r.choice("policy", POLICIES, "champion")
    deadline_ms = r.positive("deadline_ms", float, 50.0)
    top_n = r.positive("top_n", int, 2)
    qos = r.take("qos", int, 1)
    if qos not in (0, 1):
        raise r.error("qos", f"must be 0 or 1; got {qos}")
    output_format = r.choice("output_format", ("msgpack", "json"), "msgpack")
    output_qos = r.take("output_qos", int, 1)
    if output_qos not in (0, 1):
        raise r.error("output_qos", f"must be 0 or 1; got {output_qos}")
    id_field = r.take("id_field", str, "id")
    label_field = r.take("label_field", str, "label") or None
    max_payload = r.positive("max_payload_bytes", int, 256 * 1024)
    max_batch_samples = r.positive("max_batch_samples", int, 1024)
    shared_group = r.take("shared_group", str, None)
    if shared_group is not None:
        _name(r, "shared_group", shared_group)
    canary_window = r.positive("canary_window", int, 200)
    canary_threshold = r.take("canary_threshold", float, 0.8)
    if not 0.0 <= canary_threshold <= 1.0:
        raise r.error("canary_threshold", f"must be between 0 and 1; got {canary_threshold}")
    models_raw = r.take("models", list, [])
    r.finish()
    models: list[ModelSlotConfig] = []
    seen: set[tuple[str, str]] = set()
    for j, mt in enumerate(models_raw):
        mr = _Reader(mt, f"pipelines[{idx}].models[{j}]", file)
        mr.known = ("name", "version", "role", "priority", "bundle")
        mname = _name(mr, "name", mr.take("name", str, required=True))
        version = mr.take("version", (str, int), required=True)
        version = _name(mr, "version", str(version))
        role = mr.choice("role", ROLES, "champion")
        priority = mr.take("priority", int, _ROLE_PRIORITY[role] + j)
        bundle = mr.take("bundle", str, None)
        mr.finish()
        bpath = _resolve(base, bundle) if bundle else None
        if bpath is not None and not bpath.is_file():
            raise mr.error("bundle", f"no such file: {bpath}")
        if (mname, version) in seen:
            raise mr.error("version", f"{mname} {version} is listed twice")
        seen.add((mname, version))
        models.append(ModelSlotConfig(name=mname, version=version, role=role,
                                      priority=priority, bundle=bpath))
    champions = [m for m in models if m.role == "champion"]
    if len(champions) > 1:
        raise ConfigError("more than one champion", key=f"pipelines[{idx}].models", file=file)
    return PipelineConfig(
        name=name, topics=topics, format=fmt, features=features, field=field_, window=window,
        policy=policy, deadline_ms=deadline_ms, top_n=top_n, models=tuple(models), qos=qos,
        output_format=output_format, output_qos=output_qos, id_field=id_field,
        label_field=label_field, max_payload_bytes=max_payload,
        max_batch_samples=max_batch_samples, shared_group=shared_group,
        canary_window=canary_window, canary_threshold=canary_threshold,
    )


def parse_config(data: Mapping[str, Any], *, source: Path | None = None,
                 broker_url: str | None = None, data_dir: str | Path | None = None) -> Config:
    file = _src(source)
    r = _Reader(data, "", file)
    r.known = ("device_id", "profile", "data_dir", "topic_prefix", "trusted_keys", "groups",
               "status_interval_s", "broker", "upstream", "pipelines", "deploy", "sync",
               "profile_overrides")
    device_id = _name(r, "device_id", r.take("device_id", str, required=True))
    profile = r.take("profile", str, "x86-gateway")
    if "/" in profile or profile.endswith(".toml"):
        profile = str(_resolve(source, profile))
    profile_overrides = r.take("profile_overrides", dict, {})
    dd = r.take("data_dir", str, "/var/lib/edgeml")
    data_path = Path(data_dir) if data_dir is not None else _resolve(source, dd)
    prefix = r.take("topic_prefix", str, "edgeml")
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or \
            prefix.endswith("/"):
        raise r.error("topic_prefix", f"{prefix!r} must be a plain topic level without + # or "
                                      "leading/trailing /")
    keys = tuple(_resolve(source, k) for k in _str_list(r, "trusted_keys"))
    for i, k in enumerate(keys):
        if not k.is_file():
            raise r.error(f"trusted_keys[{i}]", f"no such file: {k}")
    groups = _str_list(r, "groups")
    for g in groups:
        _name(r, "groups", g)
    status_interval = r.positive("status_interval_s", float, 10.0)
    broker_t = dict(r.take("broker", dict, {}))
    if broker_url is not None:
        broker_t["url"] = broker_url
    broker = _broker(broker_t, "broker", file, source, f"edgeml-{device_id}")
    up_t = r.take("upstream", dict, None)
    upstream = (_broker(up_t, "upstream", file, source, f"edgeml-{device_id}-uplink")
                if up_t is not None else None)
    dep = _Reader(r.take("deploy", dict, {}), "deploy", file)
    dep.known = ("max_bundle_bytes", "keep_versions", "watch_window_s", "max_error_rate",
                 "max_p99_ms", "min_canary_agreement")
    deploy = DeployConfig(
        max_bundle_bytes=dep.positive("max_bundle_bytes", int, 64 * 2**20),
        keep_versions=dep.positive("keep_versions", int, 3),
        watch_window_s=dep.positive("watch_window_s", float, 60.0, zero_ok=True),
        max_error_rate=dep.positive("max_error_rate", float, 0.05, zero_ok=True),
        max_p99_ms=dep.positive("max_p99_ms", float, None),
        min_canary_agreement=dep.positive("min_canary_agreement", float, None, zero_ok=True),
    )
    dep.finish()
    sy = _Reader(r.take("sync", dict, {}), "sync", file)
    sy.known = ("enabled", "batch_max_records", "batch_max_wait_s", "bandwidth_bytes_per_s",
                "record_results")
    sync = SyncConfig(
        enabled=sy.take("enabled", bool, True),
        batch_max_records=sy.positive("batch_max_records", int, 500),
        batch_max_wait_s=sy.positive("batch_max_wait_s", float, 0.5),
        bandwidth_bytes_per_s=sy.positive("bandwidth_bytes_per_s", float, None),
        record_results=sy.take("record_results", bool, True),
    )
    sy.finish()
    pipes_raw = r.take("pipelines", list, [])
    r.finish()
    pipelines = tuple(_pipeline(t, i, file, source) for i, t in enumerate(pipes_raw))
    names = [p.name for p in pipelines]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"duplicate pipeline name {n!r}", key=f"pipelines[{i}].name",
                              file=file)
    return Config(
        source=source, device_id=device_id, profile=profile,
        profile_overrides=profile_overrides, data_dir=data_path,
        topic_prefix=prefix, trusted_keys=keys, groups=groups, status_interval_s=status_interval,
        broker=broker, upstream=upstream, pipelines=pipelines, deploy=deploy, sync=sync,
    )


def load_device_profile(config: Config):
    """The firmware profile the config names, with its ``[profile_overrides]`` merged in."""
    from edgeml.profiles import apply_overrides, load_profile

    profile = load_profile(config.profile)
    if config.profile_overrides:
        profile = apply_overrides(profile, config.profile_overrides, _src(config.source) or "")
    return profile


def load_config(path: str | Path, *, broker_url: str | None = None,
                data_dir: str | Path | None = None) -> Config:
    """Read and validate ``path``; ``broker_url``/``data_dir`` override the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(p)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(p)) from exc
    return parse_config(data, source=p.resolve(), broker_url=broker_url, data_dir=data_dir)
