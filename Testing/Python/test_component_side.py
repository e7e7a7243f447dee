"""The patient's side of the brain's midline each anomaly component lies on (Component.side: left, right, both), on a
real head (the bundled Colin27) in any voxel order, tilted, and away from the scanner's x = 0."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA

from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.postprocess import SIDE_MIN_MATCH, components
from CeVAEAnomalyLib.engine.symmetry import estimate_midplane
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.result import DetectionResult, SliceScoreRow, components_csv, load_result, save_result

Head = Tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Image]  # image, brain mask, score map, labelmap


def physical_points(image: sitk.Image) -> np.ndarray:
    """The LPS point (mm) of every voxel centre, (k, j, i, 3)."""
    matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    kji = np.indices(image.GetSize()[::-1]).reshape(3, -1).T
    return (kji[:, ::-1] @ matrix.T + np.array(image.GetOrigin())).reshape(*image.GetSize()[::-1], 3)


def on_grid(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


@pytest.fixture(scope="module")
def lesioned() -> Head:
    """Colin27 (2 mm, stored as RAS) with three bright lesions, each its own component and score: one 25 mm into
    the patient's left hemisphere (+x in LPS; the highest summed score), one on the midline, one 25 mm into the
    right hemisphere (the lowest)."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    brain = sitk.GetArrayViewFromImage(mask) > 0
    points = physical_points(image)
    centre = points[brain].mean(0)
    pixels = sitk.GetArrayFromImage(image)
    scores = np.zeros(pixels.shape, np.float32)
    bright = float(np.percentile(pixels[brain], 99.5))
    for dx, radius, score in ((25.0, 7.0, 10.0), (0.0, 8.0, 5.0), (-25.0, 7.0, 2.0)):
        ball = np.linalg.norm(points - (centre + [dx, 0.0, 10.0]), axis=-1) <= radius
        pixels[ball], scores[ball] = bright, score
    image = on_grid(pixels, image)
    return image, mask, on_grid(scores, image), on_grid((scores > 0).astype(np.uint8), image)


def tilted(head: Head, degrees: float) -> Head:
    """The head turned ``degrees`` about the S axis through its brain's centre (resampled on its own grid)."""
    image, mask, score, labelmap = head
    brain = sitk.GetArrayViewFromImage(mask) > 0
    turn = sitk.Euler3DTransform(tuple(physical_points(image)[brain].mean(0)), 0.0, 0.0, math.radians(degrees))
    linear, nearest = sitk.sitkLinear, sitk.sitkNearestNeighbor
    return (sitk.Resample(image, turn, linear, 0.0), sitk.Resample(mask, turn, nearest, 0),
            sitk.Resample(score, turn, nearest, 0.0), sitk.Resample(labelmap, turn, nearest, 0))


def moved(head: Head, dx: float) -> Head:
    """The head ``dx`` mm along the scanner's x (its header's origin moved): the scanner's x = 0 far off the midline."""
    out = []
    for im in head:
        im = sitk.Image(im)
        im.SetOrigin(tuple(np.add(im.GetOrigin(), (dx, 0.0, 0.0))))
        out.append(im)
    return tuple(out)


STORED: Dict[str, Callable[[Head], Head]] = {
    **{code: (lambda head, code=code: tuple(sitk.DICOMOrient(im, code) for im in head))
       for code in ("LPS", "RAS", "PIR", "ASL")},
    "tilted 12 degrees": lambda head: tilted(head, 12.0),
    "tilted -15 degrees, stored as PIR": lambda head: tuple(sitk.DICOMOrient(im, "PIR") for im in tilted(head, -15.0)),
    "60 mm to the scanner's right": lambda head: moved(head, -60.0),
    "60 mm to the scanner's left, tilted 12 degrees": lambda head: moved(tilted(head, 12.0), 60.0),
}


@pytest.mark.parametrize("stored", list(STORED))
def test_each_component_is_on_the_patients_side_of_the_midline_in_any_orientation(lesioned, stored):
    image, mask, score, labelmap = STORED[stored](lesioned)
    found = components(labelmap, score, "summed", estimate_midplane(image, mask))
    assert [c.max_score for c in found] == [10.0, 5.0, 2.0]  # the left lesion, the midline one, the right one
    assert [c.side for c in found] == ["left", "both", "right"]


