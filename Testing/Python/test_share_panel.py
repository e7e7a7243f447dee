"""The panel's "Share model..." action (CeVAEAnomalyLib.slicer.share_panel), without Qt.

A radiologist who adapted or calibrated a model in the panel (which records each healthy volume by its node name, often
a patient's name or ID) had no way in the panel to write the copy without those names that `cevae-anomaly share` and
the console's ``logic.shareModel`` write: the model was given on as it was, or not at all.
"""
from __future__ import annotations

import ast
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.slicer.share_panel import ModelSharing
from CeVAEAnomalyLib.slicer.widget_state import ADAPT, DETECT

MODULE_FILE = REPO / "CeVAEAnomaly" / "CeVAEAnomaly.py"
UI_FILE = REPO / "Resources" / "UI" / "CeVAEAnomaly.ui"


@pytest.fixture
def site_model(tmp_path) -> Path:
    """A model file of the user's own: a copy of the bundled model, which records its calibration scans by name."""
    model = tmp_path / "site.cevae"
    shutil.copyfile(default_model_path(), model)
    return model


def sharing(path, bundled: bool = False, readable: bool = True, busy_with=None) -> ModelSharing:
    panel = SimpleNamespace(useBundledModel=bundled, modelPath=str(path))
    return ModelSharing.of_panel(panel, readable, busy_with)


def test_it_is_offered_for_a_model_file_of_the_users_own_and_says_why_not_otherwise(site_model, tmp_path):
    offered = sharing(site_model)
    assert offered.problem is None
    assert offered.tooltip.startswith("Write a copy of site.cevae that calls the scans it was made from scan 1, scan 2")
    for bundled in (sharing("", bundled=True), sharing(site_model, bundled=True), sharing(default_model_path())):
        assert bundled.problem.startswith("The bundled model names only public sample scans")
        assert bundled.tooltip == bundled.problem
    assert sharing("").problem == "Choose the model file to share (Model bundle)."
    unreadable = "The chosen model cannot be read (the status line says why); choose a model file to share."
    assert sharing(tmp_path / "moved.cevae").problem == unreadable
    assert sharing(tmp_path).problem == unreadable  # a folder
    assert sharing(site_model, readable=False).problem == unreadable
    for task in (DETECT, ADAPT):
        assert sharing(site_model, busy_with=task).problem.startswith("Another task is running; wait for it to end")


def test_the_copy_goes_beside_the_model_by_default_never_over_it(site_model, tmp_path):
    assert sharing(site_model).default_output() == tmp_path / "site_shared.cevae"
    assert sharing(tmp_path / "Site.CEVAE").default_output() == tmp_path / "Site_shared.cevae"
    assert sharing(tmp_path / "site_shared.cevae").default_output() == tmp_path / "site_shared_2.cevae"
    assert sharing(tmp_path / "Site_Shared.cevae").default_output() == tmp_path / "Site_Shared_2.cevae"


