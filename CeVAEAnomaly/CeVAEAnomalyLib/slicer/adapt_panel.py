"""What the "Adapt to this scanner" and calibration sections offer before a run: ready or not, the time it
will take, and which files it would replace (Qt-free; the widget shows it and asks before replacing)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..engine.calibration import largest_side
from ..engine.header import BUNDLE_SUFFIX
from ..io.manifest import bids_person, scan_group
from ..io.targets import Inputs
from ..training.adapt_plan import (MIN_SCANS, AdaptOptions, describe_estimate, earlier_outputs, mixed_acquisitions,
                                   resumable)
from .gui_binding import typed_path


@dataclass(frozen=True)
class AdaptChoice:
    """``ready``: the Adapt button may start a run; ``message``: the estimate, or what is missing;
    ``existing``: files of an earlier run the new one would replace."""

    ready: bool
    message: str
    existing: List[Path] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        """Whether the files of the earlier run are an interrupted adaptation that can be resumed."""
        return resumable(self.existing)


_BARE_PERSON = re.compile(r"sub-([A-Za-z0-9]+)\Z")  # a node named after its person alone: "sub-01"


def node_person(name: str) -> Optional[str]:
    """The person a healthy volume's node ``name`` says was scanned (a BIDS name's ``sub-<label>``, or the name
    ``sub-<label>`` alone), or None."""
    bare = _BARE_PERSON.match(name)
    return bare.group(1) if bare else bids_person(Path(f"{name}.nrrd"))


def persons_scanned(persons: Sequence[Optional[str]]) -> int:
    """How many persons scans of ``persons`` (None: not known) are of, as adapting counts them for its folds and files
    (training.data.person_groups, by :func:`~..io.manifest.scan_group`): a scan of unknown person is a person of its
    own."""
    return len({scan_group(person, str(i)) for i, person in enumerate(persons)})


def output_problem(output: str, model: Optional[Path], kind: str) -> Optional[str]:
    """Why the ``kind`` ("adapted", "calibrated", "shareable") model cannot be saved at ``output``
    (gui_binding.typed_path: ``~`` expanded), or None: no path, a relative one (relative to what the panel does not
    show), a folder, a name without the .cevae suffix the model chooser lists, the model it starts from (which a run
    never replaces) or the bundled model."""
    if not output:
        return f"Choose where to save the {kind} model."
    out = typed_path(output)
    if not out.is_absolute():
        return f"Give the {kind} model's full path (with its folder), not only '{output}'."
    if out.is_dir():
        return f"The {kind} model needs a file name, not a folder."
    if not out.name.lower().endswith(BUNDLE_SUFFIX) or out.name.lower() == BUNDLE_SUFFIX:
        return f"The {kind} model needs a {BUNDLE_SUFFIX} file name, such as site{BUNDLE_SUFFIX}, not '{out.name}'."
    return bundled_model_problem(out, kind) or replaced_model_problem(out, model, kind)


_RUNS = {"adapted": ("adapt", "an adaptation's"), "calibrated": ("calibrate", "a calibration's")}


def replaced_model_problem(out: Path, model: Optional[Path], kind: str) -> Optional[str]:
    """Why the ``kind`` model cannot be saved at ``out`` when that is the ``model`` it starts from (by path, link or
    inode), which a run never replaces, with what to choose instead (a finished run's output is the model in use, and
    the output field still names it); None otherwise."""
    if model is None or Inputs([model]).which(out) is None:
        return None
    said = f"Save the {kind} model under a new name; it cannot replace the model it starts from, {model.name}"
    if kind not in _RUNS:
        return f"{said}. Choose another output file."
    verb, output = _RUNS[kind]
    return (f"{said} (the model in use, as {output} output is once it finishes). To {verb} the model it came from "
            f"again, choose that model first ('Use bundled model' for the bundled one); to {verb} {model.name} "
            "itself, choose another output file.")


def bundled_model_problem(out: Path, kind: str) -> Optional[str]:
    """Why the ``kind`` model cannot be saved at ``out`` when that is the bundled default model's file (by path, link
    or inode): the extension's own file, which every scene's "Use bundled model" means; None otherwise."""
    from ..data import is_bundled_model

    if not is_bundled_model(out):
        return None
    return (f"Save the {kind} model under a new name; it cannot replace the bundled model (the extension's own file, "
            "which 'Use bundled model' uses).")


_TAKEN_AS_HEALTHY = {
    "calibrate": "its anomalies would count as healthy scores and raise the threshold above them",
    "adapt": "the adapted model would learn its anomalies as healthy and stop flagging them",
}


def examined_as_healthy(input_volume: Any, volumes: Sequence[Any], task: str) -> str:
    """The warning to give before ``task`` ("calibrate", "adapt") runs on the checked healthy ``volumes`` (nodes) when
    one of them is the panel's ``input_volume``, the scan being examined; "" otherwise. A warning, not a refusal: the
    input field always holds a volume, so in a scene of healthy scans only it is one of them."""
    if input_volume is None or not any(volume is input_volume for volume in volumes):
        return ""
    return (f"'{input_volume.GetName()}' is the input volume (the scan being examined) and is checked as a healthy "
            f"volume: if it has anomalies, {_TAKEN_AS_HEALTHY[task]}. Uncheck it unless it is a healthy scan.")


def calibrate_problem(volumes: int, output: str, model: Optional[Path]) -> Optional[str]:
    """Why Calibrate cannot start with ``volumes`` checked healthy volumes and the output path typed, or None."""
    if volumes < 1:
        return "Check at least one healthy volume to calibrate on."
    return output_problem(output, model, "calibrated")


def adapt_choice(volumes: int, output: str, model: Optional[Path], device: str,
                 options: AdaptOptions = AdaptOptions(), names: Sequence[str] = (), note: str = "",
                 warning: str = "", device_name: str = "", spacings: Sequence[Sequence[float]] = ()) -> AdaptChoice:
    """The section's state for ``volumes`` chosen healthy volumes (``names``: their node names, which may say who
    was scanned, as a BIDS name's ``sub-<label>``), the output path typed and the current model; ``note``: said
    after the estimate when ready (settings.adapt_override_note); ``warning``: said first, ready or not
    (:func:`examined_as_healthy`), then :func:`mixed_acquisitions_warning` of the volumes' voxel ``spacings`` (mm, one
    per name); ``device_name``: the Device selector's name of ``device``."""
    choice = _adapt_choice(volumes, output, model, device, options, names, note, device_name)
    said = [text for text in (warning, mixed_acquisitions_warning(names, spacings, "adapt")) if text]
    return replace(choice, message=" ".join([*said, choice.message])) if said else choice


