"""The detection, calibration and adaptation worker: runs in its own process, started by the Slicer module.

``python -m CeVAEAnomalyLib.slicer.worker REQUEST.json`` reads a request, runs the task and
reports on stdout, one JSON object per line (see :mod:`.jobs` for the reading side)::

    {"progress": 0.42, "message": "Scoring slices"}
    {"done": {...}}            # last line on success (exit status 0)
    {"error": "one line"}      # last line on failure (exit status 2: a problem the user can fix)

Tasks (``request["task"]``):

- ``detect``: ``image`` and optional ``mask`` (image files), ``model`` (None: the bundled one),
  ``request`` (a :class:`~..options.DetectionRequest` as a dict); saves the result into
  ``out_dir`` (:func:`~..result.save_result`).
- ``calibrate``: ``subjects`` (``[{"image": ..., "mask": ...}]``), ``model``, ``request`` (its
  post-processing overrides and device), ``out`` (the new bundle), ``overwrite``.
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
from ..options import DetectionRequest
from ..progress import ProgressCallback, report, scaled

if TYPE_CHECKING:
    from ..engine.bundle import Bundle


def _load_bundle(task: Dict[str, Any], request: DetectionRequest) -> "Bundle":
    from ..data import default_model_path
    from ..engine.bundle import load_bundle
    from ..engine.devices import resolve_device

    return load_bundle(task.get("model") or default_model_path(), resolve_device(request.run.device))


def run_detect(task: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..engine.detector import Detector
    from ..io.images import read_image
    from ..result import save_result

    request = DetectionRequest.from_dict(task["request"], "detection request field(s)")
    report(progress, 0.0, "Reading the volume")
    image = read_image(Path(task["image"]))
    mask = read_image(Path(task["mask"]), "brain mask") if task.get("mask") else None
    report(progress, 0.02, "Loading the model")
    bundle = _load_bundle(task, request)
    result = Detector.from_request(bundle, request)(image, mask, progress=scaled(progress, 0.05, 0.97))
    report(progress, 0.97, "Writing the results")
    save_result(result, Path(task["out_dir"]))
    return {"components": len(result.components), "threshold": result.threshold}


def run_calibrate(task: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..engine.calibrate import recalibrate
    from ..io.manifest import Subject
    from ..io.targets import Inputs

    request = DetectionRequest.from_dict(task["request"], "detection request field(s)")
    subjects = [Subject(Path(s["image"]), Path(s["mask"]) if s.get("mask") else None) for s in task["subjects"]]
    if not subjects:
        raise CeVAEError("Choose at least one healthy volume to calibrate on.")
    out = Path(task["out"])
    if out.exists() and not task.get("overwrite"):
        raise CeVAEError(f"{out} exists already; choose another file name for the calibrated model.")
    report(progress, 0.0, "Loading the model")
    bundle = _load_bundle(task, request)
    if Inputs([bundle.path]).which(out) is not None:  # by path, link or inode
        raise CeVAEError("Save the calibrated model under a new name; it cannot replace the model it starts from.")
    score, post = request.options(bundle.header.score_options, bundle.header.postprocess)
    path = recalibrate(bundle, subjects, out, score, post, source=task.get("source", "healthy volumes of the site"),
                       progress=scaled(progress, 0.02, 0.98))
    report(progress, 1.0, "Calibrated model saved")
    return {"model": str(path), "subjects": len(subjects)}


def run_adapt(task: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..data import default_model_path
    from ..io.manifest import Subject
    from ..training.adapt import adapt
    from ..training.adapt_plan import AdaptOptions

    subjects = [Subject(Path(s["image"]), Path(s["mask"]) if s.get("mask") else None) for s in task["subjects"]]
    try:
        options = AdaptOptions(**dict(task.get("options") or {}, device=task.get("device", "auto"),
                                      overwrite=bool(task.get("overwrite"))))
    except TypeError as exc:
        raise CeVAEError(f"Invalid adaptation options: {exc}") from None
    path = adapt(Path(task.get("model") or default_model_path()), subjects, Path(task["out"]), options, progress)
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
