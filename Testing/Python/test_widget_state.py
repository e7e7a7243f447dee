"""The module panel's decisions (CeVAEAnomalyLib.slicer.widget_state), without Qt."""
from __future__ import annotations

import pytest

from CeVAEAnomalyLib.slicer.widget_state import (ADAPT, CALIBRATE, DETECT, LATE_CLICK_S, Action, Phase, WidgetState,
                                                  progress_format)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state():
    s = WidgetState(clock=Clock())
    s.set_ready(DETECT, True)
    return s


def test_apply_needs_an_input():
    s = WidgetState(clock=Clock())
    assert not s.view().detect_enabled and s.click(DETECT) is Action.IGNORE
    s.set_ready(DETECT, True)
    assert s.view().detect_enabled and s.click(DETECT) is Action.START


def test_while_running_only_the_runs_own_button_is_enabled_and_it_cancels(state):
    state.set_ready(CALIBRATE, True)
    state.started(DETECT)
    view = state.view()
    assert view.detect_enabled and view.detect_cancels and view.progress_visible
    assert not (view.settings_enabled or view.results_enabled or view.calibrate_enabled)
    assert state.click(CALIBRATE) is Action.IGNORE  # cannot start a second task
    state._clock.now += LATE_CLICK_S
    assert state.click(DETECT) is Action.CANCEL
    assert state.phase is Phase.CANCELLING


def test_a_double_click_on_cancel_cannot_start_another_run(state):
    state.started(DETECT)
    state._clock.now += 5.0
    assert [state.click(DETECT), state.click(DETECT)] == [Action.CANCEL, Action.IGNORE]
    view = state.view()
    assert view.cancelling and not view.detect_enabled
    assert state.finished() is False  # cancelled: results are not wanted
    assert state.click(DETECT) is Action.IGNORE  # the second click of the pair, delivered after the end


def test_a_late_cancel_click_after_the_run_ended_does_nothing(state):
    state.started(DETECT)
    assert state.finished() is True
    assert state.click(DETECT) is Action.IGNORE
    state._clock.now += LATE_CLICK_S + 0.01
    assert state.click(DETECT) is Action.START


def test_a_cancel_click_that_waited_while_the_results_were_loaded_starts_nothing(state):
    """Loading a real scan's results (reading them, the segmentation, the tables, the views) takes about a second
    after the run's end, while Apply still reads "Cancel"; a click on it meanwhile is delivered only afterwards. It
    started a new run on the same scan once those seconds exceeded LATE_CLICK_S."""
    import ast

    from test_slicer_module import module_classes

    state.started(DETECT)
    assert state.finished() is True  # the worker is done: its results are loaded now
    state._clock.now += 2.0  # loading them took 2 s; the Cancel click waited in the queue
    state.settled()
    assert state.click(DETECT) is Action.IGNORE and state.phase is Phase.IDLE
    state._clock.now += LATE_CLICK_S + 0.01
    assert state.click(DETECT) is Action.START  # a click of its own
    poll = next(ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
                if isinstance(n, ast.FunctionDef) and n.name == "_onPoll")
    assert poll.index("self.state.finished()") < poll.index("self.logic.finishDetection(job)") < \
        poll.index("self.state.settled()")


def test_the_second_click_of_a_double_click_on_apply_does_not_cancel_the_run_it_started(state):
    assert state.click(DETECT) is Action.START
    state.started(DETECT)
    state._clock.now += LATE_CLICK_S / 2
    assert state.click(DETECT) is Action.IGNORE and state.phase is Phase.RUNNING
    state._clock.now += LATE_CLICK_S / 2
    assert state.click(DETECT) is Action.CANCEL  # a click of its own: Cancel


def test_just_after_a_run_ended_only_its_own_button_ignores_clicks(state):
    state.set_ready(CALIBRATE, True)
    state.started(DETECT)
    assert state.finished() is True
    assert state.view().busy_with is None
    assert state.click(DETECT) is Action.IGNORE  # aimed at its Cancel button
    assert state.click(CALIBRATE) is Action.START  # another button: meant


