"""The detection, calibration and adaptation worker: runs in its own process, started by the Slicer module.

``python -m CeVAEAnomalyLib.slicer.worker REQUEST.json`` reads a request, runs the task and
reports on stdout, one JSON object per line (see :mod:`.jobs` for the reading side)::

    {"progress": 0.42, "message": "Scoring slices"}
    {"done": {...}}            # last line on success (exit status 0)
    {"error": "one line"}      # last line on failure (exit status 2: a problem the user can fix)

Tasks (``request["task"]``):

- ``detect``: ``image`` and optional ``mask`` (image files), ``model`` (None: the bundled one),
  ``device``, ``batch_size``, ``score_type``, ``fpr``, ``threshold``, ``postprocess`` (overrides);
  writes the detection into ``out_dir`` (:func:`write_detection`).
- ``calibrate``: ``subjects`` (``[{"image": ..., "mask": ...}]``), ``model``, ``device``,
  ``postprocess``, ``out`` (the new bundle), ``overwrite``.
- ``adapt``: ``subjects``, ``model``, ``device``, ``out``, ``overwrite`` and ``options`` (fields of
  ``training.adapt_plan.AdaptOptions``): fine-tunes and calibrates (``training.adapt.adapt``).

SIGTERM (the module's Cancel) ends a task like Ctrl-C, so its temporary files are removed.

Nothing here imports Qt; torch is imported only when a task runs.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..cli.interrupts import sigterm_as_interrupt
from ..errors import CeVAEError
from ..progress import ProgressCallback, report, scaled

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..engine.bundle import Bundle
    from ..engine.detector import DetectionResult
    from ..options import PostprocessOptions

RESULT_FILES = {"score": "score.nrrd", "labelmap": "labelmap.nrrd", "brain_mask": "brain_mask.nrrd"}
SUMMARY_FILE = "detection.json"


def detect_image(
    image: "sitk.Image",
    mask: Optional["sitk.Image"],
    bundle: "Bundle",
    score_type: Optional[str] = None,
    fpr: Optional[float] = None,
    threshold: Optional[float] = None,
    postprocess: Optional[Dict[str, Any]] = None,
    batch_size: int = 32,
    progress: Optional[ProgressCallback] = None,
) -> "DetectionResult":
    """One detection with the bundle's scoring (``score_type``: None for the bundle's own) and
    post-processing, ``postprocess`` overriding the latter."""
    from ..engine.detector import Detector, default_score_options
    from ..options import ThresholdPolicy

    options = default_score_options(bundle).replace(score_type=score_type)
    detector = Detector(bundle, options, _postprocess(bundle, postprocess), ThresholdPolicy(threshold, fpr),
                        batch_size=batch_size)
    return detector(image, mask, progress=progress)


def _postprocess(bundle: "Bundle", overrides: Optional[Dict[str, Any]]) -> "PostprocessOptions":
    """The bundle's post-processing with ``overrides`` applied."""
    from ..engine.detector import default_postprocess

    try:
        return default_postprocess(bundle).replace(**(overrides or {}))
    except TypeError as exc:
        raise CeVAEError(f"Invalid post-processing options: {exc}") from None


def write_detection(result: "DetectionResult", folder: Path) -> None:
    """The detection as image files and a JSON summary (read back by :func:`read_detection`), each
    checked complete before it is renamed into place."""
    from dataclasses import asdict

    from ..io.atomic import write_all

    files: Dict[Path, object] = {folder / name: getattr(result, key) for key, name in RESULT_FILES.items()}
    summary = dict(threshold=result.threshold, threshold_source=result.threshold_source,
                   slices=[asdict(r) for r in result.slices], components=[asdict(c) for c in result.components])
    files[folder / SUMMARY_FILE] = json.dumps(summary)
    write_all(files, overwrite=True)


def read_detection(folder: Path) -> "DetectionResult":
    """The detection :func:`write_detection` wrote into ``folder``."""
    import SimpleITK as sitk

    from ..engine.detector import DetectionResult, SliceScoreRow
    from ..engine.postprocess import Component

    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        images = {key: sitk.ReadImage(str(folder / name)) for key, name in RESULT_FILES.items()}
    except (OSError, RuntimeError, ValueError) as exc:
        raise CeVAEError(f"The detection results in {folder} could not be read ({exc}).") from None
    components = [Component(**dict(c, centroid_lps=tuple(c["centroid_lps"]))) for c in summary["components"]]
    return DetectionResult(images["score"], images["labelmap"], images["brain_mask"], summary["threshold"],
                           summary["threshold_source"], [SliceScoreRow(**r) for r in summary["slices"]],
                           components)


