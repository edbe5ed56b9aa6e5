"""Every flag of every `neoxray` command says what it does and, where it has one, its default; `--version`."""

from __future__ import annotations

import argparse

from neoxray import __version__
from neoxray.cli import build_parser


def parsers(p: argparse.ArgumentParser, path=("neoxray",)):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_flag_has_help_with_its_default():
    missing, no_default = [], []
    for path, p in parsers(build_parser()):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = " ".join(path) + " " + "/".join(action.option_strings or [action.dest])
            if not action.help:
                missing.append(name)
                continue
            has_default = action.option_strings and not any(action.default is v for v in (None, False))
            text = p.formatter_class(prog="x")._get_help_string(action) % {"default": action.default}
            if has_default and "default" not in text:
                no_default.append(name)
    assert missing == [] and no_default == []


def test_version(capsys):
    try:
        build_parser().parse_args(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"neoxray {__version__}"
