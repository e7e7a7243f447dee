"""Calibrating a model bundle on healthy volumes (runs the detection pipeline)."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .bundle import Bundle, save_bundle
from .calibration import calibrate, calibration_key
from ..io.manifest import Subject
from .brainmask import given_or_computed_mask
from ..errors import CeVAEError
from ..io.images import read_image
from ..options import SCORE_TYPES, PostprocessOptions, RunOptions, ScoreOptions, ThresholdPolicy
from .detector import Detector
from ..progress import ProgressCallback, labelled, report, scaled

log = logging.getLogger(__name__)


def healthy_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions,
                   post: PostprocessOptions) -> List[np.ndarray]:
    """Brain-voxel scores of each healthy subject."""
    return [s[opts.score_type] for s in _subject_scores(bundle, subjects, opts, post, [opts.score_type])]


def _subject_scores(bundle: Bundle, subjects: Sequence[Subject], opts: ScoreOptions, post: PostprocessOptions,
                    score_types: Sequence[str], progress: Optional[ProgressCallback] = None,
                    scorers: Optional[Sequence[Bundle]] = None,
                    run: RunOptions = RunOptions()) -> List[Dict[str, np.ndarray]]:
    """For each subject, the brain-voxel scores of every score type (one read, one network pass in
    batches of ``run``), scored by ``bundle`` or, if given, by ``scorers[i]`` for subject i.

    ``progress`` is called per subject and during an automatic brain mask; it may raise
    :class:`~..progress.Cancelled`.
    """
    models = list(scorers) if scorers is not None else [bundle] * len(subjects)
    if len(models) != len(subjects):
        raise CeVAEError("Give one scoring model per calibration subject.")
    detectors = {id(m): Detector(m, opts, post, ThresholdPolicy(threshold=math.inf), run.batch_size, run.amp)
                 for m in models}
    out = []
    for n, (s, model) in enumerate(zip(subjects, models)):
        detector = detectors[id(model)]
        part = labelled(scaled(progress, n / len(subjects), (n + 1) / len(subjects)),
                        f"Healthy volume {n + 1}/{len(subjects)} ({s.name})")
        report(part, 0.0, "Reading")
        image = read_image(s.image)
        mask = given_or_computed_mask(image, s.mask, s.name, progress=scaled(part, 0.0, 0.3))
        report(part, 0.3, "Scoring")
        out.append(detector.brain_scores(image, mask, score_types))
    report(progress, 1.0, "Scored every healthy volume")
    return out


def calibrate_model(bundle: Bundle, subjects: Sequence[Subject], source: str, opts: ScoreOptions,
                    post: PostprocessOptions, progress: Optional[ProgressCallback] = None,
                    scorers: Optional[Sequence[Bundle]] = None, run: RunOptions = RunOptions()) -> Dict[str, dict]:
    """Calibrations for every score type with otherwise the given options, keyed for lookup (the network
    runs as ``run`` says: batch size, mixed precision).

    ``scorers``: one model per subject that scores it instead of ``bundle`` (models that never saw
    their subject give the rates an unseen subject gets; with normalised scores these transfer).
    """
    if not subjects:
        raise CeVAEError("No healthy volumes to calibrate on.")
    scores = _subject_scores(bundle, subjects, opts, post, SCORE_TYPES, progress, scorers, run)
    log.info("Calibrated %s on %d healthy volume(s).", ", ".join(SCORE_TYPES), len(subjects))
    return {calibration_key(opts.replace(score_type=t), post): calibrate([s[t] for s in scores], source)
            for t in SCORE_TYPES}


def recalibrate(bundle: Bundle, subjects: Sequence[Subject], out: Path, opts: ScoreOptions,
                post: PostprocessOptions, default_fpr: Optional[float] = None,
                source: str = "healthy volumes given to calibrate",
                progress: Optional[ProgressCallback] = None, scorers: Optional[Sequence[Bundle]] = None,
                run: RunOptions = RunOptions()) -> Path:
    """Write ``bundle`` to ``out`` with new default scoring options and their calibration
    (``scorers``, ``run``: see :func:`calibrate_model`)."""
    old = bundle.header
    header = replace(old, score_options=opts.replace(score_type="combi"), postprocess=post,
                     calibration=calibrate_model(bundle, subjects, source, opts, post, progress, scorers, run),
                     default_fpr=old.default_fpr if default_fpr is None else float(default_fpr),
                     extra=dict(old.extra, calibration_subjects=[s.name for s in subjects]))
    return save_bundle(out, bundle.model, header, half=old.weights_dtype == "float16")
