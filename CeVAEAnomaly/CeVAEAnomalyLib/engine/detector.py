"""The one detection path: image (+ mask) -> score map, labelmap, slice scores, components.

Every entry point (command line, Slicer module, batch script) ends here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import Bundle
from .calibration import DEFAULT_FPR, calibration_key, find_calibration, threshold_for_fpr
from ..errors import CeVAEError
from .postprocess import Component, PostprocessOptions, components, refine_reach, refine_scores, threshold_labelmap
from .preprocess import Region, SliceRecord, brain_region, finite_brain, invert_region, mask_array, prepare
from ..progress import ProgressCallback, report, scaled
from .scoring import ScoreOptions, SliceScores, score_slices

log = logging.getLogger(__name__)


@dataclass
class SliceScoreRow:
    """Scores of one input slice (``index`` along the input IJK axis ``axis``)."""

    axis: int
    index: int
    kl: float
    rec: float
    neg_elbo: float


@dataclass
class DetectionResult:
    """Everything one detection produces, on the input's exact grid."""

    score: sitk.Image  # float32
    labelmap: sitk.Image  # uint8 {0,1}
    brain_mask: sitk.Image  # uint8 {0,1}
    threshold: float
    threshold_source: str
    slices: List[SliceScoreRow]
    components: List[Component]
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def top_slice(self) -> Optional[SliceScoreRow]:
        """The slice with the highest negative ELBO (the sample score)."""
        return max(self.slices, key=lambda r: r.neg_elbo) if self.slices else None

    @property
    def flagged_ml(self) -> float:
        return sum(c.volume_ml for c in self.components)


def default_score_options(bundle: Bundle, score_type: Optional[str] = None) -> ScoreOptions:
    """The bundle's recommended scoring, optionally with another score type."""
    opts = dict(bundle.header.get("score_options") or {})
    if score_type is not None:
        opts["score_type"] = score_type
    try:
        return ScoreOptions(**opts)
    except TypeError as exc:
        raise CeVAEError(f"The model's score options are invalid: {exc}") from None


def default_postprocess(bundle: Bundle) -> PostprocessOptions:
    return PostprocessOptions(**(bundle.header.get("postprocess") or {}))


def resolve_threshold(
    bundle: Bundle, opts: ScoreOptions, post: PostprocessOptions, threshold: Optional[float], fpr: Optional[float]
) -> tuple:
    """(threshold, description): absolute if given, else from the bundle's calibration."""
    if threshold is not None:
        return float(threshold), "absolute"
    rate = float(bundle.header.get("default_fpr", DEFAULT_FPR)) if fpr is None else float(fpr)
    entry = find_calibration(bundle.header, calibration_key(opts.to_dict(), post.to_dict()))
    return threshold_for_fpr(entry, rate), f"calibrated, healthy false-positive rate {rate:g}"


def detect(
    image: sitk.Image,
    bundle: Bundle,
    mask: Optional[sitk.Image] = None,
    score_options: Optional[ScoreOptions] = None,
    postprocess: Optional[PostprocessOptions] = None,
    threshold: Optional[float] = None,
    fpr: Optional[float] = None,
    batch_size: int = 64,
    amp: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> DetectionResult:
    """Score a 3D volume. ``mask``: brain mask (>0 is brain); computed automatically if None.

    The input image is never modified. Raise :class:`CeVAEError` on unusable input and
    :class:`~.progress.Cancelled` if the progress callback cancels.
    """
    opts = score_options or default_score_options(bundle)
    post = postprocess or default_postprocess(bundle)
    thr, thr_source = resolve_threshold(bundle, opts, post, threshold, fpr)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    report(progress, 0.0, "Preparing the volume")
    if mask is None:
        from .brainmask import compute_brain_mask

        mask = compute_brain_mask(image, progress=scaled(progress, 0.0, 0.2))
        timings["brain_mask"] = time.perf_counter() - t0
    brain = finite_brain(sitk.GetArrayViewFromImage(image), mask_array(mask, image))
    t1 = time.perf_counter()
    stack = prepare(image, brain, bundle.preprocess)
    timings["preprocess"] = time.perf_counter() - t1

    beta = float((bundle.header.get("loss") or {}).get("beta", 0.01))
    maps, sl = score_slices(
        bundle.model, torch.from_numpy(stack.slices), torch.from_numpy(stack.brain), opts,
        batch_size=batch_size, beta=beta, amp=amp, progress=scaled(progress, 0.2, 0.85), timings=timings,
    )

    # Scores are 0 outside the brain, so above a positive threshold nothing happens outside its
    # bounding box grown by the filters' reach: map back and post-process only there.
    t1 = time.perf_counter()
    region = (brain_region(brain, refine_reach(post, image.GetSpacing()) + 1) if thr > 0
              else tuple(slice(0, n) for n in brain.shape))
    score = _region_image(invert_region(stack.record, maps, region), image, region)
    timings["inverse"] = time.perf_counter() - t1
    report(progress, 0.9, "Post-processing")
    t1 = time.perf_counter()
    rows = _slice_rows(stack.record, sl)
    brain_img = _region_image(brain[region].astype(np.uint8), image, region)
    del stack, brain  # free the full-size mask before the full-size outputs are made
    score = refine_scores(score, brain_img, post)
    labelmap = threshold_labelmap(score, thr, post.min_volume_mm3)
    comps = components(labelmap, score)
    labelmap, brain_img = (_full_image(im, image, region) for im in (labelmap, brain_img))
    timings["postprocess"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    score = _full_image(score, image, region)
    timings["inverse"] += time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    report(progress, 1.0, "Done")
    return DetectionResult(score, labelmap, brain_img, thr, thr_source, rows, comps, timings)


def _slice_rows(record: SliceRecord, sl: SliceScores) -> List[SliceScoreRow]:
    """Per-slice scores indexed along the input's slice axis, in index order."""
    axis, idx = record.input_slice_axis()
    kl, rec, ne = (t.cpu().numpy() for t in (sl.kl, sl.rec, sl.neg_elbo))
    rows = [SliceScoreRow(axis, int(i), float(a), float(b), float(c)) for i, a, b, c in zip(idx, kl, rec, ne)]
    return sorted(rows, key=lambda r: r.index)


def _region_image(arr: np.ndarray, ref: sitk.Image, region: Region) -> sitk.Image:
    """An image of ``arr`` placed on ``region`` of ``ref``'s grid."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(ref.GetSpacing())
    img.SetDirection(ref.GetDirection())
    img.SetOrigin(ref.TransformIndexToPhysicalPoint([r.start for r in region[::-1]]))
    return img


def _full_image(part: sitk.Image, ref: sitk.Image, region: Region) -> sitk.Image:
    """``part`` (on ``region``) pasted into zeros on ``ref``'s exact grid."""
    if all(r.start == 0 and r.stop == n for r, n in zip(region, ref.GetSize()[::-1])):
        part.CopyInformation(ref)
        return part
    full = sitk.Image(ref.GetSize(), part.GetPixelID())
    full.CopyInformation(ref)
    k, j, i = region
    full[i.start : i.stop, j.start : j.stop, k.start : k.stop] = part  # in-place paste
    return full
