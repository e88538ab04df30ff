"""After a promotion the new champion is on probation: the watch. The decision is a pure
function of the figures the pipeline reports, so it is tested without a device."""

from __future__ import annotations

from dataclasses import dataclass, field

#: rows the new champion must have scored before its error rate or p99 can trip a rollback
WATCH_MIN_ROWS = 10
#: champion/canary pairs needed before agreement can trip a rollback
WATCH_MIN_CANARY = 20


@dataclass(frozen=True)
class WatchLimits:
    window_s: float = 60.0
    max_error_rate: float = 0.05
    max_p99_ms: float | None = None
    min_canary_agreement: float | None = None


@dataclass
class Watch:
    """One champion on probation, with the version's totals when the watch began."""

    pipeline: str
    champion: tuple[str, str]
    previous: tuple[str, str] | None
    started: float
    until: float
    start: dict  # figures at the start: rows, errors, skipped
    cause: str
    last: dict = field(default_factory=dict)

    def summary(self, now: float) -> dict:
        return {"champion": ":".join(self.champion),
                "previous": ":".join(self.previous) if self.previous else None,
                "cause": self.cause, "remaining_s": round(max(self.until - now, 0.0), 2),
                **self.last}


def judge(start: dict, now: dict, limits: WatchLimits) -> tuple[str | None, dict]:
    """Why the watched champion must go (a limit it passed) or None, and the figures seen.

    ``start`` and ``now`` are the pipeline's figures for the champion (rows, errors, skipped,
    p99_ms, canary_agreement, canary_count, canary_window). Rows a stuck champion skipped
    were given to it and not scored: they count as errors."""
    rows = now["rows"] - start["rows"]
    errors = now["errors"] - start["errors"] + now["skipped"] - start["skipped"]
    n = rows + errors
    error_rate = errors / n if n else None
    p99 = now.get("p99_ms")
    agreement = now.get("canary_agreement")
    seen = {"rows": rows, "errors": errors, "error_rate": error_rate, "p99_ms": p99,
            "canary_agreement": agreement, "canary_window": now.get("canary_count", 0)}
    if n >= WATCH_MIN_ROWS and error_rate is not None and error_rate > limits.max_error_rate:
        return (f"error rate {error_rate:.3f} over {n} rows is above max_error_rate "
                f"{limits.max_error_rate}", seen)
    if limits.max_p99_ms is not None and rows >= WATCH_MIN_ROWS and p99 is not None \
            and p99 > limits.max_p99_ms:
        return f"p99 latency {p99:.3f} ms is above max_p99_ms {limits.max_p99_ms}", seen
    need = min(WATCH_MIN_CANARY, now.get("canary_window") or WATCH_MIN_CANARY)
    count = now.get("canary_count", 0)
    if limits.min_canary_agreement is not None and agreement is not None \
            and count >= need and agreement < limits.min_canary_agreement:
        return (f"canary agreement {agreement:.3f} over {count} rows is below "
                f"min_canary_agreement {limits.min_canary_agreement}", seen)
    return None, seen
