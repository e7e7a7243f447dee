"""Peak memory of the automatic brain mask: no step holds more copies of a large scan than it needs (a 512x512x300
float32 scan, 300 MB, peaked at 1.97 GB while masked). Peaks are read from Linux's VmHWM, reset before each step."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, SHARED_DATA
from CeVAEAnomalyLib.engine.brainmask import _check_input, _largest_filled_component

CHILD = """
from pathlib import Path
import numpy as np
import SimpleITK as sitk
from CeVAEAnomalyLib.engine import brainmask

def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0

{setup}
try:
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident memory now
except OSError:
    print("no reset")
    raise SystemExit(0)
before = status_mb("VmRSS")
result = {work}
print(status_mb("VmHWM") - before)
"""


def peak_growth_mb(setup: str, work: str) -> float:
    """How far a fresh Python's peak resident memory rises above its resident memory while it evaluates ``work``
    after running ``setup`` (MB). glibc is told to return every block of 1 MB or more as soon as it is freed, so
    memory freed by ``setup`` is not counted as reused."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak memory is read from Linux's /proc")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_TRIM_THRESHOLD_=str(2**20),
               PYTHONPATH=os.pathsep.join([str(REPO / "CeVAEAnomaly"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", CHILD.format(setup=setup, work=work)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    if run.stdout.strip() == "no reset":
        pytest.skip("this kernel does not let a process reset its peak memory")
    return float(run.stdout)


def buffer_address(image: sitk.Image) -> int:
    view = sitk.GetArrayViewFromImage(image)
    return view.__array_interface__["data"][0]


CUBE = """
values = np.ones((256, 256, 256), np.float32)
values[0] = 0.0  # some contrast
image = sitk.GetImageFromArray(values)
del values
image.SetSpacing(({spacing},) * 3)
"""
CUBE_MB = 256**3 * 4 / 2.0**20


def test_a_float32_scan_is_not_copied_to_float32_again():
    """``_check_input`` cast a float32 scan to float32 (ITK copies every voxel: 300 MB held while masking), and
    ``_downsampled`` copied the float32 intensities once more before averaging or smoothing them."""
    values = np.ones((20, 20, 20), np.float32)
    values[0] = 0.0
    image = sitk.GetImageFromArray(values)
    assert buffer_address(_check_input(image)) == buffer_address(image)
    # blocks of 8 voxels: an eighth of the scan, and their smoothing (it was the scan's size and an eighth more)
    assert peak_growth_mb(CUBE.format(spacing=0.5), "brainmask._downsampled(image)") < 0.5 * CUBE_MB
    # 1 mm voxels are smoothed as they are: one float32 copy (it was two)
    assert peak_growth_mb(CUBE.format(spacing=1.0), "brainmask._downsampled(image)") < 1.5 * CUBE_MB


def test_a_scan_in_another_voxel_order_is_masked_in_as_little_memory():
    """The mask is made in LPS voxel order: a scan in another order (colin27 in RAS) was copied into it by
    DICOMOrient, which holds two copies at once, and the copy was held until the mask was done. One flip now copies
    it once, and the copy goes once the intensities have been read, before the template is registered."""
    path = SHARED_DATA / "colin27_t1.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    setup = f"image = sitk.ReadImage({str(path)!r}, sitk.sitkFloat32)\nlps = sitk.DICOMOrient(image, 'LPS')"
    size_mb = 181 * 217 * 181 * 4 / 2.0**20
    ras = peak_growth_mb(setup, "brainmask.compute_brain_mask(image)")
    lps = peak_growth_mb(setup, "brainmask.compute_brain_mask(lps)")
    assert ras - lps < 0.5 * size_mb, (ras, lps)  # it was the scan's size
    assert peak_growth_mb(setup, "brainmask._reordered(image)") < 1.5 * size_mb  # DICOMOrient: twice its size


def whole_grid_largest_filled(mask: sitk.Image) -> sitk.Image:
    """The largest hole-filled component as it was found before, labelling the whole grid."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.Cast(mask, sitk.sitkUInt8)), sortByObjectSize=True)
    return sitk.Cast(sitk.BinaryFillhole(components == 1), sitk.sitkUInt8)


def test_the_largest_component_is_labelled_within_the_mask_s_box():
    """The whole grid was labelled twice in 32 bits (ConnectedComponent, then RelabelComponent: 600 MB at once for a
    512x512x300 scan); now only the mask's bounding box is, with the same component, holes and ties as before."""
    rng = np.random.default_rng(7)
    for edge, noise in ((0, 0.25), (4, 0.25), (4, 0.0)):  # the mask reaching the image's border or not
        values = np.zeros((40, 46, 52), np.uint8)
        inner = values[edge:40 - edge, edge:46 - edge, edge:52 - edge]
        inner[...] = rng.random(inner.shape) < noise  # many small components
        inner[2:14, 2:14, 2:14] = 1
        inner[5:11, 5:11, 5:11] = 0  # a hole: filled
        inner[16:28, 16:28, 0:12] = 1
        inner[19:25, 19:25, 0:9] = 0  # a pit open at the box's face: not a hole
        inner[16:28, 0:12, 30:42] = 1
        inner[19:25, 3:9, 33:39] = 0  # as big as the first: without noise a tie, which the first in raster order wins
        mask = sitk.GetImageFromArray(values)
        mask.SetSpacing((0.7, 1.1, 1.3))
        mask.SetOrigin((3.0, -4.0, 5.0))
        mask.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        largest, reference = _largest_filled_component(mask), whole_grid_largest_filled(mask)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(largest), sitk.GetArrayViewFromImage(reference))
        assert (largest.GetPixelID(), largest.GetSize(), largest.GetOrigin(), largest.GetSpacing(),
                largest.GetDirection()) == (sitk.sitkUInt8, mask.GetSize(), mask.GetOrigin(), mask.GetSpacing(),
                                            mask.GetDirection())
    empty = _largest_filled_component(sitk.Image([5, 6, 7], sitk.sitkUInt8))
    assert empty.GetSize() == (5, 6, 7) and not sitk.GetArrayViewFromImage(empty).any()
    ball = """
k, j, i = np.ogrid[:256, :256, :256]
values = (((k - 128) ** 2 + (j - 120) ** 2 + (i - 130) ** 2) < 70 ** 2).astype(np.uint8)
values[120:130, 120:130, 120:130] = 0
mask = sitk.GetImageFromArray(values)
del values, k, j, i
"""
    size_mb = 256**3 / 2.0**20  # the mask's bytes; a brain's box is about a third of a scan's grid, this one's a sixth
    assert peak_growth_mb(ball, "brainmask._largest_filled_component(mask)") < 4 * size_mb  # it was over 9 times
