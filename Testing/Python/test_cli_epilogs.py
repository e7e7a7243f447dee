"""The examples and exit statuses that ``cevae-anomaly --help`` and its commands' ``--help`` end with."""
from __future__ import annotations

import re
import shlex
from typing import Dict, List

import pytest

from CeVAEAnomalyLib.cli.main import (EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_TERMINATED,
                                      build_parser, main)

COMMANDS = tuple(build_parser().commands)  # every command: train, prepare, adapt, detect, ..., demo


def epilogs() -> Dict[str, str]:
    """The epilog of the top level ("") and of each command, as --help prints it."""
    parser = build_parser()
    shown = {"": parser.format_help().split("\n\n")}
    shown.update({name: parser.commands[name].format_help().split("\n\n") for name in COMMANDS})
    return {name: "\n\n".join(p for p in parts if p.startswith(("examples:", "exit status:")))
            for name, parts in shown.items()}


def examples(text: str) -> List[List[str]]:
    return [shlex.split(line)[1:] for line in text.splitlines() if line.strip().startswith("cevae-anomaly ")]


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_every_help_ends_with_examples_that_parse_and_the_exit_statuses(name: str) -> None:
    """`cevae-anomaly --help` and `detect --help` had no example and said nothing of the exit status, which batch's
    help did: each now ends with example command lines (ones the README shows) and the statuses."""
    text = epilogs()[name]
    lines = examples(text)
    assert len(lines) >= 2, text
    for argv in lines:
        args = build_parser().parse_args(argv)  # (refused: SystemExit)
        assert not name or args.command == name, argv
    assert " ".join(text.split()).count("exit status:") == 1, text


@pytest.mark.parametrize("name", COMMANDS)
def test_every_commands_examples_are_its_own_and_its_own_parser_takes_them(name: str) -> None:
    """prepare, evaluate, info, share and demo's --help had no example; every command's --help now has, and each of
    its example lines is that command run with arguments its own parser takes (parsed, not run: paths need not
    exist), so that an option renamed or removed cannot leave an example behind."""
    lines = examples(epilogs()[name])
    assert lines, f"{name} --help has no example"
    parser = build_parser().commands[name]
    for argv in lines:
        assert argv[0] == name, argv
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{name} --help's example {shlex.join(['cevae-anomaly', *argv])!r} is refused by its parser")


def test_the_exit_statuses_the_help_states_are_those_the_command_returns(tmp_path, capsys) -> None:
    """The statuses stated are the constants the command returns; a refused option and a refused input give the
    stated 'refused' status."""
    said = " ".join(epilogs()["detect"].split()).split("exit status:")[1]
    stated = {int(code): words.strip() for code, words in re.findall(r"(\d+) ([a-z][a-z ]*)", said)}
    assert stated == {EXIT_DONE: "done", EXIT_REFUSED: "refused input or option",
                      EXIT_FAILED: "out of memory or an unexpected failure", EXIT_INTERRUPTED: "interrupted",
                      EXIT_TERMINATED: "terminated"}, said
    assert main(["detect", str(tmp_path / "scan.nii.gz"), "--score", str(tmp_path / "s.nii.gz"),
                     "--no-such-option"]) == EXIT_REFUSED
    assert main(["detect", str(tmp_path / "scan.nii.gz"), "--score", str(tmp_path / "s.nii.gz"),
                     "--device", "cpu"]) == EXIT_REFUSED  # (no such scan)
    assert "error: " in capsys.readouterr().err
    assert main(["--help"]) == EXIT_DONE
