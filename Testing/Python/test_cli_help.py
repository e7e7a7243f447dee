"""``cevae-anomaly COMMAND --help`` as a new user reads it, checked against the README."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest

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


def test_every_amp_flag_is_amp_or_no_amp_default_off_and_plain_amp_still_works() -> None:
    """train and adapt took a plain --amp while detect, batch and calibrate took --amp/--no-amp "(default: off)"; each
    takes both now (a script's --no-amp, after an --amp of its own, works everywhere) and says its default."""
    parser = build_parser()
    required = {"train": ["--out", "m.cevae"], "adapt": ["--out", "m.cevae"], "detect": ["s.nii", "--score", "x.nii"],
                "batch": ["in/", "--out-dir", "o/"], "calibrate": ["--out", "m.cevae"]}
    for name, argv in required.items():
        assert parser.parse_args([name, *argv]).amp is False, name
        assert parser.parse_args([name, *argv, "--amp"]).amp is True, name
        assert parser.parse_args([name, *argv, "--amp", "--no-amp"]).amp is False, name
        shown = [text for command, flag, text in options() if (command, flag) == (name, "--amp")]
        assert len(shown) == 1 and shown[0].endswith("(default: off)"), (name, shown)


def old_python() -> Optional[str]:
    """A Python 3.9 or 3.10 interpreter that runs here (a pyenv shim of an inactive version does not), if any."""
    for name in ("python3.9", "python3.10"):
        found = shutil.which(name)
        if found and subprocess.run([found, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return found
    return None


def test_the_amp_flags_say_their_default_once_on_the_pythons_slicer_5_6_to_5_8_embed() -> None:
    """argparse of Python 3.9 and 3.10 appends "(default: %(default)s)" to a --X/--no-X flag's help: --amp read
    "... (default: off) (default: False)" there (Slicer 5.6-5.8 embed 3.9; DetectVolume.py builds its flags alike)."""
    python = old_python()
    if python is None:
        pytest.skip("needs Python 3.9 or 3.10")
    code = ("from CeVAEAnomalyLib.cli.main import build_parser; p = build_parser(); "
            "print(*(p.commands[c].format_help() for c in ('detect', 'train', 'adapt')))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "CeVAEAnomaly")))
    shown = " ".join(done.stdout.split())
    assert done.returncode == 0 and shown.count("--amp, --no-amp") == 3, done.stderr
    assert "(default: off)" in shown and "(default: False)" not in shown, shown


def test_no_option_says_what_a_value_means_and_its_default_in_two_brackets_in_a_row() -> None:
    """--grad-sigma and --rec-sigma read "... in model pixels (0: none) (default: the model's)" (likewise
    --mc-samples, --test-time-steps, --hysteresis, --min-peak): what a value means now follows a semicolon."""
    doubled = sorted({f"{name} {flag}: {text}" for name, flag, text in options()
                      if re.search(r"\(\d+: [^()]*\) \(default", text)})
    assert not doubled, doubled
    shown = {flag: text for name, flag, text in options() if name == "detect"}
    assert shown["--grad-sigma"] == "Gaussian smoothing of |grad| in model pixels; 0: none (default: the model's)"
