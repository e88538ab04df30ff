"""``value``: one number per message, the feature and the source named by the topic.

``topic_template = "plant/{line}/{machine}/{feature}"`` subscribes to ``plant/+/+/+``; a
message on ``plant/l1/m3/ax`` is feature ``ax`` of source ``plant/l1/m3`` (the topic without
its ``{feature}`` level). The payload is the number as text (``0.25``, ``-1e-3``; what
``mosquitto_pub -m 0.25`` sends). Samples are assembled per source by :class:`ValueSession`
(see :mod:`.latest`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeml.core.formats import F32_MAX
from edgeml.core.formats.latest import LatestValues
from edgeml.errors import DecodeError

_NUMBER = re.compile(rb"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
_NON_FINITE = re.compile(rb"\s*[+-]?(?:nan|inf|infinity)\s*", re.IGNORECASE)
_MISS: Any = object()
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class TopicTemplate:
    """``a/{x}/{feature}``: each level a literal or one whole ``{name}``; one ``{feature}``."""

    template: str
    levels: tuple[str, ...]
    feature_level: int

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        """Raises ValueError with the reason (config turns it into a ConfigError)."""
        if not template:
            raise ValueError("must not be empty")
        levels = tuple(template.split("/"))
        names: list[str] = []
        feature_level = -1
        for i, lv in enumerate(levels):
            m = _PLACEHOLDER.fullmatch(lv)
            if m:
                if m.group(1) in names:
                    raise ValueError(f"{{{m.group(1)}}} appears twice")
                names.append(m.group(1))
                if m.group(1) == "feature":
                    feature_level = i
                continue
            if any(c in lv for c in "{}+#"):
                raise ValueError(f"level {i} ({lv!r}) must be a literal without + # {{ }} or "
                                 "one whole {name}")
        if feature_level < 0:
            raise ValueError("needs a {feature} level")
        return cls(template, levels, feature_level)

    @property
    def topic_filter(self) -> str:
        """The MQTT filter that subscribes to every topic of the template."""
        return "/".join("+" if lv.startswith("{") else lv for lv in self.levels)

    def split(self, topic: str) -> tuple[str, str] | None:
        """``(source, feature)`` of a concrete topic, or None when it does not fit."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        for lv, p in zip(self.levels, parts, strict=True):
            if not lv.startswith("{") and lv != p:
                return None
        feature = parts[self.feature_level]
        del parts[self.feature_level]
        return "/".join(parts), feature


@dataclass(frozen=True)
class ValueSpec:
    template: TopicTemplate
    max_age_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Scalar:
    """What the decode stage makes of a ``value`` payload: just the number."""

    value: float


def parse_value(payload: bytes) -> Scalar:
    if _NUMBER.fullmatch(payload):
        v = float(payload)
        if abs(v) <= F32_MAX:
            return Scalar(v)
    if _NUMBER.fullmatch(payload) or _NON_FINITE.fullmatch(payload):
        raise DecodeError("non_finite", f"{payload[:20]!r} is not a finite number")
    try:
        text = payload[:40].decode()
    except UnicodeDecodeError:
        raise DecodeError("malformed", "not UTF-8 text") from None
    raise DecodeError("bad_value", f"{text!r} is not a number")


class ValueSession:
    """The per-pipeline state of the ``value`` format: latest values per source."""

    def __init__(self, spec: ValueSpec, features: tuple[str, ...]) -> None:
        self.spec = spec
        self.latest = LatestValues(features, max_age_s=spec.max_age_s)
        self.counts: Counter[str] = self.latest.counts
        self._split_cache: dict[str, tuple[str, str] | None] = {}

    def feed(self, topic: str, parsed: Scalar, received: float
             ) -> list[tuple[str, np.ndarray]]:
        where = self._split_cache.get(topic, _MISS)
        if where is _MISS:
            if len(self._split_cache) >= 10_000:  # topics come from the network: bounded
                self._split_cache.clear()
            where = self._split_cache[topic] = self.spec.template.split(topic)
        if where is None:
            self.counts["unknown_topic"] += 1
            return []
        source, feature = where
        if feature not in self.latest.index:
            self.counts["unknown_feature"] += 1
            return []
        sample = self.latest.update(source, feature, parsed.value, received)
        return [] if sample is None else [(source, sample)]

    def status(self) -> dict:
        return {"sources": self.latest.pending_sources, **dict(self.counts)}
