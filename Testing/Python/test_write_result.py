"""write_result: the library writes a result's outputs as detect does (atomically, the scan's NIfTI codes kept,
refusing an existing output without overwrite, an output onto the scan and a misnamed output)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Tuple

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from conftest import make_head

MNI = (0, 4)  # qform_code 0, sform_code 4: a scan registered to MNI space


def _codes(path: Path) -> Tuple[int, int]:
    """(qform_code, sform_code) of a gzip NIfTI-1 file's header."""
    with gzip.open(path, "rb") as fh:
        return struct.unpack("<2h", fh.read(348)[252:256])


@pytest.fixture(scope="module")
def detected(tmp_path_factory, tiny_bundle):
    """(folder, MNI-coded scan, its mask, detect's outputs by role, the library's result for the same scan)."""
    from CeVAEAnomalyLib import Detector, DetectionRequest, load_bundle, read_image

    d = tmp_path_factory.mktemp("write_result")
    image, mask = make_head(seed=5)
    scan, brain = d / "scan.nii.gz", d / "scan_mask.nii.gz"
    sitk.WriteImage(image, str(scan))
    sitk.WriteImage(mask, str(brain))
    with gzip.open(scan, "rb") as fh:
        data = bytearray(fh.read())
    data[252:256] = struct.pack("<2h", *MNI)
    with gzip.open(scan, "wb") as fh:
        fh.write(bytes(data))
    cli = {"score": d / "cli_score.nii.gz", "labelmap": d / "cli_label.nii.gz", "slices": d / "cli_slices.csv",
           "components": d / "cli_components.tsv"}
    assert main(["detect", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--device", "cpu",
                 "--score", str(cli["score"]), "--labelmap", str(cli["labelmap"]),
                 "--slice-scores", str(cli["slices"]), "--components", str(cli["components"])]) == 0
    detector = Detector.from_request(load_bundle(tiny_bundle, "cpu"), DetectionRequest.of())
    return d, scan, brain, cli, detector(read_image(scan), read_image(brain))


def test_it_writes_the_files_detect_writes_for_the_same_scan(detected, tmp_path):
    from CeVAEAnomalyLib import write_result

    _, scan, _, cli, result = detected
    ours = {"record": tmp_path / "record.json", "score": tmp_path / "score.nii.gz",
            "labelmap": tmp_path / "label.nii.gz", "brain_mask": tmp_path / "brain.nii.gz",
            "slices": tmp_path / "slices.csv", "components": tmp_path / "components.tsv"}
    written = write_result(result, like=scan, **ours)
    assert written == [ours[role] for role in ("score", "labelmap", "brain_mask", "slices", "components", "record")]
    for role in ("score", "labelmap"):  # bit for bit, header (its MNI codes too) and voxels; not the gzip stream,
        # whose header names the temporary each was written to
        with gzip.open(ours[role], "rb") as a, gzip.open(cli[role], "rb") as b:
            assert a.read() == b.read(), role
    for role in ("slices", "components"):
        assert ours[role].read_bytes() == cli[role].read_bytes(), role
    for role in ("score", "labelmap", "brain_mask"):  # not ITK's (1, 1), scanner space
        assert _codes(ours[role]) == MNI
    assert "\t" in ours["components"].read_text(encoding="utf-8").splitlines()[0]
    assert '"threshold"' in ours["record"].read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in ours.values())  # no temporaries
    without = tmp_path / "without_like.nii.gz"  # no scan given: ITK's own codes, as for a scan of another format
    assert write_result(result, score=str(without)) == [without]
    assert _codes(without) == (1, 1)


def test_the_record_names_the_scan_given_as_like_as_its_input_as_detect_does(detected, tiny_bundle, tmp_path):
    """A record written for a result of images in memory had empty ``inputs`` even where ``like`` named the scan it
    was computed on: the record did not say which scan. It records that scan as detect --record records its image
    (path and sha256), and a record that already names its inputs keeps them."""
    import dataclasses
    import json

    from CeVAEAnomalyLib import write_result

    d, scan, brain, _, result = detected
    assert main(["detect", str(scan), "--mask", str(brain), "--model", str(tiny_bundle), "--device", "cpu",
                 "--score", str(tmp_path / "cli_score.nii.gz"), "--record", str(tmp_path / "cli_record.json")]) == 0
    detects = json.loads((tmp_path / "cli_record.json").read_text())["inputs"]
    write_result(result, record=tmp_path / "record.json", like=scan)
    assert json.loads((tmp_path / "record.json").read_text())["inputs"] == {"image": detects["image"]}
    assert result.record.inputs == {}  # the caller's result is left as it was
    write_result(result, record=tmp_path / "unlike.json")  # no scan named: none recorded
    assert json.loads((tmp_path / "unlike.json").read_text())["inputs"] == {}
    named = dataclasses.replace(result, record=dataclasses.replace(result.record, inputs=detects))
    write_result(named, record=tmp_path / "named.json", like=scan)
    assert json.loads((tmp_path / "named.json").read_text())["inputs"] == detects


def test_an_existing_output_is_refused_without_overwrite_and_left_unchanged(detected, tmp_path):
    from CeVAEAnomalyLib import write_result

    _, scan, _, _, result = detected
    score, label = tmp_path / "score.nii.gz", tmp_path / "label.nii.gz"
    score.write_bytes(b"an earlier run's map")
    with pytest.raises(CeVAEError, match="already exists; pass --overwrite \\(overwrite=True in Python\\)"):
        write_result(result, labelmap=label, score=score, like=scan)
    assert score.read_bytes() == b"an earlier run's map"
    assert not label.exists()  # all or none: the new output was not written either
    write_result(result, labelmap=label, score=score, like=scan, overwrite=True)
    assert sitk.ReadImage(str(score)).GetSize() == result.score.GetSize() and _codes(score) == MNI


def test_an_output_onto_the_scan_or_misnamed_is_refused_before_anything_is_written(detected, tmp_path):
    from CeVAEAnomalyLib import write_result

    _, scan, _, _, result = detected
    before = scan.read_bytes()
    with pytest.raises(CeVAEError, match="is the same file as an input"):
        write_result(result, score=scan, like=scan, overwrite=True)
    assert scan.read_bytes() == before
    label = tmp_path / "label.nii.gz"
    with pytest.raises(CeVAEError, match="needs an image file name ending in"):
        write_result(result, score=tmp_path / "score.csv", labelmap=label)
    with pytest.raises(CeVAEError, match="slice table output"):
        write_result(result, slices=tmp_path / "slices.nii.gz", labelmap=label)
    with pytest.raises(CeVAEError, match="no output"):
        write_result(result, like=scan)
    with pytest.raises(CeVAEError, match="does not exist"):
        write_result(result, labelmap=label, like=tmp_path / "scna.nii.gz")
    assert list(tmp_path.iterdir()) == []
