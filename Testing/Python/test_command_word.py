"""The closing "Detect with it" lines of calibrate and adapt quote the model's path for the platform's shell: POSIX
shells take shlex's single quotes, Windows' cmd.exe does not (it passed the quotes on as part of the path)."""
from __future__ import annotations

import shlex
from pathlib import Path

from CeVAEAnomalyLib.system import command_word

SPACED = "Site scans é/Modèl ü.cevae"
WINDOWS_SPACED = r"C:\Users\Jörg\Site scans é\Modèl ü.cevae"


def test_a_path_with_spaces_is_one_word_for_a_posix_shell():
    assert shlex.split(f"cevae-anomaly detect SCAN --model {command_word(SPACED, windows=False)}")[-1] == SPACED


def test_a_path_with_spaces_is_double_quoted_for_windows_without_single_quotes():
    word = command_word(WINDOWS_SPACED, windows=True)
    assert word == f'"{WINDOWS_SPACED}"'
    assert "'" not in word


def test_a_plain_path_is_left_as_it_is_on_both_platforms():
    assert command_word("models/site.cevae", windows=False) == "models/site.cevae"
    assert command_word(r"C:\models\site.cevae", windows=True) == r"C:\models\site.cevae"


def test_the_platform_is_this_machines_by_default():
    import os

    assert command_word(SPACED) == command_word(SPACED, windows=os.name == "nt")


def test_a_relative_path_that_starts_with_a_dash_pastes_as_the_path_not_as_an_option():
    """``--out=-site.cevae`` (or ``./-site.cevae``, which Path shortens) printed as ``--model -site.cevae``: the
    pasted command was refused ("argument --model: expected one argument")."""
    from CeVAEAnomalyLib.cli.main import build_parser

    for path in ("-site.cevae", "-site model.cevae", "--model"):
        words = shlex.split(f"detect scan.nii.gz --model {command_word(path, windows=False)} --score s.nii.gz")
        assert Path(build_parser().parse_args(words).model) == Path(path)
        assert command_word(path, windows=True).lstrip('"').startswith(".\\")


CMD_OPERATORS = "&|<>^()"  # what cmd.exe takes for a command separator, pipe, redirection or escape outside quotes


def _outside_double_quotes(word: str) -> str:
    """The characters of ``word`` that cmd.exe reads outside double quotes."""
    outside, quoted = [], False
    for c in word:
        if c == '"':
            quoted = not quoted
        elif not quoted:
            outside.append(c)
    return "".join(outside)


def test_a_windows_path_with_cmd_operators_is_double_quoted():
    """``C:\\R&D\\site.cevae`` was printed bare: pasted into cmd.exe, it ran ``... --model C:\\R`` and then a command
    ``D\\site.cevae``; ``^`` was dropped and ``( )`` could end a block."""
    for path in (r"C:\R&D\site.cevae", r"C:\scans (old)\site.cevae", r"C:\a^b\site.cevae", r"\\srv\x|y\m.cevae",
                 "C:\\R&D\\models\\"):
        word = command_word(path, windows=True)
        assert not set(_outside_double_quotes(word)) & set(CMD_OPERATORS), word
        assert word.startswith('"') and word.endswith('"')
        inner = word[1:-1]
        assert inner.rstrip("\\") == path.rstrip("\\")  # a closing backslash doubled, so that it escapes no quote
        assert len(inner) - len(inner.rstrip("\\")) == 2 * (len(path) - len(path.rstrip("\\")))
