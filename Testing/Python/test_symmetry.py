"""Tests of the left-right symmetry tools (CeVAEAnomalyLib.symmetry) against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA
from CeVAEAnomalyLib.engine import symmetry
from CeVAEAnomalyLib.engine.preprocess import brain_region, region_image
from CeVAEAnomalyLib.engine.symmetry import (MidPlane, asymmetry, box_asymmetry, estimate_midplane, fuse,
                                             fuse_with_asymmetry, mirror, plane_from, side_weight)


def test_reflection_of_points() -> None:
    plane = MidPlane((1.0, 0.0, 0.0), 5.0)
    assert plane.mirror_point((8.0, 2.0, 3.0)) == pytest.approx((2.0, 2.0, 3.0))
    t = plane.reflection()
    assert t.TransformPoint((8.0, 2.0, 3.0)) == pytest.approx((2.0, 2.0, 3.0))
    tilted = plane_from(np.array([1.0, 2.0, 3.0]), 2.0, math.tan(math.radians(10)), math.tan(math.radians(-5)))
    n = np.array(tilted.normal)
    assert np.linalg.norm(n) == pytest.approx(1.0)
    p = np.array([10.0, -4.0, 7.0])
    q = np.array(tilted.mirror_point(p))
    assert np.array(tilted.mirror_point(q)) == pytest.approx(p)  # a reflection is its own inverse
    assert n @ ((p + q) / 2) == pytest.approx(tilted.offset)  # the midpoint lies on the plane
    assert np.cross(p - q, n) == pytest.approx(np.zeros(3), abs=1e-9)  # p - q is along the normal
    assert n @ np.array([3.0, 2.0, 3.0]) == pytest.approx(tilted.offset)  # through centre + (2, 0, 0)


def test_mirror_image_about_a_plane_of_voxels() -> None:
    arr = np.tile(np.arange(21, dtype=np.float32), (4, 5, 1))  # value = i index
    img = sitk.GetImageFromArray(arr)
    out = sitk.GetArrayFromImage(mirror(img, MidPlane((1.0, 0.0, 0.0), 8.0)))
    i = np.arange(21)
    inside = (16 - i >= 0) & (16 - i <= 20)
    assert out[2, 3, inside] == pytest.approx((16 - i)[inside])
    assert (out[2, 3, ~inside] == 0).all()  # mirrors outside the volume get the default


def symmetric_phantom(shift: float, yaw_deg: float) -> tuple:
    """A textured ellipsoid 'brain' symmetric about a known plane, on a 1.5 mm grid with a flipped axis."""
    size = (60, 64, 56)
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing((1.5, 1.5, 1.5))
    img.SetOrigin((40.0, 50.0, -40.0))
    img.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    idx = np.indices(size[::-1]).reshape(3, -1)[::-1].T.astype(float)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(list(v)) for v in idx[:: 1]])
    centre = pts.mean(0)
    plane = plane_from(centre, shift, math.tan(math.radians(yaw_deg)), 0.0)
    n = np.array(plane.normal)
    u = pts @ n - plane.offset  # signed distance to the plane
    w = pts - u[:, None] * n - centre
    values = np.cos(np.abs(u) / 4.0) + np.sin(w[:, 1] / 5.0) + 0.5 * np.cos(w[:, 2] / 3.0) + np.abs(u) / 15
    brain = (u / 33) ** 2 + (w[:, 1] / 40) ** 2 + (w[:, 2] / 30) ** 2 <= 1
    arr = np.where(brain, values + 2, 0).reshape(size[::-1]).astype(np.float32)
    mask = brain.reshape(size[::-1]).astype(np.uint8)
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(img)
    mask_img = sitk.GetImageFromArray(mask)
    mask_img.CopyInformation(img)
    return image, mask_img, plane


def test_estimate_midplane_recovers_a_shifted_tilted_plane() -> None:
    image, mask, truth = symmetric_phantom(shift=4.0, yaw_deg=5.0)
    found = estimate_midplane(image, mask)
    angle = math.degrees(math.acos(min(1.0, abs(float(np.dot(found.normal, truth.normal))))))
    assert angle < 1.5
    centre = np.array(truth.mirror_point((0.0, 0.0, 0.0))) / 2  # a point on the true plane
    assert abs(np.dot(found.normal, centre) - found.offset) < 1.0


def test_the_asymmetry_is_the_same_in_any_intensity_units() -> None:
    """A volume in tiny units (scaled by 1e-8) gives the map of the original (WHAT_HAPPENS_WHEN.md)."""
    image, mask, _ = symmetric_phantom(shift=4.0, yaw_deg=5.0)
    arr = sitk.GetArrayFromImage(image)
    arr[10:20, 20:30, 30:40] += 1.5  # something asymmetric
    region = tuple(slice(0, n) for n in arr.shape)
    brain = sitk.GetArrayFromImage(mask) > 0
    maps = []
    for factor in (1.0, 1e-8):
        scaled = sitk.GetImageFromArray(arr * np.float32(factor))
        scaled.CopyInformation(image)
        maps.append(box_asymmetry(scaled, brain, region, sigma_mm=2.0))
    assert np.abs(maps[0].asymmetry).max() > 0.1
    np.testing.assert_allclose(maps[1].asymmetry, maps[0].asymmetry, atol=1e-4)


def template_head() -> tuple:
    """The bundled colin27 head (2 mm) and its brain mask."""
    from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1, default_template_dir

    return (sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1), sitk.sitkFloat32),
            sitk.ReadImage(str(default_template_dir() / TEMPLATE_MASK), sitk.sitkUInt8))


def test_the_plane_search_scores_each_plane_once(monkeypatch) -> None:
    """Every stage of the search but the first tries the best plane so far again (its step 0), and a stage that
    starts where the last one did tries its planes again: each plane is scored once, so the bundled colin27 head
    takes 74 resamples of its coarse brain, not 97, and gets the plane that scoring every trial afresh found
    (6644e62)."""
    tried = []

    def counted(image, plane, *args):
        tried.append(plane)
        return mirror(image, plane, *args)

    monkeypatch.setattr(symmetry, "mirror", counted)
    found = estimate_midplane(*template_head())
    assert len(tried) == len(set(tried)) == 74
    assert found == MidPlane((0.9999238388783044, -0.008727532388174426, 0.008726203142718957), -0.644424256114285)


@pytest.mark.parametrize("yaw, roll", [(0.0, 15.0), (-12.0, 12.0), (18.0, 0.0)])
def test_the_plane_of_a_head_turned_or_rolled_in_the_scanner_is_found(yaw, roll) -> None:
    """The bundled colin27 head turned (about the vertical axis) or rolled (about the front-back axis) by up to
    18 degrees: the plane found is the unturned head's plane, turned alike (a +-8 degree search left it 5-12
    degrees off from 10 degrees on)."""
    head, brain = template_head()
    upright = estimate_midplane(head, brain)
    centre = head.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in head.GetSize()])
    turn = sitk.Euler3DTransform(centre, 0.0, math.radians(roll), math.radians(yaw))
    found = estimate_midplane(sitk.Resample(head, turn, sitk.sitkLinear, 0.0),
                              sitk.Resample(brain, turn, sitk.sitkNearestNeighbor, 0))
    expected = np.array(turn.GetMatrix()).reshape(3, 3).T @ np.array(upright.normal)
    assert math.degrees(math.acos(min(1.0, abs(float(np.dot(found.normal, expected)))))) < 1.5


def test_asymmetry_is_the_masked_absolute_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((6, 7, 8)).astype(np.float32)
    b = rng.random((6, 7, 8)).astype(np.float32)
    both = rng.random((6, 7, 8)) > 0.3
    out = asymmetry(a, b, both, (1.0, 1.0, 1.0), sigma_mm=0.0)
    assert out == pytest.approx(np.where(both, np.abs(a - b), 0))
    # smoothing a constant difference inside the mask keeps it (normalised by the smoothed mask)
    smooth = asymmetry(a, a + 0.25, both, (1.0, 1.5, 2.0), sigma_mm=2.0)
    assert smooth[both] == pytest.approx(np.full(both.sum(), 0.25), abs=1e-4)
    assert (smooth[~both] == 0).all()


def test_fuse() -> None:
    s = np.array([0.0, 1.0, 2.0, 4.0])
    a = np.array([3.0, 0.0, 0.5, 0.25])
    assert fuse(s, a) == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert fuse(s, a, floor=0.5) == pytest.approx([0.0, 0.5, 2.0, 3.0])
    assert fuse(s, a, power=0.5) == pytest.approx([0.0, 0.0, 0.5 * 2 ** 0.5, 0.5])


@pytest.mark.parametrize("power, exact", [(0.5, np.sqrt), (2.0, np.square)])
def test_the_square_root_and_square_powers_are_correctly_rounded_on_any_numpy(power, exact) -> None:
    """The recommended score power 0.5 (and 2) is taken as np.sqrt (np.square), correctly rounded: NumPy 2 computes
    np.power so, NumPy 1.26 (Slicer 5.6, 5.8) with float32 powf, up to 1 ulp off on a fifth of the voxels, which moved
    a real head's normalised map by up to 9 ulps between the two."""
    rng = np.random.default_rng(5)
    score = (rng.random(200_000) * 12 - 1).astype(np.float32)
    asym = rng.random(score.size).astype(np.float32)
    got = fuse(score, asym, 0.1, power)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, exact(np.maximum(score, 0)) * (0.1 + asym))


