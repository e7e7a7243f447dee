"""Preprocessing and its exact inverse onto the input grid."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_head, oblique_direction
from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.engine.preprocess import canonical_axes, invert, mask_array, prepare, to_canonical

GRIDS = {
    "axis-aligned": dict(size=(40, 44, 36), spacing=(1.0, 1.0, 1.0), direction=None),
    "anisotropic-thick-slices": dict(size=(64, 64, 12), spacing=(0.78, 0.78, 6.5), direction=None),
    "oblique-noncubic": dict(size=(50, 38, 30), spacing=(1.2, 0.9, 2.0), direction=oblique_direction(25)),
    "flipped-permuted": dict(size=(30, 48, 40), spacing=(2.0, 1.0, 1.1),
                             direction=(0, 0, -1, 1, 0, 0, 0, -1, 0)),
}


def _physical_z(image):
    """LPS z coordinate of every voxel, as a (k,j,i) array."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    pts = idx @ d.T + np.array(image.GetOrigin())
    return pts[:, 2].reshape(size).transpose(2, 1, 0)


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("size", [64, 128])
def test_inverse_lands_on_the_exact_input_grid(name, size):
    image, mask = make_head(**GRIDS[name])
    brain = mask_array(mask, image)
    stack = prepare(image, brain, PreprocessConfig(input_size=size))
    assert stack.slices.shape[1:] == (size, size) and stack.slices.dtype == np.float32
    ones = torch.ones(len(stack.slices), size, size)
    out = invert(stack.record, ones)
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), brain.astype(np.float32), atol=1e-6)


@pytest.mark.parametrize("name", list(GRIDS))
def test_slices_map_back_to_their_physical_height(name):
    """Give every axial model slice its canonical index: back on the input grid, the values must
    rise with the physical superior coordinate (the slice order is undone correctly)."""
    image, mask = make_head(**GRIDS[name])
    brain = mask_array(mask, image)
    stack = prepare(image, brain, PreprocessConfig())
    maps = torch.from_numpy(stack.record.slice_index.astype(np.float32) + 1)[:, None, None].expand(-1, 64, 64)
    out = sitk.GetArrayFromImage(invert(stack.record, maps.contiguous()))
    z = _physical_z(image)[brain]
    v = out[brain]
    order = np.argsort(z, kind="stable")
    corr = np.corrcoef(z[order], v[order])[0, 1]
    assert corr > 0.95


def test_canonical_axes_for_a_permuted_flipped_direction():
    # i -> -z (S->I), j -> x, k -> -y: numpy axes are (k, j, i)
    perm, flips = canonical_axes(np.array([0, 1, 0, 0, 0, -1, -1, 0, 0]).reshape(3, 3))
    assert perm == (2, 0, 1) and flips == (True, True, False)
    arr = np.arange(24).reshape(2, 3, 4)
    assert to_canonical(arr, perm, flips).shape == (4, 2, 3)


def test_intensities_are_normalised_inside_the_brain_only():
    image, mask = make_head()
    stack = prepare(image, mask_array(mask, image), PreprocessConfig())
    s = stack.slices
    assert s.min() >= 0.0 and s.max() <= PreprocessConfig().clip_max
    assert (s[~stack.brain] == 0).mean() > 0.95  # background and skull removed
    assert 0.2 < np.median(s[stack.brain]) < 1.0


def test_input_is_not_modified():
    image, mask = make_head()
    before = sitk.GetArrayFromImage(image).copy()
    prepare(image, mask_array(mask, image), PreprocessConfig())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)


def test_empty_and_constant_inputs_are_refused():
    image, mask = make_head()
    with pytest.raises(CeVAEError, match="empty"):
        prepare(image, np.zeros(image.GetSize()[::-1], bool), PreprocessConfig())
    flat = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 5.0
    flat.CopyInformation(image)
    with pytest.raises(CeVAEError, match="constant"):
        prepare(flat, mask_array(mask, flat), PreprocessConfig())


@pytest.mark.parametrize("values, said", [
    ((1.0, 1.0), None),
    ((1.0, 3.0), "several values (1 to 3)"),
    ((1.0, np.nan), "several values (1, and NaN in 1 voxel(s), taken as outside the brain)"),
    ((np.nan, np.nan), "several values (1, and NaN in 2 voxel(s), taken as outside the brain)"),
    ((-1.0, 0.5), "several values (-1 to 1)"),
])
def test_a_float_mask_of_several_values_is_described_as_it_is(values, said, caplog):
    image = sitk.Image([6, 6, 6], sitk.sitkFloat32)
    arr = np.zeros((6, 6, 6), np.float32)
    arr[2, 2, 2], arr[3, 3, 3] = values
    arr[2:4, 1, 1] = 1.0
    mask = sitk.GetImageFromArray(arr)
    brain = mask_array(mask, image)
    assert brain.sum() == 2 + sum(v > 0 for v in values)  # NaN and negative values are not brain
    if said is None:
        assert "several values" not in caplog.text
    else:
        assert said in caplog.text
