"""A real writer process for the kill -9 test: appends BasicMotions samples in a tight loop.

Protocol on stdout (one line each, flushed):
  ``flushed <last_seq> <segment> <size>``  a burst went to the OS (append_many: one write())
  ``big <seq> <segment> <size> <record_len>``  about to append one large record; the test kills
      us while the kernel copies it, which leaves a torn record at the end of the segment.
After the big record the loop goes on with small bursts until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOPICS = ("sensors/watch-01/imu", "sensors/watch-02/imu", "sensors/watch-03/imu")
BASE_TIME = 1_700_000_000.0


def _samples() -> list[tuple[dict, str]]:
    from edgeml.host.datasets import load_basicmotions

    ds = load_basicmotions("TRAIN")
    out = []
    for s in range(ds.X.shape[0]):
        for i in range(ds.X.shape[1]):
            out.append((dict(zip(ds.channels, map(float, ds.X[s, i]), strict=True)), ds.y[s]))
    return out


_CACHE: list[tuple[dict, str]] = []


def record_for(seq: int, now: float) -> tuple[str, bytes, float]:
    """The (topic, payload, received) the writer appends as ``seq``: deterministic, so the
    test can check every byte it reads back."""
    if not _CACHE:
        _CACHE.extend(_samples())
    sample, label = _CACHE[seq % len(_CACHE)]
    payload = json.dumps({**sample, "id": seq, "label": label}).encode()
    return TOPICS[seq % len(TOPICS)], payload, now + seq * 0.01


def main() -> int:
    from edgeml.storage.rawlog import RawLog

    ap = argparse.ArgumentParser()
    ap.add_argument("directory", type=Path)
    ap.add_argument("--now", type=float, required=True, help="receive time of seq 0")
    ap.add_argument("--bursts", type=int, default=20, help="small bursts before the big one")
    ap.add_argument("--burst-size", type=int, default=50)
    ap.add_argument("--big-bytes", type=int, default=24 * 2**20)
    ap.add_argument("--segment-bytes", type=int, default=128 * 2**20)
    args = ap.parse_args()

    log = RawLog(args.directory, segment_bytes=args.segment_bytes, budget_bytes=None)
    out = sys.stdout

    def burst() -> None:
        first = log.next_seq
        seqs = log.append_many([record_for(first + i, args.now)
                                for i in range(args.burst_size)])
        seg = log.segments()[-1]
        out.write(f"flushed {seqs[-1]} {seg.name} {seg.bytes}\n")
        out.flush()

    for _ in range(args.bursts):
        burst()
    big = b"x" * args.big_bytes
    topic = "sensors/big"
    seg = log.segments()[-1]
    rec_len = 12 + 18 + len(topic) + len(big)
    out.write(f"big {log.next_seq} {seg.name} {seg.bytes} {rec_len}\n")
    out.flush()
    log.append(topic, big, args.now)
    while True:
        burst()


if __name__ == "__main__":
    sys.exit(main())
