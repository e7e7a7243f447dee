"""The panel's Qt Designer file as a user meets it: labels tied to their fields (Qt does not run here: the .ui is
parsed as XML, the way uic reads it)."""
import html
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from CeVAEAnomalyLib.engine.calibration import DEFAULT_FPR

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "Resources" / "UI" / "CeVAEAnomaly.ui"


def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def prop(widget: ET.Element, name: str) -> str:
    """The text of a widget's property (its <string>, <cstring>, <number>, ...), "" if it has none."""
    found = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return "" if found is None else "".join(found.itertext()).strip()


def form_rows() -> List[Tuple[ET.Element, ET.Element]]:
    """(label, field) of every QFormLayout row with a widget in both columns."""
    rows = []
    for layout in ui_root().iter("layout"):
        if layout.get("class") != "QFormLayout":
            continue
        cells: Dict[Tuple[str, str], ET.Element] = {}
        for item in layout.findall("item"):
            widget = item.find("widget")
            if widget is not None and item.get("colspan") is None:
                cells[item.get("row"), item.get("column")] = widget
        rows += [(cells[row, "0"], cells[row, "1"]) for row, column in cells if column == "0" and (row, "1") in cells]
    return rows


def test_every_form_label_is_the_buddy_of_its_field():
    """uic puts a form row's label and field in with QFormLayout::setWidget, which, unlike addRow(text, field), ties
    nothing: no label had a buddy, so Qt's accessibility named no field by its label (a screen reader read the
    check boxes "Use bundled model", "Show in 3D" and "Override post-processing", which have no text of their own, as
    nameless check boxes), and a click on a label did nothing. Each label names its field as its buddy now."""
    rows = form_rows()
    assert len(rows) >= 20  # the pattern finds the panel's rows
    assert [(prop(label, "text"), prop(label, "buddy")) for label, field in rows
            if label.get("class") == "QLabel" and prop(label, "buddy") != field.get("name")] == []


def widget_named(name: str) -> ET.Element:
    return next(w for w in ui_root().iter("widget") if w.get("name") == name)


def qt_step(spin: ET.Element, value: float, steps: int) -> float:
    """What a QDoubleSpinBox of the .ui shows after ``steps`` clicks on its arrows from ``value`` (QAbstractSpinBox:
    singleStep, or with AdaptiveDecimalStepType one power of ten below the value, at least 10^-decimals; the value
    rounded to its decimals and kept in its range)."""
    decimals = int(prop(spin, "decimals") or 2)
    low, high = float(prop(spin, "minimum") or 0), float(prop(spin, "maximum") or 99.99)
    adaptive = prop(spin, "stepType") == "QAbstractSpinBox::AdaptiveDecimalStepType"
    for _ in range(abs(steps)):
        step = float(prop(spin, "singleStep") or 1)
        if adaptive:
            size = abs(value) / 1.01 if (value < 0) != (steps < 0) else abs(value)  # Qt: 1100 down goes to 1090
            step = max(10.0 ** -decimals, 10.0 ** (math.floor(math.log10(size)) - 1)) if size >= 10.0 ** -decimals \
                else 10.0 ** -decimals
        value = min(max(round(value + math.copysign(step, steps), decimals), low), high)
    return value


@pytest.mark.parametrize("rate", [DEFAULT_FPR, 0.00021774, 1e-5, 1e-4, 0.01, 0.1])
def test_a_click_on_the_rates_arrows_changes_it_by_a_little(rate):
    """The false-positive rate stepped by 0.0005 a click: from the bundled model's own rate, 0.000218 (which the field
    shows when "Chosen false-positive rate" is picked), one click down (or a turn of the mouse wheel over it) went to
    0.000001, the bottom of the range, a 200 times lower rate, and no rate between it and 0.0005 (0.0001, say) could be
    reached with the arrows. A click moves the rate by one unit of its second significant digit now (Qt's adaptive
    decimal step: 0.000218 to 0.000208 or 0.000228, 0.001 to 0.0011 or 0.00099)."""
    spin = widget_named("falsePositiveRateSpinBox")
    shown = round(rate, int(prop(spin, "decimals")))
    for steps in (-1, 1):
        stepped = qt_step(spin, shown, steps)
        assert stepped != shown and abs(stepped - shown) <= 0.1 * shown + 1e-12, (shown, steps, stepped)


