"""detect() and Detector take what the command line takes, refuse the rest with one line, and never crash."""
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector, checked_image, detect
from CeVAEAnomalyLib.engine.devices import resolve_device
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DetectionRequest, ThresholdPolicy
from conftest import as_hounsfield, make_head


def _score(result):
    return sitk.GetArrayFromImage(result.score)


def _like(arr, ref):
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(ref)
    return image


def test_huge_float64_intensities_score_as_the_unscaled_image(tiny_bundle):
    """Normalisation is scale-invariant; float64 values beyond float32's range became an all-NaN map."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5, dtype=np.float64)
    huge = _like(sitk.GetArrayFromImage(image) * 1e300, image)
    plain, scaled = detect(image, bundle, mask, threshold=1.0), detect(huge, bundle, mask, threshold=1.0)
    assert np.isfinite(_score(scaled)).all()
    np.testing.assert_allclose(_score(scaled), _score(plain), atol=1e-4)


def test_intensities_spanning_more_than_floating_point_are_refused(tiny_bundle):
    image, mask = make_head(seed=5, dtype=np.float64)
    rng = np.random.default_rng(0)
    arr = np.where(rng.random(sitk.GetArrayFromImage(image).shape) < 0.5, -1.7e308, 1.7e308)
    arr.flat[0] = 0.0  # a third value: an image of two is refused as a mask
    with pytest.raises(CeVAEError, match="span more than floating point holds"):
        detect(_like(arr, image), load_bundle(tiny_bundle), mask, threshold=1.0)


def test_a_labelmap_typed_mask_or_image_does_not_abort_the_interpreter():
    """A SimpleITK LabelMap (sitk.LabelImageToLabelMap) has no array view: viewing it killed the process."""
    code = (
        "import numpy as np, SimpleITK as sitk\n"
        "from CeVAEAnomalyLib.engine.preprocess import mask_array\n"
        "from CeVAEAnomalyLib.engine.detector import checked_image\n"
        "arr = np.zeros((20, 20, 20), np.uint8); arr[5:15, 5:15, 5:15] = 1 + np.arange(1000).reshape(10, 10, 10) % 50\n"
        # 50 labels: a label image of a few is refused as the scan, before it is scored
        "mask = sitk.GetImageFromArray(arr); image = sitk.Cast(mask, sitk.sitkFloat32)\n"
        "lm = sitk.LabelImageToLabelMap(mask)\n"
        "assert np.array_equal(mask_array(lm, image), arr > 0)\n"
        "assert checked_image(lm, None, 'T1').GetPixelID() == sitk.sitkUInt8\n"
        "try:\n    checked_image(lm, lm, 'T1')\n"  # (viewed, and told to be the same voxels)
        "except Exception as e:\n    assert 'is the image itself' in str(e), e\n"
        "else:\n    raise AssertionError('the mask is the image')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("make, message", [
    (lambda im: sitk.JoinSeries([im, im]), "is 4D"),
    (lambda im: sitk.RealAndImaginaryToComplex(im, im), "complex-valued"),
    (lambda im: sitk.Compose(im, im), "2 components per voxel"),
    (lambda im: im[:, :, 10:13], "only 3 voxels along one axis"),
    (lambda im: im[:, :, 10:11], "single slice"),
    (lambda im: im[10:15, 10:15, 10:15], "too small to analyse"),
])
def test_the_api_refuses_what_the_command_line_refuses(tiny_bundle, make, message):
    bundle = load_bundle(tiny_bundle)
    image, _ = make_head(seed=5)
    for call in (lambda im: detect(im, bundle, threshold=1.0), lambda im: Detector(bundle)(im)):
        with pytest.raises(CeVAEError, match=message):
            call(make(image))


def test_a_4d_image_holding_one_volume_is_scored_as_that_volume(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    result = detect(sitk.JoinSeries([image]), bundle, mask, threshold=1.0)
    assert result.score.GetDimension() == 3
    np.testing.assert_array_equal(_score(result), _score(detect(image, bundle, mask, threshold=1.0)))
    # so is a mask (the command line took it; the API refused it as "not a single-channel 3D image")
    np.testing.assert_array_equal(_score(detect(image, bundle, sitk.JoinSeries([mask]), threshold=1.0)),
                                  _score(result))


def test_load_bundle_takes_the_device_names_of_every_entry_point(tiny_bundle, caplog):
    auto = load_bundle(tiny_bundle, "auto")
    assert next(auto.model.parameters()).device.type == resolve_device("auto").type
    with pytest.raises(CeVAEError, match="Unknown device 'tpu'"):
        load_bundle(tiny_bundle, "tpu")
    expected = resolve_device("cuda")  # the CPU where CUDA is missing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cuda = load_bundle(tiny_bundle, "cuda")
    assert next(cuda.model.parameters()).device.type == expected.type
    assert expected.type == "cuda" or "CUDA was requested but is not available" in caplog.text


def test_detect_runs_where_the_request_says(tiny_bundle, caplog):
    """detect(..., device=...) was ignored: the model stayed where it was loaded, with no word."""
    bundle = load_bundle(tiny_bundle, "cpu")
    image, mask = make_head(seed=5)
    expected = resolve_device("cuda")  # the CPU where CUDA is missing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detect(image, bundle, mask, threshold=1.0, device="cuda")
    assert next(bundle.model.parameters()).device.type == expected.type
    assert expected.type == "cuda" or "CUDA was requested but is not available" in caplog.text
    detect(image, bundle, mask, threshold=1.0, device="cpu")
    assert next(bundle.model.parameters()).device.type == "cpu"


def test_detect_takes_the_model_as_any_path_like_object(tiny_bundle):
    """A path object of another library (os.PathLike, not pathlib's) was refused as "must be a Bundle"."""

    class Where:  # e.g. a path type of a data-management library
        def __fspath__(self) -> str:
            return str(tiny_bundle)

    image, mask = make_head(seed=5)
    result = detect(image, Where(), mask, threshold=1.0, device="cpu")
    assert result.threshold == 1.0


def test_a_ct_like_range_is_warned_of_on_every_path(tiny_bundle, caplog):
    """The command line warned of Hounsfield-like intensities; detect() (and so batch and Slicer) did not."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    ct = as_hounsfield(image)
    with caplog.at_level(logging.WARNING):
        detect(ct, bundle, mask, threshold=1.0)
    assert "like a CT in Hounsfield units" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detect(image, bundle, mask, threshold=1.0)
    assert "Hounsfield" not in caplog.text


def test_the_ct_like_warning_names_the_models_own_modality(tiny_bundle, caplog):
    """A model recorded as modality "other" (trained on scans that are no T1's) was said to be "for T1 MRI", and the
    user told to give a T1-weighted MRI, which such a model does not score meaningfully either."""
    import dataclasses

    bundle = load_bundle(tiny_bundle)
    assert bundle.header.modality == "T1"
    other = dataclasses.replace(bundle, header=dataclasses.replace(bundle.header, modality="other"))
    image, mask = make_head(seed=5)
    said = {}
    for name, model in (("T1", bundle), ("other", other)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            detect(as_hounsfield(image), model, mask, threshold=1.0)
        said[name] = next(r.getMessage() for r in caplog.records if "Hounsfield" in r.getMessage())
    assert said["T1"].endswith("; this model is for T1 MRI and its scores will not be meaningful: give a T1-weighted "
                               "MRI of the head.")
    assert said["other"].endswith("; this model's modality is 'other': its scores are meaningful only on scans like "
                                  "its training volumes (on a CT only if it was trained on CTs): give a scan of its "
                                  "modality.")
    assert "T1" not in said["other"]


def test_paper_is_taken_with_other_keyword_options(tiny_bundle):
    """detect(..., paper=True, threshold=...) raised TypeError (paper given twice inside with_options)."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    by_keyword = detect(image, bundle, mask, paper=True, threshold=1.0)
    by_request = detect(image, bundle, mask, request=DetectionRequest.of(paper=True, threshold=1.0))
    np.testing.assert_array_equal(_score(by_keyword), _score(by_request))


def test_wrong_argument_types_get_one_line_errors(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    cases = [
        (lambda: detect(sitk.GetArrayFromImage(image), bundle, mask), "The image must be a SimpleITK Image, got a NumPy array"),
        (lambda: detect(image, bundle, sitk.GetArrayFromImage(mask)), "The mask must be a SimpleITK Image, got a NumPy array"),
        (lambda: Detector(bundle)(None, mask), "The image must be a SimpleITK Image.*NoneType"),
        (lambda: detect(image, 3, mask), "The bundle must be a Bundle.*got int"),
        (lambda: detect(image, bundle, mask, request=["rec"]),
         "The request must be a DetectionRequest or its dict form, not a list"),
    ]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_a_bundle_path_and_a_request_dict_are_accepted(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    request = DetectionRequest.of(score_type="rec", threshold=1.0)
    expected = _score(detect(image, bundle, mask, request))
    for model in (tiny_bundle, str(tiny_bundle)):
        np.testing.assert_array_equal(_score(detect(image, model, mask, request.to_dict())), expected)


def test_the_automatic_brain_mask_of_huge_float64_intensities_is_that_of_the_unscaled_image():
    """The float32 cast made them infinite: the image was refused as constant."""
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.engine.brainmask import compute_brain_mask

    image = sitk.Cast(sitk.ReadImage(str(template_dir() / "colin27_t1_2mm.nii.gz")), sitk.sitkFloat64)
    huge = _like(sitk.GetArrayFromImage(image) * 1e300, image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a NumPy overflow warning on the way
        masked = compute_brain_mask(huge)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masked), sitk.GetArrayFromImage(compute_brain_mask(image)))


def test_the_detector_refuses_wrong_argument_types_in_one_line(tiny_bundle):
    """Detector(path) or Detector(bundle, score={...}) raised AttributeError or TypeError deep inside."""
    from CeVAEAnomalyLib.options import ThresholdPolicy

    bundle = load_bundle(tiny_bundle)
    cases = [
        (lambda: Detector(str(tiny_bundle)), r"The bundle must be a Bundle \(from load_bundle\).*got str"),
        (lambda: Detector(bundle, {"score_type": "rec"}), "score must be a ScoreOptions.*got dict"),
        (lambda: Detector(bundle, post="rim_mm=2"), "post must be a PostprocessOptions.*got str"),
        (lambda: Detector(bundle, policy={"fpr": 0.01}), "policy must be a ThresholdPolicy.*got dict"),
    ]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert Detector(bundle, None, None, ThresholdPolicy(threshold=1.0)).threshold == 1.0


def test_readers_refuse_what_is_no_path_in_one_line(tiny_bundle):
    """read_image(image) and load_bundle(3) raised TypeError ('expected str, bytes or os.PathLike object')."""
    from CeVAEAnomalyLib.engine.bundle import read_header
    from CeVAEAnomalyLib.io.images import read_image

    image, _ = make_head(seed=5)
    cases = [(lambda: read_image(image), "The image must be a file path .*, got Image"),
             (lambda: read_image(None, "brain mask"), "The brain mask must be a file path .*, got NoneType"),
             (lambda: load_bundle(3), "The model bundle must be a file path, got int"),
             (lambda: read_header(b"m.cevae"), "The model bundle must be a file path, got bytes")]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message):
            call()


def test_a_direction_matrix_that_scales_the_voxel_axes_is_refused(tiny_bundle, tmp_path):
    """A MetaImage whose TransformMatrix scales an axis (2 0 0 ...) is read with that direction: ITK multiplies it
    into the voxel size, so flagged_ml and every component's volume were half the flagged tissue's."""
    from CeVAEAnomalyLib.io.images import read_image

    image, mask = make_head(seed=5, direction=(2, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "scaled.mha"))
    with pytest.raises(CeVAEError, match=r"direction matrix scales voxel axis i by 2"):
        read_image(tmp_path / "scaled.mha")
    with pytest.raises(CeVAEError, match=r"direction matrix scales voxel axis i by 2"):
        detect(image, load_bundle(tiny_bundle), mask, threshold=1.0)
    rotated, _ = make_head(seed=5, direction=(0, -1, 0, 1, 0, 0, 0, 0, -1))  # a rotation is no scaling
    assert read_image(_written(rotated, tmp_path / "rotated.mha")).GetDirection() == rotated.GetDirection()


def _written(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_detector_from_request_takes_what_detect_takes_as_a_request(tiny_bundle):
    """Detector.from_request(bundle, {...}) or (bundle, None) raised AttributeError ('dict' object has no attribute
    'checked_options'), and from_request(path, request) AttributeError on .header; detect() takes the first two."""
    bundle = load_bundle(tiny_bundle)
    request = DetectionRequest.of(score_type="rec", threshold=1.0)
    made = Detector.from_request(bundle, request.to_dict())
    assert (made.score.score_type, made.threshold) == ("rec", 1.0)
    assert Detector.from_request(bundle, None).score == bundle.header.score_options
    cases = [(lambda: Detector.from_request(bundle, ["rec"]), "The request must be a DetectionRequest or its dict"),
             (lambda: Detector.from_request(bundle, {"fpr": 0.01}), r"give them by name \(fpr=0.01\)"),
             (lambda: Detector.from_request(str(tiny_bundle), request), r"The bundle must be a Bundle.*got str")]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message):
            call()


def test_an_array_for_an_image_is_told_how_to_make_one_with_its_voxel_size(tiny_bundle):
    """A NumPy array was told to pass e.g. read_image(path): no help to a researcher holding an array, and silent
    about the voxel size that sitk.GetImageFromArray alone sets to 1 mm."""
    bundle = load_bundle(tiny_bundle)
    image, mask = make_head(seed=5)
    for call, name in ((lambda: detect(sitk.GetArrayFromImage(image), bundle, mask), "image"),
                       (lambda: Detector(bundle)(image, sitk.GetArrayFromImage(mask) > 0), "mask")):
        with pytest.raises(CeVAEError, match=rf"^The {name} must be a SimpleITK Image, got a NumPy array, which has no "
                                             r"voxel size: pass sitk.GetImageFromArray\(array\) .* spacing, origin "
                                             r"and direction set \(image.CopyInformation\(scan\), or SetSpacing\)\.$"):
            call()


def test_options_by_name_given_to_the_request_or_the_detector_are_told_the_call_that_takes_them(tiny_bundle):
    """DetectionRequest(fpr=0.01) and Detector(bundle, fpr=0.01), what a researcher at a console types first, raised
    Python's bare TypeError ("unexpected keyword argument 'fpr'"), naming neither .of() nor from_request."""
    bundle = load_bundle(tiny_bundle)
    cases = [(lambda: DetectionRequest(fpr=0.01, score_type="rec"),
              r"^DetectionRequest\(score, post, paper, policy, run\) takes its parts, not options by name: use "
              r"DetectionRequest\.of\(fpr=0\.01, score_type='rec'\)\.$"),
             (lambda: Detector(bundle, fpr=0.01, paper=True),
              r"^Detector\(bundle, score, post, policy, batch_size, amp\) takes options objects, not options by name: "
              r"use Detector\.from_request\(bundle, fpr=0\.01, paper=True\)\.$"),
             (lambda: DetectionRequest(fpx=0.01), r"^Unknown argument\(s\) 'fpx': DetectionRequest\(score, .*\.of\("),
             (lambda: Detector(bundle, fpx=0.01), r"^Unknown argument\(s\) 'fpx': Detector\(bundle, .*from_request")]
    for call, message in cases:
        with pytest.raises(CeVAEError, match=message):
            call()
    request = DetectionRequest(post={"rim_mm": 2.0}, paper=True)  # the parts, and what builds them, still work
    assert request == DetectionRequest.of(paper=True, rim_mm=2.0) == request.replace(paper=True)
    assert Detector.from_request(bundle, DetectionRequest.of(threshold=1.0)).threshold == 1.0


def test_a_mask_given_as_the_image_or_swapped_with_it_is_refused(tiny_bundle):
    """A uint8 scan and its mask given in each other's place were scored with warnings only (the scan's every voxel
    above 0 taken as brain, the mask's two values as the scan); a binary image alone reached "nearly constant"."""
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.io.images import read_image

    detector = Detector(load_bundle(tiny_bundle), policy=ThresholdPolicy(threshold=1.0))
    scan = read_image(template_dir() / "colin27_t1_2mm.nii.gz")  # a uint8 scan: 60 values
    mask = read_image(template_dir() / "colin27_brainmask_2mm.nii.gz")
    for given, swapped in ((mask, " \\(are the image and the mask swapped\\?\\)"), (None, "")):
        with pytest.raises(CeVAEError, match=rf"^The image holds only the values 0 and 1: it is a mask or a labelmap, "
                                             rf"not an MRI scan{swapped}; give the scan as the image\.$"):
            detector(mask, scan if given is not None else None)
    labels = _like(sitk.GetArrayFromImage(mask) * 3 + 2, mask)  # two values, neither 0
    with pytest.raises(CeVAEError, match=r"only the values 2 and 5"):
        detector(labels, mask)
    assert detector(scan, mask).threshold == 1.0


def test_a_segmentation_given_as_the_image_is_refused_in_one_line(tmp_path, tiny_bundle, capsys):
    """A tissue segmentation (background and three classes, as FSL FAST writes) given to detect as the scan was
    scored as a head with no warning, its outputs written; it is refused in one line, as a binary mask is."""
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.io.images import read_image

    scan = read_image(template_dir() / "colin27_t1_2mm.nii.gz")
    mask = read_image(template_dir() / "colin27_brainmask_2mm.nii.gz")
    voxels, brain = sitk.GetArrayFromImage(scan).astype(float), sitk.GetArrayFromImage(mask) > 0
    classes = np.zeros(voxels.shape, np.uint8)
    classes[brain] = 1 + np.digitize(voxels[brain], np.quantile(voxels[brain], [1 / 3, 2 / 3]))
    sitk.WriteImage(_like(classes, scan), str(tmp_path / "seg.nii.gz"))
    out = tmp_path / "score.nii.gz"
    assert main(["detect", str(tmp_path / "seg.nii.gz"), "--score", str(out), "--model", str(tiny_bundle),
                 "--threshold", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: The image holds only the 4 whole values 0, 1, 2 and 3: it is a segmentation or a "
                   "labelmap, not an MRI scan; give the scan as the image."), err
    assert not out.exists()
    detector = Detector(load_bundle(tiny_bundle), policy=ThresholdPolicy(threshold=1.0))
    with pytest.raises(CeVAEError, match=r"^The image holds only the 4 whole .* \(are the image and the mask "
                                         r"swapped\?\); give the scan as the image\.$"):
        detector(_like(classes, scan), mask)


def test_a_mask_or_image_without_geometry_on_another_grid_than_the_other_is_refused(tiny_bundle, caplog):
    """sitk.GetImageFromArray(mask_array) without CopyInformation (origin 0, 1 mm voxels) is on another grid than its
    scan: it was resampled onto it with a warning only, covering other voxels (or another part of the head), and so
    was a scan made from an array given a mask read from its file."""
    detector = Detector(load_bundle(tiny_bundle), policy=ThresholdPolicy(threshold=1.0))
    image, mask = make_head(seed=5)  # spacing (1.2, 1, 1.5), origin (-20, 10, 5)
    bare_mask, bare_image = (sitk.GetImageFromArray(sitk.GetArrayFromImage(im)) for im in (mask, image))
    short_mask = sitk.GetImageFromArray(sitk.GetArrayFromImage(mask)[2:])
    cases = [((image, bare_mask), r"^The brain mask has no geometry of its own \(origin 0, 1 mm voxels: what "
                                  r"sitk\.GetImageFromArray gives\), so the mask cannot be placed on the image "
                                  r"\(spacing \(1, 1, 1\) against the image's \(1\.2, 1, 1\.5\)\); give the brain mask "
                                  r"the scan's spacing, origin and direction \(mask\.CopyInformation\(image\), if it "
                                  r"is this scan's mask\)\.$"),
             ((bare_image, mask), r"^The image has no geometry .* \(spacing \(1\.2, 1, 1\.5\) against the image's "
                                  r"\(1, 1, 1\)\); give the image the scan's .*\(image\.CopyInformation\(scan\)"),
             ((bare_image, short_mask), r"^Neither the image nor its mask has a geometry .* \(size \(40, 44, 34\) "
                                        r"against the image's \(40, 44, 36\)\); give both")]
    for (scan, brain), message in cases:
        with pytest.raises(CeVAEError, match=message):
            detector(scan, brain)
    with caplog.at_level(logging.WARNING):
        moved = sitk.Image(mask)
        moved.SetOrigin((-21.2, 10.0, 5.0))  # a mask with a geometry of its own is placed in space, as before
        assert detector(image, moved).threshold == 1.0
    assert "The brain mask is on another grid than the image; resampling it" in caplog.text
    assert detector(bare_image, bare_mask).threshold == 1.0  # one grid, both arrays made images
    bare_mask.CopyInformation(image)
    assert detector(image, bare_mask).threshold == 1.0


def test_an_image_without_geometry_is_warned_of_as_taken_in_1_mm_voxels(tiny_bundle):
    """A scan and its mask made from arrays (sitk.GetImageFromArray, no SetSpacing) were scored without a word as
    1 mm voxels: the rim, the minimum volume and every ml came out for a voxel size the scan may not have."""
    detector = Detector(load_bundle(tiny_bundle), policy=ThresholdPolicy(threshold=1.0))
    image, mask = make_head(seed=5)
    bare_image, bare_mask = (sitk.GetImageFromArray(sitk.GetArrayFromImage(im)) for im in (image, mask))
    said = detector(bare_image, bare_mask).record.warnings
    assert any(w.startswith("The image has no geometry of its own (origin 0, 1 mm voxels: what sitk.GetImageFromArray "
                            "gives): its voxels are taken as 1 mm cubes") for w in said), said
    assert not any("geometry" in w for w in detector(image, mask).record.warnings)


def test_detector_from_request_takes_options_by_name_as_detect_does(tiny_bundle):
    """Detector.from_request(bundle, fpr=0.01) raised Python's bare TypeError (an unexpected keyword argument), and
    from_request(bundle) that it missed its request; detect(image, bundle, fpr=0.01) takes both."""
    bundle = load_bundle(tiny_bundle)
    made = Detector.from_request(bundle, score_type="rec", threshold=1.0)
    assert (made.score.score_type, made.threshold) == ("rec", 1.0)
    assert Detector.from_request(bundle).score == Detector.from_request(bundle, None).score
    on_top = Detector.from_request(bundle, DetectionRequest.of(score_type="rec", threshold=1.0), threshold=2.0)
    assert (on_top.score.score_type, on_top.threshold) == ("rec", 2.0)
    with pytest.raises(CeVAEError, match=r"^Unknown detection option\(s\) 'fpx'"):
        Detector.from_request(bundle, fpx=0.01)


def test_a_bundle_at_the_console_is_one_line():
    """The dataclass repr printed every layer of the network and the calibration's tables: about 24,000 characters
    for the bundled model, at a console that shows what `bundle = load_bundle(...)` holds."""
    from CeVAEAnomalyLib.data import default_model_path

    bundle = load_bundle(default_model_path(), "cpu")
    assert repr(bundle) == (f"<Bundle 'cevae_t1_default' (T1) from {default_model_path()}, sha256 "
                            f"{bundle.sha256[:12]}, on cpu>")


def _parcellation(scan: sitk.Image, brain: np.ndarray, seed: int = 0) -> sitk.Image:
    """An aseg-like parcellation of ``brain``: 70 regions (nearest of random seeds) labelled with FreeSurfer's values
    (2 to 251 for structures, 1001 to 1035 and 2001 to 2035 for cortical parcels), background 0."""
    rng = np.random.default_rng(seed)
    inside = np.argwhere(brain)
    seeds = inside[rng.choice(len(inside), 70, replace=False)]
    nearest = np.zeros(len(inside), int)
    best = np.full(len(inside), np.inf)
    for i, s in enumerate(seeds):
        d = ((inside - s) ** 2).sum(axis=1)
        nearest[d < best], best = i, np.minimum(best, d)
    values = np.array([2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 31, 41, 42, 43, 44, 46,
                       47, 49, 50, 51, 52, 53, 54, 58, 60, 62, 63, 77, 85, 251, 252] + list(range(1001, 1016))
                      + list(range(2001, 2016)))
    labels = np.zeros(brain.shape, np.int16)
    labels[tuple(inside.T)] = values[nearest]
    return _like(labels, scan)


def test_a_parcellation_of_many_labels_given_as_the_image_is_refused_and_real_scans_are_not(tmp_path, tiny_bundle,
                                                                                            capsys):
    """A FreeSurfer-like aseg or parcel map (more than 12 whole values) given as the scan was scored as a head with
    no word, its outputs written; it is refused in one line. Real scans, uint8 or float of whole values and mostly
    background, are taken as before."""
    from conftest import SHARED_DATA
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.io.images import read_image

    scan = read_image(template_dir() / "colin27_t1_2mm.nii.gz")
    mask = read_image(template_dir() / "colin27_brainmask_2mm.nii.gz")
    sitk.WriteImage(_parcellation(scan, sitk.GetArrayFromImage(mask) > 0), str(tmp_path / "aseg.nii.gz"))
    out = tmp_path / "score.nii.gz"
    assert main(["detect", str(tmp_path / "aseg.nii.gz"), "--score", str(out), "--model", str(tiny_bundle),
                 "--threshold", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The image holds 71 whole values (0, 2, 3, ..., 2015) in regions of one value "
                          "each: it is a segmentation or a parcellation (such as FreeSurfer's aseg), not an MRI "
                          "scan"), err
    assert "\n" not in err and not out.exists()
    heads = [(t1, Path(str(t1).replace("_t1.", "_brainmask."))) for t1 in sorted(SHARED_DATA.glob("*_t1.nii.gz"))]
    for path, mask_path in heads or [(template_dir() / "colin27_t1_2mm.nii.gz",
                                      template_dir() / "colin27_brainmask_2mm.nii.gz")]:
        image, head_mask = read_image(path), read_image(mask_path)
        brain = sitk.GetArrayFromImage(head_mask) > 0
        masked = _like(sitk.GetArrayFromImage(image) * brain, image)  # skull-stripped: mostly 0
        for given in (image, masked):
            checked_image(given, head_mask, "T1")  # no refusal
        with pytest.raises(CeVAEError, match="segmentation or a parcellation"):
            checked_image(_parcellation(image, brain), head_mask, "T1")


def test_a_ct_given_to_a_t1_model_is_warned_of_once(tmp_path, tiny_bundle, caplog):
    """A CT (with the automatic brain mask) was warned of twice, for its Hounsfield range and as 'another contrast
    than the model's T1 scans', two warnings of one mistake; the CT's alone is said."""
    bundle = load_bundle(tiny_bundle)
    image, _ = make_head(seed=5)
    with caplog.at_level(logging.WARNING):
        result = detect(as_hounsfield(image), bundle, threshold=1.0)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in said if "Hounsfield" in m or "another contrast" in m]) == 1, said
    assert "Hounsfield" in " ".join(result.record.warnings)
    caplog.clear()
    from CeVAEAnomalyLib.engine.calibrate import _subject_scores
    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.options import PostprocessOptions

    sitk.WriteImage(as_hounsfield(image), str(tmp_path / "ct.nii.gz"))
    with caplog.at_level(logging.WARNING):
        _subject_scores(bundle, [Subject(tmp_path / "ct.nii.gz")], [bundle.header.score_options],
                        PostprocessOptions(), ["combi"], check_contrast=True)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in said if "Hounsfield" in m or "another contrast" in m]) == 1, said


