"""A detection's record names the image it scored by a digest of its voxels and grid (``image_voxels_sha256``), also
where the image was given in memory (the Python API, the Slicer module's volume node) and no file names it."""
from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from conftest import add_volume, make_head
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.io.checksum import image_voxel_sha256, voxel_sha256
from CeVAEAnomalyLib.options import ThresholdPolicy


def test_a_detection_of_an_image_in_memory_records_its_voxels_and_grid(tiny_bundle, tmp_path):
    """detect(image) with a sitk.Image recorded no input at all (``inputs`` empty): two results could not be told to
    come from one scan or two. The record holds the digest of the image's voxels and grid, and of a given mask's; it
    is that of the same scan saved in a file (``io.checksum.voxel_sha256``), so the two can be matched."""
    image, mask = make_head(seed=12)
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    detector = Detector(load_bundle(tiny_bundle, "cpu"), policy=ThresholdPolicy(threshold=0.5))
    record = detector(image, mask).record
    assert record.image_voxels_sha256 == voxel_sha256(tmp_path / "scan.nrrd") == image_voxel_sha256(image)
    assert record.mask_voxels_sha256 == voxel_sha256(tmp_path / "mask.nii.gz")
    assert record.to_dict()["image_voxels_sha256"] == record.image_voxels_sha256
    assert detector(image).record.mask_voxels_sha256 is None  # the automatic mask: made from the image

    other = sitk.Image(image)
    other[20, 22, 18] = float(other[20, 22, 18]) + 1.0  # one voxel
    moved = sitk.Image(image)
    moved.SetOrigin((-20.0, 10.0, 6.0))  # the same voxels elsewhere
    retyped = sitk.Cast(image, sitk.sitkFloat64)  # the same values as another type
    digests = {image_voxel_sha256(i) for i in (image, other, moved, retyped)}
    assert len(digests) == 4


def test_a_grid_a_hair_off_zero_on_either_side_has_the_same_digest():
    """A grid within rounding of another (an origin at -0.00001 mm where another reader gives 0, as float noise of
    Slicer's RAS-to-LPS conversion can) is the same grid: -0.0 after rounding hashed as 0.0 does."""
    image = make_head(seed=3, origin=(0.0, 10.0, 5.0))[0]
    noisy = sitk.Image(image)
    noisy.SetOrigin((-0.00001, 10.0, 5.0))
    assert image_voxel_sha256(noisy) == image_voxel_sha256(image)
    noisy.SetOrigin((-0.001, 10.0, 5.0))
    assert image_voxel_sha256(noisy) != image_voxel_sha256(image)


def test_detect_records_the_voxel_digest_of_the_file_it_read(tiny_bundle, tmp_path):
    """``detect --record`` names the file (path, sha256) and now also its voxels' digest: a result of the same scan
    given in memory can be matched with it."""
    from CeVAEAnomalyLib.cli.main import main

    image, mask = make_head(seed=12)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    assert main(["detect", str(tmp_path / "scan.nii.gz"), "--model", str(tiny_bundle), "--device", "cpu",
                 "--threshold", "0.5", "--score", str(tmp_path / "score.nii.gz"),
                 "--record", str(tmp_path / "record.json")]) == 0
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["image_voxels_sha256"] == voxel_sha256(tmp_path / "scan.nii.gz") == image_voxel_sha256(image)
    assert written["mask_voxels_sha256"] is None


def test_the_slicer_module_records_the_digest_of_the_volume_nodes_image(tiny_bundle, tmp_path):
    """The module hands a volume node's image to the detection (in this process, or copied for the worker): no file
    of the user's names it, and its record said nothing of which image it was. Both runs record the digest of the
    node's voxels and grid, that of the file it was loaded from."""
    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.io.images import read_image
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic
    from test_slicer_worker import run_to_end

    image = make_head(seed=7)[0]
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, read_image(tmp_path / "scan.nii.gz"), "scan")
    logic = CeVAEAnomalyLogic()
    here = logic.process(volume, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    job = logic.startDetection(volume, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    run_to_end(job)
    there = logic.finishDetection(job)
    expected = voxel_sha256(tmp_path / "scan.nii.gz")
    assert here.detection.record.image_voxels_sha256 == there.detection.record.image_voxels_sha256 == expected
