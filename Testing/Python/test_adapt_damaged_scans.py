"""adapt and prepare name every site or cohort volume that cannot be read in one error, before any training (a
corrupt or truncated file, a brain mask that does not fit), and a resume with other --folds says so."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = AdaptOptions(steps=4, batch_size=8, checkpoint_every=2, device="cpu")
QUICK_ARGS = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Dict[str, Path]:
    """Colin27 at 2 mm (shipped with the package) as three site scans with its brain mask; a file that is no image, a
    truncated copy of a scan, and a brain mask a metre away from every scan."""
    d = tmp_path_factory.mktemp("site")
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    a = sitk.GetArrayFromImage(t1)
    out = {}
    for n, name in enumerate(("a", "b", "c")):
        image = sitk.GetImageFromArray(a + np.random.default_rng(n).normal(0, 0.03 * a.max(), a.shape))
        image.CopyInformation(t1)
        out[name] = d / f"scan_{name}.nii.gz"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(out[name]))
    sitk.WriteImage(mask, str(d / "mask.nii.gz"))
    out["mask"] = d / "mask.nii.gz"
    far = sitk.Image(mask)
    far.SetOrigin(tuple(o + 1000.0 for o in mask.GetOrigin()))
    sitk.WriteImage(far, str(d / "far_mask.nii.gz"))
    out["far_mask"] = d / "far_mask.nii.gz"
    (d / "garbage.nii.gz").write_bytes(b"not an image\n")
    out["garbage"] = d / "garbage.nii.gz"
    (d / "cut.nii.gz").write_bytes(out["b"].read_bytes()[:3000])
    out["cut"] = d / "cut.nii.gz"
    return out


def manifest(site: Dict[str, Path], folder: Path, rows: List[str]) -> Path:
    listed = folder / "site.csv"
    listed.write_text("image,mask\n" + "".join(f"{site[i]},{site[m]}\n" for i, m in (r.split(":") for r in rows)))
    return listed


def test_adapt_names_every_damaged_site_scan_in_one_error_before_any_training(tiny_bundle, site, tmp_path, capsys):
    """Three damaged site scans (no image, truncated, a mask of another grid): adapt stopped at the first one it read
    for its trained-scan check, so the user learnt of the next one only after fixing it and running again."""
    listed = manifest(site, tmp_path, ["a:mask", "garbage:mask", "b:mask", "cut:mask", "c:far_mask"])
    out = tmp_path / "site.cevae"
    assert main(["adapt", "--model", str(tiny_bundle), "--manifest", str(listed), "--out", str(out),
                 *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: 3 of the 5 volumes could not be read"), err
    assert f"{site['garbage']} could not be read as an image" in said[0]
    assert f"{site['cut']} is truncated or corrupt" in said[0]
    assert f"{site['c']}: The brain mask does not overlap the image" in said[0] and "Fine-tuning" not in err
    assert not list(tmp_path.glob("site.cevae*"))


def test_a_resume_with_other_folds_names_the_option(tiny_bundle, site, tmp_path):
    """An adaptation of three scans begun with --folds 3 and resumed with --folds 2 was refused as "training volume(s)
    in the checkpoint's run, not in this one", naming a scan the user had not changed; it now names --folds."""
    scans = [Subject(site[n], site["mask"]) for n in ("a", "b", "c")]
    out = tmp_path / "site.cevae"

    def stop_in_fold_2(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 2/4") and "step 2 " in message:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, scans, out, replace(QUICK, folds=3), stop_in_fold_2)
    assert Path(f"{out}.fold1.ckpt").is_file()
    with pytest.raises(CeVAEError) as refused:
        adapt_mod.adapt(tiny_bundle, scans, out, replace(QUICK, folds=2, resume=True))
    said = str(refused.value)
    assert said.startswith(f"--resume refused: the checkpoint {out}.fold1.ckpt belongs to another run: its adaptation "
                           "was begun with --folds 3 or more (3 folds of these scans), this one with --folds 2 (2 "
                           "folds)."), said
    assert "training volume" not in said
    adapt_mod.adapt(tiny_bundle, scans, out, replace(QUICK, folds=3, resume=True))  # as it was begun: it finishes
    assert out.is_file()
