"""The command line explains itself: every flag has help, every command a description, and a
mistyped flag or command gets a guess and the --help of the command it was typed in."""

from __future__ import annotations

import argparse

import pytest

from linewatch.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every command and subcommand below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def test_every_command_has_a_description_and_every_argument_help():
    found = [((), build_parser()), *commands(build_parser())]
    assert len(found) >= 14  # the walk reaches the subcommands (sink alerts, sink archive)
    missing = []
    for path, parser in found:
        if not parser.description:
            missing.append(f"linewatch {' '.join(path)}: no description")
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"linewatch {' '.join(path)} {'/'.join(action.option_strings) or action.dest}: no help")
    assert missing == []


def test_sink_alerts_and_sink_archive_have_their_own_help(capsys):
    helps = {}
    for kind in ("alerts", "archive"):
        with pytest.raises(SystemExit):
            main(["sink", kind, "--help"])
        helps[kind] = capsys.readouterr().out
    assert "--jsonl" in helps["alerts"] and "--jsonl" not in helps["archive"]
    assert "--archive" in helps["archive"] and "--archive" not in helps["alerts"]


def test_arch_help_names_the_test_architecture():
    run = dict(commands(build_parser()))[("run",)]
    (arch,) = [action for action in run._actions if "--arch" in action.option_strings]
    assert "linewatch-tiny" in arch.help


@pytest.mark.parametrize("argv, line", [
    (["run", "clip.mp4", "--refrences", "refs"],
     "linewatch: error: unrecognized arguments: --refrences refs; did you mean --references? (see `linewatch run --help`)"),
    (["eval", "--data", "d", "--batchsize", "3"],
     "linewatch: error: unrecognized arguments: --batchsize 3; did you mean --batch-size? (see `linewatch eval --help`)"),
    (["sink", "alerts", "--jsnl", "a.jsonl"],
     "linewatch: error: unrecognized arguments: --jsnl a.jsonl; did you mean --jsonl? (see `linewatch sink alerts --help`)"),
    (["rnu", "clip.mp4"], "did you mean run? (see `linewatch --help`)"),
    (["run", "clip.mp4", "--log-format", "jsn"], "did you mean json? (see `linewatch run --help`)"),
])
def test_a_mistyped_flag_or_command_gets_a_guess_and_its_command_s_help(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("linewatch: error: ") and line in err, err


def test_no_guess_when_nothing_is_close(capsys):
    with pytest.raises(SystemExit):
        main(["run", "clip.mp4", "--zzzz"])
    assert capsys.readouterr().err == "linewatch: error: unrecognized arguments: --zzzz (see `linewatch run --help`)\n"
