"""Packaging a trained model: its header, calibration in memory, one complete write.

The bundle is calibrated on a copy of the model with exactly the weights the file will hold
(fp16-rounded for ``--half``) before anything is written, so the final name only ever holds a
complete, calibrated bundle: a kill or an error during packaging leaves no file there.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..engine.bundle import Bundle, save_bundle
from ..engine.calibrate import calibrate_model
from ..engine.detector import software_versions
from ..engine.config import LossConfig, PreprocessConfig
from ..engine.header import CONTENT_KEY, BundleHeader, utc_now
from ..engine.modality import T1_DEPTH_CONTRAST, unlike
from ..engine.model import CeVAE
from ..errors import CALIBRATE_PER_ACQUISITION, COMMAND_LINE_TRAIN, CeVAEError, Wording, WriteFailed
from ..io.checksum import FileMemo, changed_while_read, first_changed
from ..io.targets import write_remedy
from ..options import RECOMMENDED_POSTPROCESS, ScoreOptions
from ..progress import ProgressCallback
from .data import Subject

log = logging.getLogger(__name__)


@dataclass
class TrainingRecord:
    """How the model was trained (the bundle header's ``training`` section; :func:`package` adds ``trained_utc``,
    when it writes the model)."""

    # name, sha256 and content_sha256 of each training image, sha256 of its mask, person scanned
    subjects: List[Dict[str, Optional[str]]]
    validation_subjects: List[Dict[str, Optional[str]]]
    train_slices: int
    orientations: List[str]
    steps: int
    batch_size: int  # effective: per rank (at most the slices each rank has) times ranks
    lr: float
    seed: int
    seconds: float  # training time in all, over every resumed part of the run
    ranks: int
    augment: Dict[str, float]
    val_loss: Optional[float]  # None: no volume was held out
    amp: bool  # mixed precision (bfloat16 on the CPU, float16 on CUDA): other weights from the same seed
    device: str  # the kind of device that trained it ("cpu", "cuda", "mps")
    # a run resumed with another learning rate, number of ranks or batch size per rank: from which step each held
    # (lr, ranks and batch_size above: the last part's); None when the whole run had one
    parts: Optional[List[Dict[str, object]]] = None


def training_header(name: str, preprocess: PreprocessConfig, loss: LossConfig,
                    training: TrainingRecord) -> BundleHeader:
    """The header of a newly trained model: the recommended post-processing, by default the maps of every orientation
    it was trained on averaged (axial first, as the bundled model's; a model trained on several used to score axial
    slices alone unless asked), the training record and the versions it was made with (its calibration is added by
    :func:`package`)."""
    from .. import __version__

    trained = [o for o in dict.fromkeys(training.orientations) if o != "axial"]  # (train refuses runs without axial)
    scoring = ScoreOptions(orientations=",".join(["axial", *trained]))
    return BundleHeader(preprocess=preprocess, name=name, loss=loss, postprocess=RECOMMENDED_POSTPROCESS,
                        score_options=scoring,
                        training={k: v for k, v in asdict(training).items() if k != "parts" or v is not None},
                        extra={"versions": {"cevae_anomaly": __version__, **software_versions()}})


def with_contrast(header: BundleHeader, contrasts: Sequence[Optional[float]]) -> BundleHeader:
    """``header`` recording its training volumes' depth contrast (in the order of its training subjects; None
    where a volume's could not be told), which ``calibrate`` and ``adapt`` check new scans against; a model
    trained on volumes that do not look T1-weighted is recorded as modality "other"."""
    known = [c for c in contrasts if c is not None]
    if not known:
        return header
    mean = round(float(sum(known) / len(known)), 4)
    modality = header.modality
    if unlike(mean, T1_DEPTH_CONTRAST):
        modality = "other"
        log.warning("The training volumes' depth contrast (%+.2f) is not a T1's (%+.2f): the model is recorded as "
                    "modality 'other', and calibrate and adapt accept scans like its training volumes.", mean,
                    T1_DEPTH_CONTRAST)
    return replace(header, modality=modality,
                   extra=dict(header.extra, training_contrast={"depth_contrast": mean,
                                                               "scan_depth_contrast": list(contrasts)}))


def person_numbers(subjects: Sequence[Subject]) -> Dict[str, str]:
    """Each person of ``subjects`` (:attr:`~..io.manifest.Subject.group`) numbered "1", "2", ... in order of first
    appearance: a model file records which volumes are of one person, never the label (it may be a patient's ID)."""
    numbers: Dict[str, str] = {}
    for s in subjects:
        if s.group[0] == "person":
            numbers.setdefault(s.group[1], str(len(numbers) + 1))
    return numbers


def subject_records(subjects: Sequence[Subject], checksums: Dict[Path, str],
                    names: Optional[Dict[Path, str]] = None, persons: Optional[Dict[str, str]] = None,
                    contents: Optional[Mapping[Path, Optional[str]]] = None) -> List[Dict[str, Optional[str]]]:
    """Name (``names``, e.g. :func:`~..io.manifest.distinct_names`; else the file stem) and sha256 of each volume,
    of its brain mask (None: the mask was computed automatically) and the number of the person scanned, as a split
    by person tells them apart (``persons``, one :func:`person_numbers` for all lists of a run; by default those of
    ``subjects``; None: not known, a person of its own); with ``contents`` (:func:`~..io.checksum.content_checksums`)
    each volume's content_sha256 too, by which calibrate and adapt tell it saved in another file."""
    persons = person_numbers(subjects) if persons is None else persons
    return [{"name": (names or {}).get(s.image, s.name), "sha256": checksums[s.image],
             **({CONTENT_KEY: contents.get(s.image)} if contents is not None else {}),
             "mask_sha256": checksums[s.mask] if s.mask is not None else None,
             "person": persons[s.group[1]] if s.group[0] == "person" else None} for s in subjects]


def _stamped(training: Optional[Dict[str, object]]) -> Optional[Dict[str, object]]:
    """A training record with the time its model is written (``trained_utc``, UTC: see engine.header.utc_now)."""
    return None if training is None else dict(training, trained_utc=utc_now())


def _refuse_changed_calibration(calib_subjects: Sequence[Subject], checksums: Mapping[Path, str], wording: Wording,
                                memo: Optional[FileMemo]) -> None:
    """Refuse, in one line, a calibration scan or brain mask no longer of the content ``checksums`` holds, naming
    which of the two it is and how the run is resumed (``wording``) to write the model from its last checkpoint."""
    changed = first_changed((p for s in calib_subjects for p in (s.image, s.mask)), checksums, memo)
    if changed is None:
        return
    kind = "brain mask" if any(changed == s.mask for s in calib_subjects) else "scan"
    raise changed_while_read(changed, f"the trained weights are in the last checkpoint: with the {kind} as it was "
                                      f"when the run began, {wording.resume} to write the model (the run's record "
                                      "holds the checksum of each scan and brain mask; with the new content the run "
                                      "starts over).")


def package(out: Path, model: CeVAE, header: BundleHeader, calib_subjects: Sequence[Subject], source: str,
            device: torch.device, half: bool, scorers: Optional[Sequence[Bundle]] = None,
            progress: Optional[ProgressCallback] = None, test_time_steps: Sequence[int] = (),
            checksums: Optional[Mapping[Path, str]] = None, wording: Wording = COMMAND_LINE_TRAIN,
            memo: Optional[FileMemo] = None, per_acquisition: Optional[str] = CALIBRATE_PER_ACQUISITION) -> Path:
    """Calibrate the weights as stored (or, if given, by ``scorers[i]`` scoring subject i; ``test_time_steps``:
    thorough modes calibrated too: see engine.calibrate.calibrate_model), then write the bundle once.

    ``checksums``: the sha256 of every image and mask, taken before the run first read them, which ``header`` records;
    a calibration scan or brain mask that no longer has that content once scored is refused (naming which) and
    nothing is written. None: ``header`` records no checksums (a benchmark's fold model). ``wording``: the caller's
    words for how its user resumes the run from its last checkpoint, for the errors that keep it, and for the
    calibration's warnings. ``memo``: the one that hashed them (a scan unchanged since is not read again).
    ``per_acquisition``: what the calibration's warning of scans of different acquisitions advises (None: the caller
    warned of them already)."""
    stored = CeVAE(model.cfg)
    stored.load_state_dict({k: (v.half() if half else v).float() for k, v in model.state_dict().items()})
    stored.eval().to(device)
    bundle = Bundle(stored, header, out)
    calibration = calibrate_model(bundle, calib_subjects, source, header.score_options, header.postprocess,
                                  progress, scorers, test_time_steps=test_time_steps, fpr=header.default_fpr,
                                  higher_rate=wording.higher_rate, unlike_scan=wording.unlike_scan,
                                  per_acquisition=per_acquisition)
    if checksums is not None:  # the scans scored are those the record names
        _refuse_changed_calibration(calib_subjects, checksums, wording, memo)
    try:
        return save_bundle(out, model, replace(header, calibration=calibration, training=_stamped(header.training)),
                           half=half)
    except CeVAEError as exc:  # could not write: the temporary file is removed, nothing is published
        cause = (exc.cause if isinstance(exc, WriteFailed) else None) or exc  # (else a short write: disk full?)
        raise CeVAEError(f"{exc} The last checkpoint is kept. {write_remedy(cause, out.parent)}, then "
                         f"{wording.resume}.") from None
