"""The panel's "Save report..." button (CeVAEAnomalyLib.slicer.widget_state, without Qt): enabled only while the
panel shows the result it loaded of the scan chosen, the file asked for named NAME_report.html in the last folder
used, and the name the dialog returns taken as the logic writes it."""
from __future__ import annotations

from pathlib import Path

import pytest

from CeVAEAnomalyLib.slicer.widget_state import (CALIBRATE, DETECT, WidgetState, report_default_path,
                                                  report_output)


@pytest.fixture
def state() -> WidgetState:
    s = WidgetState()
    s.set_ready(DETECT, True)
    s.set_ready(CALIBRATE, True)
    return s


def test_no_report_before_the_panel_loaded_a_result(state):
    assert "Apply" in state.report_problem("vtkMRMLScalarVolumeNode1", "vtkMRMLScalarVolumeNode2")
    assert "Apply" in state.report_problem(None, None)


def test_the_report_is_offered_while_the_result_loaded_is_the_one_shown(state):
    state.result_loaded("input1", "score1")
    assert state.report_problem("input1", "score1") is None
    assert "other results" in state.report_problem("input2", "score1")  # another scan picked as the input
    assert "other results" in state.report_problem("input1", "score2")  # another run's (or frame's) score volume
    assert "other results" in state.report_problem("input1", None)
    assert "removed" in state.report_problem("input1", "score1", removed=True)
    state.result_loaded("input2", "score3")  # the next run's result
    assert state.report_problem("input2", "score3") is None and state.report_problem("input1", "score1")


def test_no_report_while_a_detection_runs_but_during_a_calibration(state):
    state.result_loaded("input1", "score1")
    state.started(DETECT)
    assert "running" in state.report_problem("input1", "score1")
    state.finished()
    state.started(CALIBRATE)  # (a calibration writes a model file, not these results)
    assert state.report_problem("input1", "score1") is None


def test_the_tooltip_says_what_the_detection_is_doing_while_installing_or_cancelling(state):
    """While the dependencies a detection needs were installed (before it ran), and while one was being cancelled, the
    tooltip said "A detection is running"; it says what is happening now."""
    state.result_loaded("input1", "score1")
    state.begin_install(DETECT)
    said = state.report_problem("input1", "score1")
    assert "being installed" in said and "running" not in said
    state.started(DETECT)
    assert "A detection is running" in state.report_problem("input1", "score1")
    assert state.interrupt()  # (as a module reload cancels it; a Cancel click does the same)
    said = state.report_problem("input1", "score1")
    assert "being cancelled" in said and "running" not in said
    state.finished()
    assert state.report_problem("input1", "score1") is None  # the result loaded before it


def test_a_scene_close_forgets_the_result(state):
    state.result_loaded("input1", "score1")
    state.scene_closing()
    assert "Apply" in state.report_problem("input1", "score1")  # a new scene may reuse the node IDs


def test_the_default_file_is_name_report_html_in_the_last_folder(tmp_path):
    assert report_default_path(tmp_path, "MRHead") == tmp_path / "MRHead_report.html"
    assert report_default_path(tmp_path, 'a/b\\c:d*e?"f<g>h|i') == tmp_path / "a_b_c_d_e__f_g_h_i_report.html"
    assert report_default_path(tmp_path, "") == tmp_path / "volume_report.html"


def test_the_default_file_is_not_hidden_for_a_name_that_starts_with_dots(tmp_path):
    """A volume named ".." or ".scan" was offered ".._report.html", "._report.html" (".": macOS's name for a file's
    resource fork) or ".scan_report.html": hidden in the file browsers of Linux and macOS once saved."""
    assert report_default_path(tmp_path, "..") == tmp_path / "volume_report.html"
    assert report_default_path(tmp_path, " . ") == tmp_path / "volume_report.html"
    assert report_default_path(tmp_path, ".scan") == tmp_path / "scan_report.html"
    assert report_default_path(tmp_path, "scan.") == tmp_path / "scan._report.html"


def test_the_chosen_name_gets_html_added_and_is_replaced_only_where_the_dialog_asked(tmp_path):
    (tmp_path / "mine.html").write_text("x")
    assert report_output(str(tmp_path / "mine.html")) == (tmp_path / "mine.html", True)  # the dialog asked
    assert report_output(str(tmp_path / "new.htm")) == (tmp_path / "new.htm", False)
    assert report_output(str(tmp_path / "mine")) == (tmp_path / "mine.html", None)  # not asked for mine.html
    assert report_output(str(tmp_path / "mine.pdf")) == (tmp_path / "mine.pdf", False)  # the logic refuses it
    assert report_output("~/r.html")[0] == Path.home() / "r.html"


def test_an_existing_file_the_dialog_did_not_ask_of_is_to_be_asked_of(tmp_path):
    """"mine" typed in the save dialog, mine.html there: the dialog asked of "mine", not of mine.html, and the panel
    then showed the library's refusal, "pass --overwrite (overwrite=True in Python) to replace it", which a panel user
    cannot do. report_output says None (ask before replacing it), as it does for no other answer."""
    (tmp_path / "mine.html").write_text("x")
    assert report_output(str(tmp_path / "mine"))[1] is None
    assert report_output(str(tmp_path / "yours"))[1] is False