def test_a_shareable_copy_is_not_offered_to_share_again(site_model, tmp_path):
    """The panel offered to share a shareable copy again, as NAME_shared_shared.cevae: the copy is already the
    file to give."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    action = sharing(site_model)
    copy = action.default_output()
    action.share(CeVAEAnomalyLogic(), str(copy), replace=False)
    again = sharing(copy)
    assert again.problem == ("site_shared.cevae is already a shareable copy (its scans are called scan 1, scan 2, "
                             "...): give it as it is.")
    assert again.tooltip == again.problem
    with pytest.raises(CeVAEError, match="is already a shareable copy"):
        again.share(CeVAEAnomalyLogic(), str(tmp_path / "other.cevae"), replace=False)
    assert not (tmp_path / "other.cevae").exists()


def test_share_writes_the_copy_without_the_scan_names_and_says_so(site_model, tmp_path):
    pytest.importorskip("slicer")  # the logic imports it
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    names = read_header(site_model).extra["calibration_subjects"]
    original = site_model.read_bytes()
    action = sharing(site_model)
    said = action.share(CeVAEAnomalyLogic(), str(action.default_output()), replace=False)
    copy = tmp_path / "site_shared.cevae"
    assert said == (f"Shareable copy of site.cevae saved as {copy}: the 3 scan(s) it records are called scan 1, "
                    "scan 2, ... instead of by their names; it detects exactly as site.cevae, which stays the model in "
                    "use. Give the copy alone: the checkpoints (.ckpt) beside an adapted model hold the scans' paths.")
    assert read_header(copy).extra["calibration_subjects"] == ["scan 1", "scan 2", "scan 3"]
    assert not [name for name in names if name.encode() in copy.read_bytes()]
    assert site_model.read_bytes() == original


def test_an_output_that_would_lose_data_is_refused_in_one_line(site_model, tmp_path):
    """Never the model itself (also through a link), never the bundled model, an existing file only where the save
    dialog asked before replacing it (``replace``); a name the model chooser would not list is refused too."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    logic, action = CeVAEAnomalyLogic(), sharing(site_model)
    original = site_model.read_bytes()
    os.link(site_model, tmp_path / "alias.cevae")
    for target in (site_model, tmp_path / "alias.cevae"):
        with pytest.raises(CeVAEError, match="cannot replace the model it starts from"):
            action.share(logic, str(target), replace=True)
    with pytest.raises(CeVAEError, match="cannot replace the bundled model"):
        action.share(logic, str(default_model_path()), replace=True)
    with pytest.raises(CeVAEError, match="needs a .cevae file name"):
        action.share(logic, str(tmp_path / "site_shared.txt"), replace=True)
    earlier = tmp_path / "site_shared.cevae"
    earlier.write_bytes(b"an earlier copy")
    with pytest.raises(CeVAEError, match="exists; choose another file name for the shareable copy"):
        action.share(logic, str(earlier), replace=False)
    assert earlier.read_bytes() == b"an earlier copy" and site_model.read_bytes() == original
    action.share(logic, str(earlier), replace=True)
    assert read_header(earlier).extra["names_removed"] == {"scans": 3}
    with pytest.raises(CeVAEError, match="Another task is running"):
        sharing(site_model, busy_with=ADAPT).share(logic, str(tmp_path / "other.cevae"), replace=False)
    assert not (tmp_path / "other.cevae").exists()


def widget_methods():
    tree = ast.parse(MODULE_FILE.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    return {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}


def test_the_panel_offers_share_model_below_the_model_and_binds_it_thinly():
    """Read from the source (Qt runs only inside Slicer): the button sits in the Inputs section below the model's
    details, takes its state and tooltip from ModelSharing at every refresh, and a click asks where to save (never in
    testing mode), writes the copy in the GUI thread and shows errors as the panel's other actions do."""
    layout = next(w for w in ET.parse(UI_FILE).iter("layout") if w.get("name") == "inputsFormLayout")
    cells = {(int(i.get("row")), int(i.get("column"))): i.find("widget").get("name") for i in layout.findall("item")}
    button = next(cell for cell, name in cells.items() if name == "shareModelButton")
    assert cells[(button[0] - 1, 1)] == "modelDetailsLabel" and button[1] == 1
    assert len({row for row, _ in cells}) == max(row for row, _ in cells) + 1  # rows 0..n, none doubled
    methods = widget_methods()
    assert "self.ui.shareModelButton.connect('clicked(bool)', self.onShareModel)" in methods["setup"]
    refresh = methods["_refresh"]
    assert "sharing = self._modelSharing()" in refresh
    assert "self.ui.shareModelButton.enabled = sharing.problem is None" in refresh
    assert "self.ui.shareModelButton.toolTip = plain_tooltip(sharing.tooltip)" in refresh
    assert "self._sharing = ModelSharing.of_panel(self._parameterNode, self._modelSettings() is not None, " \
        "self.state.task, self._sharing)" in methods["_modelSharing"]
    share = methods["onShareModel"]
    assert share.index("self._askSharedModelPath(sharing.default_output())") < \
        share.index("with slicer.util.tryWithErrorDisplay(_('Sharing the model failed.'), waitCursor=True):") < \
        share.index("self.ui.statusLabel.text = sharing.share(self.logic, output, replace=not "
                    "slicer.app.testingEnabled())")
    ask = methods["_askSharedModelPath"]
    assert ask.index("if slicer.app.testingEnabled():") < ask.index("qt.QFileDialog.getSaveFileName(")


def test_the_disk_is_asked_once_per_model_choice_not_at_every_refresh(site_model, tmp_path, monkeypatch):
    """The panel refreshes at every change of its parameter node (each field edit, each spin-box step); each refresh
    asked the disk twice (problem, then tooltip) whether the model is the bundled one and a file. The panel now keeps
    the action of its last refresh and gets it back while the choice is unchanged; a new choice asks again."""
    from CeVAEAnomalyLib.slicer import share_panel

    asked = []

    def is_bundled_model(path: Path) -> bool:
        asked.append(path)
        return real(path)

    real = share_panel.is_bundled_model
    monkeypatch.setattr(share_panel, "is_bundled_model", is_bundled_model)
    panel = SimpleNamespace(useBundledModel=False, modelPath=str(site_model))
    shown = None
    for _ in range(3):
        shown = ModelSharing.of_panel(panel, True, None, shown)
        assert shown.problem is None and shown.tooltip.startswith("Write a copy of site.cevae")
    assert asked == [site_model]
    panel.modelPath = str(tmp_path / "other.cevae")
    assert ModelSharing.of_panel(panel, False, None, shown).problem.startswith("The chosen model cannot be read")
    assert asked == [site_model, tmp_path / "other.cevae"]


def test_a_received_models_text_is_shown_as_text_not_as_html():
    """Qt renders a label's text or tooltip that looks like HTML as HTML: a received model named "<b>...</b><img
    src=...>" rewrote the panel's model details. The details label is plain text, its tooltip escaped HTML."""
    from CeVAEAnomalyLib.slicer.settings import plain_tooltip

    label = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "modelDetailsLabel")
    formats = [p.find("enum").text for p in label.findall("property") if p.get("name") == "textFormat"]
    assert formats == ["Qt::PlainText"]
    said = plain_tooltip("<b>site</b> & <img src='x'>\nFile: a")
    assert said == ("<p style=\"white-space:pre-wrap\">&lt;b&gt;site&lt;/b&gt; &amp; &lt;img src=&#x27;x&#x27;&gt;\n"
                    "File: a</p>")
    update = widget_methods()["_updateGui"]
    assert "about = details or _('What the chosen model is (as cevae-anomaly info says it).')" in update
    assert "self.ui.modelDetailsLabel.toolTip = plain_tooltip(about)" in update


