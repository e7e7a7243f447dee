"""A checkpoint someone else sends is refused in one line, before it takes more memory or time than its file's
size: compressed records, tensors that view their values many times, data referenced over and over.

Each case is a tiny crafted file, read as ``train --resume`` and ``adapt --resume`` read theirs."""
from __future__ import annotations

import struct
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
