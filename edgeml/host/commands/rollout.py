"""``edgeml rollout``: a version to a group in waves, going on only while the evidence holds."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "roll a bundle out to a group in waves, judged by the fleet database; halt and roll back"
DESCRIPTION = """\
Install BUNDLE beside the champion (as --role canary or challenger) on the online members of
--group, one wave at a time (--waves, cumulative: 1,10%,50%,100% is one device, then 10%,
then half, then all). After each wave the version runs for --hold (result rows from the
wave's devices, e.g. 500rows, or a time, e.g. 60s); then the figures that `edgeml collect`
stored in --db are judged:

  --max-disagreement  share of inputs where the new version's label differs from the
                      champion's on the same device and input
  --max-error-rate    share of the new version's results that carried an error
  --max-p99-ms        99th percentile of the new version's scoring time

The rollout goes on only while every threshold holds. Otherwise it halts, retires the
version on every device it reached (signed with --sign-key when the devices have
trusted_keys) and prints which figure failed, on which devices, and the evidence (row counts
per device and the time range of the inputs). A device whose pipeline is full refuses the
install with its reason; the rollout halts on it and evicts nothing.

The rollout's state lives in --db (tables rollouts, rollout_waves, rollout_devices): run the
same command again after an interruption and it carries on where it was. `edgeml status --db
URL` shows running rollouts.

Exit status: 0 the version reached every wave, 1 halted (and rolled back) or an error.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgeml.host.collect.sink import DEFAULT_DB
    from edgeml.host.commands.promote import add_sign_key_argument
    from edgeml.host.commands.push import add_connection_arguments
    from edgeml.host.rollout.plan import DEFAULT_WAVES

    p.add_argument("bundle", type=Path, nargs="?", metavar="BUNDLE",
                   help="the .edgeml bundle to roll out (omit it with --abort or --list)")
    p.add_argument("--group", metavar="G",
                   help="the device group (devices list it under groups in their config)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="URL",
                   help="the fleet database that `edgeml collect` fills: sqlite:///PATH or "
                        "postgresql://... (default: %(default)s); the rollout's own state is "
                        "kept there too")
    p.add_argument("--waves", default=DEFAULT_WAVES, metavar="LIST",
                   help="cumulative wave sizes, device counts or shares of the group's "
                        "online members (default: %(default)s; 100%% is always last)")
    p.add_argument("--role", choices=("canary", "challenger", "shadow"), default="canary",
                   help="the role the version runs in beside the champion "
                        "(default: %(default)s)")
    p.add_argument("--pipeline", metavar="NAME",
                   help="the pipeline (default: the device's only one, or the one named "
                        "like the model)")
    p.add_argument("--hold", default="500rows", metavar="AMOUNT",
                   help="how long each wave runs before it is judged: result rows from the "
                        "wave's devices (500rows) or a time (60s, 5m, 1h) "
                        "(default: %(default)s)")
    p.add_argument("--hold-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="halt when a rows hold is not reached within this time "
                        "(default: %(default)s)")
    p.add_argument("--max-disagreement", metavar="SHARE",
                   help="highest share of inputs on which the new version's label may "
                        "differ from the champion's, 0.1 or 10%% (default: not judged)")
    p.add_argument("--max-error-rate", default="0.01", metavar="SHARE",
                   help="highest share of the new version's results that may carry an "
                        "error (default: %(default)s; 'none' to not judge it)")
    p.add_argument("--max-p99-ms", type=float, metavar="MS",
                   help="highest 99th percentile of the new version's scoring time in ms "
                        "(default: not judged)")
    p.add_argument("--min-rows-per-device", type=int, default=1, metavar="N",
                   help="every device of a wave must bring at least this many result rows "
                        "(default: %(default)s)")
    p.add_argument("--early-halt-rows", type=int, default=200, metavar="N",
                   help="while a wave holds, judge it every few seconds once its evidence has "
                        "N rows, and halt at once on a breach (default: %(default)s; 0: judge "
                        "only at the end of the hold)")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="how often to read the database during a rows hold "
                        "(default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="install even on devices that had this version before")
    p.add_argument("--abort", metavar="ID",
                   help="stop a running rollout and retire its version on every device it "
                        "reached")
    p.add_argument("--list", action="store_true",
                   help="list the recent rollouts in --db and exit")
    p.add_argument("--json", action="store_true",
                   help="print the final state (waves, devices, verdicts) as JSON on stdout")
    add_sign_key_argument(p)
    add_connection_arguments(p, timeout=60.0)


def _share(value: str | None, flag: str) -> float | None:
    from edgeml.host.rollout.plan import parse_share

    if value is None or str(value).strip().lower() in ("none", "off", ""):
        return None
    return parse_share(value, flag)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys

    from edgeml.errors import RolloutError
    from edgeml.host.commands.promote import sign_key_of
    from edgeml.host.commands.push import fleet_settings
    from edgeml.host.fleet import Fleet
    from edgeml.host.rollout.db import Database
    from edgeml.host.rollout.plan import Thresholds
    from edgeml.host.rollout.runner import RolloutRunner, RolloutSettings, abort
    from edgeml.host.rollout.store import RolloutStore
    from edgeml.host.rollout.view import rollout_doc, rollouts_table

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    key = sign_key_of(args)
    with Database(args.db, must_exist=bool(args.list or args.abort)) as db:
        store = RolloutStore(db)
        if args.list:
            print(rollouts_table(store, running_only=False))
            return 0
        if args.abort:
            async def stop():
                async with Fleet(fleet_settings(args), topic_prefix=args.topic_prefix) as fl:
                    return await abort(store, fl, args.abort, sign_key=key,
                                       timeout=min(args.timeout, 30.0), say=say)
            r = asyncio.run(stop())
            if args.json:
                print(json.dumps(rollout_doc(store, r), indent=2, sort_keys=True))
            return 0
        if args.bundle is None or not args.group:
            raise RolloutError("give BUNDLE and --group (or --abort ID, or --list)")
        if args.min_rows_per_device < 0:
            raise RolloutError("--min-rows-per-device must be 0 or more")
        thresholds = Thresholds(
            max_disagreement=_share(args.max_disagreement, "--max-disagreement"),
            max_error_rate=_share(args.max_error_rate, "--max-error-rate"),
            max_p99_ms=args.max_p99_ms, min_rows_per_device=args.min_rows_per_device)
        settings = RolloutSettings(
            bundle=args.bundle, group=args.group, waves=args.waves, hold=args.hold,
            thresholds=thresholds, role=args.role, pipeline=args.pipeline,
            hold_timeout_s=args.hold_timeout, poll_s=args.poll, push_timeout_s=args.timeout,
            command_timeout_s=min(args.timeout, 30.0), force=args.force, sign_key=key,
            early_halt_rows=args.early_halt_rows, early_every_s=max(5.0, 5 * args.poll))

        async def go():
            async with Fleet(fleet_settings(args), topic_prefix=args.topic_prefix) as fleet:
                return await RolloutRunner(settings, fleet, db, say=say).run()

        r = asyncio.run(go())
        if args.json:
            print(json.dumps(rollout_doc(store, r), indent=2, sort_keys=True))
        return 0 if r.state == "done" else 1
