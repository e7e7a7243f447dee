"""info and detect refuse, in one line, a model header whose calibration key, calibration_subjects or adaptation
record was damaged or edited (info listed them: "Adapted ... on 0 site scans", a name per letter)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import SimpleITK as sitk

from conftest import make_head
from test_untrusted_bundles import rewrite
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.errors import CeVAEError


def _rename_first_key(h: Dict[str, Any]) -> None:
    first = next(iter(h["calibration"]))
    h["calibration"]["not json {" + first[:5]] = h["calibration"].pop(first)


EDITS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "calibration key": _rename_first_key,
    "calibration_subjects text": lambda h: h.__setitem__("calibration_subjects", "DOE_J"),
    "no site scans": lambda h: h.__setitem__("adaptation", {"site_scans": [], "steps": 5}),
    "site scan as a number": lambda h: h.__setitem__("adaptation", {"site_scans": [5]}),
    "site scan without its checksum": lambda h: h.__setitem__("adaptation", {"site_scans": [{"name": "a"}]}),
    "site scan's person as a number": lambda h: h.__setitem__(
        "adaptation", {"site_scans": [{"name": "a", "sha256": "0" * 64, "person": 7}]}),
    "calibration key without its options": lambda h: _first_key(h, "{}"),
    "negative voxel count": lambda h: _first_table(h).update(n_voxels=-5),
    "voxel count as text": lambda h: _first_table(h).update(n_voxels="many"),
    "no voxel count": lambda h: _first_table(h).pop("n_voxels"),
    "source as a number": lambda h: _first_table(h).update(source=3),
    "unknown calibration key": lambda h: _first_table(h).update(notes={"DOE_J": 1}),
    "scan voxels that do not add up": lambda h: _first_table(h).update(scan_voxels=[5, 6]),
    "leave-one-out of other scans": lambda h: _first_table(h).update(
        scan_voxels=[h["calibration"][next(iter(h["calibration"]))]["n_voxels"]],
        leave_one_out={"fpr": 0.001, "threshold": [5.0, 4.0], "rate": [0.001, 0.002]}),
}
SAID = {"calibration key": "has a key that is not the JSON object of its options",
        "calibration_subjects text": "calibration_subjects must be a list of the calibration scans' names",
        "no site scans": "adaptation.site_scans must be a list of 1 or more volumes",
        "site scan as a number": "adaptation.site_scans[0] must be a JSON object, got int",
        "site scan without its checksum": "adaptation.site_scans[0].sha256 must be text, got None",
        "site scan's person as a number": "adaptation.site_scans[0].person must be text or null, got 7",
        "calibration key without its options": "has a key that is not the JSON object of its options",
        "negative voxel count": "calibration table 1 n_voxels must be a whole number in [1, ",
        "voxel count as text": "calibration table 1 n_voxels must be a whole number in [1, ",
        "no voxel count": "calibration table 1 lacks 'n_voxels'",
        "source as a number": "calibration table 1 source must be text, got 3",
        "unknown calibration key": "calibration table 1 has unknown key(s) 'notes'",
        "scan voxels that do not add up": "calibration table 1 scan_voxels add up to 11, not its n_voxels ",
        "leave-one-out of other scans": "calibration table 1 leave_one_out holds 2 volumes, its scan_voxels 1"}


def _first_table(h: Dict[str, Any]) -> Dict[str, Any]:
    return h["calibration"][next(iter(h["calibration"]))]


def _first_key(h: Dict[str, Any], key: str) -> None:
    h["calibration"][key] = h["calibration"].pop(next(iter(h["calibration"])))


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_info_and_detect_refuse_an_edited_record_in_one_line(edit: str, tmp_path: Path, capsys) -> None:
    model = tmp_path / "edited.cevae"
    shutil.copyfile(default_model_path(), model)
    rewrite(model, lambda h, t: EDITS[edit](h))
    with pytest.raises(CeVAEError) as refused:
        read_header(model)
    assert SAID[edit] in str(refused.value) and "damaged or was edited" in str(refused.value)
    image, mask = make_head(size=(30, 34, 28), seed=5)
    sitk.WriteImage(image, str(tmp_path / "h.nii.gz"))
    detect = ["detect", str(tmp_path / "h.nii.gz"), "--model", str(model), "--device", "cpu"]
    for argv in (["info", str(model)], [*detect, "--score", str(tmp_path / "out" / "s.nii.gz")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and SAID[edit] in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
