"""One pipeline at run time: accepted rows -> micro-batches -> every active version in
parallel -> rendezvous -> answers and per-version results.

Data flows one way: the ingress stage hands in decoded, archived rows
(:meth:`PipelineRuntime.enqueue`); this module batches and scores them and hands records on
to an :class:`Emitter` (the egress stage: MQTT answers, outbox). It never calls back into the
stages before it. Control changes the active set and the policy through the methods under
"the control port", never by setting attributes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeml.config import PipelineConfig
from edgeml.core.assemble import Row
from edgeml.core.model import Member, Prediction
from edgeml.core.outputs import Outputs
from edgeml.core.rendezvous import Answer, AnswerColumn, Outcome, decide, ready
from edgeml.core.stats import AgreementWindow, PipelineStats

log = logging.getLogger("edgeml.core.scoring")

MAX_PENDING_BATCHES = 2  # per version; beyond this a slow version skips batches (counted)
# A batch is scored on the loop thread, one version after another, when every version has
# proven it scores a batch of that size within INLINE_MAX_MS: handing a batch to three
# threads and back costs far more than three sub-millisecond runs (measured: with ten-sample
# messages the hand-offs were a third of the daemon's CPU). Anything slower or failing goes
# to the versions' own threads and runs in parallel, within the deadline.
INLINE_MAX_MS = 0.5  # predicted from the cheapest recent runs per row: GIL waits inflate the rest
INLINE_HISTORY = 16


class Emitter(Protocol):
    """Where a pipeline's records go: the egress stage publishes answers and fills the
    outbox. ``answers`` gets an :class:`AnswerRecords` and ``results`` a
    :class:`ResultRecords`, sequences of dicts built when read; an emitter with
    ``wants_results = False`` gets no results at all (nothing would keep them)."""

    def answers(self, pipeline: str, records: Sequence[dict]) -> None: ...

    def results(self, pipeline: str, records: Sequence[dict]) -> None: ...

    def alert(self, pipeline: str, kind: str, detail: dict) -> None: ...


@dataclass(frozen=True)
class ScoringSettings:
    """Micro-batching and the bounded row queue, from the firmware profile."""

    max_batch: int = 64
    max_wait_ms: float = 0.0
    queue_limit: int = 10_000
    queue_policy: str = "wait"


class _VersionRunner:
    """A version plus its own single worker thread, so versions run in parallel while each
    version sees its batches in order."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"score-{member.name}-{member.version}"
        )
        self.pending = 0
        self.last: asyncio.Future | None = None
        # the cheapest recent cost per row: a batch of n rows is predicted to take n times
        # that (an overestimate for large batches after small ones: they go to the thread
        # once, and teach it better)
        self._per_row: collections.deque[float] = collections.deque(maxlen=INLINE_HISTORY)
        self._cheapest: float | None = None

    def observe(self, pred: Prediction | None, exc: BaseException | None) -> None:
        """Learn from each run whether this version is fast enough to run inline. A failure
        sends it back to its thread until it has proven itself again."""
        if exc is not None or pred is None or not len(pred):
            if exc is not None or pred is None:
                self._per_row.clear()
                self._cheapest = None
            return
        self._per_row.append(pred.elapsed_ms / len(pred))
        self._cheapest = min(self._per_row) if len(self._per_row) >= 4 else None

    def inline_for(self, rows: int) -> bool:
        """Whether a batch of ``rows`` is predicted to score within ``INLINE_MAX_MS``."""
        cheapest = self._cheapest
        return cheapest is not None and cheapest * rows <= INLINE_MAX_MS

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=False)


def _add_row_fields(rec: dict[str, Any], row: Row) -> None:
    """A row record's own optional fields: its place in a message of several rows, and the
    input's label (``label_field``: upstream scores accuracy)."""
    if row.sub:
        rec["row"] = row.sub
    if row.label is not None:
        rec["true_label"] = row.label


