"""The CLI entry point: help for every verb, logging that journald files at the right level."""

from __future__ import annotations

import logging

import pytest

from edgeml.cli import VERBS, _JournalFormatter, build_parser, main


def test_every_verb_has_help(capsys):
    parser = build_parser()
    for verb, _ in VERBS:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([verb, "--help"])
        assert info.value.code == 0
        assert "usage: edgeml " + verb in capsys.readouterr().out
    assert main([]) == 2


def test_journald_priorities():
    fmt = _JournalFormatter("%(levelname)s %(name)s: %(message)s")

    def line(level, msg="x"):
        return fmt.format(logging.LogRecord("edgeml.t", level, __file__, 1, msg, None, None))
    assert line(logging.WARNING).startswith("<4>WARNING")
    assert line(logging.ERROR).startswith("<3>ERROR")
    assert line(logging.INFO).startswith("<6>INFO")
    assert line(logging.ERROR, "a\nb") == "<3>ERROR edgeml.t: a\n<3>b"  # every line
