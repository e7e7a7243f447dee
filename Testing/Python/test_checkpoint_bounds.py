"""A checkpoint someone else sends is refused in one line, before it takes more memory or time than its file's
size: compressed records, tensors that view their values many times, data referenced over and over.

Each case is a tiny crafted file, read as ``train --resume`` and ``adapt --resume`` read theirs."""
from __future__ import annotations

import functools
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.training.checkpoint import read_checkpoint


def refusal(path: Path) -> str:
    with pytest.raises(CeVAEError) as caught:
        read_checkpoint(path, {})
    return str(caught.value)


def test_a_checkpoint_with_compressed_records_is_refused_before_they_are_unpacked(tmp_path):
    """torch unpacks a deflated record whole: 64 kB of file took 64 MB (4 MB took 4 GB, more was killed)."""
    plain, path = tmp_path / "plain.ckpt", tmp_path / "m.cevae.ckpt"
    torch.save({"version": 2, "junk": torch.zeros(1000)}, plain)
    count = 16 * 2 ** 20  # float32 values: 64 MB
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):  # the tensor's length, as torch writes it
                data = data.replace(b"M\xe8\x03", b"J" + struct.pack("<i", count))
            elif "/data/" in info.filename:
                data = bytes(4 * count)
            out.writestr(info.filename, data, zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED)
    assert path.stat().st_size < 2 ** 20
    said = refusal(path)
    assert "(it holds compressed records" in said and "\n" not in said, said


@pytest.mark.parametrize("view", [
    lambda: torch.zeros(1).expand(16 * 2 ** 20),  # 64 MB of one stored value
    lambda: torch.zeros(8).as_strided((8, 2 ** 20), (1, 0)),
    lambda: [torch.zeros(4096)] * 4096,  # one stored tensor under 4096 names
], ids=["expanded", "strided", "shared"])
def test_tensors_that_view_their_values_many_times_are_refused_before_they_are_copied(tmp_path, view):
    """The checksum copied every tensor whole: one stored value expanded to 64 MB took 64 MB (4 GB took 4 GB, more
    was killed), and one tensor under many names was hashed once for each."""
    path = tmp_path / "m.cevae.ckpt"
    torch.save({"version": 2, "junk": view(), "sha256": "0" * 64}, path)
    said = refusal(path)
    assert "(its tensors view more values than it stores" in said and "\n" not in said, said


def test_tensors_viewing_parts_of_one_stored_tensor_are_read_as_any(tmp_path):
    """Views that share their values without repeating them (halves, a transposed copy) are left to the checks
    that follow: here, the checksum."""
    path, values = tmp_path / "m.cevae.ckpt", torch.arange(64.0)
    torch.save({"version": 2, "a": values[:32], "b": values[32:].view(4, 8).t(), "sha256": "0" * 64}, path)
    assert "its content does not match the checksum written with it" in refusal(path)


@pytest.mark.parametrize("tensor", [lambda: torch.zeros(4, 4).to_sparse(), lambda: torch.zeros(4, device="meta")],
                         ids=["sparse", "meta"])
def test_tensors_of_a_kind_never_written_are_named(tmp_path, tensor):
    """A sparse or a meta tensor (which has no values) failed the checksum's copy and was called a changed file."""
    path = tmp_path / "m.cevae.ckpt"
    torch.save({"version": 2, "junk": tensor(), "sha256": "0" * 64}, path)
    said = refusal(path)
    assert "(it holds a tensor of a kind no CeVAEAnomaly writes" in said and "\n" not in said, said


def shared(depth: int) -> tuple:
    """A pair of pairs of ... ``depth`` deep, each pair one object twice: torch writes it in a few bytes a level,
    2 ** depth values to walk."""
    value: tuple = (0,)
    for _ in range(depth):
        value = (value, value)
    return value


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("junk, words", [
    (lambda: shared(20), "it holds more values than its file's size allows"),  # 40 more levels walked for days
    (lambda: nested(100), "it is nested more than 64 deep"),
], ids=["shared", "nested"])
def test_data_referenced_over_and_over_or_nested_deeply_is_refused_before_it_is_walked(tmp_path, junk, words):
    """The checksum (and the checks of the run record) walked a value each time it was referenced: a 1 kB file
    holding 40 levels of pairs ran for days; nesting deeper than Python's recursion limit was called a changed
    file."""
    path = tmp_path / "m.cevae.ckpt"
    torch.save({"version": 2, "junk": junk(), "sha256": "0" * 64}, path)
    said = refusal(path)
    assert f"({words}" in said and "\n" not in said, said


@pytest.mark.parametrize("depth, junk, words", [
    (16, shared, "it holds more values than its file's size allows"),
    (5000, lambda depth: functools.reduce(lambda inner, _: (inner,), range(depth), ()),
     "it is nested more than 64 deep"),
], ids=["shared", "nested"])
def test_data_in_a_set_is_bounded_as_any(tmp_path, depth, junk, words):
    """torch loads a set (weights_only too), but the bounds walked lists, tuples and mappings alone: a set's pairs
    referenced over and over were walked whole by the checksum (2 ** 40 values in a 1 kB file: days), and its
    nesting beyond Python's recursion limit was called 'content does not match the checksum'."""
    path = tmp_path / "m.cevae.ckpt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30000)  # (torch.save recurses as deep)
    try:
        torch.save({"version": 2, "junk": {junk(depth)}, "sha256": "0" * 64}, path)
    finally:
        sys.setrecursionlimit(limit)
    said = refusal(path)
    assert f"({words}" in said and "\n" not in said, said
