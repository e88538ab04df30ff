"""PipelineRuntime with real ONNX versions: deadlines, fallbacks, late results, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from itertools import pairwise

import numpy as np
import pytest

from edgeml.bundle import read_bundle
from edgeml.config import ModelSlotConfig, PipelineConfig, WindowConfig
from edgeml.core.assemble import Row
from edgeml.core.model import LoadedModel, Member, Prediction
from edgeml.core.scoring import PipelineRuntime, ScoringSettings
from edgeml.errors import ModelError
from edgeml.host.datasets import BASICMOTIONS_CHANNELS, load_basicmotions
from edgeml.profiles import load_profile


class SlowSlot(LoadedModel):
    """A real ONNX version made deliberately slow (a stalled device, a heavy model)."""

    delay_s = 0.5

    def predict(self, x):
        time.sleep(self.delay_s)
        return super().predict(x)


class FailingSlot(LoadedModel):
    """A real ONNX version whose scoring raises (a corrupt session, a provider crash)."""

    def predict(self, x):
        raise ModelError(f"{self.name} {self.version}: provider crashed")


class BadOutputsSlot(LoadedModel):
    """A real ONNX version whose outputs do not match its manifest (a wrong class list)."""

    def outputs(self, pred):
        raise ModelError(f"{self.name} {self.version}: 4 scores for 3 classes")


class Sink:
    """Collects what the runtime emits (the daemon publishes and fills the outbox)."""

    def __init__(self):
        self.answers_: list[dict] = []
        self.results_: list[dict] = []
        self.alerts: list[tuple] = []
        self.late = threading.Event()

    def answers(self, pipeline, records):
        self.answers_ += records

    def results(self, pipeline, records):
        self.results_ += records
        if any(r["late"] for r in records):
            self.late.set()

    def alert(self, pipeline, kind, detail):
        self.alerts.append((kind, detail))


@pytest.fixture(scope="module")
def windows():
    return load_basicmotions("TEST").flat()


def slot(cls, bundle_path, role, priority, tmp_path):
    b = read_bundle(bundle_path)
    path = tmp_path / f"{b.manifest.name}-{b.manifest.version}-{role}.onnx"
    path.write_bytes(b.model_bytes)
    m = cls(b.manifest, path, profile=load_profile("x86-gateway"))
    m.load()
    return Member(m, role, priority)


def runtime(policy="champion", deadline_ms=100.0, **kw):
    cfg = PipelineConfig(name="activity", topics=("sensors/+/imu",),
                         features=BASICMOTIONS_CHANNELS, window=WindowConfig(size=100, hop=100),
                         policy=policy, deadline_ms=deadline_ms,
                         models=(ModelSlotConfig(name="activity", version="1"),))
    sink = Sink()
    return PipelineRuntime(cfg, emitter=sink, batching=ScoringSettings(**kw)), sink


def rows(windows, n):
    return [Row(windows[i], f"w{i}", "sensors/w1/imu", i, time.time()) for i in range(n)]


async def score(rt, items):
    task = asyncio.create_task(rt.run())
    rt.enqueue(items)
    await asyncio.sleep(0)
    await rt.wait_idle()
    rt.stop()
    await task


def test_slow_champion_falls_back_within_deadline(tmp_path, windows, activity_bundle,
                                                  activity_bundle_v2):
    rt, sink = runtime(deadline_ms=100)
    champ = slot(SlowSlot, activity_bundle, "champion", 0, tmp_path)
    chall = slot(LoadedModel, activity_bundle_v2, "challenger", 10, tmp_path)
    rt.set_members([champ, chall])
    t0 = time.monotonic()
    asyncio.run(score(rt, rows(windows, 4)))
    assert all(a["fallback"] and a["version"] == "2" for a in sink.answers_)
    expected = chall.predict(windows[:4]).labels.tolist()
    assert [a["output"]["label"] for a in sink.answers_] == expected
    assert max(a["latency_ms"] for a in sink.answers_) < SlowSlot.delay_s * 1000
    # the slow champion's late result is still recorded (the runtime waits for it at stop)
    assert sink.late.is_set() or time.monotonic() - t0 >= SlowSlot.delay_s
    late = [r for r in sink.results_ if r["version"] == "1"]
    assert len(late) == 4 and all(r["late"] for r in late)
    assert [r["output"]["label"] for r in late] == champ.predict(windows[:4]).labels.tolist()
    # every version's result carries its own scoring time (onnxruntime's run, not the wait)
    assert all(r["latency_ms"] > 0 for r in sink.results_)
    assert max(r["latency_ms"] for r in late) < SlowSlot.delay_s * 1000


def test_failing_champion_never_blocks(tmp_path, windows, activity_bundle, activity_bundle_v2):
    rt, sink = runtime(deadline_ms=5000)
    rt.set_members([slot(FailingSlot, activity_bundle, "champion", 0, tmp_path),
                  slot(LoadedModel, activity_bundle_v2, "challenger", 10, tmp_path)])
    t0 = time.monotonic()
    asyncio.run(score(rt, rows(windows, 3)))
    assert time.monotonic() - t0 < 2.5  # nowhere near the 5 s deadline
    assert all(a["fallback"] and a["version"] == "2" for a in sink.answers_)
    errs = [r for r in sink.results_ if r["version"] == "1"]
    assert errs and all("provider crashed" in r["error"] for r in errs)
    assert rt.stats.version("activity", "1").errors == 3


def test_bad_outputs_count_as_errors_only(tmp_path, windows, activity_bundle,
                                         activity_bundle_v2):
    rt, sink = runtime(deadline_ms=5000)
    rt.set_members([slot(BadOutputsSlot, activity_bundle, "champion", 0, tmp_path),
                  slot(LoadedModel, activity_bundle_v2, "challenger", 10, tmp_path)])
    asyncio.run(score(rt, rows(windows, 3)))
    vs = rt.stats.version("activity", "1")
    # scored by onnxruntime but unusable: 3 errors and no scored rows (an error rate of 1.0)
    assert (vs.rows, vs.errors) == (0, 3) and "bad outputs" in vs.last_error
    assert all(a["fallback"] and a["version"] == "2" for a in sink.answers_)


def test_no_answering_version_still_answers_with_error(tmp_path, windows, activity_bundle):
    rt, sink = runtime(deadline_ms=50)
    rt.set_members([slot(FailingSlot, activity_bundle, "champion", 0, tmp_path)])
    asyncio.run(score(rt, rows(windows, 2)))
    assert len(sink.answers_) == 2
    assert all(a["output"] is None and "provider crashed" in a["error"] for a in sink.answers_)
    assert rt.stats.unanswered == 2


def test_vote_and_mean_with_real_versions(tmp_path, windows, activity_bundle,
                                          activity_bundle_v2):
    lr = slot(LoadedModel, activity_bundle, "champion", 0, tmp_path)
    rf = slot(LoadedModel, activity_bundle_v2, "challenger", 10, tmp_path)
    p_lr, p_rf = lr.predict(windows), rf.predict(windows)
    rt, sink = runtime(policy="mean", deadline_ms=5000)
    rt.set_members([lr, rf])
    asyncio.run(score(rt, rows(windows, 40)))
    avg = (p_lr.scores + p_rf.scores) / 2
    classes = lr.classes
    assert [a["output"]["label"] for a in sink.answers_] == [classes[i] for i in avg.argmax(1)]
    rt, sink = runtime(policy="vote", deadline_ms=5000)
    rt.set_members([lr, rf])
    asyncio.run(score(rt, rows(windows, 40)))
    # two voters: agreement wins, a tie goes to the champion (higher priority)
    assert [a["output"]["label"] for a in sink.answers_] == p_lr.labels.tolist()
    assert all(a["version"] == "1" for a in sink.answers_)


def test_bounded_queue_counts_every_drop(windows):
    rt, _ = runtime(queue_limit=10, queue_policy="drop_oldest")
    assert rt.enqueue(rows(windows, 25)) == 15 and rt.queue_depth == 10
    assert rt.stats.dropped == 15
    rt2, _ = runtime(queue_limit=10, queue_policy="drop_newest")
    assert rt2.enqueue(rows(windows, 12)) == 2 and rt2.stats.dropped == 2
    kept = list(rt2._queue)
    assert kept[0].id == "w0" and kept[-1].id == "w9"


def test_micro_batches_form_under_load(tmp_path, windows, activity_bundle):
    rt, sink = runtime(max_batch=16)
    s = slot(LoadedModel, activity_bundle, "champion", 0, tmp_path)
    rt.set_members([s])
    asyncio.run(score(rt, rows(windows, 40)))
    assert len(sink.answers_) == 40 and rt.stats.batches == 3  # 16 + 16 + 8
    assert [a["output"]["label"] for a in sink.answers_] == s.predict(windows).labels.tolist()
    assert np.all(np.diff([a["input_seq"] for a in sink.answers_]) == 1)


def test_reconfigure_resizes_the_canary_window_keeping_the_newest_rows():
    rt, _ = runtime()
    rt.canary.add_many([1, 1, 1, 0], [1, 1, 0, 0])  # agree, agree, differ, agree
    import dataclasses

    rt.reconfigure(dataclasses.replace(rt.config, canary_window=2))
    assert rt.canary.size == 2 and rt.canary.count == 2
    assert rt.canary.value == 0.5  # the newest two rows: differ, agree
    assert rt.canary_status()["window"] == 2


def test_results_are_built_only_for_an_emitter_that_keeps_them(tmp_path, windows,
                                                               activity_bundle,
                                                               activity_bundle_v2):
    """Every version's result per row, as dicts when read; with sync off (``wants_results``
    false) none are built, while the answers are the same."""
    members = [slot(LoadedModel, activity_bundle, "champion", 0, tmp_path),
               slot(LoadedModel, activity_bundle_v2, "shadow", 10, tmp_path)]
    got = {}
    for wants in (True, False):
        rt, sink = runtime(deadline_ms=5000)
        sink.wants_results = wants
        rt.set_members(members)
        asyncio.run(score(rt, rows(windows, 12)))
        got[wants] = sink
    kept, skipped = got[True], got[False]
    assert skipped.results_ == [] and len(kept.results_) == 2 * 12
    assert sorted((r["version"], r["input_seq"]) for r in kept.results_) == sorted(
        (v, i) for v in ("1", "2") for i in range(12))
    champion = {r["input_seq"]: r["output"] for r in kept.results_ if r["version"] == "1"}
    assert all(champion[a["input_seq"]] == a["output"] for a in kept.answers_)
    assert [a["output"] for a in skipped.answers_] == [a["output"] for a in kept.answers_]


def test_rows_of_one_message_share_its_latency_and_each_is_counted(tmp_path, windows,
                                                                   activity_bundle):
    """A batch message's rows arrive together: one latency per message, every row counted
    in the answer-latency figures (/metrics histogram, status percentiles)."""
    rt, sink = runtime(deadline_ms=5000)
    rt.set_members([slot(LoadedModel, activity_bundle, "champion", 0, tmp_path)])
    t = time.time()
    sizes = (3, 1, 4)
    items = []
    for m, (size, age) in enumerate(zip(sizes, (0.5, 0.25, 0.0), strict=True)):
        items += [Row(windows[len(items) + k], f"m{m}", "sensors/w1/imu", m, t - age, sub=k)
                  for k in range(size)]
    asyncio.run(score(rt, items))
    lat = [a["latency_ms"] for a in sink.answers_]
    assert len(lat) == sum(sizes)
    groups = [lat[0:3], lat[3:4], lat[4:8]]
    assert all(len(set(g)) == 1 for g in groups)  # one figure per message
    assert groups[0][0] > groups[1][0] > groups[2][0]  # older messages waited longer
    assert groups[0][0] >= 500 and groups[1][0] >= 250
    ring = rt.stats.answer_latency
    assert sum(ring.hist) == sum(sizes) == ring.summary()["n"]
    assert ring.total_ms == pytest.approx(sum(lat), abs=0.01)
    assert [a["ts"] for a in sink.answers_] == [r.received for r in items]


class ThreadNoting(LoadedModel):
    """A real ONNX version that notes the thread each batch is scored on, and how big, and
    reports a scoring time of ``ms_per_row`` per row (the decision is tested, not the
    machine's speed)."""

    ms_per_row = 0.001

    def predict(self, x):
        self.seen.append((threading.current_thread() is threading.main_thread(), len(x)))
        p = super().predict(x)
        return Prediction(p.labels, p.scores, self.ms_per_row * len(x))


class SlowPerRow(ThreadNoting):
    """... 20 µs per row: fast for one row, too slow for a batch of 40 on the loop."""

    ms_per_row = 0.02


def test_batches_score_on_the_loop_once_their_versions_proved_fast_enough(
        tmp_path, windows, activity_bundle, activity_bundle_v2):
    """Versions go to their own threads until their runs show a batch of that size scores
    within the inline budget; then the batch is scored on the loop thread, with no hand-off.
    A version whose cost per row would exceed the budget keeps its thread for large
    batches, and the answers are the same either way."""
    from edgeml.core.scoring import INLINE_MAX_MS

    async def batches(rt, sizes):
        task = asyncio.create_task(rt.run())
        i = 0
        for n in sizes:  # one batch at a time
            rt.enqueue([Row(windows[(i + k) % len(windows)], f"w{i + k}", "sensors/w1/imu",
                            i + k, time.time()) for k in range(n)])
            i += n
            await asyncio.sleep(0)
            await rt.wait_idle()
            if rt._inflight_results:  # a late challenger: its run is counted first
                await asyncio.wait(list(rt._inflight_results))
        rt.stop()
        await task

    rt, sink = runtime(deadline_ms=5000, max_batch=64)
    fast = [slot(ThreadNoting, b, role, p, tmp_path)
            for b, role, p in ((activity_bundle, "champion", 0),
                               (activity_bundle_v2, "challenger", 10))]
    for m in fast:
        m.model.seen = []
    rt.set_members(fast)
    asyncio.run(batches(rt, [8] * 6 + [40] * 3))
    for m in fast:
        seen = m.model.seen
        assert not any(on_loop for on_loop, _ in seen[:4])  # threads until proven
        assert INLINE_MAX_MS >= 0.001 * 40  # these are fast: 40 rows fit the budget ...
        assert all(on_loop for on_loop, _ in seen[6:])  # ... and ran on the loop
    labels = fast[0].predict(np.stack([windows[i % len(windows)] for i in range(168)])).labels
    assert [a["output"]["label"] for a in sink.answers_] == labels.tolist()

    rt, sink = runtime(deadline_ms=5000, max_batch=64)
    slow = slot(SlowPerRow, activity_bundle, "champion", 0, tmp_path)
    slow.model.seen = []
    rt.set_members([slow])
    asyncio.run(batches(rt, [1] * 6 + [40] * 2 + [1] * 2))
    seen = slow.model.seen
    assert [on_loop for on_loop, n in seen if n == 40] == [False, False]  # 0.8 ms: thread
    assert seen[-1] == (True, 1)  # a single row still fits on the loop
    assert len(sink.answers_) == 88


def test_the_loop_gets_a_turn_between_batches_scored_on_it(tmp_path, windows, activity_bundle):
    """A queue of several batches, all scored on the loop: between two of them the loop
    runs its other work (in the daemon: reading and writing the sockets), rather than
    after the whole queue."""
    rt, sink = runtime(deadline_ms=5000, max_batch=8)
    m = slot(ThreadNoting, activity_bundle, "champion", 0, tmp_path)
    m.model.seen = []
    rt.set_members([m])
    events: list[str] = []

    class Noting(Sink):
        def answers(self, pipeline, records):
            events.append("batch")
            super().answers(pipeline, records)

    rt.emitter = sink = Noting()

    def rows_from(i, n):
        return [Row(windows[(i + k) % len(windows)], f"w{i + k}", "sensors/w1/imu", i + k,
                    time.time()) for k in range(n)]

    async def main():
        task = asyncio.create_task(rt.run())
        for i in range(5):  # proven fast first, one batch at a time
            rt.enqueue(rows_from(i * 8, 8))
            await asyncio.sleep(0)
            await rt.wait_idle()
        events.clear()
        rt.enqueue(rows_from(100, 32))  # four batches at once

        async def other_work():
            while not rt._idle.is_set() or not events:
                events.append("loop")
                await asyncio.sleep(0)
        await asyncio.gather(other_work(), rt.wait_idle())
        rt.stop()
        await task

    asyncio.run(main())
    assert all(on_loop for on_loop, _ in m.model.seen[4:])  # scored on the loop
    batches = [i for i, e in enumerate(events) if e == "batch"]
    assert len(batches) == 4
    # the other work ran between the batches, not only before the first and after the last
    assert all("loop" in events[a + 1:b] for a, b in pairwise(batches))
    assert len(sink.answers_) == 5 * 8 + 32
