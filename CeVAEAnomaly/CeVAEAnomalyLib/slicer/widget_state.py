"""What the module panel allows and does at each moment: a Qt-free state machine.

The widget only binds this to Qt: it asks :meth:`WidgetState.click` what a button click means,
reports what happened (install started, run started, run finished) and shows :meth:`view`.
Nothing that starts work can be clicked while work runs; a run's own button cancels it; a click on
that button just after it started the run (the second click of a double-click) or just after the run's end
was dealt with (its results loaded: meant for the Cancel button it was) does nothing. Leaving the
module keeps a run going (its result is shown on return). Closing the scene stops a detection (it loads its results
into that scene) but not a calibration or an adaptation, which run on copies of the scans and write a model file:
the panel of the next scene shows it running, and its model becomes the one in use there. Reloading the module and
quitting the application stop any run.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from ..io.naming import WINDOWS_FORBIDDEN
from .gui_binding import typed_path

DETECT = "detect"
CALIBRATE = "calibrate"
ADAPT = "adapt"
TASKS = (DETECT, CALIBRATE, ADAPT)
ON_COPIES = (CALIBRATE, ADAPT)  # tasks that run on copies of the scans, made before they start, and write a model file
LATE_CLICK_S = 0.5  # a click on a run's button this soon after the run started or ended belongs to a double-click
REPORT_TAG = "_report.html"  # Save report... offers NAME_report.html (as batch --reports names a volume's report)


class Phase(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing"
    RUNNING = "running"
    CANCELLING = "cancelling"


class Action(enum.Enum):
    START = "start"
    CANCEL = "cancel"
    IGNORE = "ignore"


@dataclass(frozen=True)
class View:
    """Enabled states and button roles for the widget to show."""

    settings_enabled: bool  # inputs, outputs, advanced, calibration and adaptation settings
    results_enabled: bool  # the Results section: the last detection's table, jump, plot and opacity
    detect_enabled: bool
    detect_cancels: bool  # the Apply button reads "Cancel"
    calibrate_enabled: bool
    calibrate_cancels: bool
    adapt_enabled: bool
    adapt_cancels: bool
    cancelling: bool  # a cancel is under way: the busy button reads "Cancelling..."
    progress_visible: bool
    busy_with: Optional[str] = None  # the task that runs (or installs): why the other buttons are disabled


class WidgetState:
    """Phase of the panel (idle, installing, running, cancelling) and the task that runs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.phase = Phase.IDLE
        self.task: Optional[str] = None
        self.ready = {task: False for task in TASKS}
        self._summary_for: Optional[str] = None  # the input whose result summary the status line shows
        self._mask_for: Optional[str] = None  # the input whose brain mask the mask field shows
        self._model_problem: Optional[str] = None  # what the status line says is wrong with the chosen model
        self._model_said: Optional[Tuple[str, str]] = None  # (model choice, what the status line says of it)
        self._rate_refusal: Optional[str] = None  # why detection refuses the panel's rate, as last said
        self.visible = True  # the module panel is the one shown
        self._ended_at = self._started_at = float("-inf")
        self._ended_task: Optional[str] = None
        self._result_pending = False
        self.install_interrupted = False  # the scene closed (or the module reloaded) during an install
        self._close_words = ""  # why the last scene close stopped a run, for the next scene's status line
        self._loaded: Optional[Tuple[str, str]] = None  # (input, score volume) IDs of the last result loaded

    @property
    def busy(self) -> bool:
        return self.phase is not Phase.IDLE

    def set_ready(self, task: str, ready: bool) -> None:
        """Whether the inputs a task needs are chosen."""
        self.ready[_check(task)] = bool(ready)

    def click(self, task: str) -> Action:
        """What a click on ``task``'s button means now; a cancel takes effect at once."""
        _check(task)
        now = self._clock()
        if self.phase is Phase.IDLE:
            late = task == self._ended_task and now - self._ended_at < LATE_CLICK_S
            return Action.START if self.ready[task] and not late else Action.IGNORE
        if self.phase is Phase.RUNNING and task == self.task and now - self._started_at >= LATE_CLICK_S:
            self.phase = Phase.CANCELLING
            return Action.CANCEL
        return Action.IGNORE

    def begin_install(self, task: str) -> None:
        """Dependencies are being installed before ``task`` can start (nothing is clickable)."""
        self._expect(Phase.IDLE)
        self.phase, self.task, self.install_interrupted = Phase.INSTALLING, _check(task), False

    def end_install(self) -> None:
        """The install ended without starting the run (declined or failed)."""
        self._expect(Phase.INSTALLING)
        self._end()

    def started(self, task: str) -> None:
        """The run of ``task`` is under way."""
        if self.phase not in (Phase.IDLE, Phase.INSTALLING) or (self.phase is Phase.INSTALLING and task != self.task):
            raise RuntimeError(f"Cannot start {task} while {self.phase.value}.")
        if self.install_interrupted:
            raise RuntimeError(f"Cannot start {task}: the scene it was asked for closed during the install.")
        self.phase, self.task, self._started_at = Phase.RUNNING, _check(task), self._clock()

    def finished(self) -> bool:
        """The run ended; True if its results are wanted (it was not cancelled)."""
        if self.phase not in (Phase.RUNNING, Phase.CANCELLING):
            raise RuntimeError(f"No run to finish while {self.phase.value}.")
        wanted = self.phase is Phase.RUNNING
        self._end()
        return wanted

    def settled(self) -> None:
        """The end of the run has been dealt with (its results loaded into the scene, or its failure said), which
        can take seconds after :meth:`finished` while its button still read "Cancel": a click on it until
        :data:`LATE_CLICK_S` from now was aimed at that Cancel and starts nothing."""
        if self.phase is Phase.IDLE and self._ended_task is not None:
            self._ended_at = self._clock()

    def scene_closing(self) -> bool:
        """The scene closes: True if the running task must be stopped (its results are not wanted), as
        :meth:`interrupt` says, except for a calibration or an adaptation under way (:data:`ON_COPIES`): its copies of
        the scans were written before it started and it writes a model file, not the scene, so it goes on (its
        button still cancels it) and its model becomes the one the next scene's panel uses."""
        self._loaded = None  # its nodes go with the scene (and a new scene may reuse their IDs)
        if self.phase is Phase.RUNNING and self.task in ON_COPIES:
            return False
        return self.interrupt()

    def stopped_by_close(self, said: str) -> None:
        """A scene close stopped the run, and the status line says why (``said``): kept for the next scene's panel
        (:meth:`close_words`), whose start clears the line."""
        self._close_words = said

    def close_words(self) -> str:
        """What the status line said of the run the last scene close stopped, once ("" otherwise): the first parameter
        node bound after the close says it too."""
        words, self._close_words = self._close_words, ""
        return words

    def interrupt(self) -> bool:
        """The module is reloaded or the application quits (or the scene closes: :meth:`scene_closing`): True if a
        running task must be stopped (its results are not wanted). During an install (which cannot be stopped, and
        comes before any copy of a scan is made) the task it was for must not start afterwards:
        :attr:`install_interrupted`."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.CANCELLING
        elif self.phase is Phase.INSTALLING:
            self.install_interrupted = True
        return self.phase is Phase.CANCELLING

    def left(self) -> None:
        """The user switched to another module: a run goes on, and its result is shown on return."""
        self.visible = False

    def entered(self) -> bool:
        """The panel is shown again: True if a result that arrived meanwhile is to be shown now."""
        self.visible = True
        pending, self._result_pending = self._result_pending, False
        return pending

    def show_result(self) -> bool:
        """A wanted result was loaded into the scene: True to show it in the views now; False while
        the panel is hidden (kept for :meth:`entered`, so the views the user looks at stay as they are)."""
        self._result_pending = not self.visible
        return self.visible

    def summary_shown(self, input_id: str) -> None:
        """The status line now shows the result summary of the input volume ``input_id``."""
        self._summary_for = input_id

    def summary_is_stale(self, input_id: Optional[str]) -> bool:
        """Whether the status line must be cleared now that ``input_id`` is the input: it shows the summary of
        another input's result (which is then forgotten)."""
        stale = self._summary_for is not None and input_id != self._summary_for
        if stale:
            self._summary_for = None
        return stale

    def result_loaded(self, input_id: str, score_id: str) -> None:
        """A detection's result was loaded into the scene: its input volume is ``input_id``, its score volume
        ``score_id`` (the panel keeps the result itself, which Save report... writes)."""
        self._loaded = (input_id, score_id)

    def report_problem(self, input_id: Optional[str], score_id: Optional[str], removed: bool = False) -> Optional[str]:
        """Why "Save report..." is disabled now (its tooltip says it), or None: the panel's input volume and score
        volume are ``input_id`` and ``score_id``; ``removed``: the result loaded last lost its input or score volume
        since. A report is of the result the panel loaded (it holds the detection's record), while the panel shows
        it: not of results it shows of another scan, run or sequence frame, nor of results loaded with a scene."""
        if self.phase is Phase.INSTALLING and self.task == DETECT:
            return ("The dependencies a detection needs are being installed; its results can be reported once it "
                    "has run and they are loaded.")
        if self.phase is Phase.CANCELLING and self.task == DETECT:
            return "A detection is being cancelled; a report can be saved once it has stopped."
        if self.busy and self.task == DETECT:
            return "A detection is running; its results can be reported once they are loaded."
        if self._loaded is None:
            return ("Run the detection (Apply) first: a report is saved of the result the panel loaded, while it "
                    "shows it (results loaded with a scene hold no record of how they were made).")
        if removed:
            return "The last detection's input or score volume was removed from the scene; run the detection again."
        if (input_id, score_id) != self._loaded:
            return ("The panel shows other results than those of its last detection (another input volume, score "
                    "volume or sequence frame): choose them again, or run the detection on this scan.")
        return None

    def model_problem(self, problem: Optional[str]) -> Optional[str]:
        """The status line's text for what is wrong with the chosen model (``problem``; None: it can be used): the
        problem when it is new, "" when the one shown has gone, None to leave the line as it is."""
        shown, self._model_problem = self._model_problem, problem
        if problem == shown:
            return None
        return problem or ""

    def rate_said(self, refusal: Optional[str], shown: str) -> Optional[str]:
        """The status line's text for why detection will refuse the panel's rate (``refusal``, settings.rate_refusal;
        None: the rate gets a threshold), the line showing ``shown``: the refusal when it is new, "" when the one said
        has gone and the line still says it, None to leave the line as it is."""
        said, self._rate_refusal = self._rate_refusal, refusal
        if refusal == said:
            return None
        return refusal or ("" if said is not None and said == shown else None)

    def model_said(self, choice: str, text: str) -> None:
        """The status line says ``text`` of the model choice ``choice`` (model_memory.remembered_value): which model
        a new scene starts with."""
        self._model_said = (choice, text)

    def model_words_are_stale(self, choice: str, shown: str) -> bool:
        """Whether the status line, showing ``shown``, must be cleared: it still says what :meth:`model_said` said of
        another model choice than ``choice`` (then forgotten), e.g. "... is in use" after 'Use bundled model'."""
        said, changed = self._model_said, self._model_said is not None and self._model_said[0] != choice
        if changed:
            self._model_said = None
        return changed and said[1] == shown

    def input_restored(self, input_id: Optional[str]) -> None:
        """A parameter node was bound (the panel built, shown again, a scene closed) or a scene is being loaded:
        its input ``input_id`` comes with the brain mask it was saved with, which stays."""
        self._mask_for = input_id

    def input_is_new(self, input_id: str) -> bool:
        """Whether ``input_id`` became the input since the mask field was chosen (then it is chosen for it anew)."""
        new, self._mask_for = input_id != self._mask_for, input_id
        return new

    def view(self) -> View:
        idle, phase = self.phase is Phase.IDLE, self.phase
        running = {task: phase is Phase.RUNNING and self.task == task for task in TASKS}
        mine = {task: phase in (Phase.RUNNING, Phase.CANCELLING) and self.task == task for task in TASKS}
        return View(
            settings_enabled=idle,
            results_enabled=idle or any(mine[task] for task in ON_COPIES),  # the results stay usable meanwhile
            detect_enabled=(idle and self.ready[DETECT]) or running[DETECT],
            detect_cancels=mine[DETECT],
            calibrate_enabled=(idle and self.ready[CALIBRATE]) or running[CALIBRATE],
            calibrate_cancels=mine[CALIBRATE],
            adapt_enabled=(idle and self.ready[ADAPT]) or running[ADAPT],
            adapt_cancels=mine[ADAPT],
            cancelling=phase is Phase.CANCELLING,
            progress_visible=phase in (Phase.RUNNING, Phase.CANCELLING),
            busy_with=self.task,
        )

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"Expected {phase.value}, but the panel is {self.phase.value}.")

    def _end(self) -> None:
        self._ended_task = self.task
        self.phase, self.task, self._ended_at = Phase.IDLE, None, self._clock()
        self.install_interrupted = False


