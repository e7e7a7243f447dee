"""Packaging a trained model: the typed bundle header, calibration in memory, one complete write.

The bundle is calibrated on a copy of the model with exactly the weights the file will hold
(fp16-rounded for ``--half``) before anything is written, so the final name only ever holds a
complete, calibrated bundle: a kill or an error during packaging leaves no file there.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..engine.bundle import Bundle, save_bundle
from ..engine.calibrate import calibrate_model
from ..engine.config import LossConfig, PreprocessConfig
from ..engine.model import CeVAE
from ..errors import CeVAEError
from ..options import RECOMMENDED_POSTPROCESS, PostprocessOptions, ScoreOptions
from ..progress import ProgressCallback
from .data import Subject

log = logging.getLogger(__name__)


@dataclass
class TrainingRecord:
    """How the model was trained (the bundle header's ``training`` section)."""

    subjects: List[Dict[str, str]]  # name and sha256 of each training image
    validation_subjects: List[Dict[str, str]]
    train_slices: int
    orientations: List[str]
    steps: int
    batch_size: int  # effective: per rank times ranks
    lr: float
    seed: int
    seconds: float
    ranks: int
    augment: Dict[str, float]
    val_loss: float


@dataclass
class BundleHeader:
    """The header a training run writes (bundle.save_bundle adds format, model and weight type)."""

    name: str
    preprocess: PreprocessConfig
    loss: LossConfig
    training: TrainingRecord
    score_options: ScoreOptions = field(default_factory=ScoreOptions)
    postprocess: PostprocessOptions = RECOMMENDED_POSTPROCESS
    modality: str = "T1"
    calibration: Optional[Dict[str, dict]] = None
    default_fpr: Optional[float] = None  # the rate detection uses when given none (else DEFAULT_FPR)
    adaptation: Optional[Dict[str, Any]] = None  # parent model, site scans, folds (training/adapt.py)

    def to_dict(self) -> Dict[str, Any]:
        from .. import __version__

        out: Dict[str, Any] = {
            "name": self.name, "modality": self.modality, "preprocess": self.preprocess.to_dict(),
            "loss": self.loss.to_dict(), "score_options": self.score_options.to_dict(),
            "postprocess": self.postprocess.to_dict(), "training": asdict(self.training),
            "versions": {"cevae_anomaly": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        for key in ("calibration", "default_fpr", "adaptation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def subject_records(subjects: Sequence[Subject], checksums: Dict[Path, str]) -> List[Dict[str, str]]:
    return [{"name": s.name, "sha256": checksums[s.image]} for s in subjects]


def package(out: Path, model: CeVAE, header: BundleHeader, calib_subjects: Sequence[Subject], source: str,
            device: torch.device, half: bool, scorers: Optional[Sequence[Bundle]] = None,
            progress: Optional[ProgressCallback] = None) -> Path:
    """Calibrate the weights as stored (or, if given, by ``scorers[i]`` scoring subject i: see
    engine.calibrate.calibrate_model), then write the bundle once."""
    stored = CeVAE(model.cfg)
    stored.load_state_dict({k: (v.half() if half else v).float() for k, v in model.state_dict().items()})
    stored.eval().to(device)
    bundle = Bundle(stored, header.to_dict(), out)
    header.calibration = calibrate_model(bundle, calib_subjects, source, header.score_options, header.postprocess,
                                         progress, scorers)
    from safetensors import SafetensorError

    try:
        return save_bundle(out, model, header.to_dict(), half=half)
    except (OSError, SafetensorError) as exc:  # the temporary file is removed, nothing is published
        raise CeVAEError(f"Could not write the model bundle {out}: {exc}. The last checkpoint is kept; "
                         "free some space and run again with --resume.") from None