def test_nothing_is_clickable_during_a_dependency_install(state):
    state.set_ready(CALIBRATE, True)
    state.begin_install(DETECT)
    view = state.view()
    assert not (view.detect_enabled or view.calibrate_enabled or view.settings_enabled or view.results_enabled)
    assert state.click(DETECT) is Action.IGNORE and state.click(CALIBRATE) is Action.IGNORE
    with pytest.raises(RuntimeError):
        state.begin_install(DETECT)  # a second install cannot start
    with pytest.raises(RuntimeError):
        state.started(CALIBRATE)
    state.started(DETECT)
    assert state.phase is Phase.RUNNING


def test_a_declined_install_returns_to_idle(state):
    state.begin_install(DETECT)
    state.end_install()
    assert state.phase is Phase.IDLE and state.task is None


@pytest.mark.parametrize("phase", ["running", "cancelling"])
@pytest.mark.parametrize("task", [DETECT, CALIBRATE, ADAPT])
def test_reload_or_application_exit_stops_a_run(state, task, phase):
    state.started(task)
    if phase == "cancelling":
        state._clock.now += LATE_CLICK_S
        assert state.click(task) is Action.CANCEL
    assert state.interrupt() is True
    assert state.finished() is False  # the interrupted run publishes nothing


@pytest.mark.parametrize("phase", ["running", "cancelling"])
def test_a_scene_close_stops_a_detection(state, phase):
    """A detection loads its results into the scene that closes: it stops, and nothing is published."""
    state.started(DETECT)
    if phase == "cancelling":
        state._clock.now += LATE_CLICK_S
        state.click(DETECT)
    assert state.scene_closing() is True
    assert state.finished() is False


def unbound(state: WidgetState) -> None:
    """What the widget tells the state when the scene closes and its parameter node goes (setParameterNode(None)):
    no input (its mask is none) and, with no parameter node, no task ready."""
    state.input_restored(None)
    for task in (DETECT, CALIBRATE, ADAPT):
        state.set_ready(task, False)


@pytest.mark.parametrize("task", [CALIBRATE, ADAPT])
def test_a_scene_close_keeps_a_calibration_or_adaptation_running_and_its_model_wanted(state, task):
    """A 20-minute adaptation was stopped when the radiologist closed the scene to read the next patient, although it
    runs on copies of the scans (written before it starts) and writes a model file, not the scene. It goes on: the
    next scene's panel shows it running (its button cancels it, nothing else starts) and takes its model at its
    end."""
    state.set_ready(task, True)
    state.started(task)
    shown = state.view()
    assert state.scene_closing() is False
    unbound(state)  # the scene's parameter node lets go of the panel
    assert state.phase is Phase.RUNNING and state.task == task
    assert state.view() == shown  # as during the run: its button reads Cancel, the progress bar stays
    view = state.view()
    assert view.progress_visible and not view.settings_enabled and not view.detect_enabled
    assert state.click(DETECT) is Action.IGNORE
    state.set_ready(DETECT, True)  # the next scene's panel: an input is chosen there
    assert state.view() == shown and state.click(DETECT) is Action.IGNORE
    assert state.finished() is True  # its model is wanted: it becomes the one in use


@pytest.mark.parametrize("task", [CALIBRATE, ADAPT])
def test_a_calibration_or_adaptation_kept_through_a_scene_close_is_still_cancelled_by_its_button_reload_or_exit(
        state, task):
    state.started(task)
    assert state.scene_closing() is False
    unbound(state)
    state._clock.now += LATE_CLICK_S
    assert state.click(task) is Action.CANCEL and state.view().cancelling
    assert state.finished() is False
    state.started(task)
    assert state.scene_closing() is False
    assert state.interrupt() is True and state.finished() is False  # Reload, or Slicer quits: it stops