def progress_format(message: str) -> str:
    """The progress bar's format: the worker's message, then the percentage. QProgressBar reads "%p", "%v"
    and "%m" anywhere in its format (with no escape), so a "%" of the message (a path, "50% done") is shown as
    the full-width sign, which Qt leaves alone."""
    return message.replace("%", "\uff05") + ": %p%"


def with_warnings(text: str, warnings: Sequence[str]) -> str:
    """The status line: ``text`` (may be empty), then each of ``warnings`` once, led by "Warning: ". While a run goes
    on it shows the worker's warnings as they come (an adaptation's, such as scans of different acquisitions, come
    before its first step, when stopping costs nothing); its end repeats them after its own words."""
    return " ".join([*([text] if text else []), *(f"Warning: {w}" for w in dict.fromkeys(warnings))])


def report_default_path(folder: Path, volume_name: str) -> Path:
    """The file Save report... offers: NAME_report.html in ``folder`` (the last folder a report went to), NAME the
    input volume's name with each character a file name cannot hold (on any system) as "_", without leading dots
    (a hidden file on Linux and macOS)."""
    name = "".join("_" if c in WINDOWS_FORBIDDEN else c for c in volume_name).strip().lstrip(".").strip()
    return folder / ((name or "volume") + REPORT_TAG)


def report_output(chosen: str) -> Tuple[Path, Optional[bool]]:
    """The file a save dialog's answer ``chosen`` names (``~`` expanded; ".html" added to a name of no suffix, as a
    dialog with a default suffix adds it) and whether to replace it: True where it exists (the dialog asked before it
    returned an existing file), False where it does not, None where the suffix was added to the name and that file
    exists (the dialog did not ask of it: ask before replacing it)."""
    added = not Path(chosen).suffix
    path = typed_path(chosen + ".html" if added else chosen)
    return path, (None if added else True) if path.exists() else False


def _check(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}.")
    return task
