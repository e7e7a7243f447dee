"""adapt checks before it trains: every checkpoint a resume would use, a base model without its training objective,
a scan whose contrast cannot be told (named), and the device it will run on (said once)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions, fold_files, output_paths, run_files
from conftest import SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = AdaptOptions(steps=4, batch_size=8, checkpoint_every=2, device="cpu")
QUICK_ARGS = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Dict[str, Path]:
    """Colin27 at 2 mm (shipped with the package) as two site scans with its brain mask, and a mask of a sagittal
    slab 2 voxels thick (a brain too thin in every axial model slice to tell its contrast)."""
    d = tmp_path_factory.mktemp("site")
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    a, brain = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(mask)
    noise = np.random.default_rng(0).normal(0, 0.03 * a[brain > 0].max(), a.shape)
    out = {}
    for name, array in (("a", a), ("b", a + noise), ("slab", np.zeros_like(brain))):
        if name == "slab":
            middle = int(np.nonzero(brain)[2].mean())
            array[:, :, middle:middle + 2] = brain[:, :, middle:middle + 2]
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(t1)
        out[name] = d / f"scan_{name}.nii.gz"
        sitk.WriteImage(image, str(out[name]))
    sitk.WriteImage(mask, str(d / "mask.nii.gz"))
    out["mask"] = d / "mask.nii.gz"
    return out


def scans(site: Dict[str, Path]) -> List[Subject]:
    return [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]


def cancel_at(run: str, step: int):
    def progress(fraction: float, message: str) -> None:
        if message.startswith(f"Fine-tuning {run}") and f"step {step} " in message:
            raise Cancelled("stopped by the test")

    return progress


def test_resume_with_another_adaptations_final_checkpoint_is_refused_before_any_fold_trains(
        tiny_bundle, site, tmp_path):
    """Only OUT.ckpt was of another run: every fold was fine-tuned anew before the final run refused it."""
    other, out = tmp_path / "other" / "site.cevae", tmp_path / "mine" / "site.cevae"
    other.parent.mkdir()
    out.parent.mkdir()
    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, scans(site), other, QUICK, cancel_at("3/3", 3))  # its final run checkpointed
    foreign = Path(f"{out}.ckpt")
    foreign.write_bytes(Path(f"{other}.ckpt").read_bytes())
    messages: List[str] = []
    resume = replace(QUICK, resume=True, seed=1)
    with pytest.raises(CeVAEError, match=rf"--resume refused: the checkpoint {foreign} belongs to another run: .*seed"):
        adapt_mod.adapt(tiny_bundle, scans(site), out, resume, lambda f, m: messages.append(m))
    assert not [m for m in messages if m.startswith("Fine-tuning") and "step" in m]  # no run trained
    assert sorted(p.name for p in out.parent.iterdir()) == ["site.cevae.ckpt"]


def test_a_base_model_without_its_loss_section_is_refused(tiny_bundle, site, tmp_path, capsys):
    """Its header's missing loss was read as the default one: the adapted model claimed a loss the base was never
    trained with."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_bundle), framework="pt") as bundle:
        metadata = bundle.metadata()
    header = json.loads(metadata["cevae_anomaly"])
    del header["loss"]
    base, out = tmp_path / "no_loss.cevae", tmp_path / "site.cevae"
    save_file(load_file(str(tiny_bundle)), str(base), metadata=dict(metadata, cevae_anomaly=json.dumps(header)))
    assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(base), "--out", str(out), *QUICK_ARGS]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"The model {base} records no training objective (its header has no 'loss' " \
                                "section)" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_loss.cevae"]


