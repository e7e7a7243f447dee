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
