"""``edgeml retire``: take a model version out of a pipeline's active set."""

from __future__ import annotations

import argparse

HELP = "take a model version out of a pipeline's active set on a device"
DESCRIPTION = """\
Send {"cmd": "retire"} on {p}/{device}/cmd and wait for the reply. The version (default: the
challenger of --model) stops being scored; it stays in the device's model store, so
`edgeml promote --version V` can bring it back. The champion cannot be retired: promote another
version or roll back first.

Exit status: 0 ok, 1 the device refused (its reason is printed), 2 no reply before --timeout.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.commands.promote import add_device_command_arguments

    add_device_command_arguments(p, model_required=True)


def run(args: argparse.Namespace) -> int:
    from edgeml.host.commands.promote import run_device_command

    return run_device_command(args, "retire")
