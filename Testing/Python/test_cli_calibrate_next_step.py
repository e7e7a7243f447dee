"""`calibrate` ended without saying how to use what it wrote (`adapt` ends with "Detect with it: ..."): a user
who calibrated on a site's healthy scans had to find out that detect takes the new bundle with --model."""
from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Tuple

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated_on_the_sample(tiny_bundle: Path, tmp_path: Path, caplog, *options: str) -> Tuple[Path, str]:
    """Calibrate ``tiny_bundle`` on the bundled 2 mm sample with ``options``: the model written and calibrate's last
    line ("Calibrated bundle written ...")."""
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    (healthy / "c_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    out = tmp_path / "site.cevae"
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", str(healthy), "--model", str(tiny_bundle), "--out", str(out), "--device", "cpu",
                     *options]) == 0
    return out, [r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibrated bundle written")][-1]


def test_calibrate_ends_by_saying_how_to_detect_with_the_calibrated_model(tiny_bundle, tmp_path: Path,
                                                                           caplog) -> None:
    out, last = _calibrated_on_the_sample(tiny_bundle, tmp_path, caplog)
    assert last.endswith(
        f"Detect with it: cevae-anomaly detect SCAN --model {out}"), last


def test_calibrate_with_another_score_type_says_that_detect_keeps_the_default(tiny_bundle, tmp_path: Path,
                                                                              caplog) -> None:
    """`calibrate --score-type rec` calibrates every score type but keeps the model's default, combi; its last line
    did not say so, and a user took it that detect now scores rec. It names the default and how to detect with rec."""
    out, last = _calibrated_on_the_sample(tiny_bundle, tmp_path, caplog, "--score-type", "rec")
    assert ("Its default scoring: score type combi (a calibration keeps it; rec is calibrated too: detect uses it "
            "only with --score-type rec), orientations") in last, last
    assert last.endswith(f"Detect with it: cevae-anomaly detect SCAN --model {out} --score-type rec"), last


def test_calibrate_says_what_a_site_calibration_changed_for_detection(caplog) -> None:
    """A user's calibration on 5 mm scans of other heads raised the bundled model's threshold from 4.9 to 7.7: every
    lesion of a patient scan left the labelmap, and nothing said why nor what gives sensitivity back; and the bundled
    model's thorough mode was silently no longer calibrated (detection then refused Slicer's Thorough)."""
    from dataclasses import replace

    from CeVAEAnomalyLib.cli.commands import _say_what_changed
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.calibration import calibrated_test_time_steps
    from CeVAEAnomalyLib.engine.header import read_header

    old = read_header(default_model_path())
    assert calibrated_test_time_steps(old.calibration) == [0, 100]
    plain = {key: dict(entry, threshold=[1.6 * t for t in entry["threshold"]])
             for key, entry in old.calibration.items() if '"test_time_steps": 0' in key}
    stricter = replace(old, calibration=plain)
    with caplog.at_level(logging.INFO):
        _say_what_changed(old, stricter, Path("site.cevae"), old.default_threshold())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "calibrate again with --test-time-steps 100" in said[0], said
    assert f"its threshold rose from {old.default_threshold():.4g} to {stricter.default_threshold():.4g}" in said[1]
    assert said[1].endswith("For more sensitivity, at the cost of more false alarms: detect with a higher --fpr (e.g. "
                            "0.001) or --min-peak 1, or calibrate again with --default-fpr 0.001 --min-peak 1 to make "
                            "them this model's defaults.")  # (calibrate itself has no --fpr)
    caplog.clear()
    unfiltered = replace(stricter, postprocess=replace(stricter.postprocess, min_peak=1.0))
    with caplog.at_level(logging.INFO):  # no peak filter: none to loosen
        _say_what_changed(old, unfiltered, Path("site.cevae"), old.default_threshold())
    assert caplog.records and not any("peak" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the same thresholds and modes: nothing to say
        _say_what_changed(old, old, Path("site.cevae"), old.default_threshold())
    assert not caplog.records



def test_the_higher_rate_calibrate_suggests_is_higher_than_the_models_default(caplog) -> None:
    """A model trained here has the default rate 0.001; calibrated on site scans that raised its threshold, calibrate
    said to "detect with a higher --fpr (e.g. 0.001)" and to "calibrate again with --default-fpr 0.001": the rate it
    already had, which gives no sensitivity back. The example is now a rate above the model's default."""
    from dataclasses import replace

    from CeVAEAnomalyLib.cli.commands import _say_what_changed
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.header import read_header

    bundled = read_header(default_model_path())
    old = replace(bundled, default_fpr=0.001)
    stricter = replace(old, calibration={key: dict(entry, threshold=[1.6 * t for t in entry["threshold"]])
                                         for key, entry in old.calibration.items()})
    with caplog.at_level(logging.INFO):
        _say_what_changed(old, stricter, Path("site.cevae"), old.default_threshold())
    said = [r.getMessage() for r in caplog.records if "rose" in r.getMessage()]
    assert len(said) == 1 and "higher --fpr (e.g. 0.002)" in said[0] and "--default-fpr 0.002" in said[0], said


def test_the_command_to_detect_with_a_model_in_a_folder_with_spaces_can_be_pasted(tiny_bundle, tmp_path: Path,
                                                                                   caplog) -> None:
    """calibrate ended with "Detect with it: cevae-anomaly detect SCAN --model Site scans é/Modèl ü.cevae": pasted
    into a shell, the path fell apart into three words and detect refused them."""
    folder = tmp_path / "Site scans é"
    folder.mkdir()
    (folder / "Müller Jörg.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    (folder / "Müller Jörg_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    out = folder / "Modèl ü.cevae"
    with caplog.at_level(logging.INFO):
        assert main(["calibrate", str(folder), "--model", str(tiny_bundle), "--out", str(out), "--device", "cpu"]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibrated bundle written")][-1]
    assert shlex.split(said.split("Detect with it: ")[1]) == ["cevae-anomaly", "detect", "SCAN", "--model", str(out)]


@pytest.mark.parametrize("mask", ["empty", "one voxel"])
def test_a_scan_calibrate_refuses_is_not_warned_of_first(tmp_path, caplog, capsys, mask):
    """A healthy scan whose brain mask is empty (or holds one voxel: its intensities are constant) was first warned of
    ("... The thresholds taken on it may not fit the model's scans") and then refused with the same words: the
    refusal alone is said."""
    import numpy as np
    import SimpleITK as sitk

    healthy = tmp_path / "healthy"
    healthy.mkdir()
    (healthy / "c.nii.gz").write_bytes(data_path("colin27_t1_2mm.nii.gz").read_bytes())
    given = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    voxels = np.zeros(sitk.GetArrayFromImage(given).shape, np.uint8)
    if mask == "one voxel":
        voxels[tuple(n // 2 for n in voxels.shape)] = 1
    written = sitk.GetImageFromArray(voxels)
    written.CopyInformation(given)
    sitk.WriteImage(written, str(healthy / "c_mask.nii.gz"))
    out = tmp_path / "site.cevae"
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(healthy), "--out", str(out), "--device", "cpu"]) == 2
    said = [r.getMessage() for r in caplog.records if "may not fit the model's scans" in r.getMessage()]
    assert said == [] and not out.exists()
    err = capsys.readouterr().err.splitlines()
    refusal = "brain mask is empty" if mask == "empty" else "inside the brain are (nearly) constant"
    assert len(err) == 1 and err[0].startswith(f"error: {healthy / 'c.nii.gz'}: ") and refusal in err[0], err
