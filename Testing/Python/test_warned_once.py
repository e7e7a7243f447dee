"""Each warning about a scan is said once: a calibration on a scan of part of the head (the bundled colin27's upper
part, 2 mm) said its coverage twice."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import template_dir
from CeVAEAnomalyLib.engine.brainmask import TEMPLATE_MASK, TEMPLATE_T1

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
