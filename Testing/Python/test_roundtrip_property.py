"""Property-based tests of the preprocessing round trip: volume -> model slices -> input grid.

Random sizes, spacings, origins, directions (signed axis permutations, oblique rotations and
left-handed grids), dtypes, brain shapes (touching the border, scattered voxels) and slicing
orientations. The inverse must land on the input's exact grid, reproduce the brain mask, and
put every slice's values back at the right physical height.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.engine.axes import ORIENTATIONS
from CeVAEAnomalyLib.engine.preprocess import invert, prepare
from hypothesis import given, settings
from hypothesis import strategies as st

CFG = PreprocessConfig(input_size=64)
DTYPES = (np.uint8, np.int16, np.uint16, np.float32, np.float64)
SETTINGS = settings(max_examples=40, deadline=None)


@dataclass
class Volume:
    image: sitk.Image
    brain: np.ndarray  # bool, (k, j, i)

    @property
    def direction(self) -> np.ndarray:
        return np.array(self.image.GetDirection()).reshape(3, 3)


def rotation(q) -> np.ndarray:
    """The rotation matrix of a (not necessarily unit) quaternion."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


@st.composite
def directions(draw) -> np.ndarray:
    """A signed permutation of the axes (flips included) or an oblique rotation, possibly mirrored."""
    if draw(st.booleans()):
        perm = draw(st.permutations(range(3)))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        m = np.zeros((3, 3))
        for image_axis, physical_axis in enumerate(perm):
            m[physical_axis, image_axis] = signs[image_axis]
        return m
    q = draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda v: np.linalg.norm(v) > 0.2))
    m = rotation(q)
    return m @ np.diag([1.0, 1.0, -1.0]) if draw(st.booleans()) else m


@st.composite
def volumes(draw) -> Volume:
    size = draw(st.tuples(*[st.integers(5, 20)] * 3))
    spacing = draw(st.tuples(*[st.floats(0.3, 5.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-200.0, 200.0)] * 3))
    direction = draw(directions())
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = size[::-1]
    grid = np.indices(shape)
    centre = rng.uniform(0, shape)
    radii = rng.uniform(1.0, np.array(shape) / 1.5)
    brain = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0  # may cross the border
    brain |= rng.random(shape) < 0.01  # scattered voxels far from the rest
    brain.flat[rng.integers(0, brain.size, 2)] = True
    values = rng.integers(0, 200, shape).astype(np.float64)
    if np.dtype(dtype).kind == "f":
        values += rng.random(shape)
    inside = np.flatnonzero(brain)
    values.flat[inside[0]], values.flat[inside[-1]] = 0, 199  # never constant inside the brain
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(direction.ravel()))
    return Volume(image, brain)


orientations = st.sampled_from(sorted(ORIENTATIONS))


@SETTINGS
@given(volumes(), orientations)
def test_ones_invert_to_the_brain_mask_on_the_exact_grid(vol, orientation):
    before = sitk.GetArrayFromImage(vol.image)
    stack = prepare(vol.image, vol.brain, CFG, orientation)
    assert stack.slices.dtype == np.float32 and np.isfinite(stack.slices).all()
    assert stack.slices.min() >= 0 and stack.slices.max() <= CFG.clip_max

    out = invert(stack.record, torch.ones(len(stack.slices), 64, 64))

    assert out.GetPixelID() == sitk.sitkFloat32
    assert out.GetSize() == vol.image.GetSize()
    assert out.GetSpacing() == vol.image.GetSpacing()
    assert out.GetOrigin() == vol.image.GetOrigin()
    assert out.GetDirection() == vol.image.GetDirection()
    back = sitk.GetArrayFromImage(out)
    assert (back[~vol.brain] == 0).all()
    np.testing.assert_allclose(back[vol.brain], 1.0, atol=1e-6)  # bilinear resizing of 1 may round by 1 ulp
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), before)  # the input is untouched


@SETTINGS
@given(volumes(), orientations)
def test_slice_values_return_to_their_physical_height(vol, orientation):
    """Give each model slice its canonical index. Back on the input grid, the values must change
    along exactly one image axis, by one per voxel, rising with the physical coordinate of the
    orientation's slicing axis (z for axial, y for coronal, x for sagittal)."""
    stack = prepare(vol.image, vol.brain, CFG, orientation)
    index = torch.from_numpy(stack.record.slice_index.astype(np.float32))
    back = sitk.GetArrayFromImage(invert(stack.record, index[:, None, None].expand(-1, 64, 64).contiguous()))
    values = back[vol.brain]
    np.testing.assert_allclose(values, np.round(values), atol=1e-4)
    back = np.round(back)

    physical = ORIENTATIONS[orientation][0]
    changing = []
    for np_axis in range(3):
        a = np.moveaxis(back, np_axis, 0)
        b = np.moveaxis(vol.brain, np_axis, 0)
        both = b[1:] & b[:-1]  # neighbours along this axis, both in the brain
        steps = (a[1:] - a[:-1])[both]
        if steps.size and (steps != 0).any():
            changing.append(np_axis)
            ijk = 2 - np_axis
            rise = np.sign(vol.direction[physical, ijk])  # physical coordinate change per index step
            assert rise != 0
            np.testing.assert_array_equal(steps, np.full(steps.shape, rise))
    assert len(changing) <= 1, f"slice values vary along several image axes {changing}"

    axis_ijk, idx = stack.record.input_slice_axis()
    if changing:
        assert axis_ijk == 2 - changing[0]
    plane = np.moveaxis(back, 2 - axis_ijk, 0)
    plane_brain = np.moveaxis(vol.brain, 2 - axis_ijk, 0)
    for n, i in enumerate(idx):  # the slice-score CSV rows name the right input slices
        np.testing.assert_array_equal(plane[i][plane_brain[i]], stack.record.slice_index[n])