def test_a_scan_whose_contrast_cannot_be_told_is_named(tiny_bundle, site, tmp_path, capsys):
    manifest, out = tmp_path / "site.csv", tmp_path / "site.cevae"
    manifest.write_text(f"image,mask\n{site['a']},{site['slab']}\n{site['b']},{site['mask']}\n")
    assert main(["adapt", "--manifest", str(manifest), "--model", str(tiny_bundle), "--out", str(out),
                 *QUICK_ARGS]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {site['a']}: The scan's brain is too small"), errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused_before_any_run(tiny_bundle, site, tmp_path, capsys):
    """--device cuda on a machine without it fell back to the CPU with a warning, and a site adaptation meant for a
    GPU then took hours; it is refused, before anything is written, and --device cpu is offered."""
    out = tmp_path / "site.cevae"
    manifest = tmp_path / "site.csv"
    manifest.write_text(f"image,mask\n{site['a']},{site['mask']}\n{site['b']},{site['mask']}\n")
    assert main(["adapt", "--manifest", str(manifest), "--model", str(tiny_bundle), "--out", str(out),
                 *QUICK_ARGS, "--device", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "CUDA was asked for (device cuda) but is not available" in error and "--device cpu" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.csv"]


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="needs the healthy sample volumes")
def test_a_missing_accelerator_is_refused_before_any_scan_is_read(tmp_path, capsys, caplog):
    """--device mps where there is none was refused only after the scans were hashed and compared with the model's
    training volumes: the bundled model's own training scans were warned about first."""
    manifest = tmp_path / "site.csv"
    manifest.write_text("image,mask\n" + "".join(f"{SHARED_DATA / (s + '_t1.nii.gz')},"
                                                  f"{SHARED_DATA / (s + '_brainmask.nii.gz')}\n"
                                                  for s in ("colin27", "mni152", "robex")))
    assert main(["adapt", "--manifest", str(manifest), "--out", str(tmp_path / "site.cevae"),
                 *QUICK_ARGS, "--device", "mps"]) == 2
    assert "MPS was asked for (device mps) but is not available" in capsys.readouterr().err
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.csv"]


def _with_augment(tiny_bundle: Path, augment: object, base: Path) -> Path:
    """``tiny_bundle`` whose header records ``augment`` as its training's augmentation, written to ``base``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_bundle), framework="pt") as bundle:
        metadata = bundle.metadata()
    header = json.loads(metadata["cevae_anomaly"])
    header["training"]["augment"] = augment
    save_file(load_file(str(tiny_bundle)), str(base), metadata=dict(metadata, cevae_anomaly=json.dumps(header)))
    return base


def test_adapt_fine_tunes_with_the_augmentation_the_base_was_trained_with(tiny_bundle, site, tmp_path, monkeypatch):
    """Every run fine-tuned with train's default augmentation, whatever the base recorded: a model trained with
    --no-augment or --acquisition-augment learnt other variation during its adaptation than before."""
    from dataclasses import asdict

    from CeVAEAnomalyLib.engine.header import read_header
    from CeVAEAnomalyLib.training.config import ACQUISITION_AUGMENT

    base = _with_augment(tiny_bundle, asdict(ACQUISITION_AUGMENT), tmp_path / "acquisition.cevae")
    used = []
    real = adapt_mod.Trainer

    def trainer(cfg, *args, **kw):
        used.append(cfg.augment)
        return real(cfg, *args, **kw)

    monkeypatch.setattr(adapt_mod, "Trainer", trainer)
    out, listed = tmp_path / "site.cevae", tmp_path / "site.csv"
    listed.write_text(f"image,mask\n{site['a']},{site['mask']}\n{site['b']},{site['mask']}\n")  # no mask to compute
    assert main(["adapt", "--manifest", str(listed), "--model", str(base), "--out", str(out), *QUICK_ARGS]) == 0
    assert used and all(a == ACQUISITION_AUGMENT for a in used), used
    assert read_header(out).training["augment"] == asdict(ACQUISITION_AUGMENT)


@pytest.mark.parametrize("augment, message", [
    ({"noise": 5.0}, "gives noise = 5.0 (expected a number from 0 to 1)"),
    ({"slab": 1.5}, "gives slab = 1.5 (expected a whole number from 0 to 16)"),
    ({"sharpen": 0.1}, "names steps this version does not know (sharpen)"),
    ([0.5], "is not an object of strengths"),
])
def test_a_base_model_whose_augmentation_record_is_damaged_is_refused(tiny_bundle, site, tmp_path, capsys, augment,
                                                                      message):
    base, out = _with_augment(tiny_bundle, augment, tmp_path / "odd.cevae"), tmp_path / "site.cevae"
    assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(base), "--out", str(out), *QUICK_ARGS]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"The model {base} records an augmentation it was trained with that {message}" \
        in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.cevae"]


def test_an_adaptation_another_adapt_is_writing_is_told_so_not_asked_to_overwrite(tiny_bundle, site, tmp_path,
                                                                                  capsys):
    """The running adaptation's fold checkpoint exists: the second run was told to pass --overwrite or --resume."""
    import os

    from CeVAEAnomalyLib.io.lock import hold_output

    out = tmp_path / "site.cevae"
    with hold_output(out, "adapt"):
        out.with_name("site.cevae.fold1.ckpt").write_bytes(b"the running adaptation's checkpoint")
        assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(tiny_bundle), "--out", str(out),
                     *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    assert f"An adapt (process {os.getpid()}) is writing" in err and "--overwrite" not in err, err


def test_the_checkpoints_and_logs_found_beside_an_output_are_those_its_runs_write(tmp_path):
    """adapt (a finished model, --overwrite) and a stopped train or adapt's last line find a run's files by one rule:
    the names each run writes (final and folds), not another output's beside them, a glob's brackets taken literally."""
    out = tmp_path / "site[1].cevae"
    written = output_paths(out, 3, AdaptOptions(folds=3))[1:]  # each run's checkpoint and log
    others = ["site1.cevae.fold1.ckpt", "site[1].cevae.fold1.ckpt.tmp", "site[1].cevae2.ckpt", "site[1].cevae.ckpt2"]
    for path in [*written, *(tmp_path / name for name in others)]:
        path.write_bytes(b"")
    (tmp_path / "site[1].cevae.fold4.ckpt").mkdir()
    for suffix in (".ckpt", ".log.csv"):
        mine, final = [p for p in written if p.name.endswith(suffix)], out.with_name(out.name + suffix)
        assert final in mine and run_files(out, suffix) == [final, *sorted(set(mine) - {final})]
        assert fold_files(out, suffix) == sorted(p for p in mine if ".fold" in p.name)


def test_an_out_that_is_a_folder_is_refused_before_any_scan_is_hashed(tiny_bundle, site, tmp_path, capsys,
                                                                     monkeypatch):
    """`--out out` naming an existing folder was refused only once every site scan had been read for its checksum
    (minutes for a site's scans); it is refused first, reading none."""
    import CeVAEAnomalyLib.io.checksum as checksum

    real, hashed = checksum.sha256_of, []
    monkeypatch.setattr(checksum, "sha256_of", lambda path: hashed.append(Path(path)) or real(path))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(tiny_bundle), "--out", str(out),
                 *QUICK_ARGS]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert errors == [f"error: The --out {out} is a folder; give the bundle's file name, e.g. {out / 'model.cevae'}."]
    assert not [p for p in hashed if p in (site["a"], site["b"], site["mask"])], hashed


def test_a_base_model_replaced_after_its_header_was_read_is_refused(tiny_bundle, site, tmp_path, monkeypatch):
    """The base's header was read before the base was hashed: a base replaced between the two gave the runs the
    header of one file and the weights (and the recorded parent sha256) of another; it is refused before any scan
    is prepared."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, other, out = tmp_path / "base.cevae", tmp_path / "other.cevae", tmp_path / "site.cevae"
    base.write_bytes(tiny_bundle.read_bytes())
    with safe_open(str(tiny_bundle), framework="pt") as bundle:
        metadata = bundle.metadata()
    header = dict(json.loads(metadata["cevae_anomaly"]), name="another model")
    save_file(load_file(str(tiny_bundle)), str(other), metadata=dict(metadata, cevae_anomaly=json.dumps(header)))
    real = adapt_mod.read_header

    def read_then_replaced(path: Path):
        read = real(path)
        if Path(path) == base and other.exists():
            other.replace(base)  # another run writes the base now
        return read

    monkeypatch.setattr(adapt_mod, "read_header", read_then_replaced)
    with pytest.raises(CeVAEError, match=f"The model file {base} was replaced while the adaptation read it"):
        adapt_mod.adapt(base, scans(site), out, QUICK, cancel_at("1/3", 1))  # (one that ran on: stopped there)
    assert not out.exists()