def test_a_brain_mask_reaching_beyond_the_image_is_used_on_it_with_a_warning(tmp_path, tiny_bundle, caplog):
    """A brain mask on another grid whose brain lies partly outside the image was resampled with a word of the
    resampling only: another scan's mask (here of 2 mm voxels) was used on what little of it fell on the image, with
    nothing said. Its share outside the image is now said, with what it means; a scan covering part of the brain with
    the mask of a whole-brain scan of the same session (a common case) is still scored on its part."""
    image, mask = make_head(seed=5)
    other = sitk.Image(mask)
    other.SetSpacing((2.0, 2.0, 2.0))
    detector = Detector(load_bundle(tiny_bundle), policy=ThresholdPolicy(threshold=1.0))
    with caplog.at_level(logging.WARNING):
        assert detector(image, other).threshold == 1.0
    said = [r.getMessage() for r in caplog.records if "outside the image" in r.getMessage()]
    assert len(said) == 1 and "is the mask this scan's?" in said[0] and "covers part of the head" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detector(image[:, :, 4:24], mask)  # a partial-coverage scan, the whole brain's mask on its own grid
    said = [r.getMessage() for r in caplog.records if "covers part" in r.getMessage()]
    assert len(said) == 1 and "outside the image" in said[0], said  # (not the edge's warning as well)
    finer = sitk.Image([n * 2 for n in mask.GetSize()], mask.GetPixelID())  # the mask's box in half voxels
    finer.SetSpacing([v / 2 for v in mask.GetSpacing()])
    finer.SetOrigin(mask.TransformContinuousIndexToPhysicalPoint([-0.25] * 3))
    finer.SetDirection(mask.GetDirection())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detector(image, sitk.Resample(mask, finer, sitk.Transform(), sitk.sitkNearestNeighbor))  # on the image
    assert not [r for r in caplog.records if "outside the image" in r.getMessage()]