def test_a_component_is_on_one_side_while_under_a_tenth_of_it_lies_across_the_midline(lesioned):
    """'both' from a tenth of its voxels on the other side (or on the plane) on: a slab across the plane."""
    image, mask, _, _ = lesioned
    plane = estimate_midplane(image, mask)
    distance = (physical_points(image) @ np.asarray(plane.normal)) - plane.offset  # + toward the patient's left
    sides = []
    for across in (0.05, 0.15):  # the share of the slab beyond the plane
        slab = (distance > -across * 20.0) & (distance <= (1 - across) * 20.0) & (sitk.GetArrayViewFromImage(mask) > 0)
        slab &= np.abs(physical_points(image)[..., 2] - 20.0) < 6
        flagged = on_grid(slab.astype(np.uint8), image)
        sides += [c.side for c in components(flagged, on_grid(slab.astype(np.float32), image), "summed", plane)]
    assert sides == ["left", "both"]


def test_without_a_plane_the_side_is_not_said(lesioned):
    _, _, score, labelmap = lesioned
    assert [c.side for c in components(labelmap, score, "summed")] == ["", "", ""]


def lesioned_scan(stored: str, dx: float) -> Tuple[sitk.Image, sitk.Image]:
    """Colin27 (2 mm) with one bright 9 mm lesion ``dx`` mm along the patient's left (LPS +x) of its brain's centre,
    stored as ``STORED`` says."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    brain = sitk.GetArrayViewFromImage(mask) > 0
    points = physical_points(image)
    pixels = sitk.GetArrayFromImage(image)
    ball = np.linalg.norm(points - (points[brain].mean(0) + [dx, 0.0, 10.0]), axis=-1) <= 9.0
    pixels[ball] = 1.6 * float(np.percentile(pixels[brain], 99.5))
    image, mask, _, _ = STORED[stored]((on_grid(pixels, image), mask, mask, mask))
    return image, mask


@pytest.mark.parametrize("stored, dx, asymmetry_mm, side", [
    ("RAS", 25.0, None, "left"), ("tilted -15 degrees, stored as PIR", 25.0, None, "left"),
    ("60 mm to the scanner's right", 25.0, 0.0, "left"), ("ASL", 5.0, None, "both"),
    ("tilted 12 degrees", 0.0, 0.0, "both")])
def test_detection_says_the_side_of_a_lesion(stored, dx, asymmetry_mm, side):
    """The bundled model's detection (its default scoring, which estimates the midline for its asymmetry term, and
    one without that term, which estimates it for the components alone)."""
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.data import default_model_path

    image, mask = lesioned_scan(stored, dx)
    options = {} if asymmetry_mm is None else {"asymmetry_mm": asymmetry_mm, "asymmetry_floor": 0.0, "threshold": 4.0}
    found = detect(image, str(default_model_path()), mask, device="cpu", **options).components
    assert found and found[0].side == side, [(c.voxels, c.side) for c in found]


def lesioned_result(head: Head) -> DetectionResult:
    """A result of the three lesions' components with their sides (one slice row per axial slice)."""
    image, mask, score, labelmap = head
    rows = [SliceScoreRow(2, k, 1.0, 1.0, 1.0, 0.5, 1.0, False) for k in range(image.GetSize()[2])]
    return DetectionResult(score, labelmap, mask, 1.0, "absolute", rows,
                           components(labelmap, score, "summed", estimate_midplane(image, mask)))


def test_the_component_table_ends_with_the_side_column(lesioned):
    table = components_csv(lesioned_result(STORED["PIR"](lesioned)))
    assert table.splitlines()[0].endswith(",peak_r,peak_a,peak_s,side")
    assert [row["side"] for row in csv.DictReader(io.StringIO(table))] == ["left", "both", "right"]
    unknown = lesioned_result(lesioned)
    unknown = dataclasses.replace(unknown, components=[dataclasses.replace(c, side="") for c in unknown.components])
    assert [row["side"] for row in csv.DictReader(io.StringIO(components_csv(unknown)))] == ["", "", ""]


