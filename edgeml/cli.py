"""The ``edgeml`` command line.

Each verb lives in its own module under :mod:`edgeml.commands` and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules import their
heavy dependencies (onnxruntime, scikit-learn, matplotlib) inside ``run`` so that ``edgeml
--help`` and the daemon's start-up stay fast. The list below is explicit on purpose: no
registration happens as a side effect of importing anything.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import ClassVar

from edgeml import __version__
from edgeml.errors import EdgemlError

# verb -> module (order is the order shown in --help). Device verbs live in edgeml.commands,
# host tools in edgeml.host.commands: the device never needs to import the host side.
VERBS: tuple[tuple[str, str], ...] = (
    ("run", "edgeml.commands.run"),
    ("demo", "edgeml.host.commands.demo"),
    ("convert", "edgeml.host.commands.convert"),
    ("keygen", "edgeml.host.commands.keygen"),
    ("models", "edgeml.commands.models"),
    ("push", "edgeml.host.commands.push"),
    ("promote", "edgeml.host.commands.promote"),
    ("rollback", "edgeml.host.commands.rollback"),
    ("retire", "edgeml.host.commands.retire"),
    ("status", "edgeml.host.commands.status"),
    ("feed", "edgeml.host.commands.feed"),
    ("log", "edgeml.commands.log"),
    ("replay", "edgeml.host.commands.replay"),
    ("bench", "edgeml.host.commands.bench"),
    ("collect", "edgeml.host.commands.collect"),
    ("fleet", "edgeml.host.commands.fleet"),
    ("rollout", "edgeml.host.commands.rollout"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) one verb's: ``edgeml run`` then imports nothing of the
    host tools."""
    parser = argparse.ArgumentParser(
        prog="edgeml",
        description="Edge inference runtime: score MQTT sensor streams with several ONNX "
        "model versions at once.",
    )
    parser.add_argument("--version", action="version", version=f"edgeml {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output on stderr (-v info, -vv debug)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_name in VERBS:
        if only is not None and verb != only:
            sub.add_parser(verb)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            verb, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


class _JournalFormatter(logging.Formatter):
    """Under systemd (``$JOURNAL_STREAM`` set) each line starts with its syslog priority,
    ``<4>`` for a warning, so ``journalctl -p warning`` filters edgeml's records."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(verbosity: int) -> None:
    """Plain one-line records on stderr: journald adds its own time stamp and unit name."""
    import os

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_JournalFormatter(fmt) if os.environ.get("JOURNAL_STREAM")
                         else logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in dict(VERBS) else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except EdgemlError as exc:
        print(f"edgeml {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
