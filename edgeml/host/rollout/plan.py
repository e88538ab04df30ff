"""The pure parts of a staged rollout: waves, holds, thresholds and the judgement.

Nothing here talks to a broker or a database, so every rule can be tested on its own and the
runner (:mod:`edgeml.host.rollout.runner`) only wires them to the fleet.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edgeml.errors import RolloutError

DEFAULT_WAVES = "1,10%,50%,100%"


# ---- waves ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaveSpec:
    """One wave's cumulative size: ``count`` devices, or ``percent`` of the group."""

    count: int | None = None
    percent: float | None = None

    def target(self, group_size: int) -> int:
        """How many devices run the version once this wave is in (cumulative)."""
        if self.count is not None:
            return min(self.count, group_size)
        assert self.percent is not None
        return min(group_size, math.ceil(group_size * self.percent / 100.0 - 1e-9))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """``"1,10%,50%,100%"``: cumulative device counts or shares of the group's online
    members, each at least the one before; the last wave always covers the whole group."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise RolloutError("--waves: give at least one wave, e.g. 1,10%,50%,100%")
    out: list[WaveSpec] = []
    for p in parts:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", p)
        if m:
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise RolloutError(f"--waves: {p!r} must be a share in (0%, 100%]")
            out.append(WaveSpec(percent=pct))
        elif re.fullmatch(r"\d+", p):
            n = int(p)
            if n < 1:
                raise RolloutError(f"--waves: {p!r} must be at least 1 device")
            out.append(WaveSpec(count=n))
        else:
            raise RolloutError(f"--waves: {p!r} is neither a device count (5) nor a share "
                               "of the group (10%)")
    if out[-1] != WaveSpec(percent=100.0):
        out.append(WaveSpec(percent=100.0))  # a rollout that ends short of 100% never ends
    return tuple(out)


def wave_order(rollout_id: str, devices: Iterable[str]) -> list[str]:
    """Devices in the order waves take them: a stable shuffle keyed by the rollout id (the
    first wave is not always the alphabetically first device, and a resumed rollout picks the
    same order)."""
    return sorted(set(devices),
                  key=lambda d: (hashlib.sha256(f"{rollout_id}/{d}".encode()).hexdigest(), d))


def next_wave(rollout_id: str, spec: WaveSpec, online: Iterable[str],
              taken: Sequence[str]) -> list[str]:
    """The devices a wave adds: enough online group members not yet in the rollout to reach
    the wave's cumulative target, computed over (devices taken so far + online ones)."""
    taken_set = set(taken)
    free = [d for d in wave_order(rollout_id, online) if d not in taken_set]
    size = len(taken_set) + len(free)
    want = spec.target(size) - len(taken_set)
    return free[:max(want, 0)]


# ---- hold -----------------------------------------------------------------------------------
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Hold:
    """How long a wave runs before it is judged: ``rows`` results of the new version from
    the wave's devices, or ``seconds`` after the wave's installs are active."""

    rows: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.rows}rows" if self.rows is not None else f"{self.seconds:g}s"


def parse_hold(text: str) -> Hold:
    """``500rows`` (or ``500 rows``), ``60s``, ``5m``, ``1h``."""
    t = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)\s*rows?", t)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise RolloutError("--hold: at least 1row")
        return Hold(rows=n)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)", t)
    if m:
        secs = float(m.group(1)) * _UNITS[m.group(2)]
        if secs <= 0:
            raise RolloutError("--hold: a time must be above 0")
        return Hold(seconds=secs)
    raise RolloutError(f"--hold: {text!r} is neither rows (500rows) nor a time (60s, 5m, 1h)")


