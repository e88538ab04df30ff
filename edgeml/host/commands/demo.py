"""``edgeml demo``: the whole story on one machine (see :mod:`edgeml.host.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run everything on this machine: train, sign, stream real data, push, promote, replay"
DESCRIPTION = """\
Run the whole edgeml story on this machine in under a minute:

  1. train three model versions on the BasicMotions smart-watch TRAIN set shipped with
     edgeml, convert them to ONNX bundles (parity-checked) and sign them with a new key
  2. start a broker: --broker URL, else a private mosquitto on a free loopback port if it
     is installed, else an embedded pure-Python broker (amqtt, the 'broker' extra)
  3. start a daemon with version 1 as champion and version 2 as shadow
  4. stream the TEST set as a live watch (one MQTT message per sample, 10 Hz x --speed)
  5. mid-stream, push version 3 over MQTT as a challenger, then promote it to champion
  6. print a summary: answers per version, accuracy of every version against the labels,
     fallbacks, what was archived and synced upstream, and an offline replay comparison

Progress and a live view go to stderr, the summary to stdout. Everything written lands in
one folder (default ./edgeml-demo-<timestamp>/, with summary.json); every process started is
stopped at the end, unless --keep.

With --fleet N it runs a fleet instead: N daemons in group demo-fleet (each streaming its own
share of the TEST set, true labels included), one collector filling fleet.db (SQLite), the
fleet report, and two staged rollouts judged from fleet.db: a version trained on shuffled
labels (halts at the first wave, rolled back with a signed command) and a good version
(reaches every device).

Needs the host tools: pip install 'edgeml[host,broker]'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", metavar="URL",
                   help="use this broker (mqtt://host:port) instead of starting one")
    p.add_argument("--embedded", action="store_true",
                   help="use the embedded amqtt broker even when mosquitto is installed")
    p.add_argument("--speed", type=float, default=20.0, metavar="X",
                   help="stream at X times real time (the watch samples at 10 Hz; "
                   "default %(default)g: 200 messages/s, about 20 s for the TEST set)")
    p.add_argument("--no-pacing", action="store_true",
                   help="send as fast as the device keeps up (for CI); push and promote "
                   "still happen at fixed points of the stream")
    p.add_argument("--keep", action="store_true",
                   help="leave the daemon (and the broker it started) running after the "
                   "summary, print the config path, and wait for Ctrl-C")
    p.add_argument("--fleet", type=int, metavar="N",
                   help="run a fleet of N daemons (2..20) with a collector, the fleet report "
                   "and staged rollouts instead of the single-device story")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="folder for everything the demo writes (must be new or empty; "
                   "default ./edgeml-demo-<timestamp>/)")


def run(args: argparse.Namespace) -> int:
    import sys

    from edgeml.host.demo import DemoSettings, default_out_dir, format_summary, run_demo

    if args.fleet is not None:
        return _run_fleet(args)

    settings = DemoSettings(
        out_dir=args.out or default_out_dir(), broker_url=args.broker, embedded=args.embedded,
        speed=args.speed, pacing=not args.no_pacing, keep=args.keep,
    )

    def show(summary: dict) -> None:
        print(format_summary(summary), flush=True)

    try:
        run_demo(settings, on_summary=show)
    except KeyboardInterrupt:
        print("edgeml demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    return 0


def _run_fleet(args: argparse.Namespace) -> int:
    import sys

    from edgeml.host.demo import default_out_dir
    from edgeml.host.fleet_demo import FleetDemoSettings, format_summary, run_fleet_demo

    settings = FleetDemoSettings(out_dir=args.out or default_out_dir(), devices=args.fleet,
                                 broker_url=args.broker, embedded=args.embedded)
    try:
        summary = run_fleet_demo(settings)
    except KeyboardInterrupt:
        print("edgeml demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(format_summary(summary), flush=True)
    return 0
