"""Detector.terms: the parts of the score map (the model's map, the asymmetry, the result) on the input's grid."""
import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.engine.postprocess import normalised, refine_scores
from CeVAEAnomalyLib.engine.preprocess import brain_region


def _sample_with_a_bright_blob():
    """The bundled 2 mm sample and its mask, with a bright blob in the left hemisphere only."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    arr = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    k, j, i = (int(np.median(ax)) for ax in np.nonzero(brain))
    i += 18  # about 36 mm off the middle, in one hemisphere
    zz, yy, xx = np.ogrid[:arr.shape[0], :arr.shape[1], :arr.shape[2]]
    blob = ((zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2 <= 16) & brain
    arr[blob] = np.percentile(arr[brain], 99.5) * 1.3
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out, mask, blob


def test_terms_are_the_parts_of_the_detection_map_on_the_input_grid():
    image, mask, blob = _sample_with_a_bright_blob()
    detector = Detector(load_bundle(default_model_path(), device="cpu"))
    before = sitk.GetArrayFromImage(image)
    terms = detector.terms(image, mask)
    result = detector(image, mask)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), before)  # the input is not modified
    for part in (terms.network, terms.asymmetry, terms.score, terms.brain_mask):
        assert part.GetSize() == image.GetSize() and part.GetOrigin() == image.GetOrigin()
        assert part.GetSpacing() == image.GetSpacing() and part.GetDirection() == image.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(terms.score), sitk.GetArrayViewFromImage(result.score))
    assert np.array_equal(sitk.GetArrayViewFromImage(terms.brain_mask), sitk.GetArrayViewFromImage(result.brain_mask))
    brain = sitk.GetArrayViewFromImage(terms.brain_mask) > 0
    network, asym = (sitk.GetArrayViewFromImage(p) for p in (terms.network, terms.asymmetry))
    assert not np.array_equal(network, sitk.GetArrayViewFromImage(terms.score))  # the fusion changes the map
    assert (asym[~brain] == 0).all() and (asym >= 0).all()
    mirror = np.zeros_like(blob)  # the blob's mirror position in the other hemisphere (the sample is near-symmetric)
    centre = (image.GetSize()[0] - 1) / 2
    ks, js, is_ = np.nonzero(blob)
    mirror[ks, js, np.round(2 * centre - is_).astype(int)] = True
    rest = brain & ~blob & ~mirror
    assert asym[blob].mean() > np.percentile(asym[rest], 99)  # the asymmetry marks the blob (and its mirror: |I - I'|)
    score = sitk.GetArrayViewFromImage(terms.score)
    assert score[blob].mean() > 2 * score[mirror & brain].mean()  # the fusion marks the side that scores


def test_without_the_asymmetry_fusion_the_result_is_the_refined_network_map():
    image, mask, _ = _sample_with_a_bright_blob()
    bundle = load_bundle(default_model_path(), device="cpu")
    detector = Detector.from_request(bundle, asymmetry_mm=0.0, threshold=5.0)
    terms = detector.terms(image, mask)
    assert terms.asymmetry is None and "network only" in repr(terms)
    brain = sitk.GetArrayViewFromImage(terms.brain_mask) > 0
    post = detector.post
    region = brain_region(brain, 0)
    k, j, i = region
    network = sitk.GetArrayFromImage(terms.network)
    refined = normalised(refine_scores(network, brain, image.GetSpacing(), post), brain, post.spread)
    assert np.allclose(sitk.GetArrayViewFromImage(terms.score)[brain], refined[brain], atol=1e-5)