def parse_share(text: str, flag: str) -> float:
    """``0.05`` or ``5%`` -> 0.05."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise RolloutError(f"{flag}: {text!r} is not a share (0.05 or 5%)") from None
    if not 0.0 <= v <= 1.0:
        raise RolloutError(f"{flag}: {text!r} must be between 0 and 1 (0% and 100%)")
    return v


# ---- thresholds and the judgement -----------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """A wave passes only while every threshold that is set holds (None: not judged)."""

    max_disagreement: float | None = None
    max_error_rate: float | None = None
    max_p99_ms: float | None = None
    min_rows_per_device: int = 1

    def as_dict(self) -> dict:
        return {"max_disagreement": self.max_disagreement,
                "max_error_rate": self.max_error_rate, "max_p99_ms": self.max_p99_ms,
                "min_rows_per_device": self.min_rows_per_device}

    @classmethod
    def from_dict(cls, doc: dict) -> Thresholds:
        return cls(**{k: doc.get(k) for k in ("max_disagreement", "max_error_rate",
                                              "max_p99_ms")},
                   min_rows_per_device=int(doc.get("min_rows_per_device", 1)))


@dataclass(frozen=True)
class Figures:
    """The evidence about the new version on some devices over some time."""

    rows: int = 0              # results of the new version
    errors: int = 0            # of which carried an error (or were skipped)
    compared: int = 0          # results paired with the champion's on the same input
    disagreed: int = 0         # of which gave another label than the champion
    p99_ms: float | None = None
    latency_rows: int = 0      # rows that carried a latency
    first_ts: float | None = None
    last_ts: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.rows if self.rows else None

    @property
    def disagreement(self) -> float | None:
        return self.disagreed / self.compared if self.compared else None

    def as_dict(self) -> dict:
        return {"rows": self.rows, "errors": self.errors, "error_rate": self.error_rate,
                "compared": self.compared, "disagreed": self.disagreed,
                "disagreement": self.disagreement, "p99_ms": self.p99_ms,
                "latency_rows": self.latency_rows, "first_ts": self.first_ts,
                "last_ts": self.last_ts}


@dataclass(frozen=True)
class Evidence:
    """Pooled figures over every device running the version, plus each device's own."""

    total: Figures
    per_device: dict[str, Figures] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"total": self.total.as_dict(),
                "devices": {d: f.as_dict() for d, f in sorted(self.per_device.items())}}


@dataclass(frozen=True)
class Breach:
    """One threshold that did not hold: the figure, its limit, and the devices whose own
    figure is over the limit too."""

    figure: str
    value: float | None
    limit: float | int | None
    devices: tuple[str, ...]
    message: str

    def as_dict(self) -> dict:
        return {"figure": self.figure, "value": self.value, "limit": self.limit,
                "devices": list(self.devices), "message": self.message}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    breaches: tuple[Breach, ...]
    evidence: Evidence

    def as_dict(self) -> dict:
        return {"passed": self.passed, "breaches": [b.as_dict() for b in self.breaches],
                "evidence": self.evidence.as_dict()}

    @property
    def reason(self) -> str:
        return "; ".join(b.message for b in self.breaches) if self.breaches else "all held"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def judge(evidence: Evidence, thresholds: Thresholds, wave_devices: Sequence[str]) -> Verdict:
    """Pass only if every set threshold holds on the pooled figures and every device of the
    current wave brought at least ``min_rows_per_device`` rows; name the devices whose own
    figures break the limit (fail closed: a threshold with no evidence to judge it fails)."""
    t, th = evidence.total, thresholds
    per = evidence.per_device
    breaches: list[Breach] = []

    def over(getter, limit) -> tuple[str, ...]:
        return tuple(sorted(d for d, f in per.items()
                            if getter(f) is not None and getter(f) > limit))

    quiet = tuple(sorted(d for d in wave_devices
                         if per.get(d, Figures()).rows < th.min_rows_per_device))
    if quiet:
        breaches.append(Breach(
            "rows", min((per.get(d, Figures()).rows for d in quiet), default=0),
            th.min_rows_per_device, quiet,
            f"no evidence: {', '.join(quiet)} sent fewer than {th.min_rows_per_device} "
            "result row(s) of the new version"))
    if th.max_error_rate is not None:
        v = t.error_rate
        if v is None or v > th.max_error_rate:
            devs = over(lambda f: f.error_rate, th.max_error_rate)
            breaches.append(Breach(
                "error_rate", v, th.max_error_rate, devs,
                f"error rate {_pct(v)} ({t.errors} of {t.rows} rows) over the limit "
                f"{_pct(th.max_error_rate)}" + (f" on {', '.join(devs)}" if devs else "")))
    if th.max_disagreement is not None:
        v = t.disagreement
        if v is None or v > th.max_disagreement:
            devs = over(lambda f: f.disagreement, th.max_disagreement)
            what = (f"disagreement with the champion {_pct(v)} ({t.disagreed} of "
                    f"{t.compared} inputs scored by both)" if v is not None else
                    "disagreement with the champion: no input scored by both")
            breaches.append(Breach(
                "disagreement", v, th.max_disagreement, devs,
                f"{what} over the limit {_pct(th.max_disagreement)}"
                + (f" on {', '.join(devs)}" if devs else "")))
    if th.max_p99_ms is not None:
        v = t.p99_ms
        if v is None or v > th.max_p99_ms:
            devs = over(lambda f: f.p99_ms, th.max_p99_ms)
            what = (f"p99 latency {v:.2f} ms (over {t.latency_rows} rows)" if v is not None
                    else "p99 latency: no row carried a latency")
            breaches.append(Breach(
                "p99_ms", v, th.max_p99_ms, devs,
                f"{what} over the limit {th.max_p99_ms:g} ms"
                + (f" on {', '.join(devs)}" if devs else "")))
    return Verdict(not breaches, tuple(breaches), evidence)
