"""detect --report: one self-contained HTML page of a detection (input, time, software, model and threshold, summary
line, warnings, component table, top slices, key picture) that a person opens, prints and files without Slicer or
Python; every text from outside escaped; the picture embedded where the research extra draws it, and said otherwise."""
from __future__ import annotations

import base64
import csv
import dataclasses
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import SimpleITK as sitk

from conftest import CLI_WITHOUT_MATPLOTLIB
from CeVAEAnomalyLib.cli.main import EXIT_DONE, EXIT_REFUSED, main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.result import DetectionRecord, components_summary, read_components_csv

HOSTILE = "x<script>alert(1)<\\script>&\"q\" 'café' 日本"  # a scan's name with markup, quotes and non-ASCII
VOID = {"meta", "img", "br"}  # the elements the report writes without an end tag (as <meta ... />)


class Page(HTMLParser):
    """A report parsed: its text, tables (rows of cell texts), images' sources and every tag, with each end tag
    matched against the element open (a mismatch or an element left open is recorded in ``errors``)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.open: List[str] = []
        self.errors: List[str] = []
        self.tags: List[Tuple[str, Dict[str, Optional[str]]]] = []
        self.tables: List[List[List[str]]] = []
        self.cell: Optional[List[str]] = None
        self.chunks: List[str] = []
        self.feed(text)
        self.close()
        if self.open:
            self.errors.append(f"left open: {self.open}")
        self.text = " ".join(" ".join(self.chunks).split())

    def handle_starttag(self, tag: str, attrs) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in VOID:
            self.errors.append(f"<{tag}> without its closing slash")
            return
        self.open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_startendtag(self, tag: str, attrs) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.errors.append(f"<{tag} /> is not a void element")

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)
        if self.cell is not None:
            self.cell.append(data)

    def table_headed(self, first: str) -> List[List[str]]:
        return next(t for t in self.tables if t and t[0] and t[0][0] == first)


def facts(page: Page) -> Dict[str, str]:
    return {row[0]: row[1] for row in page.table_headed("Input")}


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Tuple[Path, Path]:
    """The bundled Colin27 (2 mm) with a lesion inserted (CeVAEAnomalyResearch.lesions), written under a name with
    markup, quotes and non-ASCII, with its brain mask."""
    from CeVAEAnomalyResearch.lesions import insert_lesions

    folder = tmp_path_factory.mktemp("scans")
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    lesioned, _, _ = insert_lesions(image, mask, 3, n=1, kinds=("hyper",), radius_mm=(10.0, 10.0),
                                    contrast_sd=(3.0, 3.0))
    path = folder / f"{HOSTILE}.nii.gz"
    sitk.WriteImage(lesioned, str(path))
    sitk.WriteImage(mask, str(folder / "brain.nii.gz"))
    return path, folder / "brain.nii.gz"


def detect(scan: Tuple[Path, Path], out: Path, *extra: str) -> int:
    image, mask = scan
    return main(["detect", str(image), "--mask", str(mask), "--score", str(out / "score.nii.gz"), "--device", "cpu",
                 *extra])


@pytest.fixture(scope="module")
def detected(scan, tmp_path_factory) -> Path:
    """A folder with detect's report and, beside it, its component and slice tables, record and picture."""
    out = tmp_path_factory.mktemp("detected")
    extra = ["--components", str(out / "c.csv"), "--slice-scores", str(out / "s.csv"), "--record",
             str(out / "r.json"), "--report", str(out / "report.html")]
    has_pictures = subprocess.run([sys.executable, "-c", "import matplotlib"]).returncode == 0
    assert detect(scan, out, *extra, *(["--picture", str(out / "p.png")] if has_pictures else [])) == EXIT_DONE
    return out


