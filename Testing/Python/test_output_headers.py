"""The NIfTI image outputs keep the input's qform and sform codes (what space the grid is in: scanner, aligned,
Talairach, MNI), not only its grid."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Tuple

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from conftest import make_head

LEFT_HANDED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # FSL's LAS NIfTI: Slicer reverses its slice axis


def _codes(path: Path) -> Tuple[int, int]:
    """(qform_code, sform_code) read from a NIfTI-1 file's header bytes."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
        header = fh.read(348)
    assert struct.unpack("<i", header[:4])[0] == 348
    return struct.unpack("<2h", header[252:256])


def _with_codes(path: Path, codes: Tuple[int, int]) -> None:
    """Set a gzip NIfTI-1 file's qform and sform codes in place (the grid is left as it is)."""
    with gzip.open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[252:256] = struct.pack("<2h", *codes)
    with gzip.open(path, "wb") as fh:
        fh.write(bytes(data))


@pytest.mark.parametrize("codes", [(0, 4), (2, 2), (1, 3), (2, 0), (0, 0)])
def test_detect_writes_the_inputs_qform_and_sform_codes(tmp_path, tiny_bundle, codes):
    # an input registered to MNI space (sform_code 4, no qform) came out as scanner space (1, 1), which AFNI
    # shows in another view (+orig, not +tlrc) than the scan. One of no orientation (0, 0), which ITK reads as LPS
    # from the origin and nibabel and FSL as LAS about its centre, came out as scanner space on ITK's LPS grid: in
    # nibabel or FSL its maps lay mirrored front to back and shifted against the scan
    image, mask = make_head(seed=3)
    scan, brain = tmp_path / "scan.nii.gz", tmp_path / "scan_mask.nii.gz"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(mask, str(brain))
    _with_codes(scan, codes)
    score, label = tmp_path / "score.nii.gz", tmp_path / "label.nii"
    assert main(["detect", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--device", "cpu",
                 "--score", str(score), "--labelmap", str(label)]) == 0
    assert _codes(score) == codes
    assert _codes(label) == codes
    ref = sitk.ReadImage(str(scan))
    for out in (score, label):
        written = sitk.ReadImage(str(out))
        assert written.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
        assert written.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)
        assert written.GetSpacing() == pytest.approx(ref.GetSpacing(), abs=1e-6)


def test_batch_writes_each_inputs_qform_and_sform_codes(tmp_path, tiny_bundle):
    # each volume's NIfTI outputs keep that volume's codes (not ITK's (1, 1), nor another volume's)
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    cohort.mkdir()
    kept = {"mni": (0, 4), "aligned": (2, 2), "scanner": (1, 1)}
    for seed, (name, codes) in enumerate(kept.items()):
        image, mask = make_head(seed=10 + seed)
        sitk.WriteImage(image, str(cohort / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(cohort / f"{name}_mask.nii.gz"))
        _with_codes(cohort / f"{name}.nii.gz", codes)
    assert main(["batch", str(cohort), "--out-dir", str(out), "--model", str(tiny_bundle), "--device", "cpu"]) == 0
    for name, codes in kept.items():
        assert _codes(out / f"{name}_score.nii.gz") == codes
        assert _codes(out / f"{name}_labelmap.nii.gz") == codes


@pytest.mark.parametrize("codes, direction", [((0, 4), None), ((2, 2), None), ((0, 4), LEFT_HANDED), ((0, 0), None)],
                         ids=["mni", "aligned", "mni-left-handed", "no-orientation"])
def test_detect_volume_writes_the_inputs_qform_and_sform_codes(request, tmp_path, tiny_bundle, codes, direction):
    # Slicer's batch script (--format nii.gz) wrote its score and labelmap with ITK's (1, 1): an MNI-space scan's
    # results claimed scanner space, as detect's did before (left-handed: FSL's MNI152 is LAS, which Slicer stores
    # with its slice axis reversed and the script writes back on the file's grid)
    pytest.importorskip("slicer")
    script = request.getfixturevalue("script")  # (the script imports slicer)
    image, mask = make_head(seed=3, direction=direction)
    scan, brain = tmp_path / "scan.nii.gz", tmp_path / "scan_mask.nii.gz"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(mask, str(brain))
    _with_codes(scan, codes)
    out = tmp_path / "results"
    assert script.main(["--input", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--output-dir",
                        str(out), "--device", "cpu", "--format", "nii.gz"]) == 0
    ref = sitk.ReadImage(str(scan))
    for role in ("score", "labelmap"):
        written = out / f"scan_{role}.nii.gz"
        assert _codes(written) == codes
        placed = sitk.ReadImage(str(written))
        assert placed.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
        assert placed.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)


