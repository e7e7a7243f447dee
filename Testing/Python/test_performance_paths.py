"""The fast paths give the results of the plain ones: cropped post-processing, the median only where
it is kept, one-pass float NIfTI reading, matrix blurs; mixed precision stays close to fp32; scoring
keeps its tensors on the model's device and repeats only the decoder for MC samples."""
import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import make_head, oblique_direction
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_T1, default_template_dir
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig, PreprocessConfig
from CeVAEAnomalyLib.training.augment import _smooth_field
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.engine.model import CeVAE
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.options import PostprocessOptions, ThresholdPolicy
from CeVAEAnomalyLib.engine.postprocess import (_erode_ball, components, refine_scores,
                                         threshold_labelmap)
from CeVAEAnomalyLib.engine.preprocess import brain_region, invert, invert_region, mask_array, prepare
from CeVAEAnomalyLib.engine.scoring import gaussian_blur, score_slices
from CeVAEAnomalyLib.options import ScoreOptions


def _oblique_head():
    return make_head(size=(48, 52, 40), spacing=(1.2, 0.9, 1.5), direction=oblique_direction(130.0), seed=5)


def _slices():
    torch.manual_seed(0)
    x = torch.rand(5, 64, 64)
    brain = torch.zeros(5, 64, 64, dtype=torch.bool)
    brain[:, 8:56, 10:54] = True
    return x, brain


def _small_model():
    torch.manual_seed(0)
    return CeVAE(ModelConfig(channels=(8, 16, 16, 32), z_dim=16)).eval()


@pytest.mark.parametrize("post", [PostprocessOptions(min_volume_mm3=20.0),
                                  PostprocessOptions(rim_mm=3.0, median_radius=1, min_volume_mm3=5.0),
                                  PostprocessOptions(median_radius=2)])
def test_detect_crops_post_processing_without_changing_results(tiny_bundle, post):
    """detect maps back and post-processes only around the brain; the result equals doing it on the whole
    volume (same voxels, same grid, same components)."""
    image, mask = _oblique_head()
    bundle = load_bundle(tiny_bundle)
    opts = ScoreOptions()
    probe = Detector(bundle, opts, post, ThresholdPolicy(threshold=float("inf")))(image, mask)
    brain = sitk.GetArrayViewFromImage(probe.brain_mask) > 0
    thr = float(np.percentile(sitk.GetArrayViewFromImage(probe.score)[brain], 98))
    assert thr > 0
    result = Detector(bundle, opts, post, ThresholdPolicy(threshold=thr))(image, mask)

    stack = prepare(image, mask_array(mask, image), bundle.preprocess)
    maps, _ = score_slices(bundle.model, torch.from_numpy(stack.slices), torch.from_numpy(stack.brain), opts)
    brain_img = sitk.Cast(mask > 0, sitk.sitkUInt8)
    score = _itk_refine(invert(stack.record, maps), brain_img, post)
    labelmap = _itk_threshold(score, thr, post.min_volume_mm3)
    expected = components(labelmap, score)

    for got, want in ((result.score, score), (result.labelmap, labelmap), (result.brain_mask, brain_img)):
        assert got.GetSize() == want.GetSize() and got.GetPixelID() == want.GetPixelID()
        assert (got.GetOrigin(), got.GetSpacing(), got.GetDirection()) == (
            want.GetOrigin(), want.GetSpacing(), want.GetDirection())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    assert len(expected) > 0 and len(result.components) == len(expected)
    for got, want in zip(result.components, expected):
        assert (got.label, got.voxels, got.max_score) == (want.label, want.voxels, want.max_score)
        assert got.mean_score == pytest.approx(want.mean_score, rel=1e-6)
        assert got.centroid_lps == pytest.approx(want.centroid_lps, abs=1e-9)


def _itk_threshold(score, threshold, min_volume_mm3):
    """threshold_labelmap written with ITK's filters, as it was."""
    label = sitk.Cast(sitk.BinaryThreshold(score, threshold, float("inf"), 1, 0), sitk.sitkUInt8)
    if min_volume_mm3 > 0:
        min_voxels = int(np.ceil(min_volume_mm3 / float(np.prod(score.GetSpacing()))))
        label = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(label, True), minimumObjectSize=min_voxels) > 0,
                          sitk.sitkUInt8)
    return label