_ONE_ACQUISITION = {  # what to do about volumes of different acquisitions, and what pools them
    "adapt": (f"With healthy scans of {MIN_SCANS} persons in each acquisition, check only one acquisition's volumes "
              "and adapt one model per acquisition.", "The adapted model's calibration pools"),
    "calibrate": ("Check only one acquisition's volumes and calibrate one model per acquisition.",
                  "The calibrated model's thresholds pool"),
}


def mixed_acquisitions_warning(names: Sequence[str], spacings: Sequence[Sequence[float]], task: str) -> str:
    """What to say before ``task`` ("adapt", "calibrate") is pressed when the chosen volumes (node ``names``, voxel
    ``spacings`` in mm) are of different acquisitions, by the rule the adaptation and the calibration warn by
    (adapt_plan.mixed_acquisitions); "" otherwise."""
    sides: Dict[str, float] = {}
    for n, (name, spacing) in enumerate(zip(names, spacings), 1):
        key = f"'{name}'" if f"'{name}'" not in sides else f"'{name}' (volume {n})"  # two nodes of one name
        sides[key] = largest_side(spacing)
    advice, pools = _ONE_ACQUISITION[task]
    mixed = mixed_acquisitions(sides, pools)
    return f"{mixed} {advice}" if mixed else ""