def test_a_write_killed_while_it_sets_the_codes_leaves_nothing_a_later_run_keeps(tmp_path):
    # the codes of a .nii.gz are set in a copy of ITK's temporary; a process killed before that copy replaced it left
    # the copy under a name (TEMPORARY.nii.z) that the next run's tidy-up of abandoned temporaries did not know
    import subprocess
    import sys
    import time

    from CeVAEAnomalyLib.io.atomic import remove_abandoned_temporaries

    target = tmp_path / "score.nii.gz"
    code = ("import os, sys, SimpleITK as sitk\n"
            "from pathlib import Path\n"
            "from CeVAEAnomalyLib.io.atomic import temp_beside\n"
            "from CeVAEAnomalyLib.io.nifti_codes import write_image\n"
            "target = Path(sys.argv[1])\n"
            "os.replace = lambda *a: os._exit(9)  # killed just before the copy would replace the temporary\n"
            "write_image(sitk.Image([8, 8, 8], sitk.sitkFloat32), temp_beside(target), (0, 4), target)\n")
    started = time.time()
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2  # ITK's temporary and the copy with the codes
    for path in tmp_path.iterdir():
        os.utime(path, (started - 10, started - 10))  # (made before the later run began)
    assert remove_abandoned_temporaries([target], time.time()) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gz", [False, True], ids=["hdr", "hdr.gz"])
def test_detect_writes_the_codes_of_a_nifti_pair_input(tmp_path, tiny_bundle, gz):
    # a NIfTI-1 .hdr/.img pair (as SPM writes) registered to MNI space: its outputs came out as scanner space (1, 1),
    # as only a single-file .nii/.nii.gz input's codes were read
    image, mask = make_head(seed=3)
    scan, brain = tmp_path / "scan.hdr", tmp_path / "scan_mask.nii.gz"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(mask, str(brain))
    header = bytearray(scan.read_bytes())
    assert header[344:348] == b"ni1\0"
    header[252:256] = struct.pack("<2h", 0, 4)
    if gz:
        scan.unlink()
        scan = tmp_path / "scan.hdr.gz"
        with gzip.open(scan, "wb") as fh:
            fh.write(bytes(header))
        (tmp_path / "scan.img").rename(tmp_path / "scan.img.gz.tmp")
        with gzip.open(tmp_path / "scan.img.gz", "wb") as fh:
            fh.write((tmp_path / "scan.img.gz.tmp").read_bytes())
        (tmp_path / "scan.img.gz.tmp").unlink()
    else:
        scan.write_bytes(bytes(header))
    score, label = tmp_path / "score.nii.gz", tmp_path / "label.nii"
    assert main(["detect", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--device", "cpu",
                 "--score", str(score), "--labelmap", str(label)]) == 0
    assert _codes(score) == (0, 4)
    assert _codes(label) == (0, 4)


def test_a_compressed_output_with_the_inputs_codes_does_not_hold_a_temporary_name(tmp_path, tiny_bundle):
    # the copy that sets the codes stored its hidden temporary's name (random part, machine, process) in the gzip
    # header: two runs on one scan gave different bytes, and `gunzip -N` restored the file under that hidden name
    image, mask = make_head(seed=3)
    scan, brain = tmp_path / "scan.nii.gz", tmp_path / "scan_mask.nii.gz"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(mask, str(brain))
    _with_codes(scan, (0, 4))
    runs = []
    for n in (1, 2):
        score = tmp_path / f"run{n}" / "score.nii.gz"
        assert main(["detect", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--device", "cpu",
                     "--score", str(score)]) == 0
        head = score.read_bytes()
        assert head[3] & 0x08 == 0, "the gzip header names a file"  # FLG.FNAME
        runs.append(head)
    assert runs[0] == runs[1]