def test_a_channel_last_array_s_image_is_scored_as_its_one_channel(tiny_bundle):
    """sitk.GetImageFromArray of a (z, y, x, 1) array, as deep-learning code holds a scan, is a vector image of one
    component: with the automatic brain mask, detect failed inside SimpleITK's Cast ('does not support casting from
    casting vector of 32-bit float to 32-bit float'); it is scored as its one channel, with either mask."""
    from CeVAEAnomalyLib.data import template_dir

    image = sitk.ReadImage(str(template_dir() / "colin27_t1_2mm.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(template_dir() / "colin27_brainmask_2mm.nii.gz"))

    def channel_last(scalar: sitk.Image) -> sitk.Image:
        vector = sitk.GetImageFromArray(sitk.GetArrayFromImage(scalar)[..., None])
        vector.CopyInformation(scalar)
        assert vector.GetNumberOfComponentsPerPixel() == 1 and vector.GetPixelID() != scalar.GetPixelID()
        return vector

    bundle = load_bundle(tiny_bundle)
    for given in (None, mask):
        plain = detect(image, bundle, given, threshold=1.0)
        vector_mask = None if given is None else channel_last(given)
        channel = detect(channel_last(image), bundle, vector_mask, threshold=1.0)
        np.testing.assert_array_equal(_score(channel), _score(plain))
        assert channel.score.GetPixelID() == sitk.sitkFloat32
        for what in ("Spacing", "Origin", "Direction"):
            assert getattr(channel.score, f"Get{what}")() == getattr(image, f"Get{what}")()
