"""Calibrating a model bundle on healthy volumes (runs the detection pipeline)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, save_bundle
from .calibration import calibrate, calibration_key
from ..io.manifest import Subject
from .brainmask import given_or_computed_mask
from ..errors import CeVAEError
from ..io.images import read_image
from .detector import detect
from .postprocess import PostprocessOptions
from .scoring import SCORE_TYPES, ScoreOptions

log = logging.getLogger(__name__)


def healthy_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions,
                   post: PostprocessOptions) -> List[np.ndarray]:
    """Brain-voxel scores of each healthy subject."""
    return _scores_by_option(bundle, subjects, [opts], post)[0]


def _scores_by_option(bundle: Bundle, subjects: Sequence[Subject], options: Sequence[ScoreOptions],
                      post: PostprocessOptions) -> List[List[np.ndarray]]:
    """For every scoring in ``options``, the brain-voxel scores of each subject.

    Each subject is read, and its brain mask computed if it has none, once for all scorings.
    """
    values: List[List[np.ndarray]] = [[] for _ in options]
    for s in subjects:
        image = read_image(s.image)
        mask = given_or_computed_mask(image, s.mask, s.name)
        for out, opts in zip(values, options):
            res = detect(image, bundle, mask, opts, post, threshold=float("inf"))
            brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
            out.append(np.asarray(sitk.GetArrayViewFromImage(res.score)[brain], np.float32))
    return values


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup."""
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    options = [ScoreOptions(**dict(opts.to_dict(), score_type=t)) for t in SCORE_TYPES]
    scores = _scores_by_option(bundle, subjects, options, post)
    log.info("Calibrated %s on %d healthy volume(s).", ", ".join(SCORE_TYPES), len(subjects))
    return {calibration_key(o.to_dict(), post.to_dict()): calibrate(v, source) for o, v in zip(options, scores)}


def recalibrate(bundle: Bundle, subjects: Sequence[Subject], out: Path, opts: ScoreOptions,
                post: PostprocessOptions, default_fpr: Optional[float] = None,
                source: str = "healthy volumes given to calibrate") -> Path:
    """Write ``bundle`` to ``out`` with new default scoring options and their calibration."""
    header = dict(bundle.header)
    header["score_options"] = ScoreOptions(**dict(opts.to_dict(), score_type="combi")).to_dict()
    header["postprocess"] = post.to_dict()
    header["calibration"] = calibrate_model(bundle, subjects, source, opts, post)
    header["calibration_subjects"] = [s.name for s in subjects]
    if default_fpr is not None:
        header["default_fpr"] = float(default_fpr)
    half = header.get("weights_dtype") == "float16"
    return save_bundle(out, bundle.model, header, half=half)
