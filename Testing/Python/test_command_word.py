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

