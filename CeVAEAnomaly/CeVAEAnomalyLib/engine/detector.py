"""The one detection path: image (+ mask) -> score map, labelmap, slice scores, components.

Every entry point (command line, batch, Slicer module and script, calibration) builds a
:class:`Detector` once and calls it per volume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import Bundle, load_bundle
from .header import BundleHeader, utc_now
from .devices import resolve_device
from .. import __version__
from ..errors import CeVAEError
from ..io.checksum import image_voxel_sha256
from ..io.images import MASK_IS_IMAGE, check_volume, grid_difference, same_grid, warn_if_ct_range
from ..io.labels import SAMPLED_VOXELS, refuse_label_image
from ..options import (DEFAULT_BATCH_SIZE, DetectionRequest, PostprocessOptions, RunOptions, ScoreOptions,
                       ThresholdPolicy, refuse_options_by_name)
from .postprocess import (COMPONENT_ORDER, SIDE_MIN_MATCH, components, normalised, refine_reach, refine_scores,
                          sides_known, threshold_labelmap)
from .preprocess import (Region, SliceRecord, SliceStack, brain_array, brain_region, invert_region, label_image,
                         prepare, region_image, warn_unlike_a_brain)
from ..progress import ProgressCallback, checked, report, scaled
from ..result import DetectionRecord, DetectionResult, ModelRecord, ScoreTerms, SliceScoreRow
from .scan_adaptation import adapted_copy
from .scoring import NetworkMaps, SliceScores, network_maps, pixel_map, scoring_copy
from .slicescores import fused_slice_rank, slice_flags, slice_quantile
from .modality import bright_tail, scan_contrast_warning
from .symmetry import BoxAsymmetry, MidPlane, box_asymmetry, box_midplane, fuse_with_asymmetry

log = logging.getLogger(__name__)


# Map part of the slice score: this quantile of the final score map over the slice's brain voxels,
# 1 = the maximum.
SLICE_QUANTILE = 1.0
# "Most anomalous slice" = a weight x rank of map_max + the rest x rank of the negative ELBO among the
# volume's slices. A map averaged over several orientations earns more weight than a single one (each
# chosen on held-out subjects of the acquisition benchmark; docs/benchmark.md).
SLICE_MAP_WEIGHT = 0.7
SLICE_MAP_WEIGHT_FUSED = 0.8


def slice_map_weight(orientations: int) -> float:
    """Rank-fusion weight of the map part of the slice score, for a map averaged over ``orientations`` slicings."""
    return SLICE_MAP_WEIGHT if orientations <= 1 else SLICE_MAP_WEIGHT_FUSED


@dataclasses.dataclass(frozen=True)
class PreparedScan:
    """A volume checked and sliced once by :meth:`Detector.prepared` (its warnings said then), for the scoring of
    each mode: the checked image, its brain (bool, the input's array order) and its model slices in each
    orientation of the detector (axial first); ``ct``: it looks like a CT, and was warned of as one."""

    image: sitk.Image
    brain: np.ndarray
    stacks: Tuple[SliceStack, ...]
    ct: bool


class Detector:
    """Detection with one model and one set of options, built once and called per volume.

    ``score`` and ``post`` default to the bundle's recommended options, and are taken whole when given (a
    ``ScoreOptions(score_type="rec")`` is axial-only; ``bundle.header.score_options.replace(score_type="rec")``, or
    :meth:`from_request`, changes one option of the model's); the labelmap threshold is resolved here (from
    ``policy``), so a missing calibration is reported before any volume is read.
    """

    def __init__(self, bundle: Bundle, score: Optional[ScoreOptions] = None,
                 post: Optional[PostprocessOptions] = None, policy: ThresholdPolicy = ThresholdPolicy(),
                 batch_size: int = DEFAULT_BATCH_SIZE, amp: bool = False, **options: Any) -> None:
        refuse_options_by_name(options, (), "Detector(bundle, score, post, policy, batch_size, amp) takes options "
                               "objects", "Detector.from_request(bundle, {})")  # (only refused)
        if not isinstance(bundle, Bundle):
            raise CeVAEError(f"The bundle must be a Bundle (from load_bundle), got {type(bundle).__name__}.")
        for name, value, cls, optional in (("score", score, ScoreOptions, True),
                                           ("post", post, PostprocessOptions, True),
                                           ("policy", policy, ThresholdPolicy, False)):
            if not isinstance(value, cls) and not (optional and value is None):
                raise CeVAEError(f"The detector's {name} must be a {cls.__name__}{' or None' * optional} "
                                 f"(Detector.from_request takes options by name), got {type(value).__name__}.")
        self.bundle = bundle
        self.score = score or bundle.header.score_options
        self.post = post or bundle.header.postprocess
        run = RunOptions(batch_size=batch_size, amp=amp)  # refused as from every entry point (e.g. 0 slices)
        self.batch_size, self.amp = run.batch_size, run.amp
        _refuse_untrained_orientations(self.score, bundle.header)
        self.threshold, self.threshold_source = bundle.header.threshold(self.score, self.post, policy)
        self.policy = policy
        thin = bundle.header.unmeasured_rate(self.score, self.post, policy)
        if thin:
            log.warning("The threshold's false-positive rate is not measured: %s. Give a higher rate, or calibrate the "
                        "model on more healthy scans.", thin)
        self.model_record = ModelRecord(bundle.header.name, bundle.header.modality,
                                        None if bundle.sha256 is None else os.path.abspath(bundle.path),
                                        bundle.sha256, bundle.header.calibrated_on(self.score, self.post, policy),
                                        bundle.header.recalibrated_from())

    @classmethod
    def from_request(cls, bundle: Bundle, request: Union[DetectionRequest, Mapping[str, Any], None] = None,
                     **options: Any) -> "Detector":
        """The detector a :class:`~..options.DetectionRequest` (or its ``to_dict()`` form; None: the model's options)
        asks for, with the named ``options`` on top as :func:`detect` takes them (``from_request(bundle, fpr=0.01)``),
        with this model where it was loaded (the request's device is :func:`detect`'s and the entry points' choice
        when they load it)."""
        if not isinstance(bundle, Bundle):
            raise CeVAEError(f"The bundle must be a Bundle (from load_bundle), got {type(bundle).__name__}.")
        request = DetectionRequest.given(request, **options)
        score, post = request.checked_options(bundle.header.score_options, bundle.header.postprocess)
        return cls(bundle, score, post, request.policy, request.run.batch_size, request.run.amp)

    def __call__(self, image: sitk.Image, mask: Optional[sitk.Image] = None,
                 progress: Optional[ProgressCallback] = None, where: str = "") -> DetectionResult:
        """Score a 3D volume. ``mask``: brain mask (>0 is brain); computed automatically if None. ``where`` (e.g.
        "scan: ") leads the warnings about the mask and the image's NaN voxels, so that a cohort's say which volume.
        The result's ``record`` says how it was made, with the warnings this call logged and the digests of the image
        and the mask given (io.checksum.image_voxel_sha256).

        The input image is never modified. Raise :class:`CeVAEError` on unusable input and
        :class:`~.progress.Cancelled` if the progress callback cancels.
        """
        with warnings_logged() as warnings:
            result = self._detect(image, mask, progress, where)
        result.record = self._record(warnings, image, mask)
        return result

    def _record(self, warnings: Sequence[str], image: sitk.Image, mask: Optional[sitk.Image]) -> DetectionRecord:
        """How this detector makes a detection of ``image`` that logged ``warnings``, with ``mask`` given or not
        (None), ending now."""
        device = next(self.bundle.model.parameters()).device
        return DetectionRecord(TOOL, __version__, self.model_record, self.threshold, self.threshold_source,
                               self.score.to_dict(), self.post.to_dict(), str(device), self.amp, self.batch_size,
                               "automatic" if mask is None else "given", software_versions(), tuple(warnings),
                               utc_now(), image_voxels_sha256=image_voxel_sha256(image),
                               mask_voxels_sha256=None if mask is None else image_voxel_sha256(mask))

    def _detect(self, image: sitk.Image, mask: Optional[sitk.Image], progress: Optional[ProgressCallback],
                where: str) -> DetectionResult:
        checked(progress)
        image, ct = _checked_image(image, mask, self.bundle.header.modality, where)
        stack, brain = self._prepare(image, mask, progress, where)
        if not ct:  # (a CT was warned of as one only)
            self._warn_of_contrast(stack, where)
        self._warn_of_acquisition(image, brain, where)
        passes = self._passes([stack, *self._other_stacks(image, brain)], [self.score], progress)
        raw = passes[0][1]
        # map back and post-process on the brain's box only (_box: nothing happens outside it)
        thr, spacing = self.threshold, image.GetSpacing()
        region = self._box(brain, spacing)
        report(progress, 0.88, "Mapping scores back onto the input grid")
        score = _mean_map(passes, self.score, region)
        rows = _slice_rows(stack.record, raw.slices)
        inside = brain[region].copy()
        across = _cut_across(brain, image)  # (the sides: the brain's midline cannot be placed where it goes on past)
        del stack, raw, passes, brain  # the full-size mask is freed before the full-size outputs are made
        report(progress, 0.9, "Post-processing")
        asym = self._asymmetry(image, inside, region)
        score = self._refine(score, inside, image, region, asym)
        plane = None if asym is None else asym.plane  # (the mid-sagittal plane: the side of each component)
        del asym
        labelled = score if thr > 0 else np.where(inside, score, np.float32(np.nan))  # a threshold <= 0: brain only
        labelmap = threshold_labelmap(labelled, spacing, thr, self.post.min_volume_mm3, self.post.hysteresis,
                                      self.post.min_peak)
        del labelled
        _add_slice_anomaly(rows, score, inside, labelmap, region, slice_map_weight(len(self.score.orientation_list)))
        score, labelmap = region_image(score, image, region), region_image(labelmap, image, region)
        if across:  # no side is said about any plane
            plane = None
        elif plane is None and sitk.GetArrayViewFromImage(labelmap).any():  # scored without the asymmetry: found here
            plane = box_midplane(image, inside, region)
        comps = components(labelmap, score, COMPONENT_ORDER, plane)
        if comps:  # (without a plane here: the brain goes on past the image's left or right face)
            _warn_of_unknown_sides(plane, where)
        brain_img = region_image(inside.view(np.uint8), image, region)
        labelmap, brain_img, score = (_full_image(im, image, region) for im in (labelmap, brain_img, score))
        report(progress, 1.0, "Detection done")
        return DetectionResult(score, labelmap, brain_img, thr, self.threshold_source, rows, comps)

    def _warn_of_contrast(self, stack: SliceStack, where: str) -> None:
        """Say so when the scan's axial model slices do not have the model's contrast (a T2 for a T1 model)."""
        problem = scan_contrast_warning(stack.slices, self.bundle.header)
        if problem:
            log.warning("%s%s", where, problem)

    def _warn_of_acquisition(self, image: sitk.Image, brain: np.ndarray, where: str) -> None:
        """Say so when the scan is another acquisition than the healthy scans its calibrated threshold was taken on
        (thicker slices, a post-contrast look): that threshold's false-positive rate on it is not known."""
        measured = self.policy.threshold is None and brain_size_problem(brain, image.GetSpacing()) is None
        tail = bright_tail(sitk.GetArrayViewFromImage(image), brain) if measured else None  # (a brain not a human's
        # size was warned of: its tail is no sign of a contrast agent)
        difference = self.bundle.header.acquisition_difference(self.score, self.post, self.policy, image.GetSpacing(),
                                                               tail)
        if difference:
            log.warning("%sThe threshold's false-positive rate on this scan is not known: %s. Thick, noisy or "
                        "post-contrast slices can get scattered false components; calibrating the model on 2 or more "
                        "healthy scans of this protocol measures it (cevae-anomaly calibrate or adapt; in Slicer, "
                        "Calibrate on healthy scans).", where, difference)

    def brain_scores(self, image: sitk.Image, mask: Optional[sitk.Image], score_types: Sequence[str],
                     where: str = "", progress: Optional[ProgressCallback] = None) -> Dict[str, np.ndarray]:
        """Post-processed brain-voxel scores of each score type (one network pass per orientation), as calibration
        takes them (it scores a volume in each mode with :meth:`prepared` and :meth:`prepared_scores`); ``where`` (e.g.
        "scan.nii.gz: ") leads the mask's warnings, so that a list of volumes says which one; ``progress`` hears the
        network's steps (the thorough mode's adaptation takes most of the time)."""
        checked(progress)
        return self.prepared_scores(self.prepared(image, mask, where), score_types, progress)

    def prepared(self, image: sitk.Image, mask: Optional[sitk.Image], where: str = "",
                 automatic: bool = False) -> PreparedScan:
        """The volume checked and sliced for :meth:`prepared_scores`, its warnings said (once, however many modes
        score it); ``where`` as :meth:`brain_scores` takes it; ``automatic``: ``mask`` is the caller's automatic brain
        mask (engine/brainmask.py), which warned of itself."""
        image, ct = _checked_image(image, mask, self.bundle.header.modality, where)
        stack, brain = self._prepare(image, mask, None, where, automatic)
        return PreparedScan(image, brain, (stack, *self._other_stacks(image, brain)), ct)

    def prepared_scores(self, scan: PreparedScan, score_types: Sequence[str],
                        progress: Optional[ProgressCallback] = None) -> Dict[str, np.ndarray]:
        """:meth:`brain_scores` of a volume :meth:`prepared` by a detector of this model and orientations (this one, or
        that of another mode: other test-time steps), without checking it again."""
        checked(progress)
        image, brain = scan.image, scan.brain
        options = [self.score.replace(score_type=t) for t in score_types]
        passes = self._passes(scan.stacks, options, progress)
        region = self._box(brain, image.GetSpacing())
        inside = brain[region]
        asym = self._asymmetry(image, inside, region)  # the same for every score type: computed once
        out = {}
        for opts in options:
            score = self._refine(_mean_map(passes, opts, region), inside, image, region, asym)
            out[opts.score_type] = np.asarray(score[inside], np.float32)
        return out

    def terms(self, image: sitk.Image, mask: Optional[sitk.Image] = None, where: str = "",
              progress: Optional[ProgressCallback] = None) -> ScoreTerms:
        """The parts of the score map a call of this detector makes of ``image`` (``mask`` and ``where`` as the call
        takes them), each on the input's grid: the model's map, the asymmetry fused with it, the result; to see which
        term marks a voxel. One network pass per orientation, as detection makes; no labelmap or tables."""
        checked(progress)
        scan = self.prepared(image, mask, where)
        image, brain = scan.image, scan.brain
        passes = self._passes(scan.stacks, [self.score], progress)
        region = self._box(brain, image.GetSpacing())
        network = _mean_map(passes, self.score, region)
        del passes
        inside = brain[region].copy()
        asym = self._asymmetry(image, inside, region)
        score = self._refine(network.copy(), inside, image, region, asym)

        def full(part: np.ndarray) -> sitk.Image:
            return _full_image(region_image(part, image, region), image, region)

        return ScoreTerms(full(network), None if asym is None else full(asym.asymmetry), full(score),
                          full(inside.view(np.uint8)), None if asym is None else asym.reflection)

    def _box(self, brain: np.ndarray, spacing: Sequence[float]) -> Region:
        """The box a volume is post-processed on: its brain's bounding box grown by the filters' reach (scores are 0
        outside the brain, and only brain voxels are labelled)."""
        return brain_region(brain, refine_reach(self.post, spacing) + 1)

    def _asymmetry(self, image: sitk.Image, inside: np.ndarray, region: Region) -> Optional[BoxAsymmetry]:
        """The volume's asymmetry on ``region`` (None when the fusion is off)."""
        return box_asymmetry(image, inside, region, self.post.asymmetry_mm) if self.post.asymmetry_mm > 0 else None

    def _refine(self, score: np.ndarray, inside: np.ndarray, image: sitk.Image, region: Region,
                asym: Optional[BoxAsymmetry]) -> np.ndarray:
        """The post-processed map on ``region`` of ``image``'s grid (``inside``: its brain): asymmetry
        fusion, rim and median, normalisation (by ``post.spread``)."""
        post = self.post
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line
            if asym is not None:
                score = fuse_with_asymmetry(score, asym, post.asymmetry_floor, post.score_power, post.asymmetry_side)
            score = refine_scores(score, inside, image.GetSpacing(), post)
            score = normalised(score, inside, post.spread) if post.normalise else score
        if not np.isfinite(score[inside]).all():  # (an infinite score is labelled at any threshold, and ITK's
            # component statistics never end on it)
            power = "" if asym is None else f", raised to the power {post.score_power:g} ({self._score_power_source()})"
            amp = "run without mixed precision (leave out --amp; amp=False in Python), or " if self.amp else ""
            raise CeVAEError("The post-processed scores of this scan overflow (infinite or NaN values): the model's "
                             f"scores are far larger than a trained model's{power}; {amp}the model file may be damaged "
                             "or edited.")
        return score

    def _score_power_source(self) -> str:
        """Where the asymmetry fusion's score power comes from, as an overflow says it: the model's own (the Slicer
        panel has no control for it), or the caller's (detect's --score-power, detect()'s score_power)."""
        own = self.post.score_power == self.bundle.header.postprocess.score_power
        return "the model's score power" if own else "--score-power; score_power= in Python"

    def _prepare(self, image: sitk.Image, mask: Optional[sitk.Image], progress: Optional[ProgressCallback],
                 where: str = "", automatic: bool = False) -> Tuple[SliceStack, np.ndarray]:
        """Model slices of ``image`` and its brain (bool, the input's array order); ``where`` leads the warnings.
        ``automatic``: ``mask`` is an automatic one the caller made (it warned of itself): no given-mask warnings."""
        report(progress, 0.0, "Preparing the volume")
        given = mask is not None and not automatic
        with mask_warnings_held():  # said after the brain's size, which explains them where it is not a human's
            if mask is None:
                from .brainmask import SCORED_MARGIN_MM, compute_brain_mask

                mask = compute_brain_mask(image, progress=scaled(progress, 0.0, 0.2), where=where,
                                          margin_mm=SCORED_MARGIN_MM)
            brain = brain_array(image, mask, where)
            stack = prepare(image, brain, self.bundle.preprocess)  # refuses an empty mask before it is warned of
            odd_size = warn_of_brain_size(brain, image.GetSpacing(), where)
        if given:  # (the automatic mask warns of both itself)
            if not odd_size:  # (its volume was said, with what it may mean)
                warn_unlike_a_brain(brain, image, where)
            outside = 0.0 if same_grid(mask, image) else _share_outside(mask, image)
            if outside > _MASK_OUTSIDE_SHARE:
                log.warning("%s%.0f %% of the brain mask lies outside the image: only its part on the image is taken "
                            "as the brain. If the scan covers part of the head, its brain's intensities are scaled on "
                            "the part it holds and its scores may not compare with those of whole scans; if not, is "
                            "the mask this scan's? Give the mask made on this scan, or none for the automatic one.",
                            where, 100 * outside)
            else:
                _warn_of_partial_coverage(brain, image.GetSpacing()[::-1], where)
        else:
            _tell_non_finite_background(image, where)
        return stack, brain

    def _other_stacks(self, image: sitk.Image, brain: np.ndarray) -> List[SliceStack]:
        """The model slices of the volume in each orientation the options name after axial."""
        return [prepare(image, brain, self.bundle.preprocess, o) for o in self.score.orientation_list[1:]]

    def _passes(self, stacks: Sequence[SliceStack], options: Sequence[ScoreOptions],
                progress: Optional[ProgressCallback]) -> List[Tuple[SliceRecord, NetworkMaps]]:
        """(slicing, network maps) of each stack, the first one's reported to ``progress``; in the thorough mode
        all are scored by one copy of the model adapted to the slices of every stack."""
        model, start, steps = self.bundle.model, 0.2, options[0].test_time_steps
        if steps > 0:
            pre = self.bundle.preprocess
            model = adapted_copy(model, torch.from_numpy(np.concatenate([s.slices for s in stacks])),
                                 torch.from_numpy(np.concatenate([s.brain for s in stacks])), steps,
                                 self.bundle.header.loss, pre.clip_max, pre.min_brain_fraction,
                                 scaled(progress, start, 0.7))
            start = 0.7
        model = scoring_copy(model, steps > 0)
        return [(s.record, self._network(model, s, options, scaled(progress, start, 0.85) if i == 0 else None))
                for i, s in enumerate(stacks)]

    def _network(self, model: torch.nn.Module, stack: SliceStack, options: Sequence[ScoreOptions],
                 progress: Optional[ProgressCallback]) -> NetworkMaps:
        """``model``'s maps of the stack."""
        return network_maps(model, torch.from_numpy(stack.slices), torch.from_numpy(stack.brain), options,
                            batch_size=self.batch_size, beta=self.bundle.header.loss.beta, amp=self.amp,
                            progress=progress)


def _refuse_untrained_orientations(score: ScoreOptions, header: BundleHeader) -> None:
    """Refuse ``score`` naming slice orientations the model was not trained on, saying what to do: where they are the
    model's own options (an edited file; the Slicer panel has no orientation control), another model; else the
    caller's orientations, on the command line and in Python."""
    trained = header.trained_orientations()
    untrained = [o for o in score.orientation_list if o not in trained]
    if not untrained:
        return
    said = (f"The model was trained on {', '.join(trained)} slices only, so it cannot score {', '.join(untrained)} "
            "slices")
    instead = f"score the slices it was trained on (--orientations {','.join(trained)}; orientations= in Python)"
    if score.orientations == header.score_options.orientations:
        raise CeVAEError(f"{said}, which its own options name: the model file was edited or is damaged. Use another "
                         f"model (in Slicer: another Model bundle), or {instead}.")
    raise CeVAEError(f"{said}; {instead}, or train a model with --orientations {score.orientations}.")


def detect(image: sitk.Image, bundle: Union[Bundle, str, "os.PathLike[str]"], mask: Optional[sitk.Image] = None,
           request: Union[DetectionRequest, Mapping[str, Any], None] = None,
           progress: Optional[ProgressCallback] = None, **options: Any) -> DetectionResult:
    """One volume with a one-off :class:`Detector` (for scripts and the console).

    ``request`` (or its :meth:`~DetectionRequest.to_dict` form) and the keyword ``options`` (the names of
    :meth:`DetectionRequest.of`, e.g. ``score_type="rec"``, ``fpr=0.01``, ``min_peak=1``, ``batch_size=8``,
    ``device="cuda"``; they win over the request's) ask for the same things as every other entry point; what
    they leave out is the model's recommended setting. ``bundle`` may be a path, loaded onto the request's device
    (default auto: a GPU where there is one); a loaded bundle's model stays where it is unless a device is asked
    for, then it is moved there.
    """
    chosen = DetectionRequest.given(request, **options)
    checked(progress)
    device = resolve_device(chosen.run.device)
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load_bundle(bundle, device)
    elif isinstance(bundle, Bundle):
        if chosen.run.device != RunOptions().device:
            bundle.model.to(device)
    else:
        raise CeVAEError(f"The bundle must be a Bundle (from load_bundle) or a model file path, "
                         f"got {type(bundle).__name__}.")
    return Detector.from_request(bundle, chosen)(image, mask, progress)


TOOL = "cevae-anomaly"  # the name a detection's record gives the tool that made it


def software_versions() -> Dict[str, str]:
    """The versions of Python and of the libraries that compute a map, as a record names them."""
    return {"python": platform.python_version(), "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
            "numpy": np.__version__}


def brain_size_problem(brain: np.ndarray, spacing: Sequence[float]) -> Optional[str]:
    """What is wrong with the size of ``brain`` (bool, array order) on voxels of ``spacing`` (x, y, z, as the header
    says, in mm), said to the user; None for the size of a human brain. Along its longest axis a human brain spans
    140 to 190 mm; a voxel size in centimetres read as mm makes that 14 to 19 mm (the six healthy heads' masks at a
    tenth of their voxel size: 16 to 18.4 mm), one ten times too large 1.4 m or more (refused as an image). A small
    mask in an image of a head's size (a mask of a few voxels) is no question of units: the mask is warned of."""
    image = max(n * s for n, s in zip(brain.shape[::-1], spacing))
    if _SMALL_IMAGE_MM <= image <= _BRAIN_SPAN_MM[1] or not brain.any():  # (a brain spans no more than its image)
        return None
    axes = [np.flatnonzero(np.any(brain, axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    span = max((a[-1] - a[0] + 1) * s for a, s in zip(axes, tuple(spacing)[::-1]))
    if span <= _BRAIN_SPAN_MM[1] and (span >= _BRAIN_SPAN_MM[0] or image >= _SMALL_IMAGE_MM):
        return None
    ml = float(np.count_nonzero(brain)) * float(np.prod(spacing)) / 1000.0
    return (f"The brain (its mask) spans {span:.3g} mm and holds {ml:.3g} ml by the header's voxel size, where a "
            f"human adult brain spans about 140 to 190 mm and holds about 1000 to 1700 ml: the header's voxel size may "
            "be in other units (centimetres?), and then so are the results' mm and ml (the options in mm, the "
            "volumes flagged) and any sizes other warnings give. Fix the header if so (a small animal's scan is "
            "scored as its header says).")


_BRAIN_SPAN_MM = (25.0, 300.0)  # a brain mask spanning less or more along its longest axis is no human brain in mm
# an image under this along its longest axis holds no human head in mm (one in cm read as mm spans 18 to 30 mm)
_SMALL_IMAGE_MM = 40.0


def warn_of_brain_size(brain: np.ndarray, spacing: Sequence[float], where: str = "") -> bool:
    """Warn (led by ``where``) of a brain not of a human brain's size (:func:`brain_size_problem`); whether it did."""
    problem = brain_size_problem(brain, spacing)
    if problem:
        log.warning("%s%s", where, problem)
    return problem is not None


class _HeldBack(logging.Filter):
    """Holds back the records this thread logs, for :func:`mask_warnings_held` to log after."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.records.append(record)
        return False


@contextlib.contextmanager
def mask_warnings_held() -> Iterator[None]:
    """The automatic brain mask's messages of the block (this thread's), logged at its end: after what the block says
    itself (the brain's size, which says what they may mean)."""
    held, mask_log = _HeldBack(), logging.getLogger(__name__.rsplit(".", 1)[0] + ".brainmask")
    mask_log.addFilter(held)
    try:
        yield
    finally:
        mask_log.removeFilter(held)
        for record in held.records:
            mask_log.handle(record)


class _ThreadWarnings(logging.Handler):
    """Keeps the messages of the warnings logged in the thread that made it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_logged() -> Iterator[List[str]]:
    """The messages of the library's warnings that this thread logs in the block (still logged as usual): those
    of one detection, not of another thread's (the entry points add those of reading its input files)."""
    handler, library = _ThreadWarnings(), logging.getLogger(__name__.split(".")[0])
    library.addHandler(handler)
    try:
        yield handler.messages
    finally:
        library.removeHandler(handler)


def checked_image(image: sitk.Image, mask: Optional[sitk.Image], modality: str, where: str = "") -> sitk.Image:
    """The image as detection takes it (a LabelMap made a label image) after the command line's
    :func:`~..io.images.check_volume`; a one-line :class:`CeVAEError` for what is not a SimpleITK image.
    ``where`` leads the CT-range warning, which says what a model of ``modality`` takes instead."""
    return _checked_image(image, mask, modality, where)[0]


def _checked_image(image: sitk.Image, mask: Optional[sitk.Image], modality: str,
                   where: str = "") -> Tuple[sitk.Image, bool]:
    """:func:`checked_image`, and whether the image looks like a CT (warned of as one)."""
    for name, value in (("image", image), ("mask", mask)):
        if not isinstance(value, sitk.Image) and (name == "image" or value is not None):
            if isinstance(value, np.ndarray):
                raise CeVAEError(f"The {name} must be a SimpleITK Image, got a NumPy array, which has no voxel size: "
                                 "pass sitk.GetImageFromArray(array) (z, y, x order) with the scan's spacing, origin "
                                 "and direction set (image.CopyInformation(scan), or SetSpacing).")
            raise CeVAEError(f"The {name} must be a SimpleITK Image (e.g. CeVAEAnomalyLib.io.images.read_image"
                             "(path), which also keeps the NaN voxels that sitk.ReadImage turns into 0 in a NIfTI "
                             f"file), got {type(value).__name__}.")
    image = check_volume(label_image(image))
    _refuse_a_copy_as_the_mask(image, mask, where)
    refuse_label_image(image, mask is not None)
    _check_geometry(image, mask, where)
    ct = warn_if_ct_range(image, modality, where)  # every path: the command line, batch, the API and Slicer
    return image, ct


def _check_geometry(image: sitk.Image, mask: Optional[sitk.Image], where: str) -> None:
    """Refuse a brain mask that lies on another grid than the image where either has no geometry of its own
    (:func:`_no_geometry`: made from an array): resampled, it covered other voxels than the scan's (or those of
    another part of the head) with a warning only. Warn of an image with none (``where`` leads): its voxels are taken
    as 1 mm cubes."""
    lacking = [name for name, im in (("image", image), ("brain mask", mask)) if im is not None and _no_geometry(im)]
    if mask is not None and lacking and mask.GetDimension() == 3 and not same_grid(mask, image):
        what = grid_difference(mask, image)
        subject, whom, how = {
            "image": ("The image has no", "the image", "image.CopyInformation(scan), or SetSpacing"),
            "brain mask": ("The brain mask has no", "the brain mask",
                           "mask.CopyInformation(image), if it is this scan's mask"),
        }[lacking[0]] if len(lacking) == 1 else ("Neither the image nor its mask has a", "both", "CopyInformation")
        raise CeVAEError(f"{subject} geometry of its own (origin 0, 1 mm voxels: what sitk.GetImageFromArray gives), "
                         f"so the mask cannot be placed on the image ({what.lower()} "
                         f"{_numbers(getattr(mask, 'Get' + what)())} against the image's "
                         f"{_numbers(getattr(image, 'Get' + what)())}); give {whom} the scan's spacing, origin and "
                         f"direction ({how}).")
    if "image" in lacking:
        log.warning("%sThe image has no geometry of its own (origin 0, 1 mm voxels: what sitk.GetImageFromArray "
                    "gives): its voxels are taken as 1 mm cubes, so millimetre options (rim, minimum volume) and "
                    "volumes in ml hold only if they are; set the scan's spacing, origin and direction "
                    "(image.CopyInformation(scan), or SetSpacing).", where)


def _tell_non_finite_background(image: sitk.Image, where: str) -> None:
    """Say how many voxels are NaN or infinite where the automatic mask was made: it takes them for background (a
    skull-stripped scan's NaN background is its outside), which nothing said where none lies inside the mask."""
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind != "f" or (np.isfinite(values.min()) and np.isfinite(values.max())):  # NaN propagates
        return
    count = values.size - int(np.count_nonzero(np.isfinite(values)))
    log.info("%s%d voxels of the image are NaN or infinite: the automatic brain mask was made with them as "
             "background, and none of them is scored.", where, count)


def _share_outside(mask: sitk.Image, image: sitk.Image) -> float:
    """The share of ``mask``'s brain voxels (a sample of them) whose centres lie outside ``image`` (beyond half a voxel
    from its edge voxels' centres), in physical space."""
    brain = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (x, y, z) indices
    brain = brain[:: max(1, len(brain) // SAMPLED_VOXELS)]
    if len(brain) == 0 or mask.GetDimension() != 3:
        return 0.0
    to_world = np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())
    to_image = np.linalg.inv(np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing()))
    index = (brain @ to_world.T + np.array(mask.GetOrigin()) - np.array(image.GetOrigin())) @ to_image.T
    return float(np.mean(np.any((index < -0.5) | (index > np.array(image.GetSize()) - 0.5), axis=1)))


_MASK_OUTSIDE_SHARE = 0.01  # of a given mask's brain voxels outside the image: said


def _warn_of_partial_coverage(brain: np.ndarray, spacing: Sequence[float], where: str) -> None:
    """Say so when a given brain mask is cut off by the image's edge: the scan covers part of the head (a slab, a cap
    of the brain), as the automatic mask says of such a scan. ``spacing``: the array's voxel size in its axis order."""
    cut = _cut_face_share(brain, spacing)
    if cut > _PARTIAL_FACE_SHARE:
        log.warning("%sThe brain mask reaches the edge of the image (%.0f %% of a face of it): the scan covers part "
                    "of the head, so its brain's intensities are scaled on the part it holds, and its scores may not "
                    "compare with those of whole scans; check the scan's coverage.", where, 100 * cut)


def _cut_face_share(brain: np.ndarray, spacing: Sequence[float], axes: Sequence[int] = (0, 1, 2)) -> float:
    """The largest share of one of the array's faces across ``axes`` (all six by default) that is in ``brain`` where
    the brain goes on past it (its section on the face holds at least :data:`_CUT_SECTION_RATIO` of its largest one
    within :data:`_INWARD_MM` inside); 0 where it goes on past none. A brain's own end, on the face of a box cropped
    to it, is a cap that widens inwards: in thick slices its outermost slab fills up to 10 % of the face."""
    shares = [0.0]
    for axis in axes:
        step = spacing[axis]
        sections = np.count_nonzero(brain, axis=tuple(a for a in range(3) if a != axis))
        reach = max(2, int(round(_INWARD_MM / step)))
        for seq in (sections, sections[::-1]):
            if seq[0] > 0 and seq[0] >= _CUT_SECTION_RATIO * seq[1 : reach + 1].max(initial=0):
                shares.append(float(seq[0]) * brain.shape[axis] / brain.size)
    return max(shares)


def _cut_across(brain: np.ndarray, image: sitk.Image) -> bool:
    """Whether ``brain`` (bool, ``image``'s array order) goes on past the image's left or right face (those across
    the array axis nearest the patient's left-right, LPS x): the field of view cuts the brain across, so that the
    mid-sagittal plane search (kept within 10 mm of the brain's centre, which a cut moves) can miss the midline."""
    nearest_x = int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3))[0]))  # the image axis (i, j, k)
    return _cut_face_share(brain, image.GetSpacing()[::-1], (2 - nearest_x,)) > _ACROSS_FACE_SHARE