def tooltip(name: str) -> str:
    """A widget's tooltip as the user reads it (rich text's tags dropped, entities read)."""
    return html.unescape(re.sub(r"<[^>]+>", "", prop(widget_named(name), "toolTip")))


def test_the_number_fields_say_what_they_do_in_the_units_the_panel_shows():
    """Three fields' tooltips left the user guessing: the threshold's, "Absolute anomaly score threshold.", said neither
    which voxels it marks nor in what units it is; the median filter's, "3D median filter radius (voxels).", not what
    the filter does, that 0 is off, or that a large radius takes minutes (10: about 90 s and 10 GB); the minimum
    component volume's is in mm³ where the component table's Volume column is in ml (the bundled model's 50 mm³ is
    0.05 ml there), and nothing said so."""
    threshold = tooltip("thresholdSpinBox")
    assert "at or above this are marked as anomalies" in threshold and "score volume's units" in threshold
    median = widget_named("medianRadiusSpinBox")
    assert prop(median, "suffix").strip() == "voxels"
    assert "0: off" in tooltip("medianRadiusSpinBox") and "90 s" in tooltip("medianRadiusSpinBox")
    assert prop(widget_named("minVolumeSpinBox"), "suffix").strip() == "mm³"
    assert "1000 mm³ = 1 ml" in tooltip("minVolumeSpinBox")


# Properties (with the .ui's value tag) and signals of the panel's classes, as their headers declare them in Slicer
# 5.6 (git tag v5.6.0), its CTK (f53820a4) and Qt 5.15, unchanged to Slicer 5.10 and main; only those the panel may
# use. uic and QUiLoader ignore a property a class does not have, and a signal name PythonQt does not know fails only
# inside Slicer.
QWIDGET = {"geometry": "rect", "enabled": "bool", "toolTip": "string"}
BUTTON = {**QWIDGET, "text": "string"}
NODE_COMBO = {**QWIDGET, "nodeTypes": "stringlist", "showChildNodeTypes": "bool", "hideChildNodeTypes": "stringlist",
              "showHidden": "bool", "noneEnabled": "bool", "addEnabled": "bool", "removeEnabled": "bool",
              "editEnabled": "bool", "renameEnabled": "bool", "noneDisplay": "string", "baseName": "string"}
ITEM_VIEW = {**QWIDGET, "editTriggers": "set", "selectionBehavior": "enum", "selectionMode": "enum"}
PROPERTIES: Dict[str, Dict[str, str]] = {
    "qMRMLWidget": QWIDGET,
    "QLabel": {**QWIDGET, "text": "string", "textFormat": "enum", "wordWrap": "bool", "textInteractionFlags": "set",
               "buddy": "cstring"},
    "QCheckBox": BUTTON,
    "QPushButton": BUTTON,
    "QComboBox": QWIDGET,
    "QProgressBar": {**QWIDGET, "value": "number", "format": "string"},
    "QSpinBox": {**QWIDGET, "minimum": "number", "maximum": "number", "singleStep": "number", "suffix": "string"},
    "QDoubleSpinBox": {**QWIDGET, "decimals": "number", "minimum": "double", "maximum": "double",
                       "singleStep": "double", "suffix": "string", "stepType": "enum"},
    "ctkCollapsibleButton": {**BUTTON, "collapsed": "bool"},
    "ctkPathLineEdit": {**QWIDGET, "settingKey": "string", "label": "string", "nameFilters": "stringlist",
                        "currentPath": "string"},
    "ctkSliderWidget": {**QWIDGET, "decimals": "number", "singleStep": "double", "pageStep": "double",
                        "minimum": "double", "maximum": "double", "value": "double", "suffix": "string"},
    "qMRMLNodeComboBox": NODE_COMBO,
    "qMRMLCheckableNodeComboBox": NODE_COMBO,
    "qMRMLSegmentSelectorWidget": {**QWIDGET, "segmentationNodeSelectorVisible": "bool", "noneEnabled": "bool",
                                   "editEnabled": "bool", "multiSelection": "bool", "horizontalLayout": "bool"},
    "qMRMLTableView": {**ITEM_VIEW, "transposed": "bool", "firstRowLocked": "bool", "firstColumnLocked": "bool"},
}
ENUM_SCOPES = {"textFormat": "Qt::", "textInteractionFlags": "Qt::", "stepType": "QAbstractSpinBox::",
               "editTriggers": "QAbstractItemView::", "selectionBehavior": "QAbstractItemView::",
               "selectionMode": "QAbstractItemView::"}
