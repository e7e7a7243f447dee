"""A model file that is damaged, cut short or no model at all is refused in one line that says which, and what to do.

A copy or download of a model that was interrupted leaves a file whose header names every tensor but whose tensor
bytes (or header) end early: its user should copy it again, not be told that it is no model bundle. A bundle whose
bytes were edited is told to be replaced by an original copy; a file that is no safetensors file at all is told so.
"""
from __future__ import annotations

import json
import re
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



def _edited_header(edit):
    """A maker of a copy of the bundled model whose model header ``edit`` changed (test_untrusted_bundles.rewrite)."""
    def make(path: Path) -> None:
        from test_untrusted_bundles import rewrite

        path.write_bytes(default_model_path().read_bytes())
        rewrite(path, lambda h, t: edit(h))
    return make


def _with_table(path: Path, table: bytes, tensors: bytes) -> None:
    """Write a safetensors file of the tensor table ``table`` (JSON) and the tensor bytes ``tensors``."""
    table += b" " * (-len(table) % 8)
    path.write_bytes(len(table).to_bytes(8, "little") + table + tensors)


def _table_key_twice(path: Path) -> None:
    """A copy of the bundled model whose tensor table writes a key twice (safetensors' own reader refuses it)."""
    data = default_model_path().read_bytes()
    table = data[8:_table_end(data)].decode().rstrip()
    _with_table(path, re.sub(r'("dtype": ?"F(16|32)")', r"\1, \1", table, count=1).encode(), data[_table_end(data):])


def _model_header_text(text: str):
    """A maker of a copy of the bundled model whose model header is ``text``."""
    def make(path: Path) -> None:
        data = default_model_path().read_bytes()
        table = json.loads(data[8:_table_end(data)])
        table["__metadata__"]["cevae_anomaly"] = text
        _with_table(path, json.dumps(table).encode(), data[_table_end(data):])
    return make


def _tensor_entry_holding(text: str):
    """A maker of a copy of the bundled model one of whose tensor entries also holds the key "x" with the JSON
    ``text`` (safetensors' reader skips such a key, but reads its value)."""
    def make(path: Path) -> None:
        data = default_model_path().read_bytes()
        table = data[8:_table_end(data)].decode().rstrip()
        _with_table(path, table.replace('"dtype"', f'"x": {text}, "dtype"', 1).encode(), data[_table_end(data):])
    return make


def _model_header_holding(text: str):
    """A maker of a copy of the bundled model whose model header also holds the key "zz" with the JSON ``text``."""
    def make(path: Path) -> None:
        data = default_model_path().read_bytes()
        table = json.loads(data[8:_table_end(data)])
        table["__metadata__"]["cevae_anomaly"] = table["__metadata__"]["cevae_anomaly"][:-1] + f', "zz": {text}}}'
        _with_table(path, json.dumps(table).encode(), data[_table_end(data):])
    return make


def _foreign(path: Path) -> None:
    """A safetensors file of another project: one tensor, no model header."""
    _with_table(path, b'{"weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8))


USE_A_MODEL = "; use a CeVAEAnomaly model file (.cevae)."
ORIGINAL = "; the model file is damaged or was edited: use an original copy."
NOT_FINITE = ": its tensor table holds a number that is not finite (NaN or infinity)); use an original copy."
MODEL_FILES = {  # how a model file is made, and how the refusal of it ends
    "empty": (lambda p: p.write_bytes(b""), " is empty (0 bytes); copy it again, or use a CeVAEAnomaly model file "
                                            "(.cevae)."),
    "a few bytes": (lambda p: p.write_bytes(b"abc"), " is too short to be a model bundle (3 bytes)" + USE_A_MODEL),
    "text": (lambda p: p.write_text("no model at all, only text"), ")" + USE_A_MODEL),
    "a pickle": (lambda p: p.write_bytes(b"\x80\x04" + bytes(64)),
                 ". Instead, use a CeVAEAnomaly model file (.cevae)."),
    "another project's safetensors": (_foreign, " (no model header)" + USE_A_MODEL),
    "another format": (_edited_header(lambda h: h.update(format="other")), " (format 'other')" + USE_A_MODEL),
    "a header that is no JSON": (_model_header_text("{no JSON"), ORIGINAL),
    "a header without its model section": (_edited_header(lambda h: h.pop("model")), "'model' section" + ORIGINAL),
    "a format version as text": (_edited_header(lambda h: h.update(format_version="1")), "'1'" + ORIGINAL),
    "a tensor table with a key twice": (_table_key_twice, "; use an original copy."),
    "tensors other than its header declares": (_edited_header(lambda h: h["model"].update(z_dim=3)), ORIGINAL),
    # what safetensors' own reader refuses (detect), and info and share once took: a header longer than 100 MB,
    "a header length beyond safetensors' limit": (
        lambda p: p.write_bytes((100_000_001).to_bytes(8, "little") + b"{" + bytes(63)),
        ": header length 100000001 does not fit the file of 72 bytes)" + USE_A_MODEL),
    # and in its tensor table NaN, a number beyond a float's, half a UTF-16 surrogate pair, nesting 129 deep
    "a tensor table holding NaN": (_tensor_entry_holding("NaN"), NOT_FINITE),
    "a tensor table holding 1e400": (_tensor_entry_holding("1e400"), NOT_FINITE),
    "a tensor table holding half a surrogate pair": (
        _tensor_entry_holding('"\\ud800"'), ": its tensor table holds text with half of a UTF-16 surrogate pair); "
                                            "use an original copy."),
    "a tensor table nested 200 deep": (_tensor_entry_holding("[" * 200 + "]" * 200),
                                       ": its tensor table is nested too deeply); use an original copy."),
    # a model header nested 500 deep: share ended in 'unexpected RecursionError' (copying it)
    "a model header nested 500 deep": (_model_header_holding("[" * 500 + "]" * 500),
                                       " is not valid JSON (nested too deeply)" + ORIGINAL),
    # NaN in a model header's record other than a training record's values (older versions wrote val_loss: NaN):
    # detect used it, calibrate scored every scan, then ended in 'unexpected ValueError' writing its copy
    "a model header holding NaN": (_model_header_holding('{"a": NaN}'),
                                   " holds a number that is not finite (NaN or infinity), which no CeVAEAnomaly "
                                   "writes" + ORIGINAL),
}


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_a_model_file_that_cannot_be_used_is_refused_in_one_line_that_says_what_to_do(name, tmp_path, capsys):
    make, ending = MODEL_FILES[name]
    model = tmp_path / "model.cevae"
    make(model)
    for argv in _commands(model, tmp_path)[::-1]:  # detect loads the weights; info and share read the header
        [line] = _errors(argv, capsys)
        assert str(model) in line and line.endswith(ending), (argv, line)
        if name in ("a tensor table with a key twice", "tensors other than its header declares"):
            break  # (the header is intact: info and share need no weights)


def test_the_slicer_logic_says_what_to_do_with_a_model_file_that_cannot_be_used(tmp_path):
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    model = tmp_path / "model.cevae"
    logic = CeVAEAnomalyLogic()
    for name in ("empty", "another project's safetensors", "tensors other than its header declares"):
        make, ending = MODEL_FILES[name]
        make(model)
        with pytest.raises(CeVAEError) as refused:
            logic.loadModel(model, "cpu")
        assert str(refused.value).endswith(ending), name