@pytest.mark.parametrize("task", [DETECT, CALIBRATE, ADAPT])
def test_a_scene_closed_during_the_install_before_any_copy_starts_nothing(state, task):
    """An install comes before the scans are copied: a scene closed meanwhile takes the inputs with it."""
    state.set_ready(task, True)
    state.begin_install(task)
    assert state.scene_closing() is False and state.install_interrupted  # nothing runs yet: nothing to stop
    with pytest.raises(RuntimeError, match="closed during the install"):
        state.started(task)


def test_interrupt_when_idle_or_installing_stops_nothing(state):
    assert state.interrupt() is False
    state.begin_install(DETECT)
    assert state.interrupt() is False and state.phase is Phase.INSTALLING


def test_calibration_runs_like_detection(state):
    state.set_ready(CALIBRATE, True)
    assert state.click(CALIBRATE) is Action.START
    state.started(CALIBRATE)
    view = state.view()
    assert view.calibrate_enabled and view.calibrate_cancels and not view.detect_enabled
    assert view.busy_with == CALIBRATE
    state._clock.now += LATE_CLICK_S
    assert state.click(CALIBRATE) is Action.CANCEL


def test_finishing_twice_or_unknown_tasks_are_errors(state):
    with pytest.raises(RuntimeError):
        state.finished()
    with pytest.raises(ValueError):
        state.click("train")


def test_adaptation_runs_like_calibration_and_blocks_the_other_tasks(state):
    state.set_ready(ADAPT, True)
    state.set_ready(DETECT, True)
    assert state.view().adapt_enabled and not state.view().adapt_cancels
    assert state.click(ADAPT) is Action.START
    state.started(ADAPT)
    view = state.view()
    assert view.adapt_enabled and view.adapt_cancels
    assert not view.detect_enabled and not view.calibrate_enabled and not view.settings_enabled
    assert state.click(DETECT) is Action.IGNORE
    state._clock.now += LATE_CLICK_S
    assert state.click(ADAPT) is Action.CANCEL and state.view().cancelling


def test_leaving_the_module_keeps_the_run_and_shows_its_result_on_return(state):
    state.started(DETECT)
    state.left()
    assert state.phase is Phase.RUNNING and state.view().detect_cancels  # still running, still cancellable
    assert state.finished() is True  # its results are wanted
    assert state.show_result() is False  # loaded, but the views the user looks at stay as they are
    assert state.entered() is True  # shown on return, once
    assert state.entered() is False


def test_a_result_that_arrives_while_the_panel_is_shown_is_shown_at_once(state):
    state.left()
    state.entered()
    state.started(DETECT)
    assert state.finished() is True and state.show_result() is True
    state.left()
    assert state.entered() is False  # nothing left to show


# --- one parameter-node binding across enter(), exit() and scene close (gui_binding.py) ---------


class StandInWrapper:
    """Like a parameterNodeWrapper instance: one per call around the same MRML node; ``connectGui``
    adds a live binding and returns its tag (Slicer 5.10) or None (5.6 and 5.8, where it cannot be
    undone); ``disconnectGui(tag)`` removes the binding with that tag."""

    def __init__(self, node, gui, returns_tag: bool) -> None:
        self.parameterNode, self._gui, self._returns_tag = node, gui, returns_tag

    def connectGui(self, gui):
        tag = object()
        gui.append((self.parameterNode, tag))
        return tag if self._returns_tag else None

    def disconnectGui(self, tag) -> None:
        self._gui[:] = [(node, t) for node, t in self._gui if t is not tag]