SIGNALS: Dict[str, set] = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QComboBox": {"currentIndexChanged(int)", "activated(int)"},
    "QLineEdit": {"textChanged(QString)", "textEdited(QString)", "editingFinished()", "returnPressed()"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                          "currentNodeIDChanged(QString)"},
    "qMRMLCheckableNodeComboBox": {"checkedNodesChanged()", "currentNodeChanged(vtkMRMLNode*)"},
    "qMRMLSegmentSelectorWidget": {"currentSegmentChanged(QString)", "currentNodeChanged(vtkMRMLNode*)",
                                   "segmentSelectionChanged(QStringList)"},
    "qMRMLTableView": {"clicked(QModelIndex)", "doubleClicked(QModelIndex)", "selectionChanged()"},
    "QTimer": {"timeout()"},
    "QCoreApplication": {"aboutToQuit()"},
    "qSlicerApplication": {"startupCompleted()"},  # (slicer.app: the module's sample data registers on it)
}
MODULE_FILE = REPO / "CeVAEAnomaly" / "CeVAEAnomaly.py"


def test_every_property_the_ui_sets_is_one_its_class_has_with_its_type():
    """A property its class does not have (a misspelt name, or one of another class) is dropped without a word when
    Slicer loads the .ui; one of the wrong type is not applied. Dynamic ones (stdset="0", the parameter bindings)
    are the panel's own."""
    root = ui_root()
    widgets = list(root.iter("widget"))
    assert {w.get("class") for w in widgets} <= set(PROPERTIES)
    wrong = [(w.get("name"), p.get("name"), p[0].tag) for w in widgets for p in w.findall("property")
             if p.get("stdset") != "0" and PROPERTIES[w.get("class")].get(p.get("name")) != p[0].tag]
    assert wrong == []
    scoped = [(w.get("name"), p.get("name"), p[0].text) for w in widgets for p in w.findall("property")
              if p.get("name") in ENUM_SCOPES
              and not all(v.startswith(ENUM_SCOPES[p.get("name")]) for v in (p[0].text or "").split("|"))]
    assert scoped == []


def test_every_custom_widget_is_declared_with_its_real_base_class():
    """QUiLoader makes a custom widget from Slicer's designer plugins; its declaration in the .ui names the base class
    as the header declares it (ctkCollapsibleButton is declared on QWidget, as Slicer's own .ui files do)."""
    bases = {c.findtext("class"): c.findtext("extends") for c in ui_root().iter("customwidget")}
    assert bases == {"qMRMLWidget": "QWidget", "qMRMLNodeComboBox": "QWidget", "ctkCollapsibleButton": "QWidget",
                     "ctkSliderWidget": "QWidget", "ctkPathLineEdit": "QWidget",
                     "qMRMLSegmentSelectorWidget": "qMRMLWidget", "qMRMLCheckableNodeComboBox": "qMRMLNodeComboBox",
                     "qMRMLTableView": "QTableView"}


def test_every_signal_the_panel_connects_is_one_its_sender_has():
    """The panel's widgets connect by signature text; a signal its sender lacks fails only inside Slicer."""
    classes = {w.get("name"): w.get("class") for w in ui_root().iter("widget")}
    text = MODULE_FILE.read_text(encoding="utf-8")
    direct = re.findall(r'self\.ui\.(\w+)\.connect\("([^"]+)"', text)
    assert len(direct) >= 10
    assert [(name, signal) for name, signal in direct if signal not in SIGNALS[classes[name]]] == []
    known = set().union(*SIGNALS.values())
    every = re.findall(r'\.connect\("([^"]+)"', text)
    assert len(every) > len(direct) and set(every) <= known
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in ui_root().iter("connection")]
    scene_widgets = {n for n, c in classes.items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    assert sorted(c[2] for c in connections) == sorted(scene_widgets)  # each gets the scene once
    assert {(c[0], c[1], c[3]) for c in connections} == {
        ("CeVAEAnomaly", "mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)")}
