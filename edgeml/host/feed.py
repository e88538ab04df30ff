"""Publish a file of samples on one topic at a steady rate (``edgeml feed``).

A burst is what loses data on a broker as installed: mosquitto keeps at most
``max_queued_messages`` (1000 by default) QoS 1 messages per subscriber it has not yet
delivered and drops the rest, so ``mosquitto_pub -l`` with a 4,000-line file can lose most of
it before a device has read the first hundred. :func:`feed` paces the messages instead
(``rate`` per second, on a schedule, so a slow moment is caught up without a burst) and, at
QoS 1, waits for every acknowledgement before it says it is done.

Input: JSON lines (each line goes out as it is; blank lines are skipped) or CSV with a header
row (each row becomes one JSON object, numbers as numbers, empty cells left out).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgeml.errors import ConfigError

#: messages per second unless told otherwise: half of mosquitto's stock queue
#: (max_queued_messages 1000) per second, so a device that stops reading for up to 2 s
#: still loses nothing on a broker as installed
DEFAULT_RATE = 500.0
#: QoS 1 publishes awaiting their PUBACK at once
MAX_IN_FLIGHT = 100
FORMATS = ("auto", "jsonl", "csv")


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"must be one of {', '.join(FORMATS)}, not {fmt!r}", key="--format")
    if fmt != "auto":
        return fmt
    return "csv" if path.lower().endswith((".csv", ".csv.txt")) else "jsonl"


def count_messages(path: Path, fmt: str) -> int:
    """How many messages ``path`` holds (for the progress bar), without parsing them."""
    n = 0
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
    return max(0, n - 1) if fmt == "csv" else n


def _cell(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return text
    return v if v == v and v not in (float("inf"), float("-inf")) else text


def read_messages(fh: IO[str], fmt: str, *, name: str = "-") -> Iterator[bytes]:
    """The payloads in ``fh``, in order. A line that cannot be sent raises
    :class:`~edgeml.errors.ConfigError` naming the file and the line."""
    if fmt == "jsonl":
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            try:
                json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"line {lineno}: not valid JSON ({exc})", file=name) from None
            yield text.encode()
        return
    reader = csv.reader(fh)
    header: list[str] | None = None
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            if len(set(header)) != len(header) or "" in header:
                raise ConfigError(f"line {reader.line_num}: the header row needs distinct, "
                                  f"non-empty column names, got {row!r}", file=name)
            continue
        if len(row) != len(header):
            raise ConfigError(f"line {reader.line_num}: {len(row)} cells, the header has "
                              f"{len(header)}", file=name)
        doc = {k: _cell(v.strip()) for k, v in zip(header, row, strict=True) if v.strip()}
        yield json.dumps(doc, separators=(",", ":")).encode()


class Progress:
    """A bar redrawn in place on a terminal; otherwise a plain line every 10 % (or every
    5 s when the total is unknown), so logs and CI output stay readable."""

    def __init__(self, total: int | None, *, out: IO[str] | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.start = clock()
        self._last_draw = self.start
        self._next_step = 1
        self._printed = -1

    def update(self, sent: int, *, final: bool = False) -> None:
        now = self.clock()
        rate = sent / max(now - self.start, 1e-9)
        if self.tty:
            if final or now - self._last_draw >= 0.1:
                self._last_draw = now
                self.out.write("\r" + self.line(sent, rate) + ("\n" if final else ""))
                self.out.flush()
            return
        if self.total:
            due = sent * 10 // self.total >= self._next_step
        else:
            due = now - self._last_draw >= 5.0
        if due or (final and sent != self._printed):
            self._last_draw = now
            self._printed = sent
            if self.total:
                self._next_step = sent * 10 // self.total + 1
            self.out.write(self.line(sent, rate, bar=False) + "\n")
            self.out.flush()

    def line(self, sent: int, rate: float, *, bar: bool = True) -> str:
        if not self.total:
            return f"sent {sent} message(s), {rate:.0f} msg/s"
        frac = min(sent / self.total, 1.0)
        eta = (self.total - sent) / rate if rate > 0 else 0.0
        text = f"sent {sent}/{self.total} ({frac:.0%}), {rate:.0f} msg/s, {eta:.1f} s left"
        if bar:
            width = 30
            done = int(frac * width)
            text = f"[{'#' * done}{'.' * (width - done)}] " + text
        return text


@dataclass(frozen=True)
class FeedResult:
    sent: int
    seconds: float
    qos: int

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


async def feed(transport: Any, messages: Iterator[bytes], *, topic: str, rate: float,
               qos: int = 1, progress: Progress | None = None,
               clock: Callable[[], float] = time.monotonic) -> FeedResult:
    """Publish ``messages`` on ``topic``, the n-th one not before ``n / rate`` seconds after
    the first (``rate`` 0: as fast as the broker acknowledges). QoS 1 keeps at most
    :data:`MAX_IN_FLIGHT` unacknowledged and returns once every message is acknowledged."""
    if rate < 0:
        raise ConfigError(f"must be 0 (no pacing) or more, not {rate}", key="--rate")
    if qos not in (0, 1):
        raise ConfigError(f"must be 0 or 1, not {qos}", key="--qos")
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    pending: set[asyncio.Task] = set()
    failure: list[BaseException] = []

    def done(task: asyncio.Task) -> None:
        pending.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            failure.append(task.exception())  # type: ignore[arg-type]

    start = clock()
    sent = 0
    try:
        for payload in messages:
            if failure:
                raise failure[0]
            if rate > 0:
                due = start + sent / rate
                wait = due - clock()
                if wait > 0.001:  # sleep in whole milliseconds; a late loop catches up
                    await asyncio.sleep(wait)
            if qos == 0:
                transport.publish_nowait(topic, payload, qos=0)
                if sent % 256 == 255:
                    await asyncio.sleep(0)  # let the network loop write
            else:
                await slots.acquire()
                task = asyncio.create_task(transport.publish(topic, payload, qos=1))
                pending.add(task)
                task.add_done_callback(done)
            sent += 1
            if progress is not None:
                progress.update(sent)
        if pending:
            await asyncio.gather(*pending)
        if failure:
            raise failure[0]
    finally:
        for task in pending:
            task.cancel()
    seconds = clock() - start
    if progress is not None:
        progress.update(sent, final=True)
    return FeedResult(sent, seconds, qos)


def open_input(path: str) -> IO[str]:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
    try:
        return open(path, encoding="utf-8", newline="")  # closed by the caller
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key="FILE") from exc
