"""The argument parser: every flag of every `neoxray` command says what it does and, where it has one, its default;
`--version`; `train`'s `KEY=VALUE` overrides anywhere on the line; `serve --lora NAME=DIR`."""

from __future__ import annotations

import argparse

import pytest

from neoxray import __version__
from neoxray.cli import build_parser
from neoxray.errors import NeoxrayError


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


def test_train_takes_key_value_overrides_anywhere_on_the_line():
    """The demo's closing hint with one more override after `--run-dir`, as anyone would add it."""
    args = build_parser().parse_args(
        ["train", "--config", "configs/tiny-cpu.yaml", "data.path=/d", "--run-dir", "/r", "train.steps=6"]
    )
    assert args.overrides == ["data.path=/d", "train.steps=6"]
    assert (args.config, args.run_dir) == ("configs/tiny-cpu.yaml", "/r")
    args = build_parser().parse_args(["train", "a.b=1", "--no-ray", "c.d=2", "--config", "x.yaml", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.no_ray and args.config == "x.yaml"
    assert build_parser().parse_args(["train"]).overrides == []


def test_train_still_refuses_unknown_flags(capsys):
    try:
        build_parser().parse_args(["train", "a.b=1", "--no-such-flag", "c.d=2"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown flag was accepted")
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_serve_lora_flags_become_a_mapping_of_names_to_directories():
    serve = ["serve", "--model", "m"]
    assert build_parser().parse_args(serve).lora is None
    args = build_parser().parse_args([*serve, "--lora", "sft=/a/b", "--lora", "x=y=z"])
    assert args.lora == {"sft": "/a/b", "x": "y=z"}
    for bad, needle in (["just-a-dir"], "NAME=DIR"), (["=dir"], "NAME=DIR"), (["a=x", "a=y"], "'a' is given twice"):
        with pytest.raises(NeoxrayError, match=needle):
            build_parser().parse_args([*serve, *(x for b in bad for x in ("--lora", b))])
