"""How to reach one broker: :class:`BrokerSettings` and :func:`parse_broker_url`.

Paho-free on purpose: loading a config builds these, and ``edgeml run --check`` or the host
tools must not pay for importing paho just to validate a URL. Every connection has its own
settings object, so the device broker and the upstream (uplink) broker can differ in anything,
the MQTT protocol version included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edgeml.errors import ConfigError

PROTOCOLS = ("auto", "5", "3.1.1")
#: QoS 1 publishes in flight when the settings name no window
DEFAULT_MAX_INFLIGHT = 100


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """How to reach one broker. Built from config; validated when built."""

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    clean_start: bool = False
    #: "auto": MQTT 5, and 3.1.1 on a connection whose broker refuses 5 (amqtt, NATS)
    protocol: str = "3.1.1"
    #: None: DEFAULT_MAX_INFLIGHT (the device sizes its publishing window to the batch)
    max_inflight: int | None = None
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    connect_timeout_s: float = 10.0
    subscribe_timeout_s: float = 10.0
    #: MQTT 5 only: declared in CONNECT as Maximum Packet Size (the broker sends nothing
    #: larger); None declares nothing
    max_packet_bytes: int | None = None
    #: MQTT 5 only: declared in CONNECT as Receive Maximum, the QoS 1 messages the broker
    #: may send before we acknowledge (mosquitto's max_inflight_messages, 20 by default,
    #: applies to 3.1.1 clients instead)
    receive_maximum: int | None = None

    def __post_init__(self) -> None:
        parse_broker_url(self.url)
        if self.keepalive < 5:
            raise ConfigError("must be at least 5 seconds", key="broker.keepalive")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"must be 'auto', '5' or '3.1.1', not {self.protocol!r}",
                              key="broker.protocol")
        if self.max_inflight is not None and not 1 <= self.max_inflight <= 65535:
            raise ConfigError(f"must be between 1 and 65535, not {self.max_inflight}",
                              key="broker.max_inflight")
        if self.clean_start is False and not self.client_id:
            raise ConfigError("a persistent session needs a client_id", key="broker.client_id")
        if self.max_packet_bytes is not None and not 1024 <= self.max_packet_bytes <= 2**28:
            raise ConfigError(f"must be between 1 KiB and 256 MiB, not {self.max_packet_bytes}",
                              key="broker.max_packet_bytes")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise ConfigError(f"must be between 1 and 65535, not {self.receive_maximum}",
                              key="broker.receive_maximum")
        if self.subscribe_timeout_s <= 0:
            raise ConfigError(f"must be positive, not {self.subscribe_timeout_s}",
                              key="broker.subscribe_timeout_s")

    @property
    def host(self) -> str:
        return parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        return parse_broker_url(self.url)[2]

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url)[0]


def parse_broker_url(url: str) -> tuple[bool, str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (tls, host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"scheme must be mqtt:// or mqtts://, got {url!r}", key="broker.url")
    if not parts.hostname:
        raise ConfigError(f"no host in {url!r}", key="broker.url")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"bad port in {url!r}", key="broker.url") from exc
    return tls, parts.hostname, port