def test_a_saved_result_keeps_the_sides_and_one_saved_before_them_reads_them_as_not_known(lesioned, tmp_path):
    result = lesioned_result(lesioned)
    save_result(result, tmp_path / "now")
    assert json.loads((tmp_path / "now" / "detection.json").read_text())["format_version"] == 5  # older versions
    # refuse it by its version, not as damaged
    assert [c.side for c in load_result(tmp_path / "now").components] == ["left", "both", "right"]
    save_result(result, tmp_path / "before")
    summary_path = tmp_path / "before" / "detection.json"
    summary = json.loads(summary_path.read_text())
    summary["format_version"] = 4  # as the version before sides wrote it
    for component in summary["components"]:
        component.pop("side")
    summary_path.write_text(json.dumps(summary))
    assert [c.side for c in load_result(tmp_path / "before").components] == ["", "", ""]
    summary["components"][0]["side"] = "middle"
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(CeVAEError, match="component 1: side 'middle' is not of its type"):
        load_result(tmp_path / "before")


def test_the_slicer_lesion_table_has_a_side_column(lesioned):
    """Published into a real vtkMRMLScene: the component table's last column, Side, says each row's side."""
    slicer = pytest.importorskip("slicer")
    from conftest import add_volume
    from CeVAEAnomalyLib.slicer import mrml, nodes

    head = STORED["ASL"](lesioned)
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, head[0])
    table = mrml.publish(scene, volume, lesioned_result(head)).components
    last = table.GetTable().GetColumnName(table.GetNumberOfColumns() - 1)
    assert last == nodes.SIDE_COLUMN == "Side"
    column = table.GetTable().GetColumnByName("Side")
    assert [column.GetValue(row) for row in range(table.GetNumberOfRows())] == ["left", "both", "right"]


def one_sided(head: Head, how: str) -> Head:
    """The lesioned head with its brain made asymmetric: "cut" removes the patient's left beyond 5 mm past the midline
    (a field of view cut there), "resected" fills a 45 mm ball of the left hemisphere (37 % of it) with CSF-dark
    values; the scores and labels of the lesions that remain are kept."""
    image, mask, score, labelmap = head
    brain = sitk.GetArrayViewFromImage(mask) > 0
    points = physical_points(image)
    plane = estimate_midplane(image, mask)
    distance = points @ np.asarray(plane.normal) - plane.offset  # + toward the patient's left
    pixels, masked = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
    scores, labels = sitk.GetArrayFromImage(score), sitk.GetArrayFromImage(labelmap)
    if how == "cut":
        gone = distance > 5.0
        pixels[gone], masked[gone], scores[gone], labels[gone] = 0, 0, 0, 0
    else:
        centre = points[brain].mean(0) + 30.0 * np.asarray(plane.normal)
        cavity = (np.linalg.norm(points - centre, axis=-1) <= 45.0) & (distance > 3.0) & brain & (labels == 0)
        pixels[cavity] = np.percentile(pixels[brain], 2)
    return on_grid(pixels, image), on_grid(masked, mask), on_grid(scores, score), on_grid(labels, labelmap)


@pytest.mark.parametrize("how", ["cut", "resected"])
def test_no_side_is_said_where_the_brain_does_not_match_its_mirror_image(lesioned, how):
    """A hemisphere cut off by the field of view or mostly resected: the plane search, which keeps the plane within
    10 mm of the brain's centre, found a plane 20-30 mm or 24 degrees off: the lesion 25 mm into the right hemisphere
    was said to cross the midline, the one on the midline to lie left. Its match (the brain's correlation with its
    mirror image, 0.84 whole) is 0.46 and 0.19 here: no side is said."""
    image, mask, score, labelmap = one_sided(lesioned, how)
    plane = estimate_midplane(image, mask)
    assert plane.match is not None and plane.match < SIDE_MIN_MATCH
    found = components(labelmap, score, "summed", plane)
    assert found and [c.side for c in found] == [""] * len(found)


def test_the_whole_heads_plane_matches_well_enough_to_say_sides(lesioned):
    assert estimate_midplane(*lesioned[:2]).match > SIDE_MIN_MATCH