def test_a_name_typed_without_its_suffix_gets_cevae_as_the_save_dialogs_filter_says(site_model, tmp_path):
    """Qt's save dialog (getSaveFileName, no default suffix) returned "copy" as typed under its "CeVAE model (*.cevae)"
    filter, which the copy then refused ("needs a .cevae file name"). A name of no suffix gets .cevae, as a dialog with
    a default suffix does; an existing NAME.cevae is not replaced then (the dialog asked about NAME, not about it)."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    logic, action = CeVAEAnomalyLogic(), sharing(site_model)
    said = action.share(logic, str(tmp_path / "copy"), replace=True)
    assert said.startswith(f"Shareable copy of site.cevae saved as {tmp_path / 'copy.cevae'}: the 3 scan(s)")
    assert read_header(tmp_path / "copy.cevae").extra["names_removed"] == {"scans": 3}
    assert not (tmp_path / "copy").exists()
    earlier = tmp_path / "earlier.cevae"
    earlier.write_bytes(b"an earlier copy")
    with pytest.raises(CeVAEError, match=f"{earlier} exists; choose another file name for the shareable copy"):
        action.share(logic, str(tmp_path / "earlier"), replace=True)
    assert earlier.read_bytes() == b"an earlier copy"
    with pytest.raises(CeVAEError, match="needs a .cevae file name"):  # a suffix of its own: not a model file name
        action.share(logic, str(tmp_path / "copy.v2"), replace=True)


def test_every_label_the_panel_writes_shows_its_text_as_typed():
    """Qt's labels take text that looks like HTML for rich text (Qt::AutoText): the status line and the adapt estimate
    show node names and paths ("'<b>sub-01</b>' is the input volume ...", "<img src=...>"), which were drawn as HTML.
    Every label the widget sets text on is plain text in the .ui."""
    written = set()
    for node in ast.walk(ast.parse(MODULE_FILE.read_text())):
        for target in node.targets if isinstance(node, ast.Assign) else ():
            if isinstance(target, ast.Attribute) and target.attr == "text":
                written.add(ast.unparse(target.value).removeprefix("self.ui."))
    labels = {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget") if w.get("class") == "QLabel"}
    written &= set(labels)
    assert {"statusLabel", "adaptEstimateLabel", "modelDetailsLabel"} <= written  # the pattern finds them
    formats = {name: [p.find("enum").text for p in labels[name].findall("property") if p.get("name") == "textFormat"]
               for name in written}
    assert {name: f for name, f in formats.items() if f != ["Qt::PlainText"]} == {}


def test_the_status_line_can_be_selected_and_copied():
    """The status line says errors and warnings with paths and node names a user may need elsewhere (a search, a
    report); a QLabel's text cannot be selected unless it says so, so none of it could be copied."""
    status = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "statusLabel")
    flags = [p.find("set").text for p in status.findall("property") if p.get("name") == "textInteractionFlags"]
    assert flags and "Qt::TextSelectableByMouse" in flags[0].split("|"), flags
