"""A detection's report: one self-contained HTML page a person opens, reads, prints and files without Slicer or
Python (``detect --report``, ``batch --reports``; torch-free, and without matplotlib: the key picture is embedded
where the caller could draw it).

The page holds no reference to anything outside it (its style inline, the picture a ``data:`` URI), prints on A4 (a
long name or path without spaces wraps rather than running off the page), and every text from outside (file names,
warnings, the model's name) is HTML-escaped. Its numbers are the tables' and the summary line's (result.py's
formatters).
"""
from __future__ import annotations

import base64
import html
import re
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence

from .result import (COMPONENT_FIELDS, PICTURE_MODULES, SLICE_FIELDS, Component, DetectionRecord, SliceScoreRow,
                     component_cells, components_summary, slice_cells, threshold_text)
from .system import RESEARCH_EXTRA, missing_modules

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .result import DetectionResult

DISCLAIMER = "Research software, not a medical device. Scores and labelmaps are not a diagnosis."
TOP_SLICES = 5  # the slice table's rows the report shows (the most anomalous first)
NO_PICTURE = (f"The key picture needs the research extra (matplotlib: {RESEARCH_EXTRA}), which this installation "
              "lacks; the report is complete without it.")
LESION_COLUMNS = (("component", "Rank"), ("volume_ml", "Volume (ml)"), ("side", "Side"),
                  ("max_score", "Peak score"), ("r", "Centroid R (mm)"), ("a", "Centroid A (mm)"),
                  ("s", "Centroid S (mm)"))  # (the component table's column, its heading here)
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # the controls a page may not hold as they are

_STYLE = """
@page { size: A4; margin: 15mm; }
body { font-family: sans-serif; font-size: 10.5pt; color: #000; max-width: 180mm; margin: 1em auto;
       overflow-wrap: anywhere; }
h1 { font-size: 15pt; margin: 0 0 0.3em 0; }
h2 { font-size: 12pt; margin: 1.1em 0 0.3em 0; border-bottom: 1px solid #888; }
.disclaimer { border: 2px solid #000; padding: 0.4em; font-weight: bold; }
.summary { font-size: 12pt; font-weight: bold; }
table { border-collapse: collapse; margin: 0.3em 0; }
th, td { border: 1px solid #888; padding: 0.15em 0.5em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: #eee; width: 12em; }
.digest { font-family: monospace; font-size: 8.5pt; word-break: break-all; }
.note { font-size: 9pt; color: #333; }
img { max-width: 100%; height: auto; }
tr, img { page-break-inside: avoid; break-inside: avoid; }
"""


def report_html(name: str, record: DetectionRecord, components: Sequence[Component],
                ranked_slices: Sequence[SliceScoreRow], picture: Optional[bytes] = None,
                frame: Optional[str] = None) -> str:
    """The report of the detection of the input ``name`` that ``record`` describes: its components (ranked as the
    component table lists them), its slices from most to least anomalous (the first :data:`TOP_SLICES` are shown)
    and ``picture``, the key picture's PNG (None: not drawn, which the report says needs the research extra);
    ``frame``: the sequence frame scored, in words (None: the input is no sequence's frame)."""
    e = _escape
    model = record.model
    software = ", ".join(f"{k} {v}" for k, v in sorted(record.software.items()))
    facts = [("Input", e(name)), *([("Sequence frame", e(frame))] if frame else []),
             ("Made (UTC)", e(record.created_utc)),
             ("Software", e(f"{record.tool} {record.version}") + (f" ({e(software)})" if software else "")),
             ("Model", e(f"{model.name} ({model.modality})")),
             ("Model file", e(model.path) if model.path else "not loaded from a file"),
             ("Model SHA-256", f'<span class="digest">{e(model.sha256)}</span>' if model.sha256 else "not known"),
             ("Threshold", e(_threshold(record.threshold))), ("Threshold from", e(record.threshold_source)),
             *([("Calibrated on", e(model.calibrated_on))] if model.calibrated_on else []),
             ("Brain mask", e(record.mask) if record.mask else "not said"), ("Device", e(record.device))]
    facts += [(f"{role.capitalize()} file", f'{e(source["path"])}<br /><span class="digest">SHA-256 '
               f'{e(source["sha256"])}</span>') for role, source in record.inputs.items()]
    warnings = (f"<ul>{''.join(f'<li>{e(w)}</li>' for w in record.warnings)}</ul>" if record.warnings
                else "<p>None.</p>")
    if picture is None:
        figure = f'<p class="note">{e(NO_PICTURE)}</p>'
    else:
        figure = (f'<img alt="Key picture of {e(name)}" '
                  f'src="data:image/png;base64,{base64.b64encode(picture).decode("ascii")}" />')
    shown = list(ranked_slices)[:TOP_SLICES]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8" />',
        f"<title>Anomaly detection report: {e(name)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>Anomaly detection report: {e(name)}</h1>", f'<p class="disclaimer">{e(DISCLAIMER)}</p>',
        f'<p class="summary">{e(components_summary(components))}</p>',
        "<h2>Detection</h2>", _table([], [[f"<th>{k}</th>", f"<td>{v}</td>"] for k, v in facts], "facts"),
        f"<h2>Warnings ({len(record.warnings)})</h2>", warnings,
        "<h2>Key picture</h2>", figure,
        f"<h2>Components ({len(components)})</h2>", _components(components),
        f"<h2>Most anomalous slices (the first {len(shown)} of {len(ranked_slices)})</h2>", _slices(shown),
        f'<p class="note">{e(DISCLAIMER)}</p>', "</body>", "</html>", ""])