@pytest.mark.parametrize("returns_tag", [False, True], ids=["Slicer 5.6/5.8", "Slicer 5.10"])
def test_one_live_binding_across_enter_exit_and_scene_close(returns_tag):
    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.gui_binding import GuiBinding

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CeVAEAnomaly")
    gui: list = []  # the live bindings
    binding = GuiBinding()

    def enter():  # the widget makes a new wrapper of the module's parameter node on every enter()
        return binding.bind(StandInWrapper(node, gui, returns_tag), gui)

    first = enter()
    assert enter() is first and enter() is first  # module left and entered again, twice
    assert [n for n, _ in gui] == [node]
    assert binding.bind(None, gui) is None  # scene start close
    assert len(gui) == (1 if not returns_tag else 0)  # 5.6/5.8 cannot undo it
    enter()  # scene end close: the singleton parameter node is the same node
    assert [n for n, _ in gui] == [node]

    other = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CeVAEAnomaly 2")
    assert binding.bind(StandInWrapper(other, gui, returns_tag), gui).parameterNode is other
    assert [n for n, _ in gui].count(other) == 1
    assert len(gui) == (2 if not returns_tag else 1)  # only the old node's undoable binding stays


def test_a_result_summary_is_cleared_when_another_input_is_chosen():
    state = WidgetState()
    assert not state.summary_is_stale("vtkMRMLScalarVolumeNode1")  # nothing shown yet
    state.summary_shown("vtkMRMLScalarVolumeNode1")
    assert not state.summary_is_stale("vtkMRMLScalarVolumeNode1")  # the same input: the summary stays
    assert state.summary_is_stale("vtkMRMLScalarVolumeNode2")  # another scan: cleared once
    assert not state.summary_is_stale("vtkMRMLScalarVolumeNode1")  # back to the first: already cleared
    state.summary_shown("vtkMRMLScalarVolumeNode2")
    assert state.summary_is_stale(None)  # no input at all


def _qt_progress_text(fmt: str, value: int, maximum: int = 100) -> str:
    """What QProgressBar::text() shows for a format: it replaces "%m", "%v" and "%p" wherever they stand."""
    return fmt.replace("%m", str(maximum)).replace("%v", str(value)).replace("%p", str(value))


@pytest.mark.parametrize("message", ["Scoring slices", "Reading /data/%patient/t1.nii", "Training 50% done",
                                     "Calibrating %v %m"])
def test_the_progress_bar_shows_the_message_as_written(message):
    shown = _qt_progress_text(progress_format(message), 42)
    assert shown == message.replace("%", "\uff05") + ": 42%"


def test_a_scene_closed_during_an_install_starts_nothing_afterwards():
    state = WidgetState(clock=Clock())
    state.set_ready(DETECT, True)
    assert state.click(DETECT) is Action.START
    state.begin_install(DETECT)
    assert state.interrupt() is False  # nothing runs yet: nothing to cancel
    assert state.install_interrupted and state.phase is Phase.INSTALLING  # still nothing clickable
    with pytest.raises(RuntimeError, match="closed during the install"):
        state.started(DETECT)
    state.end_install()
    assert state.phase is Phase.IDLE and not state.install_interrupted
    state._clock.now += LATE_CLICK_S + 0.01  # not a late click meant for a Cancel button
    assert state.click(DETECT) is Action.START  # the next click (dependencies now present) starts a run
    state.started(DETECT)
    assert state.phase is Phase.RUNNING


