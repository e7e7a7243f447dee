"""The model card (Markdown) of a bundle, written from its header and the benchmark report."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from CeVAEAnomalyLib.engine.bundle import Bundle
from CeVAEAnomalyLib.engine.header import WEIGHTS_DIGEST_KEY, WRITER_KEY
from CeVAEAnomalyLib.engine.calibration import (ACQUISITION_FACTOR, BRIGHT_TAIL_MARGIN, calibrated_settings,
                                                  find_calibration, threshold_for_fpr)
from CeVAEAnomalyLib.engine.model_info import known_source
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import SPREADS
from CeVAEAnomalyLib.io.atomic import atomic_write_text


def _recipe(training: dict) -> str:
    """How to train the model again: the bundled recipe for the bundled subjects, else the user's own command."""
    subjects = training.get("subjects", [])
    if subjects and all(known_source(s) for s in subjects):
        return "- Recipe: `python scripts/train_default_model.py` (fetches the same data if absent)."
    return "- Recipe: `cevae-anomaly train` on the subjects above, with the settings of this section."


def _what_it_asks(flags: Sequence[str]) -> str:
    """A few words on what a calibrated scoring's ``flags`` ask detection for, where they need them."""
    if "--paper" in flags:
        return " (the paper's own score: reconstruction error × |dKL/dx|, not normalised, no asymmetry)"
    if any(f.startswith("--test-time-steps ") for f in flags):
        return " (thorough mode: each scan scored by a copy of the model adapted to it)"
    if flags == ["--orientations axial"]:
        return " (the axial map alone: one network pass)"
    return ""


def render_model_card(bundle: Bundle, benchmark: Optional[str] = None) -> str:
    h = bundle.header.to_dict()
    tr = h.get("training", {})
    pre = h.get("preprocess", {})
    lines = [
        f"# Model card: {h.get('name', bundle.path.stem)}",
        "",
        f"- File: `{bundle.path.name}`, sha256 `{bundle.sha256}`; weights sha256 `{h.get(WEIGHTS_DIGEST_KEY)}`; "
        f"written by cevae-anomaly {h.get(WRITER_KEY)}.",
        "",
        "**Intended use.** Research on unsupervised anomaly localisation in adult brain T1-weighted MRI: "
        "a heat map of voxels that look unlike the healthy training data, and a labelmap at a calibrated "
        "false-positive rate. **Not a medical device; not for diagnosis.** Anomalies are departures from "
        "a tiny healthy reference, not diseases: artefacts, unusual anatomy, other contrasts (T2, FLAIR, "
        "contrast-enhanced T1), children and CT are out of scope and will be flagged or missed unpredictably.",
        "",
        "## Training data",
        f"Modality: {h.get('modality', 'T1')}. Subjects ({len(tr.get('subjects', []))}):",
    ]
    for s in tr.get("subjects", []):
        lines.append(f"- `{s['name']}`: {known_source(s) or 'user data'} (sha256 `{s['sha256'][:16]}…`)")
    lines += [
        "",
        "## Architecture and preprocessing",
        f"- ceVAE, input {h['model']['input_size']} px, encoder widths {h['model']['channels']}, "
        f"z = {h['model']['z_dim']}; weights stored as {h.get('weights_dtype')}.",
        f"- Loss: {json.dumps(h.get('loss'))}.",
        f"- Slice orientations trained: {', '.join(tr.get('orientations', ['axial']))}; intensities "
        f"scaled by the {pre.get('low_percentile')}th–{pre.get('high_percentile')}th brain percentiles, clipped "
        f"to [0, {pre.get('clip_max')}], brain box padded by {pre.get('margin_mm')} mm to a square.",
        "",
        "## Training budget",
        f"- {tr.get('steps')} steps of batch {tr.get('batch_size')} (lr {tr.get('lr')}, Adam), "
        f"{tr.get('train_slices')} training slices, seed {tr.get('seed')}, {tr.get('seconds')} s on "
        f"{tr.get('ranks', 1)} process(es); torch {h.get('versions', {}).get('torch')}.",
        f"- Augmentation: {json.dumps(tr.get('augment'))}.",
        _recipe(tr),
        "",
        "## Scoring and calibration",
        f"- Default scoring: {json.dumps(h.get('score_options'))}.",
        f"- Post-processing: {json.dumps(h.get('postprocess'))}.",
    ]
    typed = bundle.header
    if typed.postprocess.normalise:
        lines.append(f"- Each brain's map is normalised to (s − median) / spread, negatives set to 0, with spread "
                     f"`{typed.postprocess.spread}`: {SPREADS[typed.postprocess.spread]}.")
    fpr = typed.default_fpr
    try:
        entry = find_calibration(typed.calibration, typed.score_options, typed.postprocess)
    except CeVAEError:
        entry = None
    if entry:
        lines.append(f"- Calibrated on {entry['n_voxels']} healthy brain voxels ({entry['source']}); default "
                     f"false-positive rate {fpr:g} → threshold {threshold_for_fpr(entry, fpr):.4g}.")
        if entry.get("largest_voxel_mm"):
            low, high = entry["largest_voxel_mm"]
            lines.append(f"- The calibration's healthy scans have a largest voxel side of {low:g} to {high:g} mm; "
                         f"detecting a scan whose largest side is more than {ACQUISITION_FACTOR:g} times the upper end "
                         f"({ACQUISITION_FACTOR * high:g} mm) warns that the threshold's false-positive rate on it is "
                         "not known.")
        if entry.get("bright_tail"):
            low, high = entry["bright_tail"]
            lines.append(f"- Their bright tail (how far the brightest brain voxels lie above the white matter) is "
                         f"{low:g} to {high:g}; a scan's more than {BRIGHT_TAIL_MARGIN:g} above it (a post-contrast "
                         "look) gets the same warning.")
    others = [(flags, e) for flags, e in calibrated_settings(typed.calibration, typed.score_options, typed.postprocess)
              if flags and not any(f.startswith("--score-type ") for f in flags)]
    if others:
        lines.append("- Also calibrated the same way (threshold at that rate): " + "; ".join(
            f"`{' '.join(flags)}`{_what_it_asks(flags)} {threshold_for_fpr(e, fpr):.4g}" for flags, e in others) + ".")
    if benchmark:
        lines += ["", "## Benchmark", "", benchmark.replace("# ", "### ", 1)]
    return "\n".join(lines) + "\n"


_RELATIVE_LINK = re.compile(r"\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^)\s#]+)")


def rebase_links(markdown: str, source_dir: Path, target_dir: Path) -> str:
    """Rewrite the relative links of Markdown written in ``source_dir`` so they resolve from ``target_dir``
    (anchors, absolute paths and URLs are kept)."""
    def rebased(m: "re.Match[str]") -> str:
        target = os.path.relpath(os.path.abspath(os.path.join(source_dir, m.group(1))), os.path.abspath(target_dir))
        return "](" + Path(target).as_posix()
    return _RELATIVE_LINK.sub(rebased, markdown)


def write_model_card(bundle: Bundle, path: Path, benchmark_md: Optional[Path] = None) -> Path:
    """Write the card to ``path``; the benchmark report's links are rebased so they resolve from the card."""
    text = None
    if benchmark_md is not None and benchmark_md.is_file():
        text = rebase_links(benchmark_md.read_text(encoding="utf-8"), benchmark_md.parent, path.parent)
    return atomic_write_text(path, render_model_card(bundle, text))
