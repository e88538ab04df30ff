"""The daemon's TOML config: parsed once at start, validated key by key, frozen.

Every error names the key (``pipelines[0].window.size``) and the file, so an operator can fix
it from the one line ``edgeml run --check`` prints.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeml.errors import ConfigError
from edgeml.transport.settings import BrokerSettings
from edgeml.validate import Table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROLES = ("champion", "challenger", "shadow", "canary")
POLICIES = ("champion", "first", "vote", "mean")
FORMATS = ("auto", "json", "msgpack", "senml", "influx_line", "value", "sparkplug_b")
#: formats whose topics are derived (topic_template, sparkplug) rather than listed
_DERIVED_TOPICS = ("value", "sparkplug_b")
_TOPIC_LEVEL = re.compile(r"^[^/+#]+$")
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
    topic_template: str | None = None
    max_age_s: float | None = None
    #: the format's options for the decoder (ValueSpec, SparkplugSpec), derived from the keys
    format_spec: Any = None

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
class MetricsConfig:
    """``[metrics]``: Prometheus text on /metrics, /healthz, /readyz; ``listen = ""``: off."""

    listen: str = "127.0.0.1:9464"

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """``[drift]``: input/output drift and sensor health against the bundles' references
    (docs/configuration.md; the figures: edgeml/core/drift.py)."""

    enabled: bool = True
    window: int = 2000  # input samples per drift window
    output_window: int = 500  # rows per version per output window
    #: a window also lasts at least this long (monotonic seconds): in a flood the windows
    #: grow instead of closing hundreds of times a second, one record each
    min_window_s: float = 1.0
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    ks_alert: float | None = None  # off unless set
    consecutive: int = 2  # bad windows in a row before an alert; good ones before cleared
    out_of_range: float = 0.05  # share of samples outside the training min..max
    stuck_min_samples: int = 20  # samples a source must send in a window to be judged stuck
    rate_interval_s: float = 10.0
    rate_drop_ratio: float = 0.5
    max_sources: int = 32


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
    #: every upstream broker, tried in order (``[upstream] urls``); ``upstream`` is the first
    upstreams: tuple[BrokerSettings, ...] = ()
    upstream_failover_after_s: float = 10.0
    pipelines: tuple[PipelineConfig, ...] = ()
    deploy: DeployConfig = field(default_factory=DeployConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def topic(self, *parts: str) -> str:
        return "/".join((self.topic_prefix, self.device_id, *parts))

    def pipeline(self, name: str) -> PipelineConfig:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise ConfigError(f"no pipeline named {name!r}", key="pipelines", file=_src(self.source))


def _src(path: Path | None) -> str | None:
    return str(path) if path else None


_NAME_RULE = "a valid name (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"


def _resolve(base: Path | None, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or base is None else (base.parent / p)


def _broker(r: Table, base: Path | None, default_client_id: str,
            url_override: str | None = None, *, upstream: bool = False) -> BrokerSettings:
    r.known = ("url", "client_id", "username", "password", "password_file", "ca_file",
               "cert_file", "key_file", "tls_insecure", "keepalive", "protocol", "max_inflight")
    if upstream:
        r.known = (*r.known, "urls", "failover_after_s")
    if url_override is not None:  # --broker replaces the file's url, whatever it holds
        r.value("url", None)
        url = url_override
    else:
        url = r.str("url", "mqtt://127.0.0.1:1883")
    client_id = r.str("client_id", default_client_id)
    username = r.str("username", None)
    password = r.str("password", None)
    password_file = r.str("password_file", None)
    if password_file is not None:
        try:
            password = _resolve(base, password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise r.error("password_file",
                          f"cannot read {password_file}: {exc.strerror}") from exc
    files = {}
    for k in ("ca_file", "cert_file", "key_file"):
        v = r.str(k, None)
        if v is not None:
            path = _resolve(base, v)
            if not path.is_file():
                raise r.error(k, f"no such file: {path}")
            files[k] = str(path)
    tls_insecure = r.bool("tls_insecure", False)
    keepalive = r.int("keepalive", 30)
    protocol = r.choice("protocol", ("auto", "5", "3.1.1"), "auto")
    max_inflight = r.int("max_inflight", None)
    r.finish()
    try:
        return BrokerSettings(
            url=url, client_id=client_id, username=username, password=password,
            tls_insecure=tls_insecure, keepalive=keepalive, protocol=protocol,
            max_inflight=max_inflight, clean_start=False, **files,
        )
    except ConfigError as exc:
        key = (exc.key or "").replace("broker.", f"{r.prefix}.")
        raise ConfigError(str(exc).split(": ", 1)[-1], key=key, file=r.file) from None


def _version(mr: Table) -> str:
    """A model version: a name, or an integer written without quotes."""
    raw = mr.typed("version", (str, int), what="a string or integer")
    version = str(raw)
    if not _NAME.fullmatch(version):
        raise mr.error("version", f"{version!r} is not {_NAME_RULE}")
    return version


def _check_filter(r: Table, key: str, topic_filter: str) -> None:
    """A filter no broker accepts is a config error naming the key."""
    from edgeml.errors import EdgemlError
    from edgeml.transport.base import validate_filter

    try:
        validate_filter(topic_filter)
    except EdgemlError as exc:
        raise r.error(key, str(exc)) from None


def _pipeline(r: Table, base: Path | None) -> PipelineConfig:
    r.known = ("name", "topics", "format", "features", "field", "window", "policy",
               "deadline_ms", "top_n", "models", "qos", "output_format", "output_qos",
               "id_field", "label_field", "max_payload_bytes", "max_batch_samples",
               "shared_group", "canary_window", "canary_threshold", "topic_template",
               "max_age_s", "sparkplug")
    name = r.str("name", pattern=_NAME, what=_NAME_RULE)
    fmt = r.choice("format", FORMATS, "auto")
    if fmt in _DERIVED_TOPICS and "topics" in r:
        what = "topic_template" if fmt == "value" else "sparkplug.group_id/edge_node_id"
        raise r.error("topics", f"format {fmt!r} derives its subscription from {what}; "
                                "remove 'topics'")
    topics = r.list_of_str("topics", (), nonempty=True) if fmt not in _DERIVED_TOPICS else ()
    for i, t in enumerate(topics):
        if t.startswith("$share/"):
            raise r.error(f"topics[{i}]", "use shared_group instead of writing $share/ yourself")
        _check_filter(r, f"topics[{i}]", t)
    features = r.list_of_str("features", None, nonempty=True, unique=True)
    field_ = r.str("field", None)
    if (features is None) == (field_ is None):
        raise r.error("features", "give exactly one of 'features' (field names) or 'field' "
                                  "(one array field)")
    if fmt in ("senml", "influx_line", "value", "sparkplug_b") and field_ is not None:
        raise r.error("field", f"format {fmt!r} names its values: list them in 'features'")
    topics, spec, template, max_age = _format_options(r, fmt, topics, features)
    window = None
    wr = r.table("window", None)
    if wr is not None:
        wr.known = ("size", "hop")
        size = wr.int("size", min=1)
        hop = wr.int("hop", size, min=1)
        wr.finish()
        if hop > size:
            raise wr.error("hop", f"{hop} is out of range (expected <= size, {size})")
        window = WindowConfig(size=size, hop=hop)
    policy = r.choice("policy", POLICIES, "champion")
    deadline_ms = r.number("deadline_ms", 50.0, min=0, min_open=True)
    top_n = r.int("top_n", 2, min=1)
    qos = r.int("qos", 1, min=0, max=1)
    output_format = r.choice("output_format", ("msgpack", "json"), "msgpack")
    output_qos = r.int("output_qos", 1, min=0, max=1)
    id_field = r.str("id_field", "id")
    label_field = r.str("label_field", "label") or None
    max_payload = r.int("max_payload_bytes", 256 * 1024, min=1)
    max_batch_samples = r.int("max_batch_samples", 1024, min=1)
    shared_group = r.str("shared_group", None, pattern=_NAME, what=_NAME_RULE)
    if shared_group is not None and fmt in _DERIVED_TOPICS:
        raise r.error("shared_group", f"not with format {fmt!r}: a shared subscription splits "
                                      "a source's messages between devices, so its samples "
                                      "(and a Sparkplug node's sequence) never complete")
    canary_window = r.int("canary_window", 200, min=1)
    canary_threshold = r.number("canary_threshold", 0.8, min=0, max=1)
    models_raw = r.seq("models", [])
    r.finish()
    models: list[ModelSlotConfig] = []
    seen: set[tuple[str, str]] = set()
    for j, mr in enumerate(models_raw.tables()):
        mr.known = ("name", "version", "role", "priority", "bundle")
        mname = mr.str("name", pattern=_NAME, what=_NAME_RULE)
        version = _version(mr)
        role = mr.choice("role", ROLES, "champion")
        priority = mr.int("priority", _ROLE_PRIORITY[role] + j)
        bundle = mr.str("bundle", None)
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
        raise r.error("models", "more than one champion")
    return PipelineConfig(
        name=name, topics=topics, format=fmt, features=features, field=field_, window=window,
        policy=policy, deadline_ms=deadline_ms, top_n=top_n, models=tuple(models), qos=qos,
        output_format=output_format, output_qos=output_qos, id_field=id_field,
        label_field=label_field, max_payload_bytes=max_payload,
        max_batch_samples=max_batch_samples, shared_group=shared_group,
        canary_window=canary_window, canary_threshold=canary_threshold,
        topic_template=template, max_age_s=max_age, format_spec=spec,
    )


def _format_options(r: Table, fmt: str, topics: tuple[str, ...],
                    features: tuple[str, ...] | None) -> tuple[tuple[str, ...], Any,
                                                               str | None, float | None]:
    """topic_template / max_age_s / [sparkplug] of one pipeline -> (topics, spec, ...)."""
    for key, owner in (("topic_template", "value"), ("sparkplug", "sparkplug_b")):
        if key in r and fmt != owner:
            raise r.error(key, f"only for format = {owner!r} (this pipeline's is {fmt!r})")
    if "max_age_s" in r and fmt not in _DERIVED_TOPICS:
        raise r.error("max_age_s", "only for format = 'value' or 'sparkplug_b'")
    max_age = r.number("max_age_s", 10.0, min=0, min_open=True)
    if fmt == "value":
        from edgeml.core.formats.value import TopicTemplate, ValueSpec

        template = r.str("topic_template")
        try:
            tt = TopicTemplate.parse(template)
        except ValueError as exc:
            raise r.error("topic_template", f"{template!r}: {exc}") from None
        for i, f in enumerate(features or ()):
            if not _TOPIC_LEVEL.fullmatch(f):
                raise r.error(f"features[{i}]", f"{f!r} cannot be a topic level (the "
                                                "{feature} of topic_template)")
        return (tt.topic_filter,), ValueSpec(tt, max_age), template, max_age
    if fmt == "sparkplug_b":
        from edgeml.core.formats import sparkplug

        if not sparkplug.available():
            raise r.error("format", "'sparkplug_b' needs the protobuf package, which is not "
                                    "installed: pip install 'edgeml[sparkplug]'")
        sp = r.table("sparkplug")
        sp.known = ("group_id", "edge_node_id", "metrics", "rebirth", "rebirth_interval_s")
        level = "a topic level without / + #"
        group = sp.str("group_id", pattern=_TOPIC_LEVEL, what=level)
        node = sp.str("edge_node_id", "+")
        if node != "+" and not _TOPIC_LEVEL.fullmatch(node):
            raise sp.error("edge_node_id", f"{node!r} is not {level} (or \"+\": every node)")
        mapping = sp.mapping("metrics", {})
        for metric, feat in mapping.items():
            if not isinstance(feat, str) or feat not in (features or ()):
                raise sp.error(f"metrics.{metric}", f"{feat!r} is not one of the pipeline's "
                                                    "features")
        spec = sparkplug.SparkplugSpec(
            group_id=group, edge_node_id=node, metrics=tuple(mapping.items()),
            rebirth=sp.bool("rebirth", False),
            rebirth_interval_s=sp.number("rebirth_interval_s", 30.0, min=0),
            max_age_s=max_age)
        sp.finish()
        return (spec.topic_filter,), spec, None, max_age
    return topics, None, None, None


def _upstreams(up: Table, base: Path | None,
               default_client_id: str) -> tuple[tuple[BrokerSettings, ...], float]:
    """``[upstream]``: one broker (``url``) or several tried in order (``urls``: strings, or
    tables ``{ url = ..., protocol = ... }`` when one connection needs another MQTT version).
    Every other key applies to all of them."""
    failover = up.number("failover_after_s", 10.0, min=0, min_open=True)
    urls = up.seq("urls", None)
    if urls is None:
        return (_broker(up, base, default_client_id, upstream=True),), failover
    if "url" in up:
        raise up.error("urls", "give url or urls, not both")
    if not len(urls):
        raise up.error("urls", "must list at least one broker URL")
    entries: list[tuple[str, str, str | None]] = []  # (key, url, protocol)
    for i, item in enumerate(urls.data):
        if isinstance(item, str):
            entries.append((urls.key(i), item, None))
            continue
        if not isinstance(item, Mapping):
            raise urls.error(i, f"expected a URL string or a table, got {item!r}")
        t = urls.table(i)
        t.known = ("url", "protocol")
        entries.append((t.key("url"), t.str("url"), t.choice("protocol", ("3.1.1", "5"), None)))
        t.finish()
    first = _broker(up, base, default_client_id, entries[0][1], upstream=True)
    out = []
    for key, url, protocol in entries:
        try:
            out.append(dataclasses.replace(first, url=url, protocol=protocol or first.protocol))
        except ConfigError as exc:
            raise ConfigError(str(exc).split(": ", 1)[-1], key=key, file=up.file) from None
    return tuple(out), failover


def parse_config(data: Mapping[str, Any], *, source: Path | None = None,
                 broker_url: str | None = None, data_dir: str | Path | None = None) -> Config:
    file = _src(source)
    r = Table(data, file=file, error=ConfigError)
    # Each table declares its keys (``X.known = (...)``): finish() checks the getters against
    # them, and tests/test_service.py reads them to check every key is documented.
    r.known = ("device_id", "profile", "data_dir", "topic_prefix", "trusted_keys", "groups",
               "status_interval_s", "broker", "upstream", "pipelines", "deploy", "sync",
               "profile_overrides", "metrics", "drift")
    device_id = r.str("device_id", pattern=_NAME, what=_NAME_RULE)
    profile = r.str("profile", "x86-gateway")
    if "/" in profile or profile.endswith(".toml"):
        profile = str(_resolve(source, profile))
    profile_overrides = r.mapping("profile_overrides", {})
    dd = r.str("data_dir", "/var/lib/edgeml")
    data_path = Path(data_dir) if data_dir is not None else _resolve(source, dd)
    if data_path.exists() and not data_path.is_dir():  # --check completeness
        raise r.error("data_dir", f"{data_path} exists and is not a directory")
    prefix = r.str("topic_prefix", "edgeml")
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or \
            prefix.endswith("/"):
        raise r.error("topic_prefix", f"{prefix!r} must be a plain topic level without + # or "
                                      "leading/trailing /")
    keys = tuple(_resolve(source, k) for k in r.list_of_str("trusted_keys", ()))
    for i, k in enumerate(keys):
        if not k.is_file():
            raise r.error(f"trusted_keys[{i}]", f"no such file: {k}")
    groups = r.list_of_str("groups", (), pattern=_NAME, what=_NAME_RULE)
    status_interval = r.number("status_interval_s", 10.0, min=0, min_open=True)
    broker = _broker(r.table("broker", {}), source, f"edgeml-{device_id}", broker_url)
    up = r.table("upstream", None)
    upstreams, failover_after_s = (_upstreams(up, source, f"edgeml-{device_id}-uplink")
                                   if up is not None else ((), 10.0))
    upstream = upstreams[0] if upstreams else None
    dep = r.table("deploy", {})
    dep.known = ("max_bundle_bytes", "keep_versions", "watch_window_s", "max_error_rate",
                 "max_p99_ms", "min_canary_agreement")
    deploy = DeployConfig(
        max_bundle_bytes=dep.int("max_bundle_bytes", 64 * 2**20, min=1),
        keep_versions=dep.int("keep_versions", 3, min=1),
        watch_window_s=dep.number("watch_window_s", 60.0, min=0),
        max_error_rate=dep.number("max_error_rate", 0.05, min=0),
        max_p99_ms=dep.number("max_p99_ms", None, min=0, min_open=True),
        min_canary_agreement=dep.number("min_canary_agreement", None, min=0),
    )
    dep.finish()
    sy = r.table("sync", {})
    sy.known = ("enabled", "batch_max_records", "batch_max_wait_s", "bandwidth_bytes_per_s",
                "record_results")
    sync = SyncConfig(
        enabled=sy.bool("enabled", True),
        batch_max_records=sy.int("batch_max_records", 500, min=1),
        batch_max_wait_s=sy.number("batch_max_wait_s", 0.5, min=0, min_open=True),
        bandwidth_bytes_per_s=sy.number("bandwidth_bytes_per_s", None, min=0, min_open=True),
        record_results=sy.bool("record_results", True),
    )
    sy.finish()
    metrics = _metrics(r.table("metrics", {}))
    drift = _drift(r.table("drift", {}))
    pipes = r.seq("pipelines", [])
    r.finish()
    pipelines = tuple(_pipeline(t, source) for t in pipes.tables())
    names = [p.name for p in pipelines]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise pipes.table(i).error("name", f"duplicate pipeline name {n!r}")
    return Config(
        source=source, device_id=device_id, profile=profile,
        profile_overrides=profile_overrides, data_dir=data_path,
        topic_prefix=prefix, trusted_keys=keys, groups=groups, status_interval_s=status_interval,
        broker=broker, upstream=upstream, upstreams=upstreams,
        upstream_failover_after_s=failover_after_s, pipelines=pipelines, deploy=deploy, sync=sync,
        metrics=metrics, drift=drift,
    )


_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):\d{1,5}$")


def _metrics(m: Table) -> MetricsConfig:
    m.known = ("listen",)
    listen = m.str("listen", "127.0.0.1:9464")
    if listen and (not _LISTEN.fullmatch(listen) or int(listen.rsplit(":", 1)[1]) > 65535):
        raise m.error("listen", f"{listen!r} is not HOST:PORT (or \"\" to turn it off)")
    m.finish()
    return MetricsConfig(listen=listen)


def _drift(d: Table) -> DriftConfig:
    d.known = ("enabled", "window", "output_window", "min_window_s", "psi_warn", "psi_alert",
               "ks_alert",
               "consecutive", "out_of_range", "stuck_min_samples", "rate_interval_s",
               "rate_drop_ratio", "max_sources")
    psi_warn = d.number("psi_warn", 0.1, min=0, min_open=True)
    cfg = DriftConfig(
        enabled=d.bool("enabled", True),
        window=d.int("window", 2000, min=100),
        output_window=d.int("output_window", 500, min=10),
        min_window_s=d.number("min_window_s", 1.0, min=0),
        psi_warn=psi_warn,
        psi_alert=d.number("psi_alert", 0.25, min=psi_warn),
        ks_alert=d.number("ks_alert", None, min=0, min_open=True, max=1),
        consecutive=d.int("consecutive", 2, min=1),
        out_of_range=d.number("out_of_range", 0.05, min=0, min_open=True, max=1),
        stuck_min_samples=d.int("stuck_min_samples", 20, min=2),
        rate_interval_s=d.number("rate_interval_s", 10.0, min=0, min_open=True),
        rate_drop_ratio=d.number("rate_drop_ratio", 0.5, min=0, min_open=True, max=1),
        max_sources=d.int("max_sources", 32, min=1, max=10_000),
    )
    d.finish()
    return cfg


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
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise ConfigError(f"not valid TOML: a number is too large ({exc})", file=str(p)) \
            from exc
    _check_int64(data, "", str(p))  # --check completeness
    return parse_config(data, source=p.resolve(), broker_url=broker_url, data_dir=data_dir)


def _check_int64(value: Any, key: str, file: str) -> None:
    """TOML integers are 64-bit; tomllib reads larger ones. Refuse them, naming
    the key, before any of them reaches a size, a budget or a count."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{str(value)[:20]}... does not fit a 64-bit integer", key=key,
                              file=file)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_int64(v, f"{key}.{k}" if key else str(k), file)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_int64(v, f"{key}[{i}]", file)