def test_side_weight() -> None:
    s = np.array([2.0, 1.0, 1.0, 0.0, 0.0, -1.0, 3.0])
    m = np.array([0.0, 1.0, 3.0, 0.0, 5.0, 1.0, -2.0])
    assert side_weight(s, m) == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0])


def test_side_weighting_removes_the_ghost_at_the_mirror_position() -> None:
    """A bright blob on one side makes both it and its mirror position asymmetric; with the side weight
    only the side where the score is high keeps its asymmetry (score 1 + 3 at the blob: the mirror position
    gets weight 2·1 / (1 + 4) = 0.4 of its asymmetry, the blob keeps all)."""
    image, mask, plane = symmetric_phantom(shift=0.0, yaw_deg=0.0)
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(mask) > 0
    idx = np.indices(arr.shape)
    lesion = np.array([28, 32, 42])  # (k, j, i): 12.5 voxels (19 mm) off the plane, which is the grid's i midplane
    blob = ((idx - lesion[:, None, None, None]) ** 2).sum(0) <= 9
    bright = sitk.GetImageFromArray(np.where(blob, arr + 3, arr).astype(np.float32))
    bright.CopyInformation(image)
    score = sitk.GetImageFromArray(np.where(brain, 1.0 + 3.0 * blob, 0).astype(np.float32))
    score.CopyInformation(image)
    ghost = np.flip(blob, 2)
    assert not (ghost & blob).any() and brain[ghost].all()
    whole = tuple(slice(0, n) for n in brain.shape)
    asym = box_asymmetry(bright, brain, whole, 0.0)  # one asymmetry serves both fusions
    values = sitk.GetArrayFromImage(score)
    plain = fuse_with_asymmetry(values, asym)
    sided = fuse_with_asymmetry(values, asym, side=True)
    rest = brain & ~blob & ~ghost
    assert plain[ghost].mean() > 10 * plain[rest].mean() + 0.1  # without the side weight the mirror lights up
    assert sided[blob] == pytest.approx(plain[blob], rel=1e-5)
    assert sided[ghost] == pytest.approx(0.4 * plain[ghost], rel=0.05)
    assert sided[rest] == pytest.approx(plain[rest], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("floor, power", [(0.1, 0.5), (0.0, 1.0), (np.float64(0.1), np.float64(0.5)), (0.2, 2)])
def test_asymmetry_and_fusion_keep_the_plain_formulas_bit_for_bit(floor, power) -> None:
    """The smoothing and the side-weighted fusion work in place on as few box-sized arrays as they can (a 0.5 mm
    scan's box is 36 M voxels, 144 MB each); they give exactly the values of the plain formulas, also for NumPy
    scalar options, which compute in float64."""
    image, mask, _ = symmetric_phantom(shift=1.5, yaw_deg=4.0)
    brain = sitk.GetArrayFromImage(mask) > 0
    rng = np.random.default_rng(3)
    whole = tuple(slice(0, n) for n in brain.shape)
    asym = box_asymmetry(image, brain, whole, 3.0)
    score = np.where(brain, rng.random(brain.shape) * 3 - 0.5, 0).astype(np.float32)

    here = sitk.GetImageFromArray(score)
    here.CopyInformation(image)
    mirrored = sitk.GetArrayFromImage(sitk.Resample(here, here, asym.reflection, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
    # (power 0.5 and 2 correctly rounded, in the dtype of NumPy's promotion of the score and the power)
    s = score if power == 1 else np.power(np.maximum(score, 0).astype(np.float64), power).astype(
        np.result_type(score, power))
    for side, a in ((False, asym.asymmetry), (True, asym.asymmetry * side_weight(score, mirrored))):
        want = np.multiply(s, floor + a).astype(np.float32)
        got = fuse_with_asymmetry(score, asym, floor, power, side)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)

    diff, both = rng.random(brain.shape).astype(np.float32), brain & (rng.random(brain.shape) > 0.2)
    spacing = (1.0, 1.5, 2.0)

    def smoothed(arr):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing(spacing)
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, 3.0))

    plain = smoothed(np.where(both, diff, 0)) / np.maximum(smoothed(both), np.float32(1e-6))
    np.testing.assert_array_equal(asymmetry(diff, np.zeros_like(diff), both, spacing, 3.0), np.where(both, plain, 0))


