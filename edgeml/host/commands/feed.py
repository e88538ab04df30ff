"""``edgeml feed``: publish a file of samples on a topic at a steady rate."""

from __future__ import annotations

import argparse

HELP = "publish a JSON-lines or CSV file on a topic, paced, with progress (replay recordings)"
DESCRIPTION = """\
Publish FILE on --topic, one message per JSON line (sent as it is) or per CSV row (the
header names the fields; each row goes out as a JSON object, numbers as numbers). Messages
are paced at --rate per second, so a stream is never one burst: a broker as installed
(mosquitto's max_queued_messages 1000) drops the QoS 1 messages a subscriber has not taken
yet beyond its queue, which is what `mosquitto_pub -l` with a long file runs into.

The default rate, 500 messages a second, is half that stock queue per second: a device that
stops reading for up to 2 s still loses nothing. Use --rate 10 to replay a 10 Hz recording
in real time, or a higher rate against a broker whose queue is larger.

A progress bar is drawn on a terminal; otherwise a plain line every 10 %.
Exit status: 0 when every message was sent (at QoS 1: acknowledged by the broker), 1 on an
error (the file and line are named).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.feed import DEFAULT_RATE, FORMATS

    p.add_argument("file", metavar="FILE",
                   help="JSON lines (one message per line) or CSV with a header row; "
                        "'-' reads standard input")
    p.add_argument("--topic", "-t", required=True, metavar="TOPIC",
                   help="the topic to publish on, e.g. sensors/watch-01/imu")
    p.add_argument("--rate", "-r", type=float, default=DEFAULT_RATE, metavar="MSG_PER_S",
                   help="messages per second (default: %(default)g, which a stock mosquitto "
                        "queue absorbs; 0: no pacing, as fast as the broker acknowledges)")
    p.add_argument("--qos", "-q", type=int, choices=(0, 1), default=1,
                   help="MQTT QoS of each message (default: %(default)s; at 1 the command "
                        "ends once the broker has acknowledged every message)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format (default: %(default)s: csv for *.csv files, "
                        "otherwise JSON lines)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N messages (default: %(default)s)")
    p.add_argument("--count", type=int, metavar="N",
                   help="send at most N messages (default: all)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output, only the closing summary line")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
                   help="the broker, mqtt://host:port or mqtts://host:port "
                        "(default: %(default)s)")
    p.add_argument("--username", metavar="NAME", help="broker user name")
    p.add_argument("--password-file", metavar="FILE",
                   help="file holding the broker password (kept out of the process list)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA certificate that signed the broker's TLS certificate (mqtts://)")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import itertools
    import sys
    from pathlib import Path

    from edgeml.errors import ConfigError
    from edgeml.host.commands.push import fleet_settings
    from edgeml.host.feed import (
        Progress,
        count_messages,
        detect_format,
        feed,
        open_input,
        read_messages,
    )
    from edgeml.transport.mqtt import MqttTransport

    if args.skip < 0:
        raise ConfigError(f"must be 0 or more, not {args.skip}", key="--skip")
    if args.count is not None and args.count < 0:
        raise ConfigError(f"must be 0 or more, not {args.count}", key="--count")
    if args.rate < 0:
        raise ConfigError(f"must be 0 (no pacing) or more, not {args.rate:g}", key="--rate")
    if not args.topic or any(c in args.topic for c in "+#"):
        raise ConfigError(f"must be a topic name without wildcards, not {args.topic!r}",
                          key="--topic")
    fmt = detect_format(args.file, args.format)
    total = None
    if args.file != "-" and Path(args.file).is_file():
        total = max(0, count_messages(Path(args.file), fmt) - args.skip)
        if args.count is not None:
            total = min(total, args.count)
    settings = fleet_settings(args)
    progress = None if args.quiet else Progress(total)

    async def main():
        with open_input(args.file) as fh:
            stop = None if args.count is None else args.skip + args.count
            messages = itertools.islice(read_messages(fh, fmt, name=args.file), args.skip,
                                        stop)
            async with MqttTransport(settings) as transport:
                return await feed(transport, messages, topic=args.topic, rate=args.rate,
                                  qos=args.qos, progress=progress)

    result = asyncio.run(main())
    acked = ", all acknowledged" if result.qos == 1 else ""
    print(f"sent {result.sent} message(s) to {args.topic} in {result.seconds:.1f} s "
          f"({result.rate:.0f} msg/s, QoS {result.qos}{acked})", file=sys.stderr)
    return 0
