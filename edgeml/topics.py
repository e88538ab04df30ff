"""The one MQTT topic scheme and filter matcher of edgeml (device, archive reader and host
tools all use these, so a topic means the same thing everywhere)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def strip_share(topic_filter: str) -> str:
    """``$share/group/a/b`` -> ``a/b``: the filter a shared subscription matches with."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` is one level, a trailing ``#`` the rest (also none)."""
    f_parts = strip_share(topic_filter).split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


def matcher(topic_filter: str | None) -> Callable[[str], bool] | None:
    """A predicate for an exact topic or a filter with wildcards; ``None`` matches anything
    (returned as ``None`` so callers can skip the test)."""
    if topic_filter is None:
        return None
    plain = strip_share(topic_filter)
    if "+" not in plain and "#" not in plain:
        return plain.__eq__
    return lambda topic: matches(plain, topic)


@dataclass(frozen=True)
class Topics:
    """The device's own topics under ``{prefix}/{device}`` (see docs/topics.md)."""

    prefix: str
    device: str

    def device_topic(self, *parts: str) -> str:
        return "/".join((self.prefix, self.device, *parts))

    @property
    def status(self) -> str:
        return self.device_topic("status")

    @property
    def dlq(self) -> str:
        return self.device_topic("dlq")

    @property
    def alerts(self) -> str:
        return self.device_topic("alerts")

    @property
    def cmd(self) -> str:
        return self.device_topic("cmd")

    @property
    def cmd_reply(self) -> str:
        return self.device_topic("cmd", "reply")

    @property
    def deploy(self) -> str:
        return self.device_topic("deploy")

    @property
    def deploy_status(self) -> str:
        return self.device_topic("deploy", "status")

    def out(self, pipeline: str) -> str:
        return self.device_topic("out", pipeline)

    def sync(self, stream: str) -> str:
        return self.device_topic("sync", stream)

    def group_deploy(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/deploy"
