"""Each warning about a scan is said once: a calibration on a scan of part of the head (the bundled colin27's upper
part, 2 mm) said its coverage twice, and so did adapt and train, which mask a scan for its slices and its scores."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import template_dir
from CeVAEAnomalyLib.engine.brainmask import (MARGIN_MM, SCORED_MARGIN_MM, TEMPLATE_MASK, TEMPLATE_T1,
                                            compute_brain_mask, each_warning_once)

EDGE = "reaches the edge of the image"  # the automatic mask's coverage warning and the given mask's


@pytest.fixture(scope="module")
def top(tmp_path_factory) -> Path:
    """A folder with the upper 55 % of colin27's slices (its k axis runs to superior), top.nii.gz, and its mask cut
    the same way, top_mask.nii.gz: a scan of part of the head."""
    folder = tmp_path_factory.mktemp("top")
    for name, out in ((TEMPLATE_T1, "top.nii.gz"), (TEMPLATE_MASK, "top_mask.nii.gz")):
        image = sitk.ReadImage(str(template_dir() / name))
        sitk.WriteImage(image[:, :, image.GetSize()[2] * 45 // 100:], str(folder / out))
    return folder


def _warnings(caplog, args: List[str]) -> List[str]:
    """The warnings the command line logs for ``args`` (which must succeed)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_calibrating_on_a_partial_scan_with_its_automatic_mask_says_its_coverage_once(tiny_bundle, top, tmp_path,
                                                                                       caplog):
    """calibrate handed its automatic mask to the detector as a given one, so a scan of part of the head got the
    automatic mask's "reaches the edge of the image" and then the given mask's, in other words. With a mask given,
    the given mask's warning is said."""
    common = ["--model", str(tiny_bundle), "--device", "cpu", "--overwrite"]
    warned = _warnings(caplog, ["calibrate", str(top / "top.nii.gz"), "--out", str(tmp_path / "a.cevae"), *common])
    edge = [w for w in warned if EDGE in w]
    assert len(edge) == 1 and "The automatic brain mask reaches the edge" in edge[0], warned
    warned = _warnings(caplog, ["calibrate", str(top), "--out", str(tmp_path / "g.cevae"), *common])
    edge = [w for w in warned if EDGE in w]
    assert len(edge) == 1 and "The brain mask reaches the edge of the image" in edge[0], warned


def test_calibrating_a_thorough_mode_too_says_each_scan_s_warnings_once(tiny_bundle, top, tmp_path, caplog):
    """With a thorough mode (--test-time-steps) each scan is scored in two modes, and each scoring checked the scan
    again: the given mask's "reaches the edge of the image" was said twice, word for word."""
    warned = _warnings(caplog, ["calibrate", str(top), "--test-time-steps", "2", "--out", str(tmp_path / "t.cevae"),
                                "--model", str(tiny_bundle), "--device", "cpu"])
    assert len([w for w in warned if EDGE in w]) == 1, warned


def test_calibration_s_automatic_mask_warnings_name_the_scan(tiny_bundle, top, tmp_path, caplog):
    """calibrate's automatic masks warned without saying of which healthy scan ("The automatic brain mask reaches the
    edge of the image ..."): Slicer's status line, which shows the warnings only, left the user to guess which of the
    volumes it was; the detector's warnings about the same scan name it."""
    warned = _warnings(caplog, ["calibrate", str(top / "top.nii.gz"), "--out", str(tmp_path / "n.cevae"), "--model",
                                str(tiny_bundle), "--device", "cpu"])
    edge = [w for w in warned if EDGE in w]
    assert edge and all(w.startswith(f"{top / 'top.nii.gz'}: The automatic brain mask") for w in edge), warned


@pytest.fixture(scope="module")
def tops(top, tmp_path_factory) -> List[Path]:
    """Two scans of part of the head without brain masks in a folder of their own: top.nii.gz and a noisy copy (another
    scan, as `adapt` and `train` need)."""
    folder = tmp_path_factory.mktemp("tops")
    image = sitk.ReadImage(str(top / "top.nii.gz"), sitk.sitkFloat32)
    noise = np.random.default_rng(0).normal(0.0, 2.0, image.GetSize()[::-1]).astype(np.float32)
    noisy = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + noise)
    noisy.CopyInformation(image)
    for out, volume in (("top.nii.gz", image), ("noisy.nii.gz", noisy)):
        sitk.WriteImage(volume, str(folder / out))
    return [folder / "top.nii.gz", folder / "noisy.nii.gz"]


def _edge_warnings_of(warned: List[str], scan: Path) -> List[str]:
    return [w for w in warned if EDGE in w and w.startswith(f"{scan}: ")]


