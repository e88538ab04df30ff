"""``edgeml promote``: make a challenger the champion on a device."""

from __future__ import annotations

import argparse

HELP = "make a model version the champion of a pipeline on a device"
DESCRIPTION = """\
Send {"cmd": "promote"} on {p}/{device}/cmd and wait for the reply on {p}/{device}/cmd/reply.
The version (default: the pipeline's challenger of --model) becomes the champion; the previous
champion stays as a challenger and is remembered for `edgeml rollback`. A watch window starts:
if the new champion's error rate, p99 latency or canary agreement crosses the device's [deploy]
thresholds, the device rolls back by itself and raises an alert.

A device with trusted_keys obeys only signed commands: give --sign-key FILE (the private key
of one of its trusted keys). See docs/deploy.md, "Signed commands".

Exit status: 0 ok, 1 the device refused (its reason is printed), 2 no reply before --timeout.
"""


def add_device_command_arguments(p: argparse.ArgumentParser, *,
                                 model_required: bool) -> None:
    from edgeml.host.commands.push import add_connection_arguments

    p.add_argument("--device", required=True, metavar="ID", help="the device id")
    p.add_argument("--pipeline", metavar="NAME",
                   help="the pipeline (default: the device's only pipeline)")
    p.add_argument("--model", required=model_required, metavar="NAME",
                   help="the model name" + ("" if model_required else
                                            " (default: any model with an earlier champion)"))
    p.add_argument("--version", metavar="V", help="the model version (default: see above)")
    p.add_argument("--json", action="store_true", help="print the device's reply as JSON")
    add_sign_key_argument(p)
    add_connection_arguments(p, timeout=10.0)


def add_sign_key_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign-key", metavar="FILE",
                   help="Ed25519 private key (from `edgeml keygen`) to sign the command with; "
                        "required by devices that have trusted_keys")


def sign_key_of(args: argparse.Namespace):
    if not getattr(args, "sign_key", None):
        return None
    from pathlib import Path

    from edgeml.keys import load_private_key

    return load_private_key(Path(args.sign_key))


def run_device_command(args: argparse.Namespace, cmd: str) -> int:
    import asyncio
    import json
    import sys

    from edgeml.errors import FleetTimeout
    from edgeml.host.fleet import Fleet

    async def send() -> dict:
        async with Fleet(_settings(args), topic_prefix=args.topic_prefix) as fleet:
            return await fleet.command(args.device, cmd, pipeline=args.pipeline,
                                       model=args.model, version=args.version,
                                       timeout=args.timeout, sign_key=key,
                                       policy=getattr(args, "policy", None))

    key = sign_key_of(args)

    try:
        reply = asyncio.run(send())
    except FleetTimeout as exc:
        print(f"edgeml {cmd}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    elif reply.get("ok"):
        print(f"{args.device}: {reply.get('message')}")
        for s in reply.get("active") or []:
            print(f"  {s['model']} {s['version']:<10} {s['role']:<10} priority {s['priority']}")
    if not reply.get("ok"):
        print(f"edgeml {cmd}: {args.device} refused: {reply.get('message')}", file=sys.stderr)
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device_command_arguments(p, model_required=True)


def run(args: argparse.Namespace) -> int:
    return run_device_command(args, "promote")


def _settings(args: argparse.Namespace):
    from edgeml.host.commands.push import fleet_settings

    return fleet_settings(args)