def test_a_loaded_scenes_brain_mask_stays_and_a_switched_input_gets_its_own():
    """The mask field is chosen anew (nodes.mask_for_input: the input's last run's mask first) only when the user
    picks another input. The panel took the input of a scene it was built or shown for, or that was being loaded,
    for a switch: a mask chosen after the last run and saved with the scene gave way to that run's mask."""
    import ast

    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.nodes import MASK_REFERENCE, ROLE_ATTRIBUTE, SCORE_ROLE, SOURCE_REFERENCE, \
        mask_for_input
    from test_slicer_module import module_classes

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A")
    used, saved = (scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name) for name in ("M1", "M2"))
    score = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A scores")
    score.SetAttribute(ROLE_ATTRIBUTE, SCORE_ROLE)
    score.SetNodeReferenceID(SOURCE_REFERENCE, volume.GetID())
    score.SetNodeReferenceID(MASK_REFERENCE, used.GetID())
    assert mask_for_input(volume, saved) is used  # what a switch to A shows: why a restore must not count as one

    state = WidgetState()
    state.input_restored(volume.GetID())  # the panel built for a loaded scene
    assert not state.input_is_new(volume.GetID())
    assert state.input_is_new("vtkMRMLScalarVolumeNode9") and state.input_is_new(volume.GetID())  # switches
    state.input_restored(None)  # a scene closed: its reset node has no input
    assert state.input_is_new(volume.GetID())  # the first volume put in by the panel: its own mask
    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    bind = methods["setParameterNode"]
    assert bind.index("self._binding.bind(") < bind.index("self.state.input_restored(") < bind.index("_updateGui()")
    follow = methods["_followInput"]
    assert follow.index("IsImporting()") < follow.index("self.state.input_is_new(p.inputVolume.GetID())") < \
        follow.index("mask_for_input(p.inputVolume, p.brainMask)")


def test_the_status_line_says_what_is_wrong_with_the_chosen_model_once_and_clears_it_when_gone(tmp_path):
    """A scene whose model file was moved (or another computer's path): the panel offered every mode and enabled
    Apply, Calibrate and Adapt, and said nothing (the reason went to the log) until a run failed."""
    import ast
    from types import SimpleNamespace

    from CeVAEAnomalyLib.slicer.settings import model_problem
    from test_slicer_module import module_classes

    gone = SimpleNamespace(useBundledModel=False, modelPath=str(tmp_path / "moved.cevae"))
    problem = model_problem(gone)
    assert problem is not None and "moved.cevae does not exist" in problem
    assert model_problem(SimpleNamespace(useBundledModel=True, modelPath="")) is None
    state = WidgetState()
    assert state.model_problem(None) is None  # nothing to say, nothing to clear
    assert state.model_problem(problem) == problem
    assert state.model_problem(problem) is None  # said once: later updates leave the line (and other messages)
    assert state.model_problem(None) == ""  # the bundled model ticked again: the line is cleared
    assert state.model_problem(None) is None
    update = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                              if isinstance(n, ast.FunctionDef) and n.name == "_updateGui"))
    assert "self.state.model_problem(model_problem(p) if settings is None else None)" in update


def test_the_status_line_says_at_once_that_the_chosen_rate_is_refused_and_clears_only_its_own_words():
    """A rate whose calibrated threshold is 0 (0.5 with the bundled model) was refused only by Apply."""
    import ast

    from test_slicer_module import module_classes

    refusal = "A healthy false-positive rate of 0.5 gets a threshold of 0 ..."
    state = WidgetState()
    assert state.rate_said(None, "") is None  # nothing to say, nothing to clear
    assert state.rate_said(refusal, "") == refusal
    assert state.rate_said(refusal, refusal) is None  # said once
    assert state.rate_said(None, refusal) == ""  # a rate that gets a threshold again: the refusal goes
    assert state.rate_said(refusal, "") == refusal
    assert state.rate_said(None, "Detection finished.") is None  # another message since: it stays
    update = ast.unparse(next(n for n in module_classes()["CeVAEAnomalyWidget"].body
                              if isinstance(n, ast.FunctionDef) and n.name == "_updateGui"))
    assert "self.state.rate_said(rate_refusal(p, settings), self.ui.statusLabel.text)" in update


