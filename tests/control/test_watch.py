"""The watch's judgement after a promotion, as a pure function of the pipeline's figures."""

from __future__ import annotations

import pytest

from edgeml.control.watch import WATCH_MIN_CANARY, WATCH_MIN_ROWS, WatchLimits, judge

START = {"rows": 100, "errors": 2, "skipped": 5}


def now(rows=0, errors=0, skipped=0, p99_ms=None, agreement=None, count=0, window=200):
    return {"rows": START["rows"] + rows, "errors": START["errors"] + errors,
            "skipped": START["skipped"] + skipped, "p99_ms": p99_ms,
            "canary_agreement": agreement, "canary_count": count, "canary_window": window}


def test_skipped_rows_count_as_errors() -> None:
    """A champion so stuck that batches skip it fails like one that raises."""
    why, seen = judge(START, now(skipped=WATCH_MIN_ROWS), WatchLimits(max_error_rate=0.05))
    assert (seen["rows"], seen["errors"], seen["error_rate"]) == (0, WATCH_MIN_ROWS, 1.0)
    assert why == f"error rate 1.000 over {WATCH_MIN_ROWS} rows is above max_error_rate 0.05"


def test_totals_before_the_watch_do_not_count() -> None:
    why, seen = judge(START, now(rows=WATCH_MIN_ROWS), WatchLimits(max_error_rate=0.05))
    assert why is None and seen["errors"] == 0 and seen["error_rate"] == 0.0


def test_error_rate_needs_enough_rows() -> None:
    few = WATCH_MIN_ROWS - 1
    assert judge(START, now(errors=few), WatchLimits(max_error_rate=0.0))[0] is None
    assert judge(START, now(errors=few + 1), WatchLimits(max_error_rate=0.0))[0] is not None


@pytest.mark.parametrize(("errors", "rows", "limit", "trips"), [
    (1, 19, 0.05, False),   # 0.05 is not above 0.05
    (2, 18, 0.05, True),
    (0, 50, 0.0, False),
])
def test_error_rate_threshold(errors, rows, limit, trips) -> None:
    why, _ = judge(START, now(rows=rows, errors=errors), WatchLimits(max_error_rate=limit))
    assert (why is not None) == trips


def test_p99_limit_only_when_set_and_after_enough_rows() -> None:
    slow = now(rows=WATCH_MIN_ROWS, p99_ms=12.0)
    assert judge(START, slow, WatchLimits())[0] is None
    why, _ = judge(START, slow, WatchLimits(max_p99_ms=5.0))
    assert why == "p99 latency 12.000 ms is above max_p99_ms 5.0"
    early = now(rows=WATCH_MIN_ROWS - 1, p99_ms=12.0)
    assert judge(START, early, WatchLimits(max_p99_ms=5.0))[0] is None


def test_canary_agreement_needs_its_window() -> None:
    limits = WatchLimits(min_canary_agreement=0.9)
    low = now(rows=50, agreement=0.5, count=WATCH_MIN_CANARY - 1)
    assert judge(START, low, limits)[0] is None
    why, seen = judge(START, now(rows=50, agreement=0.5, count=WATCH_MIN_CANARY), limits)
    assert why is not None and "canary agreement 0.500" in why
    assert seen["canary_window"] == WATCH_MIN_CANARY
    # a small configured window is enough on its own
    small = now(rows=50, agreement=0.5, count=5, window=5)
    assert judge(START, small, limits)[0] is not None


def test_no_canary_means_no_agreement_check() -> None:
    assert judge(START, now(rows=50), WatchLimits(min_canary_agreement=0.99))[0] is None
