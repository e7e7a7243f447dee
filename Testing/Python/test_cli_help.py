"""``cevae-anomaly COMMAND --help`` as a new user reads it, checked against the README."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Tuple

from CeVAEAnomalyLib.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]


def options() -> Iterator[Tuple[str, str, str]]:
    """(command, option, its help as --help prints it) of every long option of every command, but --help, --debug
    and the --no-X of a --X | --no-X pair."""
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            shown = formatter._expand_help(action) if action.help else ""
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--debug") and not (
                        flag.startswith("--no-") and f"--{flag[5:]}" in action.option_strings):
                    yield name, flag, " ".join(shown.split())


def test_every_option_of_every_command_is_in_the_readme() -> None:
    """train's --z-dim, --beta, --ce-weight, --rec-loss, --no-augment and --half and evaluate's --gt were in --help
    only: a reader of the README never learnt of them."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = sorted({f"{name} {flag}" for name, flag, _ in options()
                      if not re.search(re.escape(flag) + r"(?![\w-])", readme)})
    assert not missing, missing


def test_every_option_that_takes_a_value_says_what_its_absence_means() -> None:
    """--threshold, --shard, --input-size's unit, evaluate's --mask, --labelmap and --out and --manifest said
    nothing of what happens without them; each optional option now gives its default, what its absence means, or what
    it stands instead of (an output option: not written without it)."""
    commands = build_parser()._subparsers._group_actions[0].choices
    silent = []
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required or action.dest in ("help",):
                continue
            text = " ".join(parser._get_formatter()._expand_help(action).split())
            if not (re.search(r"\b(default|absent|instead)\b", text) or text.startswith("output ")):
                silent.append(f"{name} {action.option_strings[0]}: {text}")
    assert not silent, silent
    assert [text for name, flag, text in options() if (name, flag) == ("train", "--input-size")] == [
        "width and height of the network's slices in pixels: 64 or 128 (default: 64)"]