def test_adapting_on_partial_maskless_scans_says_each_coverage_once_and_a_later_detection_again(tiny_bundle, tops,
                                                                                               tmp_path, caplog):
    """adapt masked each scan for its slices (2 mm outside the template's brain) and then for its calibration (1 mm
    inside), and each mask said "reaches the edge of the image", with other figures (13 %, then 11 %): the same fact
    about a scan, twice. A detection of the scan after the run, in the same process (Slicer, a batch), is another
    run: it says it again."""
    out = tmp_path / "site.cevae"
    warned = _warnings(caplog, ["adapt", *map(str, tops), "--model", str(tiny_bundle), "--out", str(out), "--steps",
                                "2", "--batch-size", "4", "--device", "cpu"])
    for scan in tops:
        assert len(_edge_warnings_of(warned, scan)) == 1, warned
    warned = _warnings(caplog, ["detect", str(tops[0]), "--model", str(out), "--device", "cpu",
                                "--score", str(tmp_path / "score.nii.gz")])
    assert len([w for w in warned if EDGE in w]) == 1, warned


def test_training_with_a_partial_maskless_held_out_scan_says_its_coverage_once(tops, tmp_path, caplog):
    """train masked the held-out scan for its validation slices and again for the calibration, at another margin: its
    coverage was said twice, with other figures."""
    warned = _warnings(caplog, ["train", *map(str, tops), "--out", str(tmp_path / "t.cevae"), "--max-steps", "2",
                                "--input-size", "64", "--channels", "8,16,16,32", "--z-dim", "16", "--batch-size",
                                "4", "--val-fraction", "0.5", "--device", "cpu"])
    for scan in tops:
        assert len(_edge_warnings_of(warned, scan)) == 1, warned


def test_a_scan_masked_again_in_one_run_says_its_facts_once_and_again_after_the_run(top, caplog):
    """adapt masks a scan for its axial slices, again for a fold's other orientations (the same margin: the same
    words) and then for its scores (another margin); a skull-stripped scan's mask and notice are the same at every
    margin. Each was said every time. Within one run each is said once; a mask made after the run says it again."""
    head = sitk.ReadImage(str(top / "top.nii.gz"), sitk.sitkFloat32)
    brain = sitk.Mask(head, sitk.ReadImage(str(top / "top_mask.nii.gz"), sitk.sitkUInt8))
    scans = {"head: ": head, "brain: ": brain}
    caplog.set_level(logging.INFO, logger="CeVAEAnomalyLib.engine.brainmask")

    def said(where: str) -> List[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(where)]

    with each_warning_once():
        for margin in (MARGIN_MM, MARGIN_MM, SCORED_MARGIN_MM):
            for where, image in scans.items():
                compute_brain_mask(image, where=where, margin_mm=margin)
    assert len(said("head: ")) == 1 and EDGE in said("head: ")[0], said("head: ")
    brain_said = said("brain: ")
    assert len(brain_said) == 2 and EDGE in brain_said[1] and "skull-stripped" in brain_said[0], brain_said
    caplog.clear()
    compute_brain_mask(head, where="head: ", margin_mm=SCORED_MARGIN_MM)
    assert len(said("head: ")) == 1 and EDGE in said("head: ")[0], said("head: ")


GRID = "The brain mask is on another grid than the image"


def test_adapting_with_masks_on_other_grids_says_each_resampling_once_and_a_later_detection_again(tiny_bundle,
                                                                                                 tmp_path, caplog):
    """adapt resampled a scan's mask on another grid for its slices and again for its calibration, and said "The
    brain mask is on another grid than the image" each time: the same fact about a scan, twice. A detection of the
    scan after the run is another run: it says it again."""
    from conftest import write_heads

    heads = tmp_path / "heads"
    heads.mkdir()
    subjects = write_heads(heads, seeds=(4, 5))  # not the base model's training heads
    for subject in subjects:  # 2 voxels more each side: the same mask on a larger grid
        mask = sitk.ReadImage(str(subject.mask))
        sitk.WriteImage(sitk.ConstantPad(mask, [2, 2, 2], [2, 2, 2], 0), str(subject.mask))
    out = tmp_path / "site.cevae"
    warned = _warnings(caplog, ["adapt", str(heads), "--model", str(tiny_bundle), "--out", str(out), "--steps", "2",
                                "--batch-size", "4", "--device", "cpu"])
    for subject in subjects:
        assert len([w for w in warned if w.startswith(f"{subject.image}: {GRID}")]) == 1, warned
    warned = _warnings(caplog, ["detect", str(subjects[0].image), "--mask", str(subjects[0].mask), "--model",
                                str(out), "--device", "cpu", "--score", str(tmp_path / "score.nii.gz")])
    assert len([w for w in warned if GRID in w]) == 1, warned
