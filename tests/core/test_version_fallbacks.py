"""Per-version fallback counts (for /metrics edgeml_version_fallbacks_total)."""

from __future__ import annotations

import asyncio

from test_pipeline import FailingSlot, rows, runtime, score, slot
from test_pipeline import windows as windows  # the fixture, re-exported

from edgeml.core.model import LoadedModel


def test_fallback_answers_are_counted_per_version(tmp_path, windows, activity_bundle,
                                                  activity_bundle_v2):
    rt, sink = runtime(deadline_ms=5000)
    rt.set_members([slot(FailingSlot, activity_bundle, "champion", 0, tmp_path),
                    slot(LoadedModel, activity_bundle_v2, "challenger", 10, tmp_path)])
    asyncio.run(score(rt, rows(windows, 3)))
    assert all(a["fallback"] for a in sink.answers_)
    assert rt.stats.version("activity", "2").fallbacks == 3
    assert rt.stats.version("activity", "1").fallbacks == 0
    assert rt.stats.fallbacks == 3
