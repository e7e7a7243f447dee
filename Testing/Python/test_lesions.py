"""Tests of synthetic lesion insertion in CeVAEAnomalyResearch.lesions."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.lesions import LESION_KINDS, insert_lesions

HEALTHY = Path(__file__).resolve().parents[3] / "shared" / "data" / "healthy"
SPACING = (1.0, 1.25, 2.0)
BRAIN_RADIUS_MM = 22.0


def physical_points(image: sitk.Image, indices_kji: np.ndarray) -> np.ndarray:
    """Physical points of numpy (k, j, i) indices, shape (n, 3)."""
    matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return indices_kji[:, ::-1] @ matrix.T + np.array(image.GetOrigin())


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    """A uint8 ball 'brain' on an anisotropic, rotated grid: a textured head and its mask."""
    angle = math.radians(30)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    shape_kji = (30, 44, 56)
    image = sitk.Image(shape_kji[::-1], sitk.sitkUInt8)
    image.SetSpacing(SPACING)
    image.SetDirection(tuple((rotation @ np.diag([1, -1, 1])).ravel()))
    image.SetOrigin((10.0, -20.0, 5.0))
    centre_index = np.array(shape_kji) / 2
    centre = physical_points(image, centre_index[None])[0]
    points = physical_points(image, np.indices(shape_kji).reshape(3, -1).T).reshape(*shape_kji, 3)
    distance = np.linalg.norm(points - centre, axis=-1)
    brain = distance <= BRAIN_RADIUS_MM
    rng = np.random.default_rng(7)
    values = 100 + 30 * np.sin(points[..., 0] / 4) * np.cos(points[..., 2] / 5) + rng.normal(0, 5, shape_kji)
    array = np.where(brain | (distance < BRAIN_RADIUS_MM + 3), values, 0).clip(0, 255).astype(np.uint8)
    head = sitk.GetImageFromArray(array)
    head.CopyInformation(image)
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(image)
    return head, mask


def arrays(*images: sitk.Image) -> list[np.ndarray]:
    return [sitk.GetArrayFromImage(im) for im in images]


def test_reproducible_with_seed(phantom) -> None:
    head, mask = phantom
    first = insert_lesions(head, mask, 3, n=2)
    second = insert_lesions(head, mask, np.random.default_rng(3), n=2)
    other = insert_lesions(head, mask, 4, n=2)
    for a, b in zip(arrays(*first[:2]), arrays(*second[:2])):
        np.testing.assert_array_equal(a, b)
    assert first[2] == second[2]
    assert first[2] != other[2]
    assert not np.array_equal(*arrays(first[1], other[1]))


def test_geometry_types_and_input_unchanged(phantom) -> None:
    head, mask = phantom
    before = sitk.GetArrayFromImage(head)
    lesioned, truth, lesions = insert_lesions(head, mask, 0, n=3)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(head), before)
    assert head.GetPixelID() == sitk.sitkUInt8
    assert lesioned.GetPixelID() == sitk.sitkFloat32 and truth.GetPixelID() == sitk.sitkUInt8
    for out in (lesioned, truth):
        assert out.GetSize() == head.GetSize()
        assert out.GetSpacing() == head.GetSpacing()
        assert out.GetOrigin() == head.GetOrigin()
        assert out.GetDirection() == head.GetDirection()
    assert len(lesions) == 3
    assert sum(le.n_voxels for le in lesions) == int(sitk.GetArrayViewFromImage(truth).sum())


def test_lesions_stay_inside_the_brain(phantom) -> None:
    head, mask = phantom
    original, brain = arrays(head, mask)
    for seed in range(4):
        lesioned, truth = arrays(*insert_lesions(head, mask, seed, n=2, radius_mm=(3.0, 10.0))[:2])
        assert truth.any()
        assert not (truth.astype(bool) & (brain == 0)).any()
        changed = lesioned != original.astype(np.float32)
        assert not (changed & (brain == 0)).any()  # soft borders included


@pytest.mark.parametrize("background", [-1.0, float("nan")])
def test_a_float_mask_with_negative_or_nan_background_keeps_lesions_in_the_brain(phantom, background: float) -> None:
    """A float brain mask with -1 or NaN outside the brain (as detect and evaluate read it, > 0 is brain): the lesions
    were placed anywhere in the volume, outside the mask that evaluate then scores them in."""
    head, mask = phantom
    brain = arrays(mask)[0] > 0
    as_float = sitk.GetImageFromArray(np.where(brain, 1.0, background).astype(np.float32))
    as_float.CopyInformation(mask)
    for seed in range(4):
        truth = arrays(insert_lesions(head, as_float, seed, n=2, radius_mm=(3.0, 6.0))[1])[0]
        assert truth.any()
        assert not (truth.astype(bool) & ~brain).any()


@pytest.mark.parametrize("irregularity", [0.0, 0.3])
def test_radius_in_mm_on_anisotropic_grid(phantom, irregularity: float) -> None:
    head, mask = phantom
    for seed in range(3):
        _, truth, (lesion,) = insert_lesions(
            head, mask, seed, radius_mm=(8.0, 8.0), irregularity=irregularity
        )
        voxels = np.argwhere(sitk.GetArrayViewFromImage(truth))
        reach = np.linalg.norm(physical_points(head, voxels) - lesion.center_mm, axis=1).max()
        assert lesion.radius_mm == 8.0 == max(lesion.semi_axes_mm)
        assert reach <= 8.0 + 1e-6
        assert reach >= 8.0 * (1 - irregularity) - max(SPACING)
        volume = lesion.n_voxels * np.prod(SPACING)
        assert volume == pytest.approx(lesion.volume_ml * 1000)
        ellipsoid = 4 / 3 * math.pi * np.prod(lesion.semi_axes_mm)
        if irregularity == 0:
            assert volume == pytest.approx(ellipsoid, rel=0.15)
        else:
            assert (1 - irregularity) ** 3 * ellipsoid * 0.85 <= volume <= ellipsoid * 1.15


def kind_effect(head: sitk.Image, mask: sitk.Image, kind: str, seed: int = 1):
    lesioned, truth, _ = insert_lesions(head, mask, seed, kinds=[kind], radius_mm=(6.0, 8.0))
    original, after, inside = arrays(head, lesioned, truth)
    return original.astype(np.float32), after, inside.astype(bool)


def test_hyper_and_hypo_shift_intensity(phantom) -> None:
    head, mask = phantom
    brain = sitk.GetArrayViewFromImage(mask) != 0
    p1, p99 = np.percentile(sitk.GetArrayViewFromImage(head)[brain], [1, 99])
    original, after, inside = kind_effect(head, mask, "hyper")
    assert after[inside].mean() > p99 > original[inside].mean()
    original, after, inside = kind_effect(head, mask, "hypo")
    assert after[inside].mean() < original[inside].mean() - 0.25 * (p99 - p1)  # the phantom has no CSF


def test_ring_has_bright_rim_and_dark_core(phantom) -> None:
    head, mask = phantom
    _, after, inside = kind_effect(head, mask, "ring")
    core = inside.copy()
    for axis, shift in itertools.product(range(3), (-1, 1)):
        core &= np.roll(inside, shift, axis)
    rim = inside & ~core
    assert after[rim].mean() > after[core].mean() + 20


def test_texture_keeps_mean_and_adds_variance(phantom) -> None:
    head, mask = phantom
    original, after, inside = kind_effect(head, mask, "texture")
    assert after[inside].mean() == pytest.approx(original[inside].mean(), abs=5)
    assert after[inside].std() > 1.5 * original[inside].std()


def test_min_separation(phantom) -> None:
    head, mask = phantom
    _, truth, lesions = insert_lesions(head, mask, 5, n=3, radius_mm=(3.0, 4.0), min_separation_mm=2.0)
    assert int(sitk.GetArrayViewFromImage(truth).sum()) == sum(le.n_voxels for le in lesions)
    for a, b in itertools.combinations(lesions, 2):
        gap = np.linalg.norm(np.subtract(a.center_mm, b.center_mm)) - a.radius_mm - b.radius_mm
        assert gap >= 2.0 + 1.5  # separation plus the two half borders


def test_kinds_follow_the_request(phantom) -> None:
    head, mask = phantom
    _, _, lesions = insert_lesions(head, mask, 2, n=6, radius_mm=(3.0, 3.0), min_separation_mm=None)
    assert {le.kind for le in lesions} <= set(LESION_KINDS)
    _, _, lesions = insert_lesions(head, mask, 2, n=2, kinds=("ring",), radius_mm=(3.0, 3.0))
    assert [le.kind for le in lesions] == ["ring", "ring"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"radius_mm": (30.0, 40.0)}, "too small"),
        ({"kinds": ("cyst",)}, "kinds"),
        ({"radius_mm": (5.0, 2.0)}, "radius"),
        ({"n": 40, "radius_mm": (10.0, 12.0)}, "Could not place"),
    ],
)
def test_bad_requests_raise(phantom, arguments: dict, message: str) -> None:
    head, mask = phantom
    with pytest.raises(CeVAEError, match=message):
        insert_lesions(head, mask, 0, **arguments)


def test_mask_on_another_grid_raises(phantom) -> None:
    head, mask = phantom
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(CeVAEError, match="origin"):
        insert_lesions(head, shifted, 0)


@pytest.mark.parametrize("name", ["robex", "colin27"])
def test_real_subject(name: str) -> None:
    if not (HEALTHY / f"{name}_t1.nii.gz").is_file():
        pytest.skip(f"no {name} data at {HEALTHY}")
    head = sitk.ReadImage(str(HEALTHY / f"{name}_t1.nii.gz"))
    mask = sitk.ReadImage(str(HEALTHY / f"{name}_brainmask.nii.gz"))
    lesioned, truth, lesions = insert_lesions(head, mask, 11, n=4)
    brain, inside = sitk.GetArrayViewFromImage(mask) != 0, sitk.GetArrayViewFromImage(truth) != 0
    assert inside.any() and not (inside & ~brain).any()
    assert all(3.0 <= le.radius_mm <= 15.0 and le.n_voxels > 0 for le in lesions)
    original, after = arrays(head, lesioned)
    assert not (original.astype(np.float32) != after)[~brain].any()


def test_strength_blends_the_lesion_partly(phantom) -> None:
    head, mask = phantom
    original = sitk.GetArrayFromImage(head).astype(np.float32)
    full_img, full_gt, _ = insert_lesions(head, mask, 11, n=1, kinds=("hypo",), radius_mm=(6.0, 6.0))
    weak_img, weak_gt, _ = insert_lesions(head, mask, 11, n=1, kinds=("hypo",), radius_mm=(6.0, 6.0),
                                          strength=(0.3, 0.3))
    assert np.array_equal(*arrays(full_gt, weak_gt))  # same lesion, same ground truth
    full_change = sitk.GetArrayFromImage(full_img) - original
    weak_change = sitk.GetArrayFromImage(weak_img) - original
    inside = sitk.GetArrayFromImage(full_gt) > 0
    assert np.allclose(weak_change[inside], 0.3 * full_change[inside], atol=1e-3)
    with pytest.raises(CeVAEError, match="strength"):
        insert_lesions(head, mask, 1, strength=(0.5, 1.5))


def test_midline_lesions_cross_the_mid_sagittal_plane(phantom) -> None:
    from CeVAEAnomalyLib.engine.symmetry import estimate_midplane, plane_distance_mm

    head, mask = phantom
    distance = plane_distance_mm(head, estimate_midplane(head, mask))
    for seed in range(3):
        _, gt, _ = insert_lesions(head, mask, seed, n=1, radius_mm=(5.0, 8.0), sites=("midline",))
        side = distance[sitk.GetArrayViewFromImage(gt) > 0]
        assert side.min() < -1.0 and side.max() > 1.0  # both hemispheres