def test_a_scene_loaded_while_the_panel_is_open_keeps_its_brain_mask():
    """A parameter node saved before the volumes (the module opened before the data was loaded) gets its references
    only at the end of the import, after its last ModifiedEvent: the panel saw the loaded input at the next unrelated
    change, took it for a switch and replaced the saved mask. The end of an import now counts as a restore."""
    import ast

    import vtk
    slicer = pytest.importorskip("slicer")
    from test_slicer_module import module_classes

    saved = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag("CeVAEAnomaly")
    saved.AddNode(node)
    volume = saved.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "A")
    node.SetNodeReferenceID("inputVolume", volume.GetID())
    node.SetParameter("useBundledModel", "true")
    saved.SetSaveToXMLString(1)
    saved.Commit()
    scene = slicer.vtkMRMLScene()
    loaded = slicer.vtkMRMLScriptedModuleNode()
    loaded.SetSingletonTag("CeVAEAnomaly")
    scene.AddNode(loaded)
    seen = []
    loaded.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: seen.append(
        caller.GetNodeReference("inputVolume")))
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(saved.GetSceneXMLString())
    scene.Import()
    assert seen and all(reference is None for reference in seen)  # no update of the panel saw the input
    assert loaded.GetNodeReference("inputVolume").GetName() == "A"
    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    assert "slicer.mrmlScene.EndImportEvent, self.onSceneEndImport" in methods["setup"]
    end = methods["onSceneEndImport"]
    assert end.index("self.state.input_restored(") < end.index("self._updateGui()")


@pytest.mark.parametrize("task", [CALIBRATE, ADAPT])
def test_the_last_detections_results_stay_usable_while_a_calibration_or_adaptation_runs(state, task):
    """An adaptation runs minutes to an hour on a CPU: the Results section (table rows, jump, plot, opacity) was
    disabled all that time, although those work on copies of the scans and change none of the results."""
    state.set_ready(task, True)
    state.started(task)
    view = state.view()
    assert view.results_enabled and not view.settings_enabled and not view.detect_enabled
    state._clock.now += LATE_CLICK_S
    assert state.click(task) is Action.CANCEL
    assert state.view().results_enabled  # cancelling: still nothing to change there


def test_what_the_status_line_said_of_the_start_model_goes_when_another_model_is_chosen():
    """"The model used last on this computer is in use: site.cevae" stayed after 'Use bundled model' was ticked,
    naming a model that no longer was. It goes with the choice it spoke of, and only while the line still says it."""
    import ast

    from test_slicer_module import module_classes

    said = "The model used last on this computer is in use: /site/site.cevae. Tick 'Use bundled model' ..."
    state = WidgetState()
    assert not state.model_words_are_stale("", "")  # nothing said
    state.model_said("/site/site.cevae", said)
    assert not state.model_words_are_stale("/site/site.cevae", said)  # the same model: it stays
    assert state.model_words_are_stale("", said)  # the bundled model ticked: cleared once
    assert not state.model_words_are_stale("/site/site.cevae", said)
    state.model_said("/site/site.cevae", said)
    assert not state.model_words_are_stale("", "2 component(s), 1.20 ml flagged; ...")  # a later message stays
    assert not state.model_words_are_stale("/site/other.cevae", said)  # and the start words are forgotten
    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    assert "self.state.model_said(remembered_value(self._parameterNode), self.ui.statusLabel.text)" in \
        methods["_startWithRememberedModel"]
    assert "self.state.model_words_are_stale(remembered_value(p), self.ui.statusLabel.text)" in methods["_updateGui"]