def robex_scan(dx: float, cut: bool) -> Tuple[sitk.Image, sitk.Image]:
    """The ROBEX subject (1.5 mm; a very symmetric head: its brain matches its mirror image at 0.94) with one bright
    9 mm lesion ``dx`` mm along the patient's left (LPS +x) of its midline; ``cut``: the field of view cut (the image
    and its mask cropped) 5 mm past the midline on the other side, the lesion's hemisphere kept."""
    image = sitk.ReadImage(str(SHARED_DATA / "robex_t1.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(SHARED_DATA / "robex_brainmask.nii.gz"))
    brain = sitk.GetArrayViewFromImage(mask) > 0
    points = physical_points(image)
    plane = estimate_midplane(image, mask)
    sign = 1.0 if plane.normal[0] >= 0 else -1.0
    normal, offset = sign * np.asarray(plane.normal), sign * plane.offset
    centre = points[brain].mean(0)
    centre -= (centre @ normal - offset) * normal
    pixels = sitk.GetArrayFromImage(image)
    ball = np.linalg.norm(points - (centre + dx * normal + [0.0, 0.0, 10.0]), axis=-1) <= 9.0
    pixels[ball] = 1.6 * float(np.percentile(pixels[brain], 99.5))
    image = on_grid(pixels, image)
    if not cut:
        return image, mask
    across = 2 - int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3))[0]))  # the array axis along x
    distance = np.moveaxis(points @ normal - offset, across, 0).reshape(pixels.shape[across], -1).mean(1)
    kept = np.flatnonzero(distance <= 5.0 if dx < 0 else distance >= -5.0)
    start, size = [0, 0, 0], list(image.GetSize())
    start[2 - across], size[2 - across] = int(kept[0]), len(kept)
    return sitk.RegionOfInterest(image, size, start), sitk.RegionOfInterest(mask, size, start)


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="needs the healthy sample volumes")
@pytest.mark.parametrize("cut, given, side", [(False, True, "right"), (True, True, ""), (True, False, "")])
def test_no_side_is_said_where_the_field_of_view_cuts_the_brain_across(cut, given, side):
    """The field of view cut 5 mm past the midline of a very symmetric head: its brain still matches its mirror image
    at 0.76 (above SIDE_MIN_MATCH) about a plane the search (within 10 mm of the brain's centre, which the cut moves
    by 30 mm) put off the midline, and a lesion 25 mm into the right hemisphere was said to cross it ("both"). No
    side is said where the brain (given or automatic mask) goes on past the image's left or right face; the whole
    head keeps its sides."""
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.data import default_model_path

    image, mask = robex_scan(-25.0, cut)
    found = detect(image, str(default_model_path()), mask if given else None, device="cpu", threshold=4.0).components
    assert found and found[0].side == side, [(c.voxels, c.side) for c in found]


def colin_half(dx: float) -> Tuple[sitk.Image, sitk.Image]:
    """The bundled Colin27 with a bright lesion ``dx`` mm along the patient's left of its brain's centre and all of
    the patient's left beyond 5 mm past the midline made background (image and mask on their grid: a brain that
    matches its mirror image at 0.46 and does not reach the image's edge)."""
    image, mask = lesioned_scan("RAS", dx)
    points = physical_points(image)
    plane = estimate_midplane(image, mask)
    sign = 1.0 if plane.normal[0] >= 0 else -1.0
    gone = points @ (sign * np.asarray(plane.normal)) - sign * plane.offset > 5.0
    pixels, masked = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask)
    pixels[gone], masked[gone] = 0, 0
    return on_grid(pixels, image), on_grid(masked, mask)


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="needs the healthy sample volumes")
@pytest.mark.parametrize("scan, threshold, why", [
    ("robex cut", 4.0, "the brain reaches the image's left or right edge"),
    ("colin half", 4.0, "the brain matches its mirror image poorly (0."),
    ("robex whole", 4.0, None), ("robex cut", 1000.0, None)])
def test_a_warning_says_why_no_side_is_said(scan, threshold, why):
    """One warning, in the detection's record, says why the components have no side; none where they have one or
    where there are none."""
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.data import default_model_path

    image, mask = colin_half(-25.0) if scan == "colin half" else robex_scan(-25.0, scan == "robex cut")
    result = detect(image, str(default_model_path()), mask, device="cpu", threshold=threshold)
    said = [w for w in result.record.warnings if "no side" in w]
    assert bool(result.components) == (threshold < 100)
    if why is None:
        assert said == [] and all(c.side for c in result.components), said
    else:
        assert len(said) == 1 and why in said[0] and [c.side for c in result.components] == [""], said
