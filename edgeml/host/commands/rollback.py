"""``edgeml rollback``: bring the previous champion back on a device."""

from __future__ import annotations

import argparse

HELP = "bring the previous champion of a pipeline back on a device"
DESCRIPTION = """\
Send {"cmd": "rollback"} on {p}/{device}/cmd and wait for the reply. Without --version the
most recent earlier champion (of --model, if given) comes back; the current champion stays
as a challenger. With --version that version becomes champion (loaded from the device's model
store if it is no longer active; the store keeps [deploy] keep_versions per model).

Exit status: 0 ok, 1 the device refused (its reason is printed), 2 no reply before --timeout.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.commands.promote import add_device_command_arguments

    add_device_command_arguments(p, model_required=False)


def run(args: argparse.Namespace) -> int:
    from edgeml.host.commands.promote import run_device_command

    return run_device_command(args, "rollback")
