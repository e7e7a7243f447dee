"""The panel's Qt Designer file as a user meets it: labels tied to their fields (Qt does not run here: the .ui is
parsed as XML, the way uic reads it)."""
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

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