def report_picture(image: "sitk.Image", result: "DetectionResult", name: str) -> Optional[bytes]:
    """The key picture a report of ``result`` (a detection of ``image``, ``name`` its title) embeds: the PNG
    ``detect --picture`` draws where the research extra (matplotlib) is installed; None where it is not (the report
    says so)."""
    if missing_modules(PICTURE_MODULES):
        return None
    from CeVAEAnomalyResearch.figures import result_picture_png

    return result_picture_png(image, result, name)


def result_report_html(name: str, result: "DetectionResult", picture: Optional[bytes],
                       frame: Optional[str] = None) -> str:
    """:func:`report_html` of the detection ``result`` of the input ``name``, with ``picture`` (:func:`report_picture`;
    None: not drawn) and the sequence ``frame`` scored (None: none)."""
    return report_html(name, result.record, result.components, result.ranked_slices(), picture, frame)


def _threshold(value: float) -> str:
    """The threshold to 4 significant figures and, where those do not read back as it, exactly (as evaluate writes
    it), so that ``--threshold`` with the last number gives the same labelmap."""
    rounded, exact = f"{value:.4g}", threshold_text(value)
    return exact if float(rounded) == value else f"{rounded} (exactly {exact})"


def _components(components: Sequence[Component]) -> str:
    if not components:
        return "<p>None.</p>"
    at = [COMPONENT_FIELDS.index(field) for field, _ in LESION_COLUMNS]
    rows = [[_cell(component_cells(c)[i], i != COMPONENT_FIELDS.index("side")) for i in at] for c in components]
    return (_table([heading for _, heading in LESION_COLUMNS], rows)
            + '<p class="note">Rank 1 has the highest summed score. Centroids are in RAS coordinates (mm, as Slicer '
              "shows positions). Side: the patient's side of the brain's mid-sagittal plane (both: crossing the "
              "midline; empty: not known). The component table (CSV) also gives each one's voxels, summed and mean "
              "score and highest-scoring point.</p>")


def _slices(rows: Sequence[SliceScoreRow]) -> str:
    if not rows:
        return "<p>None.</p>"
    return (_table(SLICE_FIELDS, [[_cell(v) for v in slice_cells(r)] for r in rows])
            + '<p class="note">axis: the input\'s IJK axis the slice is across (0 I, 1 J, 2 K); index: the slice '
              "along it; anomaly: the slice score that follows lesions; flagged: 1 where the labelmap marks the "
              "slice.</p>")


def _cell(value: str, number: bool = True) -> str:
    return f'<td class="number">{_escape(value)}</td>' if number else f"<td>{_escape(value)}</td>"


def _table(headings: Iterable[str], rows: List[List[str]], kind: str = "") -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in headings)
    body = "".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    kind = f' class="{kind}"' if kind else ""
    return (f"<table{kind}>" + (f"<thead><tr>{head}</tr></thead>" if head else "")
            + f"<tbody>{body}</tbody></table>")


def _escape(text: str) -> str:
    """``text`` HTML-escaped, each control character the HTML spec makes a parse error (C0 but tab, newline, form
    feed and carriage return; DEL; C1) shown as a visible escape (\\x07)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", html.escape(text, quote=True))
