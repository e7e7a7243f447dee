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
    values = []
    for s in subjects:
        image = read_image(s.image)
        mask = read_image(s.mask, "brain mask") if s.mask else None
        res = detect(image, bundle, mask, opts, post, threshold=float("inf"))
        brain = sitk.GetArrayViewFromImage(res.brain_mask) > 0
        values.append(np.asarray(sitk.GetArrayViewFromImage(res.score)[brain], np.float32))
    return values


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup."""
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    out = {}
    for score_type in SCORE_TYPES:
        o = ScoreOptions(**dict(opts.to_dict(), score_type=score_type))
        out[calibration_key(o.to_dict(), post.to_dict())] = calibrate(healthy_scores(bundle, subjects, o, post), source)
        log.info("Calibrated %s on %d healthy volume(s).", score_type, len(subjects))
    return out


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