def calibrate_warning(input_volume: Any, volumes: Sequence[Any]) -> str:
    """What to say before Calibrate runs on the checked healthy ``volumes`` (nodes): :func:`examined_as_healthy`, then
    :func:`mixed_acquisitions_warning`; "" when neither applies. A warning, not a refusal."""
    said = (examined_as_healthy(input_volume, volumes, "calibrate"),
            mixed_acquisitions_warning([v.GetName() for v in volumes], [v.GetSpacing() for v in volumes], "calibrate"))
    return " ".join(text for text in said if text)


def _adapt_choice(volumes: int, output: str, model: Optional[Path], device: str, options: AdaptOptions,
                  names: Sequence[str], note: str, device_name: str) -> AdaptChoice:
    """:func:`adapt_choice` without its warning."""
    if volumes < MIN_SCANS:
        return AdaptChoice(False, f"Choose at least {MIN_SCANS} healthy volumes: each is held out once to calibrate "
                                  "the model fine-tuned on the others.")
    persons = persons_scanned([node_person(name) for name in names]) or volumes
    if persons < MIN_SCANS:
        return AdaptChoice(False, f"The chosen volumes are scans of {persons} person (their names' sub-<label>); "
                                  f"choose scans of at least {MIN_SCANS} persons: a person's scans are held out "
                                  "together.")
    problem = output_problem(output, model, "adapted")
    if problem is not None:
        return AdaptChoice(False, problem)
    existing = earlier_outputs(typed_path(output), persons, options)
    start = f"Starting from {model.name}: " if model is not None else ""  # (after an adaptation: the adapted one)
    estimate = describe_estimate(volumes, device, options, persons if persons < volumes else None,
                                 _thorough_modes(model), f"the {device_name} chosen as Device" if device_name else "")
    return AdaptChoice(True, " ".join(text for text in (start + estimate, _resume_note(existing), note) if text),
                       existing)


def _resume_note(existing: Sequence[Path]) -> str:
    """What the estimate adds beside the files ``existing`` of an interrupted adaptation that Adapt offers to resume:
    that the estimate counts the steps its checkpoints hold, which a resume skips; "" where there is none."""
    if not resumable(existing):
        return ""
    names = ", ".join(path.name for path in existing if path.name.endswith(".ckpt"))
    return (f"Resuming the interrupted adaptation to this file (Adapt asks) skips the fine-tuning steps its "
            f"checkpoints hold ({names}), so it takes less.")


def adaptation_stopped(request: Mapping[str, Any]) -> str:
    """What the status line adds when the adaptation worker ``request`` (logic.startAdaptation's) was cancelled or
    stopped: that its checkpoints are kept and Adapt resumes from them, or that it had written none yet; and that a
    model already at its file (an earlier one: the adaptation writes its own last) is kept as it was."""
    options = AdaptOptions(folds=(request.get("options") or {}).get("folds", AdaptOptions.folds))
    persons = persons_scanned([subject.get("person") for subject in request["subjects"]])
    out = Path(request["out"])
    earlier = earlier_outputs(out, persons, options)
    kept = f" The earlier model {out.name} is kept as it was until the new one is written." if out.is_file() else ""
    if not resumable(earlier):
        return f"The adaptation had written no checkpoint yet: Adapt starts it anew.{kept}"
    names = ", ".join(path.name for path in earlier if path.name.endswith(".ckpt"))
    return (f"The adaptation's checkpoints are kept ({names}): press Adapt again with the same volumes and file name "
            f"to resume from them (it asks first).{kept}")


def _thorough_modes(model: Optional[Path]) -> int:
    """How many thorough modes ``model`` is calibrated for (an adaptation calibrates them again); 0 where it cannot
    be read (its problem is said where the model is chosen)."""
    from ..engine.calibration import calibrated_test_time_steps
    from ..engine.header import read_header
    from ..errors import CeVAEError

    try:
        steps = calibrated_test_time_steps(read_header(model).calibration) if model is not None else []
        return len([s for s in steps if s > 0])  # (0 is the plain mode)
    except (CeVAEError, OSError):
        return 0