def _warn_of_unknown_sides(plane: Optional[MidPlane], where: str) -> None:
    """Say why the components have no side where they have none: the brain goes on past the image's left or right
    face (``plane`` None) or matches its mirror image poorly about ``plane``."""
    if plane is None:
        why = "the brain reaches the image's left or right edge (the scan covers part of the head across)"
    elif not sides_known(plane):
        why = (f"the brain matches its mirror image poorly ({plane.match:.2f}, under {SIDE_MIN_MATCH:g}: a hemisphere "
               "cut off or largely resected)")
    else:
        return
    log.warning("%sThe lesion table gives no side (left, right, both) for the components: %s, so the brain's "
                "midline cannot be placed reliably.", where, why)


# the share of the left or right face of the image above which the brain is cut across there: on seven heads, FOV
# cuts 15 mm short of the midline to 30 mm past it fill 22 to 45 % of it (0 to 50 % of the brain on the wrong side of
# the plane found), slivers of 0-3 % of the brain 4 to 17 %; whole heads 0 (given and automatic masks)
_ACROSS_FACE_SHARE = 0.02

# the share of a face of the image above which the brain is cut off there: a brain cut by the field of view fills
# 8 to 48 % of the cut face (six heads, from a 14 mm cap to a half); one cropped to its bounding box up to 10 %
_PARTIAL_FACE_SHARE = 0.05
# a cut brain's section on the face is 0.81 to 1.17 times its largest within 10 mm inside (six heads: halves, caps of
# 14 and 30 mm, slabs); a whole brain's at the face of its bounding box, 1 mm to 6.5 mm slices, at most 0.35
_CUT_SECTION_RATIO = 0.6
_INWARD_MM = 10.0