@pytest.mark.parametrize("min_volume", [0.0, 3.0, 40.0])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.1, 1.6)])
def test_threshold_labelmap_equals_itk(min_volume, spacing):
    """The numpy threshold (in the score's precision) and size filter equal ITK's BinaryThreshold and
    RelabelComponent, at a threshold that float32 rounds (voxels equal to it count as above)."""
    rng = np.random.default_rng(3)
    arr = rng.random((20, 22, 18)).astype(np.float32)
    thr = float(np.float32(0.8)) + 1e-9  # rounds to the float32 0.8 in ITK's float comparison
    arr[5, 5, 5] = np.float32(0.8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    got = threshold_labelmap(arr, spacing, thr, min_volume)
    want = sitk.GetArrayFromImage(_itk_threshold(img, thr, min_volume))
    assert got.dtype == np.uint8 and want.any() and (min_volume == 0 or not want.all())
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threshold, flagged", [(0.95, True), (2.0, False)])
def test_nothing_flagged_takes_no_component_passes(monkeypatch, threshold, flagged):
    """A scan with no voxel above the threshold (most scans) gets its empty labelmap and no components without
    ITK's connected-component and relabelling passes over the brain's box (a fifth of a second on a 256^3 head at
    one thread); a scan with flagged voxels gets them, and the labelmap of the plain ITK filters."""
    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1), sitk.sitkFloat32)  # a real head's values
    arr = sitk.GetArrayFromImage(head) / float(sitk.GetArrayViewFromImage(head).max())
    score = sitk.GetImageFromArray(arr)
    score.CopyInformation(head)
    want = sitk.GetArrayFromImage(_itk_threshold(score, threshold, 50.0))  # (before the passes are counted)
    passes = []
    for name in ("ConnectedComponent", "RelabelComponent"):
        monkeypatch.setattr(sitk, name, lambda *args, _itk=getattr(sitk, name), _name=name:
                            passes.append(_name) or _itk(*args))
    label = threshold_labelmap(arr, head.GetSpacing(), threshold, 50.0)
    labelmap = sitk.GetImageFromArray(label)
    labelmap.CopyInformation(head)
    found = components(labelmap, score)
    assert bool(passes) == flagged and bool(found) == flagged == bool(want.any())
    np.testing.assert_array_equal(label, want)


def _itk_refine(score, brain, post):
    """refine_scores written with ITK's filters over the whole volume (a rim under half a voxel masks with the
    brain: it left the median unmasked, so scores outside the brain were not 0)."""
    out = sitk.Median(score, [post.median_radius] * 3) if post.median_radius > 0 else score
    if post.rim_mm > 0:
        radius = [max(0, int(round(post.rim_mm / s))) for s in brain.GetSpacing()]
        out = sitk.Mask(out, sitk.BinaryErode(brain, radius, sitk.sitkBall, 0, 1) if any(radius) else brain)
    elif post.median_radius > 0:
        out = sitk.Mask(out, brain)
    return out


