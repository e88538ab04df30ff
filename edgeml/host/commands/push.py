"""``edgeml push``: send a bundle to a device or a group and follow its progress."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "push a model bundle to a device or a group over MQTT and wait until it is active"
DESCRIPTION = """\
Push a bundle on {p}/{device}/deploy (or {p}/group/{group}/deploy, retained, so a device that
is offline gets it when it comes back) and print each device's progress from
{p}/+/deploy/status: received, verified, installed, loaded, active (or failed + reason, or
noop when the device already has that name and version).

Bundles larger than --chunk-size go out as a header and sha256-checked chunks; a transfer
that breaks off is refused by the device, never half-installed.

Exit status: 0 when the device (for a group: every member that was online, and at least one
device) is active or reports noop; 1 when a device reports failed; 2 on timeout.
"""


def add_connection_arguments(p: argparse.ArgumentParser, timeout: float) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
                   help="the devices' broker, mqtt://host:port or mqtts://host:port "
                        "(default: %(default)s)")
    p.add_argument("--topic-prefix", default="edgeml", metavar="PREFIX",
                   help="the devices' topic_prefix (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                   help="how long to wait for the device(s) (default: %(default)s)")
    p.add_argument("--username", metavar="NAME", help="broker user name")
    p.add_argument("--password-file", metavar="FILE",
                   help="file holding the broker password (kept out of the process list)")
    p.add_argument("--ca-file", metavar="FILE",
                   help="CA certificate that signed the broker's TLS certificate (mqtts://)")


def fleet_settings(args: argparse.Namespace):
    """BrokerSettings for a host-side verb: a clean session with a random client id."""
    import secrets

    from edgeml.errors import ConfigError
    from edgeml.transport.settings import BrokerSettings

    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.password_file}: {exc.strerror}",
                              key="--password-file") from exc
    return BrokerSettings(url=args.broker, client_id=f"edgeml-cli-{secrets.token_hex(4)}",
                          clean_start=True, username=args.username, password=password,
                          ca_file=args.ca_file)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.control.protocol import DEFAULT_CHUNK_SIZE, DEFAULT_TRANSFER_TIMEOUT_S, ROLES

    p.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE",
                   help="the .edgeml bundle file (omit it with --clear-retained)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="push to this one device")
    target.add_argument("--group", metavar="NAME",
                        help="push to every device whose config lists this group (retained)")
    p.add_argument("--pipeline", metavar="NAME",
                   help="the pipeline to add the model to (default: the device's only "
                        "pipeline, or the one named like the model)")
    p.add_argument("--role", choices=ROLES, default="challenger",
                   help="the model's role once active (default: %(default)s; champion "
                        "promotes it at once and starts the watch window)")
    p.add_argument("--priority", type=int, metavar="N",
                   help="fallback priority, lower wins (default: by role: champion 0, "
                        "challenger 10, canary 20, shadow 30)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help="bundles larger than this are sent in chunks of this size "
                        "(default: %(default)s, at least 1024)")
    p.add_argument("--transfer-timeout", type=float, default=DEFAULT_TRANSFER_TIMEOUT_S,
                   metavar="SECONDS",
                   help="the device refuses a chunked transfer idle this long "
                        "(default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="deploy even if the device had this name and version before "
                        "(normally a no-op)")
    p.add_argument("--clear-retained", action="store_true",
                   help="with --group and no BUNDLE: remove the group's retained deployment")
    p.add_argument("--json", action="store_true",
                   help="print every report as one JSON line instead of text")
    add_connection_arguments(p, timeout=60.0)


def _print_report(doc: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, sort_keys=True), flush=True)
        return
    stage = doc.get("stage")
    what = f"{doc.get('name')} {doc.get('version')}"
    line = f"{doc.get('device')}: {stage:<9} {what}"
    if stage == "verified":
        line += f" (signed by {doc['signer']})" if doc.get("signer") else " (unsigned)"
    elif stage == "loaded" and doc.get("load_ms") is not None:
        line += f" (warm-up and self-test in {doc['load_ms']} ms)"
    elif stage == "active":
        line += f" as {doc.get('role')} in pipeline {doc.get('pipeline')}"
    elif stage in ("failed", "noop"):
        line += f": {doc.get('reason')}"
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from edgeml.errors import DeployError
    from edgeml.host.fleet import Fleet

    if args.clear_retained:
        if args.group is None or args.bundle is not None:
            raise DeployError("received", "--clear-retained takes --group and no BUNDLE")

        async def clear() -> int:
            async with Fleet(fleet_settings(args), topic_prefix=args.topic_prefix) as fleet:
                return await fleet.clear_group(args.group)
        n = asyncio.run(clear())
        print(f"cleared {n} retained message(s) of group {args.group}")
        return 0
    if args.bundle is None:
        raise DeployError("received", "BUNDLE is required (or --group G --clear-retained)")

    async def push():
        async with Fleet(fleet_settings(args), topic_prefix=args.topic_prefix) as fleet:
            return await fleet.push(
                args.bundle, device=args.device, group=args.group, pipeline=args.pipeline,
                role=args.role, priority=args.priority, chunk_size=args.chunk_size,
                timeout=args.timeout, transfer_timeout_s=args.transfer_timeout,
                force=args.force, on_report=lambda d: _print_report(d, args.json))

    result = asyncio.run(push())
    h = result.plan.header
    if not args.json:
        how = f"{h.chunks} chunks of {h.chunk_size} bytes" if h.chunks > 1 else "one message"
        target = f"group {args.group}" if args.group else f"device {args.device}"
        print(f"pushed {h.name} {h.version} ({h.size} bytes, {how}, transfer {h.transfer}) "
              f"to {target}", file=sys.stderr)
        if result.group:
            members = ", ".join(result.expected) or "none known online"
            print(f"group members online at push: {members}; finished: "
                  f"{', '.join(sorted(result.final)) or 'none'}", file=sys.stderr)
        for dev in result.waiting_for:
            print(f"{dev}: no final report within {args.timeout:g} s", file=sys.stderr)
        if result.group and not result.final:
            print(f"no device reported within {args.timeout:g} s (the deployment is retained: "
                  "members get it when they come online)", file=sys.stderr)
    return result.exit_code
