"""The collector: deliveries from every source, stored in batches, acknowledged after commit.

One task per source feeds a queue; one writer takes whatever is waiting (up to
``batch_max_deliveries``, waiting at most ``batch_wait_s`` for more once it has one), stores
it in one transaction on a worker thread and then acknowledges every delivery of the batch.
When the database is away the writer keeps the same deliveries and tries again with backoff,
acknowledging nothing: the sources' brokers keep (and redeliver) what is not acknowledged.

Stopping (:meth:`Collector.stop`, SIGTERM in ``edgeml collect``): the sources stop taking new
deliveries, what was received is stored, committed and acknowledged, then the sources close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeml.errors import SinkUnavailableError
from edgeml.host.collect.sink import Sink, StoreResult
from edgeml.host.collect.source import Delivery, Source

log = logging.getLogger("edgeml.host.collect")


class Collector:
    """``await Collector(sources, sink).run()`` until :meth:`stop`.

    - ``batch_max_deliveries``, ``batch_max_bytes``: per transaction at most this many
      deliveries, and deliveries are added only while their payloads total less than this
      (a transaction's rows are held in memory until the commit).
    - ``batch_wait_s``: once one delivery is waiting, how long to wait for more.
    - ``status_interval_s`` / ``on_status``: a progress snapshot (:meth:`status`) every so
      often, logged and handed to ``on_status`` (the CLI prints it as a status line).
    - ``retry_min_s``..``retry_max_s``: backoff while the database is unavailable.
    - ``retention_interval_s``: how often the sink's retention runs (if it has one).
    - ``stop_grace_s``: after a stop, how long to keep retrying an unavailable database
      before giving up on the deliveries in hand (unacknowledged, so redelivered later)."""

    def __init__(self, sources: Sequence[Source], sink: Sink, *,
                 batch_max_deliveries: int = 500, batch_max_bytes: int = 8 << 20,
                 batch_wait_s: float = 0.02,
                 status_interval_s: float = 10.0,
                 on_status: Callable[[dict], None] | None = None,
                 retry_min_s: float = 0.2, retry_max_s: float = 5.0,
                 retention_interval_s: float = 3600.0, stop_grace_s: float = 10.0) -> None:
        if not sources:
            raise ValueError("at least one source")
        self.sources = list(sources)
        self.sink = sink
        self.batch_max_deliveries = batch_max_deliveries
        self.batch_max_bytes = batch_max_bytes
        self.batch_wait_s = batch_wait_s
        self.status_interval_s = status_interval_s
        self.on_status = on_status
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.retention_interval_s = retention_interval_s
        self.stop_grace_s = stop_grace_s
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._executor: Any = None
        self.started = time.monotonic()
        self.totals = {"deliveries": 0, "records": 0, "stored": 0, "duplicates": 0,
                       "quarantined": 0, "commits": 0, "db_errors": 0, "ack_errors": 0,
                       "expired": 0, "abandoned": 0}
        self.db_down_since: float | None = None
        self.last_error: str | None = None
        self._last_snapshot = (time.monotonic(), 0)
        self.ready = asyncio.Event()

    def stop(self) -> None:
        """Finish: store and acknowledge what was received, then return from :meth:`run`."""
        self._stopping.set()

    # ---- running --------------------------------------------------------------------------
    async def run(self) -> dict:
        import concurrent.futures

        self._executor = concurrent.futures.ThreadPoolExecutor(1, "collect-db")
        try:
            async with contextlib.AsyncExitStack() as stack:
                for src in self.sources:
                    await stack.enter_async_context(src)
                    log.info("receiving from %s", getattr(src, "name", src))
                feeders = [asyncio.create_task(self._feed(s), name=f"source {i}")
                           for i, s in enumerate(self.sources)]
                status = asyncio.create_task(self._status_loop(), name="status")
                self.ready.set()
                try:
                    await self._write_loop(feeders)
                finally:
                    for t in (*feeders, status):
                        t.cancel()
                    await asyncio.gather(*feeders, status, return_exceptions=True)
                    # anything a feeder handed over after the last batch: store it too
                    if not self._queue.empty():
                        await self._store_until_done(self._take_all())
        finally:
            self._executor.shutdown(wait=True)
        snap = self.status()
        self._report(snap)
        return snap

    async def _feed(self, src: Source) -> None:
        async for d in src.deliveries():
            self._queue.put_nowait(d)
            if self._stopping.is_set():
                break
        # a source that ends (closed) just stops feeding; the others go on

    def _take_all(self, limit: int | None = None, size: int = 0) -> list[Delivery]:
        """What is waiting, up to ``limit`` deliveries and ``batch_max_bytes`` of payload
        (``size``: bytes already taken)."""
        out = []
        q = self._queue
        while not q.empty() and (limit is None or len(out) < limit) and \
                size < self.batch_max_bytes:
            d = q.get_nowait()
            size += len(d.payload)
            out.append(d)
        return out

    async def _write_loop(self, feeders: list[asyncio.Task]) -> None:
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                if self._queue.empty():
                    getter = asyncio.create_task(self._queue.get())
                    done, _ = await asyncio.wait({getter, stop_wait, *feeders},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await getter
                        if getter.done() and not getter.cancelled():
                            self._queue.put_nowait(getter.result())  # raced: keep it
                        for f in feeders:
                            if f.done() and not f.cancelled() and f.exception() is not None:
                                raise f.exception()  # type: ignore[misc]
                        if all(f.done() for f in feeders) and self._queue.empty():
                            return  # every source ended
                        continue
                    batch = [getter.result()]
                    if self.batch_wait_s > 0 and self._queue.qsize() < self.batch_max_deliveries:
                        await asyncio.sleep(self.batch_wait_s)  # let a burst gather
                else:
                    batch = []
                batch += self._take_all(self.batch_max_deliveries - len(batch),
                                        sum(len(d.payload) for d in batch))
                await self._store_until_done(batch)
        finally:
            stop_wait.cancel()

    async def _store_until_done(self, batch: list[Delivery]) -> None:
        """Store and commit ``batch`` (retrying while the database is away), then ack."""
        loop = asyncio.get_running_loop()
        delay = self.retry_min_s
        reconnect = False
        while True:
            try:
                result = await loop.run_in_executor(self._executor, self._store, batch,
                                                    reconnect)
                break
            except SinkUnavailableError as exc:
                if self._stopping.is_set() and self.db_down_since is not None and \
                        time.monotonic() - self.db_down_since > self.stop_grace_s:
                    log.warning("stopping with the database still away: %d deliveries not "
                                "stored and not acknowledged (the broker delivers them "
                                "again)", len(batch))
                    self.totals["abandoned"] += len(batch)
                    return
                self.totals["db_errors"] += 1
                self.last_error = str(exc)
                if self.db_down_since is None:
                    self.db_down_since = time.monotonic()
                    log.warning("fleet database unavailable, holding %d deliveries "
                                "(unacknowledged) and retrying: %s", len(batch), exc)
                reconnect = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        if self.db_down_since is not None:
            log.warning("fleet database back after %.1f s",
                        time.monotonic() - self.db_down_since)
            self.db_down_since = None
        self._count(result)
        for d in batch:
            try:
                await d.ack()
            except Exception as exc:  # the broker redelivers it; idempotent by record_id
                self.totals["ack_errors"] += 1
                log.debug("ack failed (%s): it will be delivered again", exc)

    def _store(self, batch: list[Delivery], reconnect: bool) -> StoreResult:
        if reconnect:
            self.sink.reconnect()
        return self.sink.store(batch)

    def _count(self, r: StoreResult) -> None:
        t = self.totals
        t["deliveries"] += r.deliveries
        t["records"] += r.records
        t["stored"] += r.stored
        t["duplicates"] += r.duplicates
        t["quarantined"] += r.quarantined
        t["commits"] += 1
        if r.quarantined:
            log.warning("quarantined %d message(s) or record(s) (%d so far)", r.quarantined,
                        t["quarantined"])

    # ---- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.monotonic()
        t0, n0 = self._last_snapshot
        rate = (self.totals["stored"] - n0) / (now - t0) if now > t0 else 0.0
        up = now - self.started
        sources = []
        for s in self.sources:
            stats = getattr(s, "stats", None)
            sources.append(stats() if callable(stats) else {"source": getattr(s, "name", "")})
        return {**self.totals, "uptime_s": round(up, 1), "stored_per_s": round(rate, 1),
                "mean_stored_per_s": round(self.totals["stored"] / up, 1) if up > 0 else 0.0,
                "queued": self._queue.qsize(),
                "db": "down" if self.db_down_since is not None else "up",
                "last_error": self.last_error, "sources": sources}

    def _report(self, snap: dict) -> None:
        log.info("stored %d records (%.0f/s), %d duplicates, %d quarantined, %d deliveries "
                 "in %d commits, queued %d, database %s", snap["stored"], snap["stored_per_s"],
                 snap["duplicates"], snap["quarantined"], snap["deliveries"], snap["commits"],
                 snap["queued"], snap["db"])
        if self.on_status is not None:
            self.on_status(snap)

    async def _status_loop(self) -> None:
        last_expire = -1e18
        loop = asyncio.get_running_loop()
        while True:
            if self.sink.retention_days is not None and \
                    time.monotonic() - last_expire >= self.retention_interval_s:
                last_expire = time.monotonic()
                try:
                    n = await loop.run_in_executor(self._executor, self.sink.expire)
                    self.totals["expired"] += n
                    if n:
                        log.info("retention: deleted %d records older than %g days", n,
                                 self.sink.retention_days)
                except SinkUnavailableError as exc:
                    log.warning("retention skipped: %s", exc)
            await asyncio.sleep(self.status_interval_s)
            snap = self.status()
            self._last_snapshot = (time.monotonic(), self.totals["stored"])
            self._report(snap)
