"""calibrate (the command and the Slicer panel's worker) names every healthy scan that cannot be read in one error,
before any scoring, in train's words: it stopped at the first one it read for its voxel checksums, so a site's
damaged scans were found one run at a time."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.options import DetectionRequest
from CeVAEAnomalyLib.slicer.worker import run_calibrate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def healthy(tmp_path) -> Dict[str, Path]:
    """A folder of three healthy scans with their brain masks: the bundled 2 mm Colin27, a truncated copy of it and a
    file that is no image."""
    folder = tmp_path / "healthy"
    folder.mkdir()
    scan = data_path("colin27_t1_2mm.nii.gz").read_bytes()
    files = {"good": scan, "cut": scan[: len(scan) // 3], "garbage": b"not an image\n"}
    for name, content in files.items():
        (folder / f"{name}.nii.gz").write_bytes(content)
        (folder / f"{name}_mask.nii.gz").write_bytes(data_path("colin27_brainmask_2mm.nii.gz").read_bytes())
    return {name: folder / f"{name}.nii.gz" for name in files}


def _names_both(said: str, healthy: Dict[str, Path]) -> None:
    assert said.startswith("2 of the 3 volumes could not be read (the others were read): "), said
    assert f"{healthy['cut']} is truncated or corrupt" in said, said
    assert f"{healthy['garbage']} could not be read as an image" in said, said


def test_calibrate_names_every_damaged_healthy_scan_in_one_error(healthy, tmp_path, capsys) -> None:
    out = tmp_path / "site.cevae"
    assert main(["calibrate", str(healthy["good"].parent), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1, err
    _names_both(said[0][len("error: "):], healthy)
    assert "Healthy volume" not in err and not out.exists()  # nothing scored, nothing written


def test_the_panels_calibration_names_every_damaged_scan_in_one_error(healthy, tmp_path) -> None:
    scored = []
    out = tmp_path / "site.cevae"
    task = {"subjects": [{"image": str(p), "mask": str(p.with_name(p.name.replace(".nii", "_mask.nii")))}
                         for p in healthy.values()],
            "model": str(default_model_path()), "request": DetectionRequest.of(device="cpu").to_dict(),
            "out": str(out)}
    with pytest.raises(CeVAEError) as refused:
        run_calibrate(task, lambda fraction, message: scored.append(message))
    _names_both(str(refused.value), healthy)
    assert not any("Healthy volume" in m for m in scored) and not out.exists()


def test_recalibrate_from_python_names_every_damaged_scan_and_mask_before_scoring(healthy, tmp_path, capsys) -> None:
    """recalibrate called from Python had none of the command's check: it scored the scans one by one and stopped at
    the first damaged one; a damaged brain mask was found only when its scan was scored, by the command too. Every
    unreadable scan and mask is named in one error before any scoring."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions

    broken = healthy["good"].with_name("broken_mask.nii.gz")
    broken.write_bytes(b"not a mask\n")
    subjects = [Subject(healthy["good"], healthy["good"].with_name("good_mask.nii.gz")),
                Subject(healthy["cut"], healthy["cut"].with_name("cut_mask.nii.gz")),
                Subject(healthy["good"].with_name("copy.nii.gz"), broken)]
    subjects[2].image.write_bytes(healthy["good"].read_bytes())
    bundle = load_bundle(default_model_path(), "cpu")
    scored, out = [], tmp_path / "site.cevae"
    with pytest.raises(CeVAEError) as refused:
        recalibrate(bundle, subjects, out, ScoreOptions(), PostprocessOptions(),
                    progress=lambda fraction, message: scored.append(message))
    said = str(refused.value)
    assert f"{healthy['cut']} is truncated or corrupt" in said and f"{broken}" in said, said
    assert not any("Healthy volume" in m for m in scored) and not out.exists()
    (tmp_path / "list.csv").write_text(f"image,mask\n{healthy['good']},{broken}\n")
    assert main(["calibrate", "--manifest", str(tmp_path / "list.csv"), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{broken}" in err and "Healthy volume" not in err and not out.exists(), err


def test_when_no_healthy_scan_can_be_read_the_error_speaks_of_no_others(tmp_path, capsys) -> None:
    """A 4D fMRI and a 2D PNG given to calibrate were refused as '2 of the 2 volumes could not be read (the others
    were read)': there were no others."""
    import numpy as np
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(np.zeros((8, 9, 10, 3), np.float32), isVector=False)
    sitk.WriteImage(volume, str(tmp_path / "fmri.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(8, 8)), str(tmp_path / "slice.png"))
    out = tmp_path / "site.cevae"
    assert main(["calibrate", str(tmp_path / "fmri.nii.gz"), str(tmp_path / "slice.png"), "--out", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Neither of the 2 volumes could be read: ") and "\n" not in err, err
    assert "others" not in err and not out.exists()


def test_a_2d_or_4d_healthy_scan_is_named_by_its_path(tmp_path, capsys) -> None:
    """calibrate said 'The image T1w.nii.gz is 2D' of a cohort's scan, by its file name alone (BIDS names every
    person's scan alike), where train, prepare and adapt name it by its path."""
    import numpy as np
    import SimpleITK as sitk

    flat = tmp_path / "sub-02" / "T1w.nii.gz"
    flat.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(80, dtype=np.float32).reshape(8, 10)), str(flat))
    out = tmp_path / "site.cevae"
    assert main(["calibrate", str(data_path("colin27_t1_2mm.nii.gz")), str(data_path("colin27_brainmask_2mm.nii.gz")),
                 str(flat), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: The image {flat} is 2D; a 3D volume is needed.", err
    assert not out.exists()


@pytest.mark.parametrize("command", [["calibrate", "--device", "cpu"], ["adapt", "--steps", "1", "--device", "cpu"],
                                     ["train", "--max-steps", "1", "--device", "cpu"], ["prepare"]])
def test_a_colour_healthy_scan_is_named_once_by_its_path(command, tmp_path, capsys) -> None:
    """An RGB scan among healthy ones was named twice, "error: /path/rgb.nrrd: The image rgb.nrrd has 3 components"
    (calibrate, adapt, prepare), or by its file name alone (train)."""
    import numpy as np
    import SimpleITK as sitk

    head = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    rgb = sitk.GetImageFromArray(np.repeat(sitk.GetArrayFromImage(head)[..., None], 3, axis=-1).astype(np.uint8),
                                 isVector=True)
    rgb.CopyInformation(head)
    colour = tmp_path / "site" / "rgb.nrrd"
    colour.parent.mkdir()
    sitk.WriteImage(rgb, str(colour))
    out = ["--cache-dir", str(tmp_path / "cache")] if command[0] == "prepare" else ["--out", str(tmp_path / "m.cevae")]
    model = ["--model", str(default_model_path())] if command[0] in ("calibrate", "adapt") else []
    assert main([*command, *out, *model, str(data_path("colin27_t1_2mm.nii.gz")), str(colour)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: The image {colour} has 3 components per voxel (colour or vector image); a single-channel "
                   "MRI volume is needed."), err
