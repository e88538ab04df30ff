"""``edgeml collect``: the long-running upstream service that stores what devices sync."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "receive what devices sync ({p}/+/sync/#) and store it once in a fleet database"
DESCRIPTION = """\
Subscribe to the batches devices sync upstream ({p}/<device>/sync/<stream>: outputs, results,
alerts, deploy, drift) and store every record once in a database (table `records`, keyed by
record_id), committing many batches per transaction and acknowledging a batch to its broker
only after the commit. Runs until stopped; SIGTERM or Ctrl-C stores and acknowledges what was
received, then exits 0.

Sources (--source, repeatable):
  mqtt://HOST:PORT, mqtts://HOST:PORT   any MQTT broker: a persistent session (stable client
                                         id, clean session off), QoS 1; with --group NAME the
                                         subscription is $share/NAME/{p}/+/sync/# so several
                                         collectors split the work
  nats://HOST:PORT[,HOST:PORT...]        a NATS JetStream durable consumer on what NATS's
                                         MQTT listener stored ($MQTT_msgs; add ?from=stream
                                         for a stream of our own on {p}.*.sync.>)

Databases (--db):
  sqlite:///PATH                         an embedded SQLite file (default ./edgeml-fleet.db)
  postgresql://USER@HOST:PORT/DB         PostgreSQL (pip install 'edgeml[fleet]')

Messages that are not sync batches of this prefix, or that cannot be decoded, are stored in
the `quarantine` table with the reason; the collector never stops for them. A status line
(stored, rate, duplicates, quarantined, queue, database state) is printed every
--status-interval seconds. See docs/fleet.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.collect.sink import DEFAULT_DB

    p.add_argument("--source", action="append", required=True, metavar="URL",
                   help="where devices sync to: mqtt://HOST:PORT, mqtts://HOST:PORT or "
                        "nats://HOST:PORT (repeatable)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="URL",
                   help="the fleet database, sqlite:///PATH or postgresql://... "
                        "(default: %(default)s)")
    p.add_argument("--group", metavar="NAME",
                   help="share the work with other collectors of this group: MQTT "
                        "$share/NAME/..., NATS durable consumer NAME")
    p.add_argument("--topic-prefix", default="edgeml", metavar="PREFIX",
                   help="the devices' topic_prefix (default: %(default)s)")
    p.add_argument("--client-id", metavar="ID",
                   help="MQTT client id of the persistent session (default: "
                        "edgeml-collect-<group or all>-<hostname>; keep it stable across "
                        "restarts, and distinct per collector of a group)")
    p.add_argument("--username", metavar="NAME", help="broker user name")
    p.add_argument("--password-file", metavar="FILE",
                   help="file holding the broker password (kept out of the process list)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA certificate that signed the broker's TLS certificate (mqtts://)")
    p.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1",
                   help="MQTT protocol version of the MQTT sources (default: %(default)s)")
    p.add_argument("--receive-maximum", type=int, default=100, metavar="N",
                   help="MQTT 5 only: at most N unacknowledged batches in flight from the "
                        "broker, which bounds the collector's memory (default: %(default)s; "
                        "with 3.1.1 the broker's own limit applies, mosquitto's "
                        "max_inflight_messages)")
    p.add_argument("--retention-days", type=float, metavar="DAYS",
                   help="delete records, alerts, deploy events and quarantine entries older "
                        "than this (checked hourly; default: keep everything)")
    p.add_argument("--batch-max", type=int, default=500, metavar="N",
                   help="at most this many messages per database transaction "
                        "(default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                   help="once a message is waiting, how long to wait for more before "
                        "committing (default: %(default)s)")
    p.add_argument("--status-interval", type=float, default=10.0, metavar="SECONDS",
                   help="print a status line this often (default: %(default)s)")
    p.add_argument("--json-status", action="store_true",
                   help="print each status as one JSON line instead of text")


def status_line(s: dict) -> str:
    down = "" if s["db"] == "up" else f"  DATABASE DOWN ({s.get('last_error') or ''})"
    return (f"collect: {s['stored']:,} stored ({s['stored_per_s']:,.0f}/s), "
            f"{s['duplicates']:,} duplicates, {s['quarantined']:,} quarantined, "
            f"{s['deliveries']:,} messages in {s['commits']:,} commits, "
            f"queued {s['queued']}{down}")