def _load_bundle(request: Dict[str, Any]) -> "Bundle":
    from ..data import default_model_path
    from ..engine.bundle import load_bundle
    from ..engine.devices import resolve_device

    return load_bundle(request.get("model") or default_model_path(), resolve_device(request.get("device", "auto")))


def run_detect(request: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..io.images import read_image

    report(progress, 0.0, "Reading the volume")
    image = read_image(Path(request["image"]))
    mask = read_image(Path(request["mask"]), "brain mask") if request.get("mask") else None
    report(progress, 0.02, "Loading the model")
    bundle = _load_bundle(request)
    result = detect_image(image, mask, bundle, request.get("score_type"), request.get("fpr"),
                          request.get("threshold"), request.get("postprocess"), int(request.get("batch_size", 32)),
                          scaled(progress, 0.05, 0.97))
    report(progress, 0.97, "Writing the results")
    write_detection(result, Path(request["out_dir"]))
    return {"components": len(result.components), "threshold": result.threshold}


def run_calibrate(request: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..engine.calibrate import recalibrate
    from ..engine.detector import default_score_options
    from ..io.manifest import Subject
    from ..io.targets import Inputs

    subjects = [Subject(Path(s["image"]), Path(s["mask"]) if s.get("mask") else None) for s in request["subjects"]]
    if not subjects:
        raise CeVAEError("Choose at least one healthy volume to calibrate on.")
    out = Path(request["out"])
    if out.exists() and not request.get("overwrite"):
        raise CeVAEError(f"{out} exists already; choose another file name for the calibrated model.")
    report(progress, 0.0, "Loading the model")
    bundle = _load_bundle(request)
    if Inputs([bundle.path]).which(out) is not None:  # by path, link or inode
        raise CeVAEError("Save the calibrated model under a new name; it cannot replace the model it starts from.")
    post = _postprocess(bundle, request.get("postprocess"))
    path = recalibrate(bundle, subjects, out, default_score_options(bundle), post,
                       source=request.get("source", "healthy volumes of the site"),
                       progress=scaled(progress, 0.02, 0.98))
    report(progress, 1.0, "Calibrated model saved")
    return {"model": str(path), "subjects": len(subjects)}


def run_adapt(request: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..data import default_model_path
    from ..io.manifest import Subject
    from ..training.adapt import adapt
    from ..training.adapt_plan import AdaptOptions

    subjects = [Subject(Path(s["image"]), Path(s["mask"]) if s.get("mask") else None) for s in request["subjects"]]
    try:
        options = AdaptOptions(**dict(request.get("options") or {}, device=request.get("device", "auto"),
                                      overwrite=bool(request.get("overwrite"))))
    except TypeError as exc:
        raise CeVAEError(f"Invalid adaptation options: {exc}") from None
    path = adapt(Path(request.get("model") or default_model_path()), subjects, Path(request["out"]), options, progress)
    return {"model": str(path), "subjects": len(subjects)}


TASKS: Dict[str, Callable[[Dict[str, Any], ProgressCallback], Dict[str, Any]]] = {
    "detect": run_detect, "calibrate": run_calibrate, "adapt": run_adapt}


def _emit(message: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the request file named in ``argv``; the exit status says how it ended."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        if len(args) != 1:
            raise CeVAEError("usage: python -m CeVAEAnomalyLib.slicer.worker REQUEST.json")
        request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        task = TASKS.get(request.get("task"))
        if task is None:
            raise CeVAEError(f"Unknown worker task {request.get('task')!r}.")
        with sigterm_as_interrupt():
            done = task(request, lambda f, m: _emit({"progress": round(f, 4), "message": m}))
    except KeyboardInterrupt:  # Terminated included: cancelled, cleaned up
        _emit({"error": "Stopped."})
        return 143
    except CeVAEError as exc:
        _emit({"error": str(exc)})
        return 2
    except Exception as exc:  # a bug: keep the traceback for the log, one line for the user
        traceback.print_exc()
        _emit({"error": f"Unexpected error: {exc!r} (details in the log)."})
        return 1
    _emit({"done": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
