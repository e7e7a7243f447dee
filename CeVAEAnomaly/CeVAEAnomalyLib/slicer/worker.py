"""The detection, calibration and adaptation worker: runs in its own process, started by the Slicer module.

``python -m CeVAEAnomalyLib.slicer.worker REQUEST.json`` reads a request, runs the task and
reports on stdout, one JSON object per line (see :mod:`.jobs` for the reading side)::

    {"progress": 0.42, "message": "Scoring slices"}
    {"done": {...}}            # last line on success (exit status 0)
    {"error": "one line"}      # last line on failure (exit status 2: a problem the user can fix)

The worker stops by itself (exit status 3, nothing written) when its request file disappears
(the module cancelled the job, or closed, and removed the job's folder) or, on POSIX, when its
parent process changes (the launcher ended) or the process that made the request (``owner_pid``:
Slicer, which a launcher may stand between) is gone; then it also removes the job's folder, which
holds a copy of the scan and nobody else will remove. A calibration or an adaptation removes it as
it ends in any case (its model is written elsewhere). It checks at every progress report and,
between them, in a watch thread every REQUEST_POLL_S seconds. SIGTERM stops it like Ctrl-C, so
files being written are removed.

Tasks (``request["task"]``):

- ``detect``: ``image`` and optional ``mask`` (image files), ``model`` (None: the bundled one),
  ``request`` (a :class:`~..options.DetectionRequest` as a dict); saves the result into
  ``out_dir`` (:func:`~..result.save_result`).
- ``calibrate``: ``subjects`` (``[{"image": ..., "mask": ...}]``), ``model``, ``request`` (its
  post-processing overrides and device), ``out`` (the new bundle), ``overwrite``.
- ``adapt``: ``subjects``, ``model``, ``device``, ``out``, ``overwrite`` and ``options`` (fields of
  ``training.adapt_plan.AdaptOptions``): fine-tunes and calibrates (``training.adapt.adapt``).

Nothing here imports Qt; torch is imported only when a task runs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..errors import CeVAEError, Wording, out_of_memory
from ..io import strict_json
from ..options import THOROUGH_STEPS, DetectionRequest
from ..progress import Cancelled, ProgressCallback, report, scaled
from ..system import process_exists
from . import dependencies
from .jobs import EXIT_ABANDONED, JOB_FOLDER_PREFIX

if TYPE_CHECKING:
    from ..io.manifest import Subject
    from ..engine.bundle import Bundle

log = logging.getLogger(__name__)
REQUEST_POLL_S = 0.25
LOG_FORMAT = "%(levelname)s: %(message)s"  # its warnings start with jobs.WARNING_PREFIX: the panel shows them
ABANDON_GRACE_S = 5.0  # after the main thread was interrupted, how long it may take to clean up
# how the panel's user stops, resumes or starts anew an adaptation, with the panel's controls (Cancel; Adapt, which
# asks Yes: resume, No: start anew, when the file's interrupted adaptation has checkpoints; Model; Device), as
# training.adapt's warnings and errors say it; and what a calibration's warnings advise (Calibrate, Adapt), where the
# panel sets no model's default rate but detection's Sensitivity chooses another
PANEL_WORDING = Wording(
    stop="press Cancel",
    resume="press Adapt again with the same volumes and file name and choose to resume (it asks first)",
    run_again="press Adapt again",
    resume_request="Resume",
    start_anew="press Adapt again and answer No (start anew) when it asks whether to resume",
    start_over="press Adapt again and answer No (start anew) when it asks whether to resume",
    same_model="Choose the model that adaptation started from (Use bundled model, or Model bundle) and resume",
    less_memory="close other programs that use its memory, or choose another device in the Device selector",
    cache_room="Free space there (the system's temporary folder, where an adaptation prepares its slices), then press "
               "Adapt again",
    cache_dir="the adaptation option cache_dir",  # (the panel's adaptations use a temporary folder; the logic's
    # caller may give one: startAdaptation(options={"cache_dir": ...}))
    out="file name for the adapted model",
    higher_rate="detect with a higher false-positive rate (Sensitivity: Chosen false-positive rate)",
    cpu_choice="choose CPU or Automatic in the Device selector",
    replace_model="press Adapt again and answer Yes when it asks whether to replace them, or choose another file name "
                  "for the adapted model",
    past_the_end="past the {steps} steps each run takes from the panel, which has no control for them: resume it with "
                 "the command that started it (cevae-anomaly adapt, with {step} steps or more), or press Adapt again "
                 "and answer No (start anew) when it asks whether to resume",
    same_settings="the panel resumes it with {steps} steps and learning rate {lr:g} a run; if it was started with "
                  "others (from the command line), press Cancel and resume it with the command that started it",
    detect_with="To detect with it, choose it as the Model bundle (the panel does so when the adaptation ends)",
    lower_rate="detect with a lower false-positive rate (Sensitivity: Chosen false-positive rate) or an absolute "
               "threshold (Sensitivity: Absolute threshold)",
    same_run="To resume it, choose the model and the healthy volumes it was started with and press Adapt again (one "
             "started from the command line: resume it with the command that started it)",
    other_model="it adapts another model than the one chosen (Use bundled model, or Model bundle)",
    other_volumes="it was started on other healthy volumes than those chosen",
    other_settings="it was started with other settings than the panel's (from the command line)",
    option_names=(),  # (what differs is named by kind: other_model, other_volumes, other_settings)
    # a person is known from a volume's name as a BIDS file name starts (adapt_panel.node_person)
    unknown_persons="No volume's name (sub-<label>_..., as BIDS names scans)",
    same_person="give their volumes names that start with the same sub-<label>_ (e.g. sub-01_ses-1_T1w and "
                "sub-01_ses-2_T1w)",
    unlike_scan="leave it out of the healthy volumes and adapt again unless it is a healthy scan of this protocol: "
                "the adapted model was fine-tuned on it too, so it may take what is unusual in it for healthy")
# what a calibration in the panel advises for a healthy volume unlike the others (engine.calibration.unlike_scans)
PANEL_CALIBRATE_UNLIKE_SCAN = ("leave it out of the healthy volumes and calibrate again unless it is a healthy scan of "
                               "this protocol")


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


def _subjects(task: Dict[str, Any]) -> List["Subject"]:
    """The healthy volumes of a calibration or adaptation request (image, mask, person scanned if known, and the
    name a model records: the node's, not the copy's file name)."""
    from ..io.manifest import Subject

    return [Subject(Path(s["image"]), Path(s["mask"]) if s.get("mask") else None, s.get("person") or None,
                    s.get("name") or None) for s in task["subjects"]]


def run_calibrate(task: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..engine.calibrate import readable_subjects, recalibrate, warn_of_training_scans
    from ..engine.calibration import SLICER_CALIBRATE_SOURCE
    from ..io.checksum import sha256_of
    from ..io.lock import hold_output
    from ..io.targets import Inputs
    from ..training.data import unique_subjects

    request = DetectionRequest.from_dict(task["request"], "detection request field(s)")
    subjects = _subjects(task)
    if not subjects:
        raise CeVAEError("Choose at least one healthy volume to calibrate on.")
    out = Path(task["out"])
    with hold_output(out, "calibration"):  # against a train, adapt or calibrate writing the same file
        if out.exists() and not task.get("overwrite"):
            raise CeVAEError(f"{out} exists already; choose another file name for the calibrated model.")
        report(progress, 0.0, "Loading the model")
        bundle = _load_bundle(task, request)
        if Inputs([bundle.path]).which(out) is not None:  # by path, link or inode
            raise CeVAEError("Save the calibrated model under a new name; it cannot replace the model it starts "
                             "from.")
        score, post = request.options(bundle.header.score_options, bundle.header.postprocess)
        checksums = {s.image: sha256_of(s.image) for s in subjects}  # once, for each step below (as the command line)
        # a volume loaded twice counts once; every copy that cannot be read is named in one error
        subjects = unique_subjects(subjects, readable_subjects(subjects, checksums))
        warn_of_training_scans(bundle.header, [s.image for s in subjects], checksums)
        path = recalibrate(bundle, subjects, out, score, post,
                           source=task.get("source", SLICER_CALIBRATE_SOURCE),
                           progress=scaled(progress, 0.02, 0.98), run=request.run, checksums=checksums,
                           higher_rate=PANEL_WORDING.higher_rate, unlike_scan=PANEL_CALIBRATE_UNLIKE_SCAN,
                           unknown_persons=PANEL_WORDING.unknown_persons, same_person=PANEL_WORDING.same_person,
                           read_checked=True)
    _warn_of_lost_thorough_mode(bundle, path)
    report(progress, 1.0, "Calibrated model saved")
    return {"model": str(path), "subjects": len(subjects)}


def _warn_of_lost_thorough_mode(source: "Bundle", calibrated: Path) -> None:
    """Warn, in the panel's words, when the model ``source`` is calibrated for the panel's thorough mode and its
    calibrated copy at ``calibrated`` is not (Calibrate with Thorough unticked): detection with it in that mode then
    needs an absolute threshold (the command line warns of every such mode: cli.commands._say_what_changed)."""
    from ..engine.calibration import lost_thorough_modes
    from ..engine.header import read_header

    if THOROUGH_STEPS in lost_thorough_modes(source.header.calibration, read_header(calibrated).calibration):
        log.warning("%s is calibrated for the thorough mode too (Advanced: 'Adapt the model to this scan first'); %s "
                    "is not, so with that mode ticked detection with it needs an absolute threshold. Tick it and "
                    "calibrate again to calibrate that mode too (each scan then takes about 13 to 50 s longer on 2 CPU "
                    "cores).",
                    source.path.name, calibrated.name)


def run_adapt(task: Dict[str, Any], progress: ProgressCallback) -> Dict[str, Any]:
    from ..data import default_model_path
    from ..training.adapt import adapt
    from ..training.adapt_plan import adapt_options

    subjects = _subjects(task)
    options = adapt_options(task.get("options") or {}, device=task.get("device", "auto"),
                            overwrite=bool(task.get("overwrite")))
    path = adapt(Path(task.get("model") or default_model_path()), subjects, Path(task["out"]), options, progress,
                 wording=PANEL_WORDING)
    return {"model": str(path), "subjects": len(subjects)}


SCRATCH_TASKS = ("calibrate", "adapt")  # tasks whose folder holds nothing to read afterwards (their model is elsewhere)
TASKS: Dict[str, Callable[[Dict[str, Any], ProgressCallback], Dict[str, Any]]] = {
    "detect": run_detect, "calibrate": run_calibrate, "adapt": run_adapt}


def _emit(message: Dict[str, Any]) -> None:
    try:
        sys.stdout.write(strict_json.dumps(message) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # nobody reads any more (Slicer ended): the watch stops the worker
        pass


class RequestWatch:
    """Whether the job is still wanted: its request file exists and (POSIX) the parent is the same and
    the owner (the process that made the request) is alive."""

    def __init__(self, request_path: Path, owner_pid: Optional[int] = None) -> None:
        self.path = request_path
        self._parent = os.getppid() if os.name == "posix" else None
        self._owner = owner_pid
        self._over = False  # the task has ended: nothing more to watch

    @property
    def orphaned(self) -> bool:
        """The launcher or the owner ended: nobody will read the result or remove the job's folder."""
        return ((self._parent is not None and os.getppid() != self._parent)
                or (self._owner is not None and not process_exists(self._owner)))

    @property
    def abandoned(self) -> bool:
        """Withdrawn while the task runs (after :meth:`stop`, its folder may go: that is no withdrawal)."""
        return not self._over and (not self.path.exists() or self.orphaned)

    def leave(self) -> None:
        """End the process now; an orphaned job first removes its folder (the copy of the scan in it)."""
        if self.orphaned:
            _remove_job_folder(self.path.parent)
        os._exit(EXIT_ABANDONED)

    def check(self) -> None:
        """Raise Cancelled if the job is no longer wanted (called at every progress report)."""
        if self.abandoned:
            raise Cancelled("The job was withdrawn.")

    def start(self) -> None:
        """Watch in a thread: once abandoned, interrupt the main thread (so files being written
        are removed); if it has not ended after ABANDON_GRACE_S, leave at once."""
        def watch() -> None:
            while not (self._over or self.abandoned):
                time.sleep(REQUEST_POLL_S)
            if self._over:  # (read after the folder check: a folder the ended task removed is no withdrawal)
                return
            import _thread

            _thread.interrupt_main()
            time.sleep(ABANDON_GRACE_S)
            self.leave()

        threading.Thread(target=watch, name="CeVAEAnomaly request watch", daemon=True).start()

    def stop(self) -> None:
        """The task has ended: stop watching (its folder may go now)."""
        self._over = True