def test_the_report_holds_the_summary_every_component_the_top_slices_and_the_model(detected):
    page = Page((detected / "report.html").read_text(encoding="utf-8"))
    assert page.errors == []
    components = read_components_csv((detected / "c.csv").read_text())
    assert components, "the inserted lesion was found"
    assert components_summary(components) in page.text
    with open(detected / "c.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = page.table_headed("Rank")
    assert rows[0] == ["Rank", "Volume (ml)", "Side", "Peak score", "Centroid R (mm)", "Centroid A (mm)",
                       "Centroid S (mm)"]
    assert rows[1:] == [[r["component"], r["volume_ml"], r["side"], r["max_score"], r["r"], r["a"], r["s"]]
                        for r in table]  # one row per component, with the CSV's values
    with open(detected / "s.csv", newline="") as f:
        slices = list(csv.reader(f))
    assert page.table_headed("axis") == slices[:6]  # the header and the 5 most anomalous slices
    record = DetectionRecord.from_dict(json.loads((detected / "r.json").read_text()))
    said = facts(page)
    assert said["Input"] == f"{HOSTILE}.nii.gz"
    assert said["Made (UTC)"] == record.created_utc
    assert said["Model SHA-256"] == record.model.sha256
    assert said["Threshold from"] == record.threshold_source
    assert said["Software"].startswith(f"cevae-anomaly {record.version}")
    assert "Research software, not a medical device. Scores and labelmaps are not a diagnosis." in page.text


def test_the_report_gives_the_threshold_so_that_it_reads_back_as_the_records(detected):
    """The report showed the threshold to 4 significant figures (4.878 where the record holds 4.878498...), so a reader
    re-running detect --threshold with it got another labelmap. The number it ends with now reads back as the record's
    threshold (the text evaluate writes, repr), after the rounded one where that differs."""
    from CeVAEAnomalyLib.report import report_html
    from CeVAEAnomalyLib.result import read_slices_csv

    record = DetectionRecord.from_dict(json.loads((detected / "r.json").read_text()))
    said = facts(Page((detected / "report.html").read_text(encoding="utf-8")))["Threshold"]
    assert float(re.findall(r"[-+0-9.e]+", said)[-1]) == record.threshold, said
    components = read_components_csv((detected / "c.csv").read_text())
    slices = read_slices_csv((detected / "s.csv").read_text())
    for threshold, shown in ((4.878498458862305, "4.878 (exactly 4.878498458862305)"), (2.5, "2.5")):
        text = report_html("n", dataclasses.replace(record, threshold=threshold), components, slices)
        assert facts(Page(text))["Threshold"] == shown


def test_the_report_escapes_the_scans_name_and_refers_to_nothing_outside(detected):
    text = (detected / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert "<script" not in text.lower() and "café" in text and "日本" in text
    assert "&lt;script&gt;" in text and "&amp;" in text and "&quot;q&quot;" in text
    assert f"Anomaly detection report: {HOSTILE}.nii.gz" in page.text
    assert not any(tag in ("link", "script", "iframe", "object") for tag, _ in page.tags)
    references = [value for _, attrs in page.tags for key, value in attrs.items() if key in ("src", "href")]
    assert all(value.startswith("data:image/png;base64,") for value in references), references
    assert "url(" not in text and "@import" not in text


def test_a_long_unbroken_name_or_path_wraps_inside_the_printed_page(detected):
    """A scan's name, a path or a model name without spaces (a DICOM folder of IDs, a 200-character name) had no break
    opportunity: the heading and the facts table grew past the page's 180 mm and were cut off when printed. Every text
    of the page may now wrap anywhere (overflow-wrap: anywhere, inherited from body, which, unlike break-word, also
    narrows a table's cells), and no rule takes that back."""
    text = (detected / "report.html").read_text(encoding="utf-8")
    style = text[text.index("<style>") + len("<style>"):text.index("</style>")]
    rules = [([s.strip() for s in selectors.split(",")], dict(tuple(p.strip() for p in d.split(":", 1))
                                                               for d in body.split(";") if ":" in d))
             for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", style)]
    assert any("body" in selectors and declared.get("overflow-wrap") == "anywhere" for selectors, declared in rules)
    assert all(declared.get("overflow-wrap", "anywhere") == "anywhere" and declared.get("white-space") != "nowrap"
               for _, declared in rules)


def test_the_report_embeds_the_picture_detect_draws(detected):
    pytest.importorskip("matplotlib")
    page = Page((detected / "report.html").read_text(encoding="utf-8"))
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 1
    assert base64.b64decode(images[0].split(",", 1)[1]) == (detected / "p.png").read_bytes()


def test_the_report_lists_the_records_warnings_escaped(detected):
    from CeVAEAnomalyLib.report import report_html
    from CeVAEAnomalyLib.result import read_slices_csv

    record = DetectionRecord.from_dict(json.loads((detected / "r.json").read_text()))
    warned = dataclasses.replace(record, warnings=("The scan <b>café</b> & \"its\" DICOM 日本", "second"))
    text = report_html("n", warned, read_components_csv((detected / "c.csv").read_text()),
                       read_slices_csv((detected / "s.csv").read_text()))
    page = Page(text)
    assert page.errors == [] and "<b>" not in text
    assert "Warnings (2) The scan <b>café</b> & \"its\" DICOM 日本 second" in page.text


def test_control_characters_in_a_name_or_warning_are_shown_escaped_not_written_into_the_page(detected):
    """A control character (BEL, ESC, NUL, DEL, C1; a file name may hold them) went into the page as it was, a parse
    error by the HTML spec. The report now shows each as a visible escape (\\x07); tab and newline stay as they were."""
    from CeVAEAnomalyLib.report import report_html
    from CeVAEAnomalyLib.result import read_slices_csv

    record = DetectionRecord.from_dict(json.loads((detected / "r.json").read_text()))
    warned = dataclasses.replace(record, warnings=("bell\x07 escape\x1b[31m nul\x00 del\x7f c1\x9b\ttab\nline",))
    text = report_html("scan\x07\x1b.nii", warned, read_components_csv((detected / "c.csv").read_text()),
                       read_slices_csv((detected / "s.csv").read_text()))
    assert not re.findall(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]", text)
    page = Page(text)
    assert page.errors == []
    assert "Anomaly detection report: scan\\x07\\x1b.nii" in page.text
    assert "bell\\x07 escape\\x1b[31m nul\\x00 del\\x7f c1\\x9b tab line" in page.text
    assert "\\x9b\ttab\nline</li>" in text


def test_without_matplotlib_the_report_is_written_and_says_the_picture_needs_the_extra(scan, tmp_path):
    image, mask = scan
    report = tmp_path / "report.HTM"
    done = subprocess.run([sys.executable, "-c", CLI_WITHOUT_MATPLOTLIB, "detect", str(image), "--mask", str(mask),
                           "--score", str(tmp_path / "s.nii.gz"), "--report", str(report), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_DONE, done.stderr
    page = Page(report.read_text(encoding="utf-8"))
    assert page.errors == []
    assert not any(tag == "img" for tag, _ in page.tags)
    assert ("The key picture needs the research extra (matplotlib: pip install 'cevae-anomaly[research]'), which "
            "this installation lacks" in page.text)
    assert "component(s)" in page.text


def test_a_report_not_named_html_is_refused_before_scoring(scan, tmp_path, capsys):
    assert detect(scan, tmp_path, "--report", str(tmp_path / "report.pdf")) == EXIT_REFUSED
    assert "name ending in .html" in capsys.readouterr().err
    assert not (tmp_path / "score.nii.gz").exists()


def test_an_existing_report_is_kept_without_overwrite_and_nothing_is_written(scan, tmp_path, capsys):
    report = tmp_path / "report.html"
    report.write_text("mine")
    assert detect(scan, tmp_path, "--report", str(report)) == EXIT_REFUSED
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert report.read_text() == "mine" and not (tmp_path / "score.nii.gz").exists()



@pytest.fixture(scope="module")
def cohort(scan, tmp_path_factory) -> Path:
    """A folder with the lesioned scan (named ``lesioned``) and its brain mask."""
    folder = tmp_path_factory.mktemp("cohort")
    (folder / "lesioned.nii.gz").write_bytes(scan[0].read_bytes())
    (folder / "lesioned_mask.nii.gz").write_bytes(scan[1].read_bytes())
    return folder


def batch(folder: Path, out: Path, *extra: str) -> int:
    return main(["batch", str(folder), "--out-dir", str(out), "--device", "cpu", *extra])


def statuses(out: Path) -> List[str]:
    with open(out / "summary.csv", newline="") as f:
        return [row["status"] for row in csv.DictReader(f)]


def test_batch_reports_and_a_rerun_that_makes_the_missing_ones_from_saved_outputs_without_scoring(cohort, tmp_path):
    fresh = tmp_path / "fresh"
    assert batch(cohort, fresh, "--reports") == EXIT_DONE
    report = fresh / "lesioned_report.html"
    page = Page(report.read_text(encoding="utf-8"))
    assert page.errors == [] and facts(page)["Input"] == "lesioned"
    with open(fresh / "lesioned_components.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table and page.table_headed("Rank")[1:] == [
        [r["component"], r["volume_ml"], r["side"], r["max_score"], r["r"], r["a"], r["s"]] for r in table]
    out = tmp_path / "out"
    assert batch(cohort, out) == EXIT_DONE
    assert not (out / "lesioned_report.html").exists()
    scored = (out / "lesioned_score.nii.gz").stat().st_mtime_ns
    assert batch(cohort, out, "--reports") == EXIT_DONE
    assert statuses(out) == ["skipped"] and (out / "lesioned_score.nii.gz").stat().st_mtime_ns == scored
    made = (out / "lesioned_report.html").read_text(encoding="utf-8")
    record = json.loads((out / "lesioned_record.json").read_text())
    assert facts(Page(made))["Made (UTC)"] == record["created_utc"]  # the scoring's time, not the rerun's
    later = json.loads((fresh / "lesioned_record.json").read_text())["created_utc"]
    assert made == report.read_text(encoding="utf-8").replace(later, record["created_utc"])  # as a scoring makes it


def test_a_rerun_makes_no_report_from_a_record_that_is_not_the_one_written_with_the_outputs(cohort, tmp_path, caplog):
    """A done volume whose NAME_record.json was edited (or replaced) since its outputs were written: batch knows it is
    not their record (record_sha256 empty, warned of), yet --reports made the report from it, stating the edited
    threshold and its source beside the components the real one made. No report is made from it now, with a warning
    why; the outputs are kept."""
    out = tmp_path / "out"
    assert batch(cohort, out) == EXIT_DONE
    path = out / "lesioned_record.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, threshold=99.0, threshold_source="edited by hand")))
    with caplog.at_level("WARNING"):
        assert batch(cohort, out, "--reports") == EXIT_DONE
    assert statuses(out) == ["skipped"] and not (out / "lesioned_report.html").exists()
    said = [r.getMessage() for r in caplog.records if "report" in r.getMessage()]
    assert len(said) == 1 and "lesioned: its report cannot be made" in said[0] and "--overwrite" in said[0], said


def test_a_volume_scored_again_without_reports_loses_its_old_report(cohort, tmp_path):
    out = tmp_path / "out"
    assert batch(cohort, out, "--reports") == EXIT_DONE
    report = out / "lesioned_report.html"
    assert report.is_file()
    assert batch(cohort, out, "--overwrite") == EXIT_DONE
    assert statuses(out) == ["ok"] and not report.exists()  # it described the earlier result


def test_batch_reports_without_matplotlib_are_written_without_the_picture(cohort, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", CLI_WITHOUT_MATPLOTLIB, "batch", str(cohort), "--out-dir", str(out),
                           "--reports", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_DONE, done.stderr
    page = Page((out / "lesioned_report.html").read_text(encoding="utf-8"))
    assert not any(tag == "img" for tag, _ in page.tags) and "needs the research extra" in page.text


@pytest.mark.parametrize("rerun", [False, True])
def test_batch_pictures_and_reports_draw_the_key_picture_once_and_embed_the_png_file(cohort, tmp_path, monkeypatch,
                                                                                     rerun):
    """With --pictures --reports, a rerun that made a done volume's missing picture and report from its saved outputs
    drew the key picture twice, once for each; it is drawn once now, in a first run as in a rerun, and the report
    embeds the very bytes of the PNG file."""
    pytest.importorskip("matplotlib")
    from CeVAEAnomalyResearch import figures

    out = tmp_path / "out"
    if rerun:
        assert batch(cohort, out) == EXIT_DONE
    drawn: List[bytes] = []
    real = figures.key_picture_png

    def counted(*args, **kwargs) -> bytes:
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(figures, "key_picture_png", counted)
    assert batch(cohort, out, "--pictures", "--reports") == EXIT_DONE
    assert statuses(out) == ["skipped" if rerun else "ok"]
    assert len(drawn) == 1
    png = (out / "lesioned_picture.png").read_bytes()
    images = [attrs["src"] for tag, attrs in Page((out / "lesioned_report.html").read_text("utf-8")).tags
              if tag == "img"]
    assert png == drawn[0] and len(images) == 1 and base64.b64decode(images[0].split(",", 1)[1]) == png