def test_a_typed_model_path_is_read_once_it_names_a_file_or_is_typed_out(tmp_path):
    """Each keystroke in the model path field (its text ending in .cevae) set the model path, so the panel read the
    path and put "The model bundle ... does not exist" on the status line at every keystroke, replacing a result's
    summary. A typed model path is now taken once it names a file, or when typing ends (Enter, the field left); a
    dialog's or the history's path at once. A save-as path follows every keystroke, also without the .cevae the
    field's name filter wants (that change did not reach the panel, whose checks then judged an older path)."""
    import ast
    from pathlib import Path

    from CeVAEAnomalyLib.slicer.gui_binding import takes_path_now

    model = tmp_path / "site.cevae"
    model.write_bytes(b"a model")
    typing = str(tmp_path / "sit.cevae")
    assert not takes_path_now("modelPath", typing, typed=True, finished=False)
    assert takes_path_now("modelPath", typing, typed=True, finished=True)  # then its problem is said, once
    assert takes_path_now("modelPath", str(model), typed=True, finished=False)
    assert takes_path_now("modelPath", typing, typed=False, finished=False)  # a dialog, the history, the panel
    for field in ("calibratedModelPath", "adaptedModelPath"):
        for text in (typing, str(tmp_path / "site"), ""):
            assert takes_path_now(field, text, typed=True, finished=False)
    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    setup = methods["setup"]
    assert "currentPathChanged" not in setup
    assert "lineEdit = slicer.util.findChildren(pathEdit, className='QLineEdit')[0]" in setup
    assert "lineEdit.connect('textChanged(QString)', self._pathHandler(lineEdit, name, finished=False))" in setup
    assert "lineEdit.connect('editingFinished()', self._pathHandler(lineEdit, name, finished=True))" in setup
    for name in ("modelPath", "calibratedModelPath", "adaptedModelPath"):
        assert f"'{name}')" in setup
    assert "if takes_path_now(name, lineEdit.text, lineEdit.modified, finished):" in methods["_pathHandler"]


def test_the_widget_asks_the_state_on_scene_close_and_gives_a_kept_runs_model_to_the_next_scene():
    """The Qt widget (which cannot run here) binds the decisions above: a scene close asks scene_closing, reload and
    exit interrupt; a kept run's end binds the next scene's parameter node when the panel was hidden at the close
    (onSceneEndClose binds one only for a shown panel), and waits while a scene closes."""
    import ast

    from test_slicer_module import module_classes

    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    close = methods["onSceneStartClose"]
    assert close.index("self._interrupt(sceneClosing=True)") < close.index("self.setParameterNode(None)")
    for name in ("cleanup", "onReload"):
        assert "self._interrupt()" in methods[name], name
    assert "self.state.scene_closing() if sceneClosing else self.state.interrupt()" in methods["_interrupt"]
    # (a console-made panel's parent, a plain qMRMLWidget, has no isEntered: it counts as shown)
    assert "if getattr(self.parent, 'isEntered', True):" in methods["onSceneEndClose"]
    use = methods["_useNewModel"]
    assert use.index("if self._parameterNode is None:") < use.index("self.initializeParameterNode()") < use.index(
        "p = self._parameterNode")
    poll = methods["_onPoll"]
    assert poll.index("if slicer.mrmlScene.IsClosing():") < poll.index("finished = job.poll()")


def test_why_a_run_stopped_at_a_scene_close_is_still_said_in_the_next_scene(state):
    """A scene close stops a detection and the status line said "Stopped: the scene was closed ...", which the next
    scene's panel wiped at once (its start with the remembered model cleared the line): the user saw no reason why
    their run ended. The words of a run the close stopped are kept for the first parameter node bound afterwards,
    once; a close that stopped nothing keeps nothing."""
    import ast

    from test_slicer_module import module_classes

    said = "Stopped: the scene was closed or the module reloaded; nothing was changed."
    state.started(DETECT)
    assert state.scene_closing() is True
    state.finished()
    state.stopped_by_close(said)
    assert state.close_words() == said
    assert state.close_words() == ""  # once
    assert state.scene_closing() is False and state.close_words() == ""
    methods = {n.name: ast.unparse(n) for n in module_classes()["CeVAEAnomalyWidget"].body
               if isinstance(n, ast.FunctionDef)}
    interrupt = methods["_interrupt"]
    assert interrupt.index("self._stopJob(") < interrupt.index("self.state.stopped_by_close(self.ui.statusLabel.text)")
    start = methods["initializeParameterNode"]
    assert start.index("kept = self.state.close_words()") < start.index("self._startWithRememberedModel(kept)")
    remembered = methods["_startWithRememberedModel"]
    assert "self.ui.statusLabel.text = ' '.join((text for text in (kept, start.message, said) if text))" in remembered
