"""Calibrating a model bundle on healthy volumes (runs the detection pipeline)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, save_bundle
from .calibration import calibrate, calibration_key
from ..training.data import Subject
from ..errors import CeVAEError
from ..io.images import read_image
from .detector import detect
from .postprocess import PostprocessOptions
from .scoring import SCORE_TYPES, ScoreOptions
from ..progress import ProgressCallback, labelled, scaled

log = logging.getLogger(__name__)


def healthy_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions,
                   post: PostprocessOptions) -> List[np.ndarray]:
    """Brain-voxel scores of each healthy subject."""
    return _scores_by_option(bundle, subjects, [opts], post)[0]


def _scores_by_option(bundle: Bundle, subjects: Sequence[Subject], options: Sequence[ScoreOptions],
                      post: PostprocessOptions, progress: Optional[ProgressCallback] = None) -> List[List[np.ndarray]]:
    """For every scoring in ``options``, the brain-voxel scores of each subject.

    Each subject is read, and its brain mask computed if it has none, once for all scorings.
    ``progress`` may raise :class:`~..progress.Cancelled`.
    """
    values: List[List[np.ndarray]] = [[] for _ in options]
    for n, s in enumerate(subjects):
        part = labelled(scaled(progress, n / len(subjects), (n + 1) / len(subjects)),
                        f"Healthy volume {n + 1}/{len(subjects)} ({s.name})")
        image = read_image(s.image)
        if s.mask:
            mask = read_image(s.mask, "brain mask")
        else:
            from .brainmask import compute_brain_mask

            mask = compute_brain_mask(image, progress=scaled(part, 0.0, 0.2))
        for j, (out, opts) in enumerate(zip(values, options)):
            res = detect(image, bundle, mask, opts, post, threshold=float("inf"),
                         progress=scaled(part, 0.2 + 0.8 * j / len(options), 0.2 + 0.8 * (j + 1) / len(options)))
            brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
            out.append(np.asarray(sitk.GetArrayViewFromImage(res.score)[brain], np.float32))
    return values


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions, progress: Optional[ProgressCallback] = None) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup."""
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    options = [ScoreOptions(**dict(opts.to_dict(), score_type=t)) for t in SCORE_TYPES]
    scores = _scores_by_option(bundle, subjects, options, post, progress)
    log.info("Calibrated %s on %d healthy volume(s).", ", ".join(SCORE_TYPES), len(subjects))
    return {calibration_key(o.to_dict(), post.to_dict()): calibrate(v, source) for o, v in zip(options, scores)}


def recalibrate(bundle: Bundle, subjects: Sequence[Subject], out: Path, opts: ScoreOptions,
                post: PostprocessOptions, default_fpr: Optional[float] = None,
                source: str = "healthy volumes given to calibrate",
                progress: Optional[ProgressCallback] = None) -> Path:
    """Write ``bundle`` to ``out`` with new default scoring options and their calibration."""
    header = dict(bundle.header)
    header["score_options"] = ScoreOptions(**dict(opts.to_dict(), score_type="combi")).to_dict()
    header["postprocess"] = post.to_dict()
    header["calibration"] = calibrate_model(bundle, subjects, source, opts, post, progress)
    header["calibration_subjects"] = [s.name for s in subjects]
    if default_fpr is not None:
        header["default_fpr"] = float(default_fpr)
    half = header.get("weights_dtype") == "float16"
    return save_bundle(out, bundle.model, header, half=half)