@pytest.mark.parametrize("post", [PostprocessOptions(median_radius=1), PostprocessOptions(median_radius=2, rim_mm=2.0),
                                  PostprocessOptions(median_radius=1, rim_mm=0.2), PostprocessOptions(rim_mm=2.0),
                                  PostprocessOptions(rim_mm=3.0, median_radius=1)])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.8, 1.1, 1.6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_refine_scores_equals_itk_median_and_mask(post, spacing, seed):
    """The median computed only where the mask keeps it, and the erosion as a distance test, equal ITK's
    filters, borders included (the brain touches the array's faces; a rim thinner than half a voxel keeps the
    brain; anisotropic radii go to ITK)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(9, 24, 3))
    values, inside = rng.random(shape).astype(np.float32), rng.random(shape) > 0.3
    score = sitk.GetImageFromArray(values)
    score.SetSpacing(spacing)
    brain = sitk.GetImageFromArray(inside.astype(np.uint8))
    brain.CopyInformation(score)
    got, want = refine_scores(values, inside, spacing, post), sitk.GetArrayFromImage(_itk_refine(score, brain, post))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_ball_erosion_equals_itk(radius):
    """Blobs with holes, touching the faces."""
    rng = np.random.default_rng(radius)
    brain = rng.random((30, 34, 28)) > 0.15
    brain[5:25, 6:28, 4:24] = True
    got = _erode_ball(brain, [radius] * 3)
    want = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), [radius] * 3,
                                                   sitk.sitkBall, 0, 1)) > 0
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("radius", [[7, 7, 5], [2, 3, 4], [5, 1, 0], [12, 9, 1], [0, 3, 3]])
def test_anisotropic_ball_erosion_equals_itk_without_its_kernel(radius, monkeypatch):
    """A 3 mm rim on 0.45 x 0.45 x 0.6 mm voxels is radius (7, 7, 5): the erosion is the weighted distance test, not
    ITK's kernel (2.7 s against 1.0 s on that scan's brain box), and equals ITK's ball erosion (borders, holes, a
    zero radius along an axis, a sum beyond uint16)."""
    rng = np.random.default_rng(sum(radius))
    brain = rng.random((34, 40, 44)) > 0.1
    brain[4:30, 5:35, 6:40] = True
    brain[15:17, 14:19, 20:22] = False  # a hole
    want = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), radius,
                                                   sitk.sitkBall, 0, 1)) > 0
    monkeypatch.setattr(sitk, "BinaryErode", lambda *a, **k: pytest.fail("ITK's ball kernel was used"))
    got = _erode_ball(brain, radius)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


def test_a_rim_of_many_voxels_erodes_by_distance_in_the_images_memory():
    """A 3 mm rim on voxels of 0.01 mm asked ITK for a ball kernel of 601^3 offsets ("std::bad_alloc"); beyond 15
    voxels the erosion is a distance map, which matches ITK's ball where ITK can still build one."""
    brain = np.zeros((70, 72, 74), bool)
    brain[2:68, 3:69, 2:72] = True
    brain[12:15, 30:33, 20:23] = False  # a hole
    for radius in ([16, 16, 16], [18, 17, 16], [16, 16, 4], [20, 20, 0]):
        got = _erode_ball(brain, radius)
        want = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), radius,
                                                       sitk.sitkBall, 0, 1)) > 0
        assert want.any() and not want.all()
        np.testing.assert_array_equal(got, want)
    huge = _erode_ball(brain, [300, 300, 300])  # as 3 mm on 0.01 mm voxels: no voxel is that deep in this brain
    assert not huge.any()
    assert _erode_ball(np.ones((5, 6, 7), bool), [300] * 3).all()  # no non-brain voxel: nothing to erode from


def test_brain_region_is_the_padded_bounding_box():
    brain = np.zeros((20, 30, 40), bool)
    brain[5:9, 0:12, 30:33] = True
    assert brain_region(brain) == (slice(5, 9), slice(0, 12), slice(30, 33))
    assert brain_region(brain, pad=3) == (slice(2, 12), slice(0, 15), slice(27, 36))  # clipped to the array


def test_invert_region_is_the_matching_part_of_the_full_inverse():
    image, mask = _oblique_head()
    brain = mask_array(mask, image)
    stack = prepare(image, brain, PreprocessConfig())
    maps = torch.rand(len(stack.slices), 64, 64)
    full = sitk.GetArrayFromImage(invert(stack.record, maps))
    region = brain_region(brain, pad=2)
    assert all(r.start > 0 and r.stop < n for r, n in zip(region, brain.shape))  # a real crop on every axis
    np.testing.assert_array_equal(invert_region(stack.record, maps, region), full[region])
    outside = np.ones(full.shape, bool)
    outside[region] = False
    assert (full[outside] == 0).all() and (full[region] > 0).sum() == brain.sum()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_nifti_read_in_one_pass_matches_itk(tmp_path, suffix, dtype):
    image, _ = make_head(size=(20, 24, 18), direction=oblique_direction(40.0), dtype=dtype)
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(image, str(path))
    mine, itk = read_image(path), sitk.ReadImage(str(path))
    assert mine.GetPixelID() == itk.GetPixelID()
    assert (mine.GetOrigin(), mine.GetSpacing(), mine.GetDirection()) == (
        itk.GetOrigin(), itk.GetSpacing(), itk.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(itk))


