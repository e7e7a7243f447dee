"""What the automatic brain mask says of a scan of part of the head: what is true of the scan it masked."""
from __future__ import annotations

import logging
from typing import List

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1, compute_brain_mask, default_template_dir

EDGE = "The automatic brain mask reaches the edge of the image"


@pytest.fixture(scope="module")
def upper_parts() -> dict:
    """The upper 55 % of the bundled colin27's slices (2 mm, its k axis runs to superior): with its skull ("head")
    and skull-stripped, the head times its brain mask ("stripped")."""
    head = sitk.ReadImage(str(default_template_dir() / TEMPLATE_T1), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(default_template_dir() / TEMPLATE_MASK))
    stripped = sitk.Mask(head, sitk.Cast(brain > 0, sitk.sitkUInt8))
    cut = head.GetSize()[2] * 45 // 100
    return {"head": head[:, :, cut:], "stripped": stripped[:, :, cut:]}


def _said(caplog, image: sitk.Image, level: int = logging.WARNING) -> List[str]:
    """The messages at ``level`` or above that the automatic mask of ``image`` logs."""
    caplog.clear()
    with caplog.at_level(level, logger="CeVAEAnomalyLib.engine.brainmask"):
        compute_brain_mask(image, where="scan.nii.gz: ")
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def test_a_partial_skull_stripped_scan_is_not_said_to_hold_more_than_the_brain(upper_parts, caplog):
    """A skull-stripped scan of part of the head is its own mask ("Input looks skull-stripped: its foreground is the
    brain mask"), yet was warned that "the mask may hold more than the brain; check it, or give a brain mask": what
    holds of a template registered to a cut-off head, not of a stripped scan's foreground. Each is told its own."""
    stripped = [w for w in _said(caplog, upper_parts["stripped"]) if EDGE in w]
    assert len(stripped) == 1 and "more than the brain" not in stripped[0], stripped
    assert "skull-stripped scan may cover part of the brain only" in stripped[0], stripped
    head = [w for w in _said(caplog, upper_parts["head"]) if EDGE in w]
    assert len(head) == 1 and "the template registered to it may put more than the brain in the mask" in head[0]


def test_preparing_a_cohort_s_mask_less_partial_scans_names_each_in_its_automatic_mask_s_words(upper_parts,
                                                                                             tmp_path, caplog):
    """train, prepare and adapt mask their mask-less scans through given_or_computed_mask, which passed no name to
    the automatic mask: "The automatic brain mask reaches the edge of the image ..." and "Input looks
    skull-stripped ..." named no scan, and with several (or with --workers, interleaved) the user could not tell
    which. They now lead with the scan's path, as its other warnings (and detect's and calibrate's) do."""
    from CeVAEAnomalyLib.cli.main import main

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name, image in upper_parts.items():
        sitk.WriteImage(image, str(cohort / f"{name}.nii.gz"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["prepare", str(cohort), "--cache-dir", str(tmp_path / "cache")]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "CeVAEAnomalyLib.engine.brainmask"
            and not r.getMessage().startswith("No brain mask for ")]
    assert [w for w in said if EDGE in w] and [w for w in said if "looks skull-stripped" in w], said
    paths = (f"{cohort / 'head.nii.gz'}: ", f"{cohort / 'stripped.nii.gz'}: ")
    assert [w for w in said if not w.startswith(paths)] == [], said
