"""The read-back check of written NRRD files (io/verify.py) reads any header a valid NRRD has."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

SCRIPT = REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py"
TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^12738006^Brain~^^~Anatomic codes - DICOM master list~^^~^^")


def atlas_segmentation(segments: int):
    """A segmentation node of ``segments`` segments with long names and terminology tags, as an atlas has them."""
    import slicer

    scene = slicer.vtkMRMLScene()
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "atlas labels")
    slicer.util.updateVolumeFromArray(labels, (np.arange(6 ** 3).reshape(6, 6, 6) % (segments + 1)).astype(np.uint8))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "atlas")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labels, node)
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        segment.SetName(f"atlas region {i}, a long anatomical name as an atlas gives it")
        segment.SetTag("TerminologyEntry", TERMINOLOGY)
    return scene, node


def test_a_segmentation_whose_header_is_longer_than_64_kib_is_written(tmp_path):
    """The check looked for the blank line that ends a NRRD header in the first 64 KiB only: a segmentation of 150
    segments, whose header Slicer fills with each segment's name, colour and tags (about 74 KiB), was refused as
    "Could not write ... completely (no valid NRRD header); is the disk full?". The header is now read to its end."""
    from CeVAEAnomalyLib.io.atomic import write_all
    from CeVAEAnomalyLib.io.verify import incomplete_reason

    spec = importlib.util.spec_from_file_location("DetectVolume", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    scene, node = atlas_segmentation(150)
    target = tmp_path / "head_segmentation.seg.nrrd"
    write_all({target: script._node_writer(node)})
    whole = target.read_bytes()
    assert whole.index(b"\n\n") > 1 << 16 and whole.count(b"_Name:=atlas region ") == 150
    assert incomplete_reason(target, target) is None
    short = tmp_path / "short.seg.nrrd"
    short.write_bytes(whole[:-8])  # the gzip stream without its CRC and length
    assert incomplete_reason(short, short).startswith("the compressed stream is cut short")
    header_only = tmp_path / "header.seg.nrrd"
    header_only.write_bytes(whole[: 1 << 16])  # cut inside the header
    assert incomplete_reason(header_only, header_only) == "no valid NRRD header"


@pytest.mark.parametrize("sizes", [b"20 twenty 20", b"20 -20 20", b"20 2.5e1 20", b"20 \xb2 20"])
def test_a_nrrd_whose_sizes_are_not_whole_numbers_is_refused_in_one_line(tmp_path, sizes):
    """A sizes line that is not whole numbers (a foreign or damaged file) raised "ValueError: invalid literal for
    int()" out of the check, which write_all let through as an unexpected error, not the one-line refusal of a file
    without a valid header; a negative size was taken for a complete file."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.io.atomic import write_all
    from CeVAEAnomalyLib.io.verify import incomplete_reason

    whole = tmp_path / "whole.nrrd"
    sitk.WriteImage(sitk.Image(20, 20, 20, sitk.sitkUInt8), str(whole), False)
    assert b"\nsizes: 20 20 20\n" in whole.read_bytes()
    foreign = whole.read_bytes().replace(b"\nsizes: 20 20 20\n", b"\nsizes: " + sizes + b"\n")
    damaged = tmp_path / "damaged.nrrd"
    damaged.write_bytes(foreign)
    assert incomplete_reason(damaged, damaged) == "no valid NRRD header"
    target = tmp_path / "out.nrrd"
    target.write_bytes(b"the earlier file")
    with pytest.raises(CeVAEError, match=r"^Could not write .*out\.nrrd completely \(no valid NRRD header\)"):
        write_all({target: lambda tmp: Path(tmp).write_bytes(foreign)}, overwrite=True)
    assert target.read_bytes() == b"the earlier file"


@pytest.mark.parametrize("sizes", [b"20 20 20 1", b"20 20"])
def test_a_nrrd_whose_sizes_do_not_match_its_dimension_is_refused(tmp_path, sizes):
    """A header of dimension 3 with 4 (or 2) sizes passed the check as a complete file when it held enough bytes,
    though no NRRD reader opens it ("seem to have more than expected 3 sizes")."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.io.verify import incomplete_reason

    whole = tmp_path / "whole.nrrd"
    sitk.WriteImage(sitk.Image(20, 20, 20, sitk.sitkUInt8), str(whole), False)
    assert incomplete_reason(whole, whole) is None
    damaged = tmp_path / "damaged.nrrd"
    damaged.write_bytes(whole.read_bytes().replace(b"\nsizes: 20 20 20\n", b"\nsizes: " + sizes + b"\n"))
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(damaged))
    assert incomplete_reason(damaged, damaged) == "no valid NRRD header"
