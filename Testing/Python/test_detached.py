"""What reading a volume file also opens (CeVAEAnomalyLib.io.detached), and that no output lands there."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.detached import read_alongside
from CeVAEAnomalyLib.io.targets import Inputs, check_paths


def nrrd_header(path: Path, data_field: str, *after: str) -> Path:
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                    f"data file: {data_field}\n" + "".join(f"{line}\n" for line in after))
    return path


def refused(inputs: Inputs, target: Path) -> bool:
    try:
        check_paths([target], True, inputs)
    except CeVAEError:
        return True
    return False


def test_a_list_is_read_to_the_end_of_a_long_header(tmp_path):
    names = [f"{'n' * 90}{k:04d}.raw" for k in range(800)]  # about 76 KB of names: past the first 64 KiB
    header = nrrd_header(tmp_path / "series.nhdr", "LIST 2", *names)
    inputs = Inputs([header])
    for k in (0, 600, 799):
        assert refused(inputs, tmp_path / names[k]), k
    assert not refused(inputs, tmp_path / "scores.nii.gz")


def test_a_numbered_range_is_a_rule_never_expanded(tmp_path):
    header = nrrd_header(tmp_path / "big.nhdr", "slices/s%06d.raw 0 400000000 2 2")
    inputs = Inputs([header])
    assert len(inputs.names) <= 4 and len(inputs.numbered) == 1  # no list of 200 million names
    assert refused(inputs, tmp_path / "slices" / "s000000.raw") and refused(inputs, tmp_path / "slices" / "s123456.raw")
    assert not refused(inputs, tmp_path / "slices" / "s000001.raw")  # odd: not in the range's steps
    assert not refused(inputs, tmp_path / "slices" / "s12345.raw")  # another width: not a name of the pattern
    assert not refused(inputs, tmp_path / "s000000.raw")  # another folder


def test_a_pattern_not_understood_protects_its_folder(tmp_path):
    header = nrrd_header(tmp_path / "odd.nhdr", "slice%s.raw 1 3 1")
    assert refused(Inputs([header]), tmp_path / "anything.csv")


def test_an_analyze_header_protects_both_image_halves(tmp_path):
    (tmp_path / "brain.hdr").write_bytes(b"\0" * 348)
    found = {p.name for p in read_alongside(tmp_path / "brain.hdr").files}
    assert {"brain.img", "brain.img.gz"} <= found


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_a_named_pipe_with_a_header_name_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe.mhd"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise AssertionError("opening the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert read_alongside(fifo).files == [] and Inputs([fifo]).which(tmp_path / "o.nii.gz") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