def test_float_nifti_in_several_gzip_members(tmp_path):
    image, _ = make_head(size=(20, 24, 18))
    raw = tmp_path / "v.nii"
    sitk.WriteImage(image, str(raw))
    data = raw.read_bytes()
    cut = len(data) // 3
    (tmp_path / "v.nii.gz").write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "v.nii.gz")),
                                  sitk.GetArrayFromImage(image))


def test_scaled_float_nifti_is_read_by_itk(tmp_path):
    """Intensity scaling (scl_slope) is left to ITK, which applies it."""
    image, _ = make_head(size=(20, 24, 18))
    path = tmp_path / "v.nii"
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    data[112:116] = struct.pack("<f", 2.0)  # scl_slope
    path.write_bytes(bytes(data))
    got = sitk.GetArrayFromImage(read_image(path))
    np.testing.assert_allclose(got, 2.0 * sitk.GetArrayFromImage(image), rtol=1e-6)
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def _padded_conv_blur(maps, sigma):
    """The blur written as reflect padding + convolution, as it was before the matrix form."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).float()
    pad = min(radius, maps.shape[-1] - 1)
    k = k[radius - pad : radius + pad + 1]
    out = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))


@pytest.mark.parametrize("sigma", [0.7, 3.0, 30.0])
def test_matrix_blur_equals_padded_convolution(sigma):
    maps = torch.rand(6, 1, 64, 64)
    np.testing.assert_allclose(gaussian_blur(maps, sigma), _padded_conv_blur(maps, sigma), atol=2e-6)


def test_smooth_field_equals_bicubic_interpolation():
    coarse = torch.rand(4, 2, 5, 5) * 2 - 1
    expected = F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=True)
    np.testing.assert_allclose(_smooth_field(coarse, 64), expected, atol=1e-5)


@pytest.mark.parametrize("opts", [ScoreOptions(), ScoreOptions(score_type="rec"), ScoreOptions(mc_samples=3),
                                  ScoreOptions(grad_target="elbo")])
def test_amp_maps_close_to_fp32(opts):
    """bf16 autocast on the CPU: maps within a few percent of fp32, slice scores closer still."""
    model = _small_model()
    x, brain = _slices()
    torch.manual_seed(1)
    full, s_full = score_slices(model, x, brain, opts)
    torch.manual_seed(1)
    half, s_half = score_slices(model, x, brain, opts, amp=True)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() <= 0.08 * full.abs().max()
    assert torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1] > 0.999
    np.testing.assert_allclose(s_half.kl, s_full.kl, atol=1e-3)
    np.testing.assert_allclose(s_half.rec, s_full.rec, rtol=0.02)


@pytest.mark.parametrize("opts", [ScoreOptions(), ScoreOptions(score_type="rec", rec_sigma=1.0),
                                  ScoreOptions(mc_samples=2, grad_target="elbo", grad_norm="slice"),
                                  ScoreOptions(combi="attribution")])
def test_scoring_keeps_tensors_on_the_model_device(opts):
    """On the meta device any operand left on the CPU raises; the maps and slice scores stay there."""
    x, brain = _slices()
    maps, slices = score_slices(_small_model().to("meta"), x, brain, opts, batch_size=2)
    assert maps.device.type == "meta" and maps.shape == (5, 64, 64)
    assert {t.device.type for t in (slices.kl, slices.rec, slices.neg_elbo)} == {"meta"}


def test_mc_sampling_repeats_only_the_decoder(monkeypatch):
    """N samples: one encoding and one KL gradient per batch, N decodings (none of the mean)."""
    model = _small_model()
    x, brain = _slices()
    calls = {"encode": 0, "decode": 0, "grad": 0}
    for name in ("encode", "decode"):
        original = getattr(model, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(model, name, counted)
    grad = torch.autograd.grad

    def counted_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    score_slices(model, x, brain, ScoreOptions(mc_samples=4), batch_size=3)  # 2 batches
    assert calls == {"encode": 2, "grad": 2, "decode": 8}
