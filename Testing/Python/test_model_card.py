"""The model card: the benchmark report it embeds keeps working links wherever the card is written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyResearch.modelcard import rebase_links, write_model_card

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_targets(markdown: str) -> list:
    """Link targets that are neither URLs nor anchors, without their fragment."""
    return [t.split("#")[0] for t in LINK.findall(markdown) if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#", t)]


def test_links_are_rebased_and_urls_and_anchors_kept() -> None:
    text = ("see [t](tables.md), [f](figures/a.png#x), [up](../README.md), [a](#the-peak-filter), "
            "[u](https://example.org/a.md), [m](mailto:x@y.org) and [abs](/etc/hosts)")
    out = rebase_links(text, Path("/p/docs"), Path("/p/Resources/Models"))
    assert out == ("see [t](../../docs/tables.md), [f](../../docs/figures/a.png#x), [up](../../README.md), "
                   "[a](#the-peak-filter), [u](https://example.org/a.md), [m](mailto:x@y.org) and [abs](/etc/hosts)")


def test_a_written_card_links_to_the_benchmark_files(tiny_bundle, tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tables.md").write_text("| a |\n")
    (docs / "benchmark.md").write_text("# Benchmark\n\nThe [tables](tables.md) and [below](#benchmark).\n")
    card = write_model_card(load_bundle(tiny_bundle), tmp_path / "Resources" / "Models" / "CARD.md",
                            docs / "benchmark.md")
    targets = relative_targets(card.read_text())
    assert targets == ["../../docs/tables.md"]
    assert all((card.parent / t).is_file() for t in targets)


def test_a_card_is_written_whole_whatever_the_systems_text_encoding(tiny_bundle, tmp_path) -> None:
    """The benchmark report was read in the locale's encoding (cp1252 on Windows; ASCII here): its UTF-8 dashes and
    Greek letters came out garbled in the card, or stopped the write."""
    report = tmp_path / "benchmark.md"
    report.write_text("# Benchmark \u2013 \u03b2 = 0.01, 256\u00b3 voxels\n", encoding="utf-8")
    card = tmp_path / "CARD.md"
    script = ("import sys; from pathlib import Path; from CeVAEAnomalyLib.engine.bundle import load_bundle; "
              "from CeVAEAnomalyResearch.modelcard import write_model_card; "
              "write_model_card(load_bundle(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), LC_ALL="C", PYTHONUTF8="0",
               PYTHONCOERCECLOCALE="0")  # a locale whose encoding is not UTF-8
    done = subprocess.run([sys.executable, "-c", script, str(tiny_bundle), str(card), str(report)], env=env,
                          capture_output=True, text=True, errors="replace")
    assert done.returncode == 0, done.stderr
    assert "# Benchmark \u2013 \u03b2 = 0.01, 256\u00b3 voxels" in card.read_text(encoding="utf-8")


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "Resources").rglob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_shipped_documents_resolves(document: Path) -> None:
    missing = sorted({t for t in relative_targets(document.read_text()) if not (document.parent / t).exists()})
    assert not missing, f"links in {document.name} that do not resolve: {missing}"


def test_the_shipped_model_card_links_to_the_benchmark_tables() -> None:
    card = ROOT / "Resources" / "Models" / "MODEL_CARD.md"
    assert "../../docs/benchmark_acquisition_fused_tables.md" in relative_targets(card.read_text())


def test_the_recipe_is_the_bundled_one_only_for_the_bundled_model(tiny_bundle) -> None:
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyResearch.modelcard import render_model_card

    assert "scripts/train_default_model.py" in render_model_card(load_bundle(default_model_path()))
    own = render_model_card(load_bundle(tiny_bundle))  # trained on synthetic heads: a user's own data
    assert "scripts/train_default_model.py" not in own and "`cevae-anomaly train` on the subjects above" in own


def test_the_card_says_which_scans_the_calibration_covers() -> None:
    """The shipped model's calibration records its healthy scans' largest voxel side, and its card says it and what
    detection does outside that range."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyResearch.modelcard import render_model_card

    card = render_model_card(load_bundle(default_model_path()))
    assert "healthy scans have a largest voxel side of 1 to 1.5 mm" in card
    assert "more than 1.5 times the upper end (2.25 mm)" in card


def test_the_shipped_model_card_is_written_from_the_current_benchmark_report() -> None:
    """The card holds docs/benchmark.md (links rebased); it is written by the default model's training recipe only, so
    sections added to the report later were missing from it (stop 51's and 52's): regenerate it with
    write_model_card when the report changes."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyResearch.modelcard import render_model_card

    card = ROOT / "Resources" / "Models" / "MODEL_CARD.md"
    report = ROOT / "docs" / "benchmark.md"
    expected = render_model_card(load_bundle(default_model_path()),
                                 rebase_links(report.read_text(encoding="utf-8"), report.parent, card.parent))
    assert card.read_text(encoding="utf-8") == expected, "Resources/Models/MODEL_CARD.md is stale: regenerate it"


def test_the_card_names_every_calibrated_scoring_of_the_model() -> None:
    """The shipped model is calibrated for the paper's own score (issue 21: selectable and calibrated); its card listed
    the thorough and axial calibrations only, so a reader of the card did not learn that `--paper ...` needs no
    absolute threshold. Every calibrated scoring of the default score type is named with its flags and threshold."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.calibration import calibrated_settings, threshold_for_fpr
    from CeVAEAnomalyResearch.modelcard import render_model_card

    header = load_bundle(default_model_path()).header
    card = render_model_card(load_bundle(default_model_path()))
    others = [(f, e) for f, e in calibrated_settings(header.calibration, header.score_options, header.postprocess)
              if f and not any(x.startswith("--score-type") for x in f)]
    assert any("--paper" in flags for flags, _ in others)
    line = next(li for li in card.splitlines() if li.startswith("- Also calibrated the same way"))
    for flags, entry in others:
        assert f"`{' '.join(flags)}`" in line and f"{threshold_for_fpr(entry, header.default_fpr):.4g}" in line


def test_the_card_names_the_model_file_it_describes_by_its_sha256(tiny_bundle) -> None:
    """The card named the model and its training scans, but not which file it describes: a calibrated or adapted
    copy of the same name, or a retrained model, read the same. It names the file, its sha256 (as a detection's
    record gives it), the weights' digest and the version that wrote it."""
    import hashlib

    from CeVAEAnomalyLib.engine.bundle import read_header
    from CeVAEAnomalyResearch.modelcard import render_model_card

    header = read_header(tiny_bundle)
    card = render_model_card(load_bundle(tiny_bundle))
    digest = hashlib.sha256(tiny_bundle.read_bytes()).hexdigest()
    assert (f"- File: `{tiny_bundle.name}`, sha256 `{digest}`; weights sha256 `{header.extra['weights_sha256']}`; "
            f"written by cevae-anomaly {header.extra['written_by']}.") in card.splitlines()