class _LazyRecords(Sequence[dict]):
    """Records of one scored batch as a sequence of dicts built on first read
    (:meth:`records`); their consumers may read the columns instead."""

    __slots__ = ("_records",)

    def records(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        return self.records()[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())


class AnswerRecords(_LazyRecords):
    """The answer record of each row of one scored batch, in row order.

    A sequence of dicts built on first read (:meth:`records` defines the fields). Egress
    need not read them as dicts: when one version answered every row it packs the answers
    and their records straight from these columns (``rows``, ``answers``, ``latency_ms``)."""

    __slots__ = ("answers", "latency_ms", "pipeline", "policy", "rows")

    def __init__(self, pipeline: str, rows: Sequence[Row], answers: Sequence[Answer],
                 policy: str, latency_ms: Sequence[float]) -> None:
        self.pipeline, self.rows, self.answers = pipeline, rows, answers
        self.policy, self.latency_ms = policy, latency_ms
        self._records: list[dict[str, Any]] | None = None

    def records(self) -> list[dict[str, Any]]:
        if self._records is not None:
            return self._records
        records: list[dict[str, Any]] = []
        name, policy = self.pipeline, self.policy
        for row, a, latency in zip(self.rows, self.answers, self.latency_ms, strict=True):
            rec = {
                "id": row.id, "topic": row.topic, "pipeline": name, "model": a.model,
                "version": a.version, "output": a.output, "policy": policy,
                "fallback": a.fallback, "latency_ms": latency, "ts": row.received,
                "input_seq": row.seq,
            }
            _add_row_fields(rec, row)
            if a.error:
                rec["error"] = a.error
            records.append(rec)
        self._records = records
        return records

    def __len__(self) -> int:
        return len(self.rows)


class ResultRecords(_LazyRecords):
    """Every version's result record for one scored batch, version by version, row by row.

    A sequence of dicts built on first read (:meth:`records` defines the fields). The outbox
    need not read them as dicts: it packs the same fields straight from these columns
    (``rows``, ``outcomes``), which costs far less than a dict per record."""

    __slots__ = ("late", "outcomes", "pipeline", "rows")

    def __init__(self, pipeline: str, rows: Sequence[Row], outcomes: Sequence[Outcome],
                 late: bool) -> None:
        self.pipeline, self.rows, self.outcomes, self.late = pipeline, rows, outcomes, late
        self._records: list[dict[str, Any]] | None = None

    def records(self) -> list[dict[str, Any]]:
        if self._records is not None:
            return self._records
        records: list[dict[str, Any]] = []
        name, late, rows = self.pipeline, self.late, self.rows
        for o in self.outcomes:
            outputs = o.outputs
            latency = round(o.elapsed_ms, 3) if o.elapsed_ms is not None else None
            for i, row in enumerate(rows):
                rec: dict[str, Any] = {
                    "id": row.id, "topic": row.topic, "pipeline": name, "model": o.name,
                    "version": o.version, "role": o.role, "ts": row.received,
                    "input_seq": row.seq, "late": late,
                    "output": outputs[i] if outputs is not None else None,
                }
                _add_row_fields(rec, row)
                if latency is not None:  # per version, so upstream can compare
                    rec["latency_ms"] = latency
                if o.error:
                    rec["error"] = o.error
                records.append(rec)
        self._records = records
        return records

    def __len__(self) -> int:
        return len(self.rows) * len(self.outcomes)


class PipelineRuntime:
    def __init__(self, config: PipelineConfig, *, emitter: Emitter,
                 batching: ScoringSettings, stats: PipelineStats | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.name = config.name
        self.emitter = emitter
        self.batching = batching
        self.stats = stats or PipelineStats()
        self.policy = config.policy
        self.deadline_s = config.deadline_ms / 1000.0
        self._clock = clock
        self._queue: collections.deque[Row] = collections.deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set when the queue drops below its limit
        self._runners: dict[tuple[str, str], _VersionRunner] = {}
        self._members: tuple[Member, ...] = ()
        self._stopping = False
        self.canary = AgreementWindow(config.canary_window)
        self.canary_alerted = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight_results: set[asyncio.Future] = set()
        self._last_batch = 0
        # drift/health watch (edgeml.core.drift.DriftMonitor), set by the device: sees each
        # batch's inputs once and every version's outcomes
        self.observer: Any = None

    # ---- the active set ----------------------------------------------------------------------
    @property
    def members(self) -> tuple[Member, ...]:
        return self._members

    def set_members(self, members: Sequence[Member]) -> None:
        """Swap the active set between two batches; loaded sessions are reused by key."""
        keep = {s.key for s in members}
        for key, runner in list(self._runners.items()):
            if key not in keep:
                runner.close()
                del self._runners[key]
        for s in members:
            runner = self._runners.get(s.key)
            if runner is None:
                self._runners[s.key] = _VersionRunner(s)
            else:
                runner.member = s
            self.stats.version(s.name, s.version)
        self._members = tuple(sorted(members, key=lambda s: s.priority))
        if not any(s.role == "canary" for s in members):
            self.canary.clear()

    def reconfigure(self, config: PipelineConfig) -> None:
        """Take the settings that can change live (policy, deadline, top_n, canary) from a
        reloaded config; the caller swaps the members separately."""
        if config.canary_window != self.canary.size:
            self.canary = self.canary.resized(config.canary_window)
        self.config = config
        self.policy = config.policy
        self.deadline_s = config.deadline_ms / 1000.0

    # ---- the control port ---------------------------------------------------------------
    def set_policy(self, policy: str) -> None:
        self.policy = policy

    def reset_canary(self) -> None:
        """Agreement measured from now on belongs to a new champion, not the old one."""
        self.canary.clear()
        self.canary_alerted = False

    def figures(self, key: tuple[str, str]) -> dict:
        """One version's running totals, for the watch after a promotion."""
        vs = self.stats.version(*key)
        lat = vs.latency.summary()
        return {"rows": vs.rows, "errors": vs.errors, "skipped": vs.skipped,
                "p99_ms": lat["p99_ms"] if lat else None,
                "canary_agreement": self.canary.value if any(
                    m.role == "canary" for m in self._members) else None,
                "canary_count": self.canary.count, "canary_window": self.config.canary_window}

    def canary_status(self) -> dict:
        return {"agreement": self.canary.value, "window": self.canary.count,
                "threshold": self.config.canary_threshold, "alert": bool(self.canary_alerted)}

    def champion(self) -> Member | None:
        return next((s for s in self._members if s.role == "champion"), None)

    # ---- input side ----------------------------------------------------------------------------
    def enqueue(self, rows: Sequence[Row], *, hold: bool = False) -> int:
        """Add accepted rows; returns how many were dropped by the bounded queue's policy.

        ``hold``: the rows come from QoS 1 messages whose acknowledgements the caller
        withholds while :attr:`full` (the broker then stops sending), so none is dropped:
        the queue may exceed its limit by at most what the broker has in flight."""
        q, limit = self._queue, self.batching.queue_limit
        dropped = 0
        if hold or self.batching.queue_policy == "wait":
            # the caller takes no more input while the queue is full (TCP backpressure): the
            # queue exceeds its limit by at most the burst at hand
            q.extend(rows)
        elif self.batching.queue_policy == "drop_newest":
            room = max(limit - len(q), 0)
            q.extend(rows[:room])
            dropped = len(rows) - min(room, len(rows))
        else:
            q.extend(rows)
            while len(q) > limit:
                q.popleft()
                dropped += 1
        self.stats.rows += len(rows)
        if dropped:
            self.stats.dropped += dropped
        self._idle.clear()
        self._wake.set()
        return dropped

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def waits(self) -> bool:
        """Policy ``wait``: input of any QoS waits for room instead of being shed."""
        return self.batching.queue_policy == "wait"

    @property
    def full(self) -> bool:
        """At or over the queue limit: held acknowledgements wait for :meth:`wait_room`."""
        return len(self._queue) >= self.batching.queue_limit

    async def wait_room(self) -> None:
        """Return once the queue is below its limit (or the pipeline stops)."""
        while self.full and not self._stopping:
            self._room.clear()
            await self._room.wait()

    # ---- the scoring loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Score until :meth:`stop`; then drain what is queued and return."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._idle.set()
                if self._stopping:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            if (self.batching.max_wait_ms > 0 and len(self._queue) < self.batching.max_batch
                    and self._last_batch >= self.batching.max_batch):
                # Only when the previous batch was full (the stream outruns scoring) is it
                # worth letting this one fill up; below that rows are scored as they come and
                # batches form by themselves while the previous one is being scored.
                await asyncio.sleep(self.batching.max_wait_ms / 1000.0)
            q = self._queue
            batch = [q.popleft() for _ in range(min(self.batching.max_batch, len(q)))]
            while q and q[0].seq == batch[-1].seq:
                batch.append(q.popleft())  # a message's rows stay together: one answer message
            if not self.full:
                self._room.set()
            self._last_batch = len(batch)
            try:
                await self._score(loop, batch)
                if q:
                    # a batch scored on the loop never yields: let the loop read, write and
                    # acknowledge before the next one (without this a flood's queue was
                    # scored in one stretch while the sockets waited: 25% fewer messages
                    # per second)
                    await asyncio.sleep(0)
            except Exception:  # a bug here must not stop the pipeline
                self.stats.errors += 1
                log.exception("pipeline %s: batch of %d rows failed", self.name, len(batch))
        if self._inflight_results:
            await asyncio.wait(self._inflight_results, timeout=5)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._room.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[Row]) -> None:
        # np.array over rows of one length is np.stack's result at a third of its cost
        # (rows of different lengths raise ValueError either way)
        x = np.array([r.features for r in batch])
        members = self._members
        if self.observer is not None:
            self.observer.on_batch(batch, x, members)
        n = len(batch)
        if members and all((r := self._runners[s.key]).pending == 0 and r.inline_for(n)
                           for s in members):
            self._score_inline(members, x, batch)
            return
        t_dispatch = time.monotonic()
        deadline = t_dispatch + self.deadline_s
        futures: dict[asyncio.Future, Member] = {}
        skipped: list[Member] = []
        for member in members:
            runner = self._runners[member.key]
            if runner.pending >= MAX_PENDING_BATCHES and runner.last is not None:
                # backpressure: a version that is merely busy gets up to one deadline to catch
                # up; only a version that stays stuck skips the batch (counted, recorded)
                await asyncio.wait([runner.last], timeout=self.deadline_s)
            if runner.pending >= MAX_PENDING_BATCHES:
                skipped.append(member)
                self.stats.version(member.name, member.version).skipped += len(batch)
                continue
            runner.pending += 1
            fut = loop.run_in_executor(runner.pool, member.predict, x)
            runner.last = fut
            futures[fut] = member
        self.stats.batches += 1
        done_outcomes: list[Outcome] = []
        pending = set(futures)
        while pending:
            pending_roles = [futures[f].role for f in pending]
            if ready(self.policy, done_outcomes, pending_roles):
                break
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                done_outcomes.append(self._outcome(futures[f], f, batch, late=False))
        answers = decide(self.policy, done_outcomes, len(batch), top_n=self.config.top_n,
                         champion_configured=any(s.role == "champion" for s in members))
        self._emit_answers(batch, answers)
        self._results(batch, done_outcomes, late=False)
        self._track_canary(done_outcomes)
        for f in pending:  # late versions: recorded when they finish, never waited for
            member = futures[f]
            self._inflight_results.add(f)
            f.add_done_callback(lambda fut, s=member: self._late(fut, s, batch))
        for s in skipped:
            self._results(batch, [Outcome(s.name, s.version, s.role, s.priority,
                                          error="skipped: version busy")], late=False)

    def _score_inline(self, members: Sequence[Member], x: np.ndarray,
                      batch: list[Row]) -> None:
        self.stats.batches += 1
        outcomes = []
        for member in members:
            try:
                pred, exc = member.predict(x), None
            except Exception as e:  # recorded like a threaded failure
                pred, exc = None, e
            self._runners[member.key].observe(pred, exc)
            outcomes.append(self._make_outcome(member, pred, exc, batch, late=False))
        answers = decide(self.policy, outcomes, len(batch), top_n=self.config.top_n,
                         champion_configured=any(s.role == "champion" for s in members))
        self._emit_answers(batch, answers)
        self._results(batch, outcomes, late=False)
        self._track_canary(outcomes)

    def _outcome(self, member: Member, fut: asyncio.Future, batch: list[Row],
                 late: bool) -> Outcome:
        runner = self._runners.get(member.key)
        if runner is not None:
            runner.pending -= 1
        exc = fut.exception()
        pred = fut.result() if exc is None else None
        if runner is not None:
            runner.observe(pred, exc)
        return self._make_outcome(member, pred, exc, batch, late)

    def _make_outcome(self, member: Member, pred: Prediction | None,
                      exc: BaseException | None, batch: list[Row], late: bool) -> Outcome:
        vs = self.stats.version(member.name, member.version)
        vs.batches += 1
        if exc is not None or pred is None:
            vs.errors += len(batch)
            vs.last_error = str(exc)
            return Outcome(member.name, member.version, member.role, member.priority,
                           error=str(exc), done_at=time.monotonic())
        try:
            outputs = member.outputs(pred)
        except Exception as exc:  # a model whose outputs do not match its manifest
            vs.errors += len(batch)  # an error, not also a scored row
            vs.last_error = f"bad outputs: {exc}"
            return Outcome(member.name, member.version, member.role, member.priority,
                           error=vs.last_error, done_at=time.monotonic())
        vs.rows += len(batch)
        vs.latency.add(pred.elapsed_ms)
        if late:
            vs.late += len(batch)
        if isinstance(outputs, Outputs):  # a regressor's values are no labels
            labels = outputs.labels if outputs.kind != "value" else [None] * len(outputs)
        else:
            labels = [o.get("label") for o in outputs]
        return Outcome(member.name, member.version, member.role, member.priority, outputs=outputs,
                       labels=labels, scores=pred.scores, classes=member.classes,
                       done_at=time.monotonic(), elapsed_ms=pred.elapsed_ms)

    def _late(self, fut: asyncio.Future, member: Member, batch: list[Row]) -> None:
        self._inflight_results.discard(fut)
        outcome = self._outcome(member, fut, batch, late=True)
        self._results(batch, [outcome], late=True)

    def _emit_answers(self, batch: list[Row], answers: Sequence[Answer]) -> None:
        now = self._clock()
        st = self.stats
        latencies: list[float] = []
        received = latency = None
        same = 0  # rows in a run with one receive time (one message's rows): one latency
        for row in batch:
            if row.received != received:
                if same:
                    st.answer_latency.add_repeated(latency, same)
                    latencies += [round(latency, 3)] * same  # type: ignore[arg-type]
                received, same = row.received, 0
                latency = (now - received) * 1000.0
            same += 1
        if same:
            st.answer_latency.add_repeated(latency, same)
            latencies += [round(latency, 3)] * same  # type: ignore[arg-type]
        st.scored += len(batch)
        # per version; an ensemble answer (mean: "a+b") belongs to no single version
        if isinstance(answers, AnswerColumn):  # one version answered every row
            o = answers.outcome
            key = (o.name, o.version)
            if key in self._runners:
                vs = self.stats.version(*key)
                vs.answered += len(batch)
                if answers.fallback:
                    vs.fallbacks += len(batch)
            if answers.fallback:
                st.fallbacks += len(batch)
        else:
            answered: collections.Counter[tuple[str, str]] = collections.Counter()
            fell_back: collections.Counter[tuple[str, str]] = collections.Counter()
            for a in answers:
                key = (a.model, a.version)
                answered[key] += 1
                if a.error:
                    st.unanswered += 1
                if a.fallback:
                    st.fallbacks += 1
                    fell_back[key] += 1
            for key, n in answered.items():
                if key in self._runners:
                    vs = self.stats.version(*key)
                    vs.answered += n
                    vs.fallbacks += fell_back[key]
        self.emitter.answers(self.name, AnswerRecords(self.name, batch, answers, self.policy,
                                                      latencies))

    def _results(self, batch: list[Row], outcomes: Sequence[Outcome], late: bool) -> None:
        if self.observer is not None:
            self.observer.on_outcomes(outcomes)
        if not getattr(self.emitter, "wants_results", True):
            return  # nothing keeps per-version results (sync off): do not build them
        if batch and outcomes:
            self.emitter.results(self.name, ResultRecords(self.name, batch, outcomes, late))

    def _track_canary(self, outcomes: Sequence[Outcome]) -> None:
        champ = next((o for o in outcomes if o.role == "champion" and o.ok), None)
        canary = next((o for o in outcomes if o.role == "canary" and o.ok), None)
        if champ is None or canary is None:
            return
        self.canary.add_many(champ.labels or [], canary.labels or [])
        value = self.canary.value
        threshold = self.config.canary_threshold
        if value is None or self.canary.count < min(self.canary.size or 1, 20):
            return
        if value < threshold and not self.canary_alerted:
            self.canary_alerted = True
            detail = {"agreement": round(value, 4), "threshold": threshold,
                      "champion": f"{champ.name}:{champ.version}",
                      "canary": f"{canary.name}:{canary.version}", "window": self.canary.count}
            log.warning("pipeline %s: champion/canary agreement %.3f below %.3f", self.name,
                        value, threshold)
            self.emitter.alert(self.name, "canary_agreement_low", detail)
        elif value >= threshold:
            self.canary_alerted = False

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()

    def status(self) -> dict:
        st = self.stats
        versions = []
        for s in self._members:
            vs = st.version(s.name, s.version)
            versions.append({"model": s.name, "version": s.version, "role": s.role,
                             "priority": s.priority, **vs.to_dict()})
        return {
            "policy": self.policy, "deadline_ms": self.config.deadline_ms,
            "received": st.received, "accepted": st.accepted, "rejected": st.rejected,
            "rejected_by_reason": dict(st.rejected_by_reason), "rows": st.rows,
            "dropped": st.dropped, "queue_waits": st.queue_waits, "scored": st.scored,
            "published": st.published,
            "fallbacks": st.fallbacks, "unanswered": st.unanswered, "errors": st.errors,
            "queue_depth": len(self._queue), "answer_latency": st.answer_latency.summary(),
            "versions": versions,
            "canary_agreement": self.canary.value,
        }