def make_sources(args: argparse.Namespace) -> list:
    from pathlib import Path
    from urllib.parse import urlsplit

    from edgeml.errors import ConfigError

    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.password_file}: {exc.strerror}",
                              key="--password-file") from exc
    sources = []
    for i, url in enumerate(args.source):
        scheme = urlsplit(url).scheme
        if scheme in ("mqtt", "mqtts", "tcp", "ssl"):
            from edgeml.host.collect.mqtt_source import MqttSource, default_client_id

            cid = args.client_id or default_client_id(args.group)
            if len(args.source) > 1 and i:
                cid = f"{cid}-{i}"
            v5 = args.mqtt_version == "5"
            sources.append(MqttSource(url, prefix=args.topic_prefix, group=args.group,
                                      client_id=cid, username=args.username,
                                      password=password, ca_file=args.ca_file,
                                      protocol=args.mqtt_version,
                                      receive_maximum=args.receive_maximum if v5 else None))
        elif scheme == "nats":
            try:
                from edgeml.host.collect.nats_source import NatsSource
            except ImportError as exc:
                raise ConfigError(f"NATS sources are not available: {exc}",
                                  key="--source") from exc
            sources.append(NatsSource(url, prefix=args.topic_prefix, group=args.group,
                                      username=args.username, password=password))
        else:
            raise ConfigError(f"must be mqtt://, mqtts:// or nats://, not {url!r}",
                              key="--source")
    return sources


def open_sink(args: argparse.Namespace):
    """The database, waiting (with backoff, printing why) while it cannot be reached: a
    service started before its database comes up. None if stopped meanwhile."""
    import logging
    import signal
    import threading

    from edgeml.errors import SinkUnavailableError
    from edgeml.host.collect.sink import Sink

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    delay = 0.5
    try:
        while True:
            try:
                return Sink(args.db, prefix=args.topic_prefix,
                            retention_days=args.retention_days)
            except SinkUnavailableError as exc:
                why = " ".join(str(exc).split())
                print(f"collect: waiting for the database: {why}", flush=True)
                logging.getLogger("edgeml.host.collect").info("database unavailable: %s", why)
            if stop.wait(delay):
                return None
            delay = min(delay * 2, 10.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from edgeml.errors import ConfigError
    from edgeml.host.collect.service import Collector

    if args.batch_max < 1:
        raise ConfigError(f"must be at least 1, not {args.batch_max}", key="--batch-max")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"must not be negative, not {args.batch_wait_ms}",
                          key="--batch-wait-ms")
    if args.status_interval <= 0:
        raise ConfigError(f"must be positive, not {args.status_interval}",
                          key="--status-interval")
    sources = make_sources(args)
    sink = open_sink(args)
    if sink is None:
        return 0  # stopped while waiting for the database

    def on_status(snap: dict) -> None:
        line = json.dumps(snap, sort_keys=True) if args.json_status else status_line(snap)
        print(line, flush=True)

    collector = Collector(sources, sink, batch_max_deliveries=args.batch_max,
                          batch_wait_s=args.batch_wait_ms / 1000.0,
                          status_interval_s=args.status_interval, on_status=on_status)

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, collector.stop)
        task = asyncio.create_task(collector.run())
        ready = asyncio.create_task(collector.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            where = ", ".join(getattr(s, "filter", s.name) + f" on {s.name}"
                              if hasattr(s, "filter") else s.name for s in sources)
            before, after = sink.schema or (0, 0)
            migrated = f" (schema {before} -> {after})" if before != after else ""
            print(f"collect: ready, {where} -> {sink.name}{migrated}", flush=True)
        else:
            ready.cancel()
        return await task

    try:
        snap = asyncio.run(main())
    finally:
        sink.close()
    print(f"collect: stopped; {snap['stored']:,} records stored, {snap['duplicates']:,} "
          f"duplicates, {snap['quarantined']:,} quarantined", file=sys.stderr, flush=True)
    return 0
