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
}
SAID = {"calibration key": "has a key that is not the JSON object of its options",
        "calibration_subjects text": "calibration_subjects must be a list of the calibration scans' names",
        "no site scans": "adaptation.site_scans must be a list of 1 or more volumes"}


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
