"""Calibrating a model bundle on healthy volumes (runs the detection pipeline)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, save_bundle
from .calibration import calibrate, calibration_key
from .data import Subject
from .errors import CeVAEError
from .imageio import read_image
from .pipeline import detect
from .postprocess import PostprocessOptions
from .scoring import SCORE_TYPES, ScoreOptions

log = logging.getLogger(__name__)


def healthy_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions,
                   post: PostprocessOptions) -> List[np.ndarray]:
    """Brain-voxel scores of each healthy subject."""
    return _scores_by_option(bundle, subjects, [opts], post)[0]


def _scores_by_option(bundle: Bundle, subjects: Sequence[Subject], options: Sequence[ScoreOptions],
                      post: PostprocessOptions, scorers: Optional[Sequence[Bundle]] = None) -> List[List[np.ndarray]]:
    """For every scoring in ``options``, the brain-voxel scores of each subject (scored by ``bundle``,
    or by ``scorers[i]`` for subject i).

    Each subject is read, and its brain mask computed if it has none, once for all scorings.
    """
    values: List[List[np.ndarray]] = [[] for _ in options]
    models = list(scorers) if scorers is not None else [bundle] * len(subjects)
    if len(models) != len(subjects):
        raise CeVAEError("Give one scoring model per calibration subject.")
    for s, model in zip(subjects, models):
        image = read_image(s.image)
        if s.mask:
            mask = read_image(s.mask, "brain mask")
        else:
            from .brainmask import compute_brain_mask

            mask = compute_brain_mask(image)
        for out, opts in zip(values, options):
            res = detect(image, model, mask, opts, post, threshold=float("inf"))
            brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
            out.append(np.asarray(sitk.GetArrayViewFromImage(res.score)[brain], np.float32))
    return values


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions, scorers: Optional[Sequence[Bundle]] = None) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup.

    ``scorers``: one model per subject that scores it instead of ``bundle`` (models that never saw
    their subject give the rates an unseen subject gets; with normalised scores these transfer).
    """
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    options = [ScoreOptions(**dict(opts.to_dict(), score_type=t)) for t in SCORE_TYPES]
    scores = _scores_by_option(bundle, subjects, options, post, scorers)
    log.info("Calibrated %s on %d healthy volume(s).", ", ".join(SCORE_TYPES), len(subjects))
    return {calibration_key(o.to_dict(), post.to_dict()): calibrate(v, source) for o, v in zip(options, scores)}


def recalibrate(bundle: Bundle, subjects: Sequence[Subject], out: Path, opts: ScoreOptions,
                post: PostprocessOptions, default_fpr: Optional[float] = None,
                source: str = "healthy volumes given to calibrate",
                scorers: Optional[Sequence[Bundle]] = None) -> Path:
    """Write ``bundle`` to ``out`` with new default scoring options and their calibration
    (``scorers``: see :func:`calibrate_model`)."""
    header = dict(bundle.header)
    header["score_options"] = ScoreOptions(**dict(opts.to_dict(), score_type="combi")).to_dict()
    header["postprocess"] = post.to_dict()
    header["calibration"] = calibrate_model(bundle, subjects, source, opts, post, scorers)
    header["calibration_subjects"] = [s.name for s in subjects]
    if default_fpr is not None:
        header["default_fpr"] = float(default_fpr)
    half = header.get("weights_dtype") == "float16"
    return save_bundle(out, bundle.model, header, half=half)