def _no_geometry(image: sitk.Image) -> bool:
    """Whether ``image`` has the geometry of an array made an image (sitk.GetImageFromArray; a NIfTI header of
    identity affine): origin 0, 1 mm voxels, axes along the patient's."""
    axes = np.abs(np.array(image.GetDirection())).reshape(image.GetDimension(), -1)
    return (all(s == 1 for s in image.GetSpacing()) and not any(image.GetOrigin())
            and np.array_equal(axes, np.eye(image.GetDimension())))


def _numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _refuse_a_copy_as_the_mask(image: sitk.Image, mask: Optional[sitk.Image], where: str) -> None:
    """Refuse a brain mask whose voxels and grid are the image's (the scan given as its own mask, e.g. a copy of its
    file or a second node of it), which was scored as a "brain" of every voxel above 0, with warnings only."""
    if mask is None or mask.GetSize() != image.GetSize() or grid_difference(mask, image):
        return
    labels = label_image(mask)  # (named: a view does not keep its image alive)
    ours, theirs = sitk.GetArrayViewFromImage(labels).ravel(), sitk.GetArrayViewFromImage(image).ravel()
    step = max(1, ours.size // SAMPLED_VOXELS)  # a sample first: a mask differs from its scan in most voxels
    if np.array_equal(ours[::step], theirs[::step]) and np.array_equal(ours, theirs):
        raise CeVAEError(f"{where}The brain mask {MASK_IS_IMAGE}")


def _mean_map(passes: Sequence[Tuple[SliceRecord, NetworkMaps]], opts: ScoreOptions, region: Region) -> np.ndarray:
    """The pixel maps of ``opts`` from each (slicing, network maps) pass, mapped onto ``region`` and averaged."""
    score = invert_region(passes[0][0], pixel_map(passes[0][1], opts), region)
    for record, raw in passes[1:]:
        score += invert_region(record, pixel_map(raw, opts), region)
    if len(passes) > 1:
        score /= len(passes)  # in place: no third box-sized array
    return score


def _slice_rows(record: SliceRecord, sl: SliceScores) -> List[SliceScoreRow]:
    """Per-slice scores indexed along the input's slice axis, in index order."""
    axis, idx = record.input_slice_axis()
    kl, rec, ne = (t.cpu().numpy() for t in (sl.kl, sl.rec, sl.neg_elbo))
    rows = [SliceScoreRow(axis, int(i), float(a), float(b), float(c)) for i, a, b, c in zip(idx, kl, rec, ne)]
    return sorted(rows, key=lambda r: r.index)


def _add_slice_anomaly(rows: List[SliceScoreRow], score: np.ndarray, brain: np.ndarray, labelmap: np.ndarray,
                       region: Region, weight: float) -> None:
    """Set each row's ``map_max`` and ``flagged`` from the map and labelmap on ``region`` (slices outside it
    keep 0 and False), then its ``anomaly`` (rank fusion with the negative ELBO over all rows, ``weight`` on
    the map)."""
    if not rows:
        return
    axis = 2 - rows[0].axis  # numpy axis of the input's slice axis
    values = slice_quantile(score, brain, axis, SLICE_QUANTILE)
    flags = slice_flags(labelmap, axis)
    start = region[axis].start
    for r in rows:
        if 0 <= r.index - start < len(values):
            r.map_max, r.flagged = float(values[r.index - start]), bool(flags[r.index - start])
    fused = fused_slice_rank(np.array([r.map_max for r in rows]), np.array([r.neg_elbo for r in rows]), weight)
    for r, v in zip(rows, fused):
        r.anomaly = float(v)


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
