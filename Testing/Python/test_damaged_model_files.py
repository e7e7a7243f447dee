"""A model file that is damaged, cut short or no model at all is refused in one line that says which, and what to do.

A copy or download of a model that was interrupted leaves a file whose header names every tensor but whose tensor
bytes (or header) end early: its user should copy it again, not be told that it is no model bundle. A bundle whose
bytes were edited is told to be replaced by an original copy; a file that is no safetensors file at all is told so.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.errors import CeVAEError

pytestmark = pytest.mark.usefixtures("one_thread")


def _table_end(data: bytes) -> int:
    """Where the tensor table of the bundle ``data`` ends (its tensor bytes start)."""
    return 8 + int.from_bytes(data[:8], "little")


def _errors(argv: List[str], capsys) -> List[str]:
    """The non-empty lines the command ``argv`` wrote to stderr, after checking that it was refused."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.strip()]


def _commands(model: Path, tmp_path: Path) -> List[List[str]]:
    """info, share and detect with ``model`` (detect's volume is the bundled sample scan)."""
    scan = default_model_path().parent / "colin27_t1_2mm.nii.gz"
    return [["info", str(model)], ["share", str(model), "--out", str(tmp_path / "shared.cevae")],
            ["detect", str(scan), "--model", str(model), "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"]]


@pytest.mark.parametrize("where", ["in its tensors", "in its header", "in a header whose length's first byte is 0x80"])
def test_a_model_file_cut_short_is_said_to_be_cut_short(where, tmp_path, capsys):
    """(A length whose first byte is 0x80, the first byte of a pickle, was taken for a pickle's once cut short.)"""
    from test_untrusted_bundles import rewrite

    cut = tmp_path / "model.cevae"
    cut.write_bytes(default_model_path().read_bytes())
    if where.endswith("0x80"):
        rewrite(cut, lambda h, t: None, length_mod_256=0x80)
    data = cut.read_bytes()
    keep = len(data) // 2 if where == "in its tensors" else _table_end(data) // 2
    cut.write_bytes(data[:keep])
    needed = f"{len(data)}" if where == "in its tensors" else f"at least {_table_end(data)}"
    said = f"{cut} is cut short: {keep} of {needed} bytes (an interrupted copy or download?); copy it again."
    with pytest.raises(CeVAEError) as refused:
        read_header(cut)
    assert str(refused.value) == f"The model file {said}"
    for argv in _commands(cut, tmp_path):
        assert _errors(argv, capsys) == [f"error: The model file {said}"], argv
    assert not (tmp_path / "shared.cevae").exists() and not (tmp_path / "score.nii.gz").exists()


def test_the_slicer_logic_says_a_model_file_is_cut_short(tmp_path):
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    cut = tmp_path / "model.cevae"
    cut.write_bytes(default_model_path().read_bytes()[:-1000])
    logic = CeVAEAnomalyLogic()
    for use in (lambda: logic.loadModel(cut, "cpu"), lambda: logic.shareModel(cut, tmp_path / "shared.cevae")):
        with pytest.raises(CeVAEError, match=r"model\.cevae is cut short: \d+ of \d+ bytes .*; copy it again\.$"):
            use()


def test_a_model_file_with_bytes_beyond_its_tensors_is_said_to_be_damaged_or_edited(tmp_path, capsys):
    padded = tmp_path / "model.cevae"
    padded.write_bytes(default_model_path().read_bytes() + b"\0" * 100)
    said = (f"error: The model file {padded} is damaged or was edited (not a valid safetensors file: 100 bytes follow "
            "its tensors); use an original copy.")
    for argv in _commands(padded, tmp_path):
        assert _errors(argv, capsys) == [said], argv


def test_a_file_that_is_no_safetensors_file_is_said_to_be_no_model(tmp_path, capsys):
    text = tmp_path / "notes.cevae"
    text.write_text("a text file that is no model at all\n")
    for argv in _commands(text, tmp_path):
        [line] = _errors(argv, capsys)
        assert line.startswith(f"error: {text} is not a CeVAEAnomaly model bundle (not a valid safetensors file: "), \
            argv
