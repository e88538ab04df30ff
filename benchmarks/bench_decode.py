"""Decode cost per sample of every payload format, beside msgpack.

BasicMotions TEST samples (6 features) are encoded in each format, the way a sensor would
send them, and fed through the daemon's own code: ``Decoder.decode`` (the decode stage) and
``Assembler.feed_decoded`` without windows (for ``value`` and ``sparkplug_b`` this is where the
per-source assembly happens). Two shapes where the format allows: one sample per message, and
10 samples per message (a batch / pack / 10 lines). ``value`` always needs 6 messages per
sample (one per feature). Sparkplug sends DDATA with aliases (one per sample), needs the
``protobuf`` package (the ``sparkplug`` extra) and is skipped without it.

Prints a table and writes benchmarks/results/decode.json.

    python benchmarks/bench_decode.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import msgpack

from edgeml.core.assemble import Assembler
from edgeml.core.decode import Decoder
from edgeml.core.formats.value import TopicTemplate, ValueSpec
from edgeml.host.datasets import load_basicmotions

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests" / "core"))
from _formats_streams import (  # noqa: E402  (the test streams: the same encodings)
    CH,
    SPARKPLUG_METRICS,
    SparkplugNode,
    influx_messages,
    senml_messages,
    value_messages,
)


def cases(test) -> list[tuple[str, int, Decoder, list[tuple[str, bytes]], int]]:
    """(format, samples per message, decoder, messages, samples)."""
    windows = range(8)  # 800 samples
    n = len(windows) * test.X.shape[1]
    flat = [s for w in windows for s in test.X[w]]
    feats = tuple(CH)
    one = [dict(zip(CH, map(float, s), strict=True)) for s in flat]
    out = []
    out.append(("msgpack", 1, Decoder(format="msgpack", features=feats, n_features=6),
                [("s/imu", msgpack.packb(d)) for d in one], n))
    out.append(("msgpack", 10, Decoder(format="msgpack", features=feats, n_features=6),
                [("s/imu", msgpack.packb({"samples": one[i:i + 10]}))
                 for i in range(0, n, 10)], n))
    out.append(("json", 1, Decoder(format="json", features=feats, n_features=6),
                [("s/imu", json.dumps(d).encode()) for d in one], n))
    out.append(("json", 10, Decoder(format="json", features=feats, n_features=6),
                [("s/imu", json.dumps({"samples": one[i:i + 10]}).encode())
                 for i in range(0, n, 10)], n))
    for k in (1, 10):
        out.append(("senml", k, Decoder(format="senml", features=feats, n_features=6),
                    senml_messages(test, windows, per_pack=k), n))
        out.append(("influx_line", k, Decoder(format="influx_line", features=feats,
                                              n_features=6),
                    influx_messages(test, windows, per_msg=k), n))
    spec = ValueSpec(TopicTemplate.parse("plant/{line}/{machine}/{feature}"), max_age_s=1e9)
    out.append(("value", 1 / 6, Decoder(format="value", features=feats, spec=spec),
                value_messages(test, windows), n))
    try:
        from edgeml.core.formats.sparkplug import SparkplugSpec
    except ImportError:
        return out
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        print("sparkplug_b skipped: protobuf is not installed", file=sys.stderr)
        return out
    node = SparkplugNode()
    msgs = [node.nbirth()]
    for w in windows:
        msgs.append(node.dbirth(f"w{w}"))
        msgs += [node.ddata(f"w{w}", s) for s in test.X[w]]
    sspec = SparkplugSpec(group_id=node.group, edge_node_id=node.node,
                          metrics=tuple(SPARKPLUG_METRICS.items()), max_age_s=1e9)
    out.append(("sparkplug_b", 1, Decoder(format="sparkplug_b", features=feats, spec=sspec),
                msgs, n))
    return out


def _best(fn, samples: int, seconds: float, rounds: int = 5) -> float:
    """Microseconds per sample: the best of ``rounds`` rounds of ``seconds / rounds`` each
    (the minimum is the least disturbed by other processes on a shared machine)."""
    best = float("inf")
    for _ in range(rounds):
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            el = time.perf_counter() - t0
            if el >= seconds / rounds:
                break
        best = min(best, el / (reps * samples) * 1e6)
    return best


def measure(decoder: Decoder, msgs, samples: int, seconds: float) -> dict:
    def decode_only() -> None:
        for _, p in msgs:
            decoder.decode(p)

    def decode_assemble() -> None:  # a fresh session per pass: stateful formats start empty
        asm = Assembler(decoder, None)
        rows = 0
        for seq, (topic, p) in enumerate(msgs):
            rows += len(asm.feed_decoded(topic, decoder.decode(p), seq, seq * 0.001))
        assert rows == samples, (rows, samples)

    return {"decode_us_per_sample": _best(decode_only, samples, seconds),
            "decode_assemble_us_per_sample": _best(decode_assemble, samples, seconds),
            "bytes_per_sample": sum(len(p) for _, p in msgs) / samples,
            "messages_per_sample": len(msgs) / samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="per measurement (5 rounds; the best round counts)")
    ap.add_argument("--out", default=str(ROOT / "results" / "decode.json"))
    args = ap.parse_args()
    test = load_basicmotions("TEST")
    results = []
    for fmt, per_msg, decoder, msgs, n in cases(test):
        r = measure(decoder, msgs, n, args.seconds)
        r.update(format=fmt, samples_per_message=per_msg)
        results.append(r)
    base = next(r for r in results if r["format"] == "msgpack"
                and r["samples_per_message"] == 1)["decode_assemble_us_per_sample"]
    print(f"{'format':<12} {'samples/msg':>11} {'bytes/sample':>12} {'decode us':>10} "
          f"{'+assemble us':>13} {'x msgpack':>9}")
    for r in results:
        spm = r["samples_per_message"]
        spm_s = "1/6" if spm < 1 else str(spm)
        print(f"{r['format']:<12} {spm_s:>11} {r['bytes_per_sample']:>12.0f} "
              f"{r['decode_us_per_sample']:>10.2f} {r['decode_assemble_us_per_sample']:>13.2f} "
              f"{r['decode_assemble_us_per_sample'] / base:>9.1f}")
    doc = {"benchmark": "decode", "python": platform.python_version(),
           "machine": platform.machine(), "processor": platform.processor(),
           "seconds_per_measurement": args.seconds, "features": 6,
           "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
           "note": "microseconds per sample (6 float features), BasicMotions TEST, best of 5 "
                   "rounds; decode = Decoder.decode, +assemble = Decoder.decode + "
                   "Assembler.feed_decoded without windows",
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: "
          "figures from a busy machine are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