def _remove_job_folder(folder: Path) -> None:
    """Remove a job's temporary folder (one the module made: its name says so)."""
    if folder.name.startswith(JOB_FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def _progress(watch: RequestWatch) -> ProgressCallback:
    def progress(fraction: float, message: str) -> None:
        watch.check()
        _emit({"progress": round(fraction, 4), "message": message})

    return progress


_TEXT, _OPTIONAL_TEXT = (str,), (str, type(None))
REQUEST_FIELDS: Dict[str, Dict[str, tuple]] = {  # task -> field -> the JSON types it may hold
    "detect": {"image": _TEXT, "mask": _OPTIONAL_TEXT, "model": _OPTIONAL_TEXT, "request": (dict,),
               "out_dir": _TEXT},
    "calibrate": {"subjects": (list,), "model": _OPTIONAL_TEXT, "request": (dict,), "out": _TEXT,
                  "overwrite": (bool,), "source": _OPTIONAL_TEXT},
    "adapt": {"subjects": (list,), "model": _OPTIONAL_TEXT, "device": _TEXT, "out": _TEXT, "overwrite": (bool,),
              "options": (dict,)},
}
OPTIONAL_FIELDS = ("mask", "model", "source", "overwrite", "options", "device", "name")  # the module may leave out
SUBJECT_FIELDS = {"image": _TEXT, "mask": _OPTIONAL_TEXT, "person": _OPTIONAL_TEXT, "name": _OPTIONAL_TEXT}


def read_request(path: Path) -> Dict[str, Any]:
    """The request file the module wrote (:class:`~.jobs.WorkerJob`), each field the task reads of its type; one cut
    short, edited or of another shape is refused in one line."""
    def damaged(what: str) -> CeVAEError:
        return CeVAEError(f"The worker's request file {path} is damaged: {what}. Start the run again.")

    try:
        data = path.read_bytes()
    except FileNotFoundError:  # its folder went before the worker started: the job was withdrawn
        raise Cancelled("The job was withdrawn.") from None
    except OSError as exc:
        raise CeVAEError(f"The worker's request file {path} could not be read ({exc}).") from None
    try:
        task = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (a UnicodeDecodeError is a ValueError)
        raise damaged(f"it is not JSON ({exc})") from None
    if not isinstance(task, dict):
        raise damaged(f"it holds {'a list' if isinstance(task, list) else type(task).__name__}, not a request")
    if task.get("task") not in REQUEST_FIELDS:
        raise CeVAEError(f"Unknown worker task {task.get('task')!r}.")
    owner = task.get("owner_pid")
    if owner is not None and (isinstance(owner, bool) or not isinstance(owner, int) or owner <= 0):
        raise damaged(f"'owner_pid' is {owner!r}, not a process id")
    _check_fields(task, REQUEST_FIELDS[task["task"]], "", damaged)
    for n, subject in enumerate(task.get("subjects", ()), 1):
        if not isinstance(subject, dict):
            raise damaged(f"subject {n} is {subject!r}, not an object")
        _check_fields(subject, SUBJECT_FIELDS, f"subject {n}: ", damaged)
    return task


def _check_fields(data: Dict[str, Any], kinds: Dict[str, tuple], where: str,
                  damaged: Callable[[str], CeVAEError]) -> None:
    """Refuse (``damaged``) a field of ``kinds`` that ``data`` lacks (unless optional) or holds of another type."""
    for name, kind in kinds.items():
        if name not in data:
            if name in OPTIONAL_FIELDS:
                continue
            raise damaged(f"{where}'{name}' is missing")
        if not isinstance(data[name], kind):
            expected = {dict: "an object", list: "a list", bool: "true or false"}.get(kind[0], "text")
            raise damaged(f"{where}'{name}' is {data[name]!r}, not {expected}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the request file named in ``argv``; the exit status says how it ended."""
    from ..interrupts import sigterm_as_interrupt

    args = sys.argv[1:] if argv is None else argv
    watch: Optional[RequestWatch] = None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    try:
        with sigterm_as_interrupt():
            if len(args) != 1:
                raise CeVAEError("usage: python -m CeVAEAnomalyLib.slicer.worker REQUEST.json")
            task = read_request(Path(args[0]))
            run = TASKS[task["task"]]
            watch = RequestWatch(Path(args[0]), task.get("owner_pid"))
            watch.start()
            try:
                dependencies.require()  # a Python without torch, or with one that fails to import: said in one line
                done = run(task, _progress(watch))
                watch.check()
            finally:
                if task.get("task") in SCRATCH_TASKS:  # its folder held copies of the scans only
                    watch.stop()
                    _remove_job_folder(Path(args[0]).parent)
    except (Cancelled, KeyboardInterrupt):  # withdrawn, SIGTERM (Cancel) or the watch: nothing more to say
        # Files being written were removed on the way here; skip the interpreter's teardown (about a
        # second with torch loaded), so that Cancel ends the process at once.
        if watch is None:
            os._exit(EXIT_ABANDONED)
        watch.leave()
    except Exception as exc:
        if watch is not None and watch.abandoned:  # failed because its folder went (e.g. its input): withdrawn
            watch.leave()
        if isinstance(exc, CeVAEError):
            _emit({"error": str(exc)})
            return 2
        if out_of_memory(exc):
            _emit({"error": "Out of memory: close other programs or use a machine with more memory."})
            return 1
        traceback.print_exc()  # a bug: keep the traceback for the log, one line for the user
        _emit({"error": f"Unexpected error: {exc!r} (details in the log)."})
        return 1
    _emit({"done": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