def real_head(name: str) -> tuple:
    """A real head and its brain mask: the bundled colin27 (2 mm), or one of $CEVAE_DATA_DIR."""
    if name == "template":
        return template_head()
    if not (SHARED_DATA / f"{name}_t1.nii.gz").exists():
        pytest.skip("healthy sample data not found ($CEVAE_DATA_DIR)")
    return (sitk.ReadImage(str(SHARED_DATA / f"{name}_t1.nii.gz"), sitk.sitkFloat32),
            sitk.ReadImage(str(SHARED_DATA / f"{name}_brainmask.nii.gz"), sitk.sitkUInt8))


@pytest.mark.parametrize("name", ["template", "colin27", "robex"])
def test_the_asymmetry_is_smoothed_on_the_box_of_both_sides_brain_only(monkeypatch, name) -> None:
    """The two Gaussian smoothings of the asymmetry run on the bounding box of the voxels that are brain on both
    sides, grown by the 4 voxels at each end of a line that ITK's recursive filter takes into its boundary terms,
    not on the whole box around the brain (with the post-processing's reach); a real head's map is the one that
    smoothing the whole box gives, bit for bit."""
    image, mask = real_head(name)
    brain = sitk.GetArrayFromImage(mask) > 0
    region = brain_region(brain, 5)
    inside = brain[region].copy()
    smoothed = []
    real = symmetry._smooth
    monkeypatch.setattr(symmetry, "_smooth", lambda img, *args: smoothed.append(img.GetSize()) or real(img, *args))
    asym = box_asymmetry(image, inside, region, 3.0)

    here = region_image(inside.view(np.uint8), image, region)
    there = sitk.GetArrayFromImage(sitk.Resample(here, here, asym.reflection, sitk.sitkNearestNeighbor, 0)) > 0
    both = inside & there
    tight = [r.stop - r.start for r in brain_region(both, 4)[::-1]]
    assert smoothed == [tuple(tight)] * 2 and tight != list(inside.shape[::-1])
    diff = np.where(both, np.abs(asym.asymmetry), 0).astype(np.float32)  # any values: the smoothing is compared
    spacing = image.GetSpacing()

    def whole(arr):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing(spacing)
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, 3.0))

    plain = whole(diff) / np.maximum(whole(both), np.float32(1e-6))
    np.testing.assert_array_equal(asymmetry(diff, np.zeros_like(diff), both, spacing, 3.0), np.where(both, plain, 0))
