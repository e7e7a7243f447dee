"""Adapting a model to a site (training/adapt.py, `cevae-anomaly adapt`): what the bundle records, that no
scan calibrates a model trained on it, resuming, and the refusals (too few scans, another contrast, a
model without a training objective)."""
from __future__ import annotations

import json
import logging
import shutil
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
from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.engine.header import BundleHeader, read_header
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.checksum import FileMemo, sha256_of
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.options import SCORE_TYPES, ThresholdPolicy
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions, describe_estimate, estimate_seconds, fold_plan
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.data import subject_slices
from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.engine.modality import T1_DEPTH_CONTRAST, TOLERANCE, check_modality, depth_contrast
from CeVAEAnomalyLib.training.trainer import Trainer
from conftest import SHARED_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = AdaptOptions(steps=4, batch_size=8, checkpoint_every=2, device="cpu")
QUICK_ARGS = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]


def _write(array: np.ndarray, like: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Dict[str, Path]:
    """A real T1 (Colin27 at 2 mm, shipped with the package) as three site scans, its brain mask (and scan c's, the
    mask mirrored as c is), and the same brain with its contrast reversed inside the brain (a T2-like scan)."""
    d = tmp_path_factory.mktemp("site")
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    a, brain = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(mask) > 0
    sitk.WriteImage(mask, str(d / "mask.nii.gz"))
    noise = np.random.default_rng(0).normal(0, 0.03 * a[brain].max(), a.shape)
    top = np.percentile(a[brain], 99)
    return {"a": _write(a, t1, d / "scan_a.nii.gz"), "b": _write(a + noise, t1, d / "scan_b.nii.gz"),
            "c": _write(a[:, :, ::-1], t1, d / "scan_c.nii.gz"), "mask": d / "mask.nii.gz",
            "mask_c": _write(brain[:, :, ::-1], t1, d / "mask_c.nii.gz"),
            "reversed": _write(np.where(brain, np.clip(top - a, 0, None), a), t1, d / "reversed.nii.gz")}


def subjects(site: Dict[str, Path], *names: str) -> List[Subject]:
    """The site scans ``names``, scan c without its mask (computed by the run)."""
    return [Subject(site[n], site["mask"] if n != "c" else None) for n in names]


def masked(site: Dict[str, Path], *names: str) -> List[Subject]:
    """The site scans ``names``, each with its brain mask: for tests about something else than a computed mask,
    which costs a registration to the atlas (once per scan and process: training and calibrating share it)."""
    return [Subject(site[n], site["mask_c" if n == "c" else "mask"]) for n in names]


def test_fold_plan_holds_out_every_scan_exactly_once_and_a_person_s_scans_together():
    for n, k in ((2, 5), (5, 5), (12, 5), (7, 3)):
        plan = fold_plan([[i] for i in range(n)], k)
        assert len(plan) == min(n, k)
        assert sorted(j for held in plan for j in held) == list(range(n))
        assert all(held for held in plan)
    persons = [[0, 3], [1], [2, 4, 5]]
    plan = fold_plan(persons, 2)
    assert sorted(j for held in plan for j in held) == list(range(6))
    assert all(any(set(p) <= set(held) for held in plan) for p in persons)  # no person split between folds
    with pytest.raises(CeVAEError, match="at least 2"):
        fold_plan([[0]], 5)
    with pytest.raises(CeVAEError, match="got 2 scan.s. of 1 person"):
        fold_plan([[0, 1]], 5)


@pytest.mark.parametrize("setting, value", [("steps", float("nan")), ("steps", 2.5), ("folds", 2.5),
                                            ("folds", float("nan")), ("batch_size", 8.0), ("checkpoint_every", "2"),
                                            ("seed", 1.5), ("lr", "1e-4"), ("steps", True)])
def test_adapt_options_refuse_what_is_no_number_of_steps_folds_or_scans(setting, value):
    """adapt(options=AdaptOptions(steps=nan)) hashed the scans, then failed with a ValueError; folds=2.5 with a
    TypeError; steps=2.5 and folds=nan adapted with some other number."""
    with pytest.raises(CeVAEError, match=f"{setting} must be a"):
        AdaptOptions(**{setting: value}).validate()
    AdaptOptions(steps=np.int64(3), folds=np.int32(2), lr=np.float32(1e-4)).validate()  # NumPy numbers are numbers


@pytest.mark.parametrize("setting, value, message", [("overwrite", "False", "must be true or false"),
                                                     ("resume", 1, "must be true or false"),
                                                     ("amp", None, "must be true or false"),
                                                     ("cache_dir", 3, "must be a folder path")])
def test_adapt_options_refuse_switches_that_are_not_true_or_false(setting, value, message):
    """AdaptOptions(overwrite="False") overwrote (any non-empty text is true), and cache_dir=3 ended in TypeError."""
    with pytest.raises(CeVAEError, match=f"{setting} {message}"):
        AdaptOptions(**{setting: value}).validate()
    AdaptOptions(cache_dir="cache").validate()


def test_the_estimate_grows_with_the_scans_and_steps_and_is_said_in_minutes():
    assert estimate_seconds(3) < estimate_seconds(8)
    assert estimate_seconds(3, AdaptOptions(steps=100)) < estimate_seconds(3, AdaptOptions(steps=400))
    assert estimate_seconds(3, AdaptOptions(batch_size=16)) < estimate_seconds(3) < estimate_seconds(
        3, AdaptOptions(batch_size=128))
    text = describe_estimate(3, "cpu")
    assert "4 fine-tuning runs" in text and "min" in text
    assert "3 fine-tuning runs on 4 scan(s) of 2 persons" in describe_estimate(4, "cpu", n_persons=2).replace(
        " of 100 steps", "")
    assert estimate_seconds(4, n_persons=2) < estimate_seconds(4)


def test_depth_contrast_tells_a_t1_from_the_same_brain_with_reversed_contrast(site):
    pre = PreprocessConfig()
    t1 = depth_contrast(subject_slices(Subject(site["a"], site["mask"]), pre, ("axial",))[0])
    reversed_ = depth_contrast(subject_slices(Subject(site["reversed"], site["mask"]), pre, ("axial",))[0])
    assert abs(t1 - T1_DEPTH_CONTRAST) < TOLERANCE < abs(reversed_ - T1_DEPTH_CONTRAST)
    t1_model = BundleHeader(preprocess=pre, modality="T1")
    check_modality(["scan_a"], [t1], t1_model)
    with pytest.raises(CeVAEError, match="reversed .*check their brain masks: a mask that holds the head"):
        check_modality(["scan_a", "reversed"], [t1, reversed_], t1_model)  # (an all-ones mask looks alike)
    check_modality(["reversed"], [reversed_], replace(t1_model, modality="T2"))  # no T2 reference: not compared
    adapted = replace(t1_model, extra={"adaptation": {"depth_contrast": reversed_}})  # a site's own reference wins
    check_modality(["reversed"], [reversed_], adapted)
    with pytest.raises(CeVAEError, match="adapted to"):
        check_modality(["scan_a"], [t1], adapted)


@pytest.mark.skipif(not (SHARED_DATA / "mni152_t1.nii.gz").exists(), reason="needs the healthy sample volumes")
def test_the_t1_reference_is_the_three_healthy_volumes_pooled(tmp_path):
    pre = PreprocessConfig()
    slices = [subject_slices(Subject(SHARED_DATA / f"{s}_t1.nii.gz", SHARED_DATA / f"{s}_brainmask.nii.gz"), pre,
                             ("axial",))[0] for s in ("colin27", "mni152", "robex")]
    assert depth_contrast(np.concatenate(slices)) == pytest.approx(T1_DEPTH_CONTRAST, abs=1e-3)


def test_a_trainer_can_start_from_a_bundle_s_weights(tiny_bundle, site, tmp_path):
    base = load_bundle(tiny_bundle)
    cfg = TrainConfig(out=tmp_path / "m.cevae", model=base.model_config, max_steps=1, device="cpu",
                      val_fraction=0.0, init_from=tiny_bundle)
    trainer = Trainer(cfg, subjects(site, "a"), base.preprocess)
    for key, value in base.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    other = TrainConfig(out=tmp_path / "o.cevae", model=ModelConfig(channels=(8, 16), z_dim=8), device="cpu",
                        init_from=tiny_bundle)
    with pytest.raises(CeVAEError, match="another architecture"):
        Trainer(other, subjects(site, "a"))


def test_adapt_records_parent_site_and_folds_and_no_scan_calibrates_a_model_trained_on_it(
        tiny_bundle, site, tmp_path, monkeypatch):
    runs, packaged = [], {}
    real_trainer, real_package = adapt_mod.Trainer, adapt_mod.package

    def trainer(cfg, train_subjects, *args, **kw):
        t = real_trainer(cfg, train_subjects, *args, **kw)
        runs.append(t)
        return t

    def package(*args, **kw):
        packaged.update(subjects=args[3], scorers=kw["scorers"])
        return real_package(*args, **kw)

    monkeypatch.setattr(adapt_mod, "Trainer", trainer)
    monkeypatch.setattr(adapt_mod, "package", package)
    scans = subjects(site, "a", "b", "c")
    out = tmp_path / "site.cevae"
    assert adapt_mod.adapt(tiny_bundle, scans, out, QUICK) == out

    assert len(runs) == 4  # three folds, then the final model on all scans
    for subject, scorer in zip(packaged["subjects"], packaged["scorers"]):
        owner = next(t for t in runs if t.model is scorer.model)
        assert owner is not runs[-1] and subject.image not in [s.image for s in owner.train_subjects]
    header = read_header(out)
    record = header.extra["adaptation"]
    assert record["parent"]["sha256"] == sha256_of(tiny_bundle)
    in_order = sorted(scans, key=lambda s: sha256_of(s.image))  # by content, not as listed
    assert [s["sha256"] for s in record["site_scans"]] == [sha256_of(s.image) for s in in_order]
    assert len(record["scan_depth_contrast"]) == 3  # one per site scan, in their order
    held = [n for fold in record["folds"] for n in fold["held_out"]]
    assert sorted(held) == ["scan_a", "scan_b", "scan_c"]
    assert all(not set(f["held_out"]) & set(f["trained_on"]) for f in record["folds"])
    assert [s["name"] for s in header.training["subjects"]] == [s.image.name[:-7] for s in in_order]
    assert {json.loads(k)["score"]["score_type"] for k in header.calibration} == set(SCORE_TYPES)
    base_header = read_header(tiny_bundle)
    assert (header.score_options, header.postprocess, header.preprocess) == \
        (base_header.score_options, base_header.postprocess, base_header.preprocess)
    adapted, base = load_bundle(out).model.state_dict(), load_bundle(tiny_bundle).model.state_dict()
    assert any(not torch.equal(adapted[k], base[k]) for k in base)
    assert out.with_name("site.cevae.ckpt").is_file()
    assert not list(tmp_path.glob("*.fold*.ckpt"))  # only needed to resume an unfinished adaptation


def test_the_same_site_scans_in_another_order_give_the_same_adapted_model(tiny_bundle, site, tmp_path):
    """The folds were made in the order the scans were listed: a folder listed or a manifest written in another
    order, one seed, held out other scans in each fold and gave another model and calibration."""
    outs = [adapt_mod.adapt(tiny_bundle, masked(site, *names), tmp_path / f"{''.join(names)}.cevae", QUICK)
            for names in (("a", "b", "c"), ("c", "a", "b"))]
    weights = [load_bundle(out).model.state_dict() for out in outs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    records = [read_header(out) for out in outs]
    assert records[0].extra["adaptation"]["folds"] == records[1].extra["adaptation"]["folds"]
    assert records[0].calibration == records[1].calibration


def test_an_adapted_model_keeps_the_modes_its_parent_is_calibrated_for(tiny_bundle, site, tmp_path):
    """A parent calibrated for a thorough mode too (as the bundled model is) gives an adapted model calibrated
    for both modes on the site's held-out scans, so the panel's Thorough keeps a calibrated threshold."""
    from CeVAEAnomalyLib.engine.calibration import calibrated_test_time_steps, calibration_key

    parent = load_bundle(tiny_bundle)
    h = parent.header
    table = next(iter(h.calibration.values()))  # any table: the adapted model is calibrated anew
    thorough = {calibration_key(h.score_options.replace(score_type=t, test_time_steps=2), h.postprocess): table
                for t in SCORE_TYPES}
    base = save_bundle(tmp_path / "parent.cevae", parent.model, replace(h, calibration={**h.calibration, **thorough}))
    assert calibrated_test_time_steps(read_header(base).calibration) == [0, 2]
    out = adapt_mod.adapt(base, masked(site, "a", "b", "c"), tmp_path / "site.cevae", QUICK)
    adapted = read_header(out)
    assert calibrated_test_time_steps(adapted.calibration) == [0, 2] and len(adapted.calibration) == 6
    assert adapted.score_options.test_time_steps == 0
    assert adapted.calibration[calibration_key(adapted.score_options.replace(test_time_steps=2), adapted.postprocess)][
        "source"].startswith("site scans")


def test_an_adaptation_begun_with_its_folds_in_the_order_listed_resumes_with_those_folds(tiny_bundle, site, tmp_path,
                                                                                        caplog):
    """Earlier versions made the folds in the order the scans were listed (now: by content): resumed now, their fold
    checkpoints held out other scans than the folds made now and the resume was refused as another run's."""
    out = tmp_path / "site.cevae"

    def cancel_in_final_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 3/3"):
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b"), out, QUICK, cancel_in_final_run)
    for suffix in (".ckpt", ".log.csv"):  # each fold of two persons now holds out the other: the other order's folds
        first, second = out.with_name(f"site.cevae.fold1{suffix}"), out.with_name(f"site.cevae.fold2{suffix}")
        first.rename(tmp_path / "swap")
        second.rename(first)
        (tmp_path / "swap").rename(second)
    trained = [torch.load(out.with_name(f"site.cevae.fold{n}.ckpt"), weights_only=True)["run"]["train"] for n in (1, 2)]
    with caplog.at_level(logging.INFO):
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b"), out, replace(QUICK, resume=True))
    assert "begun by an earlier version, which made its folds in the order the scans were listed" in caplog.text
    folds = read_header(out).extra["adaptation"]["folds"]
    assert [f["trained_on"] for f in folds] == [[Path(v[0]["image"]).name[:-7]] for v in trained]


def test_an_interrupted_adaptation_resumes_without_training_finished_folds_again(tiny_bundle, site, tmp_path):
    scans = subjects(site, "a", "b")
    out = tmp_path / "cut" / "site.cevae"
    out.parent.mkdir()

    def cancel_in_final_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 3/3") and "step 3 " in message:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, scans, out, QUICK, cancel_in_final_run)
    assert not out.exists()
    fold_ckpts = sorted(out.parent.glob("site.cevae.fold*.ckpt"))
    assert len(fold_ckpts) == 2 and out.with_name("site.cevae.ckpt").is_file()
    with pytest.raises(CeVAEError, match="already exists"):
        adapt_mod.adapt(tiny_bundle, scans, out, QUICK)
    trained = sum(torch.load(p, weights_only=True)["seconds"] for p in [*fold_ckpts, out.with_name("site.cevae.ckpt")])
    messages = []
    adapt_mod.adapt(tiny_bundle, scans, out, AdaptOptions(**{**QUICK.__dict__, "resume": True}),
                    lambda f, m: messages.append(m))
    assert read_header(out).training["seconds"] >= round(trained, 1) > 0  # the time before the resume counts
    # the finished folds are read back from their checkpoints, not trained again: no step reported for them
    assert not any(m.startswith(("Fine-tuning 1/3", "Fine-tuning 2/3")) and "step" in m for m in messages)
    assert any(m.startswith("Fine-tuning 3/3") and "step 4 " in m for m in messages)

    ref = tmp_path / "ref" / "site.cevae"
    ref.parent.mkdir()
    adapt_mod.adapt(tiny_bundle, scans, ref, QUICK)
    got, want = load_bundle(out).model.state_dict(), load_bundle(ref).model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    got_cal, want_cal = read_header(out).calibration, read_header(ref).calibration
    assert got_cal.keys() == want_cal.keys()
    for key in want_cal:
        np.testing.assert_allclose(got_cal[key]["threshold"], want_cal[key]["threshold"], rtol=1e-4)


def test_a_site_scan_replaced_before_it_is_calibrated_on_is_refused_not_recorded(tiny_bundle, site, tmp_path):
    """The adapted model records each site scan's sha256, taken before preparing read it, but its calibration reads the
    scans again after the fine-tuning: a scan replaced meanwhile was scored as new content and recorded under the old
    checksum. It is now refused in one line and no model is written."""
    import shutil

    scans = []
    for name in ("a", "b"):
        shutil.copyfile(site[name], tmp_path / f"scan_{name}.nii.gz")
        scans.append(Subject(tmp_path / f"scan_{name}.nii.gz", site["mask"]))
    replaced, done = scans[1].image, []
    original = replaced.read_bytes()

    def replace_while_calibrating(fraction: float, message: str) -> None:
        if message.startswith("Calibrating: Healthy volume 1/2") and not done:
            shutil.copyfile(site["c"], replaced)  # another valid scan of the same grid
            done.append(replaced)

    out = tmp_path / "site.cevae"
    with pytest.raises(CeVAEError, match=rf"^{replaced} changed while it was being read \(replaced or still being "
                                         r"written\); the trained weights are in the last checkpoint: with the scan "
                                         r"as it was when the run began, run again with --resume to write the model"):
        adapt_mod.adapt(tiny_bundle, scans, out, QUICK, replace_while_calibrating)
    assert not out.exists()
    replaced.write_bytes(original)  # as the message says: the scan back, then --resume
    adapt_mod.adapt(tiny_bundle, scans, out, replace(QUICK, resume=True))
    assert out.is_file()


def test_a_site_scan_replaced_under_the_panels_adaptation_says_how_the_panel_resumes(tiny_bundle, site, tmp_path):
    """The same refusal in Slicer's Adapt (its worker's run_adapt) told the panel's user that "--resume writes the
    model", a flag the panel has not: it now says to press Adapt again and resume, as the panel lets them."""
    import shutil

    from CeVAEAnomalyLib.slicer.worker import run_adapt

    copies = [Path(shutil.copyfile(site[name], tmp_path / f"0{n}_{name}.nii.gz")) for n, name in enumerate("ab", 1)]
    task = {"model": str(tiny_bundle), "out": str(tmp_path / "site.cevae"), "device": "cpu",
            "options": {"steps": 4, "batch_size": 8, "checkpoint_every": 2},
            "subjects": [{"image": str(p), "mask": str(site["mask"]), "name": p.stem} for p in copies]}

    def replace_while_calibrating(fraction: float, message: str) -> None:
        if message.startswith("Calibrating: Healthy volume 1/2"):
            shutil.copyfile(site["c"], copies[1])

    with pytest.raises(CeVAEError) as refused:
        run_adapt(task, replace_while_calibrating)
    assert str(refused.value).startswith(f"{copies[1]} changed while it was being read")
    assert ("with the scan as it was when the run began, press Adapt again with the same volumes and file name and "
            "choose to resume (it asks first) to write the model") in str(refused.value)
    assert "--" not in str(refused.value)
    assert not (tmp_path / "site.cevae").exists()


def test_resume_knows_the_base_model_by_its_content_not_its_path(tiny_bundle, site, tmp_path):
    import shutil

    scans = subjects(site, "a", "b")
    out = tmp_path / "site.cevae"
    base = Path(shutil.copy(tiny_bundle, tmp_path / "base.cevae"))

    def cancel_in_final_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 3/3") and "step 3 " in message:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt_mod.adapt(base, scans, out, QUICK, cancel_in_final_run)
    checkpoints = {p: p.read_bytes() for p in tmp_path.glob("site.cevae*.ckpt")}
    other = load_bundle(base)  # another model of the same architecture, saved under the base's name
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    save_bundle(base, other.model, other.header)
    resume = AdaptOptions(**{**QUICK.__dict__, "resume": True})
    with pytest.raises(CeVAEError, match=r"--resume refused: .* init_from\.sha256, set by --model \('[0-9a-f]{64}' in "
                                         r"the checkpoint"):
        adapt_mod.adapt(base, scans, out, resume)
    assert {p: p.read_bytes() for p in tmp_path.glob("site.cevae*.ckpt")} == checkpoints and not out.exists()
    elsewhere = tmp_path / "models" / "the-same-base.cevae"
    elsewhere.parent.mkdir()
    shutil.copy(tiny_bundle, elsewhere)  # the base the run started from, under another path
    adapt_mod.adapt(elsewhere, scans, out, resume)
    assert read_header(out).extra["adaptation"]["parent"]["sha256"] == sha256_of(tiny_bundle)


def _refusal(capsys, argv: List[str]) -> str:
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ")  # other lines: progress of the work before it
    return errors[0]


def test_calibrate_warns_about_a_scan_of_another_contrast(tiny_bundle, site, tmp_path, caplog):
    """A T1 model's thresholds taken on a T2-like scan would mean little; calibrate names the scan (a warning, not
    a refusal: a thin slab of a T1 measures lower too)."""
    out, manifest = tmp_path / "calibrated.cevae", tmp_path / "healthy.csv"
    common = ["--manifest", str(manifest), "--model", str(tiny_bundle), "--out", str(out), "--device", "cpu"]
    manifest.write_text(f"image,mask\n{site['a']},{site['mask']}\n{site['reversed']},{site['mask']}\n")
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", *common]) == 0
    warned = [r.getMessage() for r in caplog.records if "another contrast" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{site['reversed']}: ") and "reversed (" in warned[0]
    caplog.clear()
    manifest.write_text(f"image,mask\n{site['a']},{site['mask']}\n{site['b']},{site['mask']}\n")
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", *common, "--overwrite"]) == 0 and out.is_file()
    assert "another contrast" not in caplog.text


def test_a_model_trained_on_another_contrast_records_it_and_calibrates_on_it(site, tmp_path, caplog):
    """train takes any contrast; the model then records its volumes' depth contrast (modality "other" when it is
    not a T1's), so that calibrate and adapt accept scans like them and refuse T1 scans."""
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site["mask"]))) > 0
    like = sitk.ReadImage(str(site["a"]))
    rows = ["image,mask"]
    for n in ("a", "b", "c"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(site[n])))
        inside = mask[:, :, ::-1] if n == "c" else mask  # scan c is scan a mirrored
        top = np.percentile(a[inside], 99)
        rows.append(f"{_write(np.where(inside, np.clip(top - a, 0, None), a), like, tmp_path / f'rev_{n}.nii.gz')},"
                    + (str(_write(mask[:, :, ::-1].astype(np.uint8), like, tmp_path / 'mask_c.nii.gz')) if n == "c"
                       else str(site["mask"])))
    (tmp_path / "train.csv").write_text("\n".join(rows[:3]) + "\n")
    (tmp_path / "held_out.csv").write_text("\n".join([rows[0], rows[3]]) + "\n")
    model, calibrated = tmp_path / "t2like.cevae", tmp_path / "t2like_calibrated.cevae"
    assert main(["train", "--manifest", str(tmp_path / "train.csv"), "--out", str(model), "--max-steps", "2",
                 "--channels", "8,16,16,32", "--z-dim", "16", "--batch-size", "8", "--val-fraction", "0",
                 "--device", "cpu"]) == 0
    header = read_header(model)
    recorded = header.extra["training_contrast"]
    assert header.modality == "other" and recorded["depth_contrast"] < T1_DEPTH_CONTRAST - TOLERANCE
    assert len(recorded["scan_depth_contrast"]) == 2  # one per training volume, in the header's order
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", "--manifest", str(tmp_path / "held_out.csv"), "--model", str(model),
                     "--out", str(calibrated), "--device", "cpu"]) == 0
    assert "another contrast" not in caplog.text  # scans like its training volumes
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(site["a"]), "--model", str(model), "--out", str(tmp_path / "x.cevae"),
                     "--device", "cpu"]) == 0
    assert "another contrast" in caplog.text and "the volumes this model was trained on" in caplog.text


def test_the_command_refuses_too_few_scans_another_contrast_and_models_it_cannot_fine_tune(
        tiny_bundle, site, tmp_path, capsys):
    out = str(tmp_path / "site.cevae")
    common = ["--model", str(tiny_bundle), "--out", out, *QUICK_ARGS]
    assert main(["adapt", str(site["a"]), *common]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and "fine-tuning runs" not in err  # no plan announced for what is refused
    copy = tmp_path / "copy_of_a.nii.gz"
    copy.write_bytes(site["a"].read_bytes())  # the same scan under another name counts once
    assert "at least 2" in _refusal(capsys, ["adapt", str(site["a"]), str(copy), *common])
    saved_again = tmp_path / "a_saved_again.nrrd"  # the same voxels in another format: other bytes, one scan
    sitk.WriteImage(sitk.ReadImage(str(site["a"])), str(saved_again))
    assert "at least 2" in _refusal(capsys, ["adapt", str(site["a"]), str(saved_again), *common])
    one_person = [tmp_path / "sub-01_ses-1_T1w.nii.gz", tmp_path / "sub-01_ses-2_T1w.nii.gz"]  # BIDS: one person
    for scan, source in zip(one_person, (site["a"], site["b"])):
        scan.write_bytes(source.read_bytes())
    assert "of 1 person" in _refusal(capsys, ["adapt", *map(str, one_person), *common])
    err = _refusal(capsys, ["adapt", str(site["a"]), str(site["reversed"]), *common])
    assert "another contrast" in err and "reversed" in err and "scan_a" not in err.split("T1 scans:")[1].split(";")[0]
    untrained = replace(read_header(tiny_bundle), training=None)  # e.g. converted from elsewhere
    no_record = save_bundle(tmp_path / "no_record.cevae", load_bundle(tiny_bundle).model, untrained)
    assert "no training run" in _refusal(capsys, ["adapt", str(site["a"]), str(site["b"]), "--model",
                                                  str(no_record), "--out", out, *QUICK_ARGS])
    assert "--folds" in _refusal(capsys, ["adapt", str(site["a"]), str(site["b"]), *common, "--folds", "1"])
    assert "--steps" in _refusal(capsys, ["adapt", str(site["a"]), str(site["b"]), *common, "--steps", "0"])
    assert "does not exist" in _refusal(capsys, ["adapt", str(site["a"]), str(tmp_path / "missing.nii.gz"), *common])
    assert not Path(out).exists() and not list(tmp_path.glob("site.cevae*"))


SLOW_STEPS = """
import sys, time
from CeVAEAnomalyLib.training.trainer import Trainer
step = Trainer._train_step
def slow(self, batch):
    time.sleep(1.0)
    return step(self, batch)
Trainer._train_step = slow
from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_keeps_the_checkpoints_and_resume_finishes_the_adaptation(tiny_bundle, site, tmp_path):
    """A scheduler's SIGTERM mid-adaptation: exit 143, no bundle, checkpoints kept; --resume completes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "site.cevae"
    scans = tmp_path / "site.csv"  # with their masks: no run registers the atlas to compute them
    scans.write_text("image,mask\n" + "".join(f"{site[n]},{site['mask']}\n" for n in "ab"))
    args = ["adapt", "--manifest", str(scans), "--model", str(tiny_bundle), "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu"]
    cmd = [sys.executable, "-m", "CeVAEAnomalyLib.cli", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    # the first run's steps are slowed down, so that the signal comes while it trains (a resume takes the same
    # --steps: an adaptation's runs are trained alike)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    fold1 = tmp_path / "site.cevae.fold1.ckpt"
    deadline = time.monotonic() + 120
    while not fold1.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated; its checkpoints are kept ("), err
    assert fold1.is_file() and not out.exists()
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stderr and read_header(out).extra["adaptation"]["steps_per_run"] == 6
    written = out.read_bytes()
    again = subprocess.run(resumed.args, env=env, capture_output=True, text=True, timeout=300)  # complete now
    assert again.returncode == 2 and "is complete (its model file is written); there is nothing to resume" \
        in again.stderr and "Resumed" not in again.stderr, again.stderr
    assert out.read_bytes() == written and not list(tmp_path.glob("site.cevae.fold*.ckpt"))


def test_a_second_adaptation_to_the_same_output_is_refused_while_one_runs(tiny_bundle, site, tmp_path):
    from CeVAEAnomalyLib.io.lock import hold_output

    out = tmp_path / "site.cevae"
    with hold_output(out, "adapt"):  # as another process running the same adaptation would
        with pytest.raises(CeVAEError) as refused:
            adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), out, QUICK)
    assert str(out.name) in str(refused.value) and not out.exists()


def test_a_finished_adaptations_output_is_refused_before_the_scans_are_read(tiny_bundle, tmp_path, monkeypatch):
    """As calibrate: an existing --out of a finished adaptation (no fold checkpoints beside it, its fold logs may be
    there) is refused before every scan is checked and hashed (a large site cohort took minutes to be refused)."""
    out = tmp_path / "site.cevae"
    out.write_bytes(b"a finished adaptation's model")
    out.with_name("site.cevae.fold1.log.csv").write_text("step,loss\n")
    monkeypatch.setattr(adapt_mod, "_checksums", lambda subjects: pytest.fail("the scans were read first"))
    missing = [Subject(tmp_path / "a.nii.gz"), Subject(tmp_path / "b.nii.gz")]
    with pytest.raises(CeVAEError, match="site.cevae already exists .a finished adaptation"):
        adapt_mod.adapt(tiny_bundle, missing, out, QUICK)


def test_a_dicom_series_folder_is_a_site_scan_like_in_train(tmp_path):
    """Site scans are checked and hashed as train does: a series folder is hashed, a missing scan refused."""
    series = tmp_path / "series"
    series.mkdir()
    (series / "001.dcm").write_bytes(b"slice one")
    (series / "002.dcm").write_bytes(b"slice two")
    assert adapt_mod._checksums([Subject(series)], FileMemo()) == {series: sha256_of(series)}
    with pytest.raises(CeVAEError, match="does not exist"):
        adapt_mod._checksums([Subject(tmp_path / "missing.nii.gz")], FileMemo())


def test_a_checkpoint_that_recorded_its_base_by_path_resumes_with_the_same_content(tiny_bundle, tmp_path):
    """Checkpoints written before the base model was recorded by its SHA-256 named it by path."""
    from CeVAEAnomalyLib.training.checkpoint import check_same_run

    base = tmp_path / "base.cevae"
    base.write_bytes(tiny_bundle.read_bytes())
    current = {"options": {"init_from": {"sha256": sha256_of(base)}, "seed": 0}, "train": [], "validation": []}
    older = {"options": {"init_from": str(base), "seed": 0}, "train": [], "validation": []}
    check_same_run(older, current, tmp_path / "site.cevae.ckpt")  # the same file, the same content: resumes
    base.write_bytes(tiny_bundle.read_bytes() + b"\0")  # replaced since
    with pytest.raises(CeVAEError, match=r"init_from \("):
        check_same_run(older, current, tmp_path / "site.cevae.ckpt")


def test_overwrite_keeps_the_earlier_model_until_the_new_one_is_written(tiny_bundle, site, tmp_path, caplog):
    """--overwrite removed the earlier adaptation's model before its first fine-tuning run, so an adaptation then
    stopped (Ctrl-C, an error, the machine down) left no working model. The earlier model now stays, byte for byte,
    until the new one replaces it; the earlier checkpoints and logs go at its first checkpoint (the earlier final
    checkpoint made the --resume fail after the folds were trained again), and the --resume continues the new
    adaptation, not taking the earlier model for its result. An adapted model adapted again on its own site scans
    is warned of."""
    out = tmp_path / "site.cevae"
    with caplog.at_level(logging.INFO):
        adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), out, QUICK)
    assert "Its threshold at the default healthy false-positive rate is" in caplog.text  # and how to use it
    assert f"cevae-anomaly detect SCAN --model {out}" in caplog.text
    caplog.clear()
    with pytest.raises(CeVAEError, match="a finished adaptation keeps no fold checkpoints to resume.*--overwrite"):
        adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), out, QUICK)  # (it advised --resume, then refused it)
    assert "fine-tuning runs of" not in caplog.text  # the estimate of a run that does not start: not told
    header = read_header(out)
    source = header.threshold(header.score_options, header.postprocess, ThresholdPolicy())[1]
    assert source.startswith("calibrated on site scans (2 scans), healthy false-positive rate")  # not the parent's
    earlier = {p.name for p in tmp_path.glob("site.cevae*")}
    assert {"site.cevae", "site.cevae.ckpt", "site.cevae.log.csv"} <= earlier

    def stop_in_second_fold(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 2/4") and "step 2 " in message:
            raise Cancelled("stopped by the test")

    again = AdaptOptions(**{**QUICK.__dict__, "overwrite": True})
    with pytest.raises(CeVAEError, match="another contrast"):  # refused before it begins: the earlier one stays
        adapt_mod.adapt(tiny_bundle, subjects(site, "a", "reversed"), out, again)
    assert {p.name for p in tmp_path.glob("site.cevae*")} == earlier
    model = out.read_bytes()
    with pytest.raises(Cancelled), caplog.at_level(logging.INFO):
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b", "c"), out, again, stop_in_second_fold)
    assert out.is_file() and out.read_bytes() == model  # the earlier model, usable until the new one is written
    assert f"The earlier model {out} stays in place, usable, until the new one is written." in caplog.text
    left = {p.name for p in tmp_path.glob("site.cevae*")}
    assert "site.cevae.ckpt" not in left and "site.cevae.log.csv" not in left  # the earlier run's files went
    assert "site.cevae.fold1.ckpt" in left
    with pytest.raises(CeVAEError, match=r"site\.cevae\.fold1\.ckpt already exists.*--resume"):
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b", "c"), out, QUICK)  # not taken for a finished one
    adapt_mod.adapt(tiny_bundle, masked(site, "a", "b", "c"), out, AdaptOptions(**{**QUICK.__dict__,
                                                                                     "resume": True}))
    assert len(read_header(out).extra["adaptation"]["site_scans"]) == 3 and out.read_bytes() != model
    assert not list(tmp_path.glob("site.cevae.fold*.ckpt"))

    with caplog.at_level(logging.WARNING):
        adapt_mod.adapt(out, subjects(site, "a", "b"), tmp_path / "again.cevae", QUICK)
    assert f"The site scan(s) {site['a']}, {site['b']} are among the training volumes of site.cevae" in caplog.text


def test_site_scans_named_by_text_are_taken_and_bare_paths_refused_in_one_line(tiny_bundle, site, tmp_path):
    """adapt() with Subject("scan.nii.gz", "mask.nii.gz") failed with AttributeError ('str' has no 'exists'), and
    adapt() or recalibrate() with plain paths instead of Subjects failed with AttributeError too."""
    from CeVAEAnomalyLib.engine.calibrate import recalibrate

    scans = [Subject(str(site[n]), str(site["mask"])) for n in "ab"]
    assert all(isinstance(s.image, Path) and isinstance(s.mask, Path) for s in scans)
    out = tmp_path / "site.cevae"
    assert adapt_mod.adapt(tiny_bundle, scans, out, QUICK) == out
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(CeVAEError, match=r"healthy scans must be Subject\(image, mask\) objects, got str"):
        adapt_mod.adapt(tiny_bundle, [str(site["a"]), str(site["b"])], tmp_path / "other.cevae", QUICK)
    with pytest.raises(CeVAEError, match=r"healthy scans must be Subject\(image, mask\) objects, got PosixPath"):
        recalibrate(bundle, [site["a"]], tmp_path / "c.cevae", bundle.header.score_options, bundle.header.postprocess)
    with pytest.raises(CeVAEError, match="The scan's image must be a file path, got int"):
        Subject(3)


def test_the_summary_of_an_adapted_model_whose_default_rate_gets_no_threshold_says_so(tiny_bundle, site, tmp_path,
                                                                                        caplog):
    """A parent written with a default rate of 0.5 (calibrate took one before b5f9f79) and a 20 mm rim: the adapted
    model's threshold there is 0, refused, and the summary's '%.3g' of None failed in the logging module (a
    'Logging error' traceback in place of the summary)."""
    parent = load_bundle(tiny_bundle)
    h = parent.header
    base = save_bundle(tmp_path / "parent.cevae", parent.model,
                       replace(h, default_fpr=0.5, postprocess=replace(h.postprocess, rim_mm=20.0)))
    with caplog.at_level(logging.INFO):
        out = adapt_mod.adapt(base, masked(site, "a", "b", "c"), tmp_path / "site.cevae", QUICK)
    assert read_header(out).default_threshold() is None  # the premise: 0.5 gets no threshold
    summary = [r.getMessage() for r in caplog.records if r.msg.startswith("Adapted model written")]
    assert len(summary) == 1 and "default healthy false-positive rate is none (it gets 0 there, which would flag " \
        "the whole brain: detect with a lower --fpr, or a --threshold)" in summary[0], summary
    # its calibration is for its training's 3 mm rim, not 20 mm: said in words, not '(parent.cevae: not calibrated)'
    assert ("the model it was adapted from, parent.cevae, has no threshold to compare with: it is not calibrated "
            "for its own default settings") in summary[0], summary


def test_the_summary_says_plainly_what_the_model_it_was_adapted_from_had_at_that_rate():
    """The summary's '(parent.cevae: not calibrated)' said neither which model that is nor why it has no threshold,
    and said it too of a calibrated model whose threshold at that rate is 0."""
    parent = read_header(data_path("cevae_t1_default.cevae"))
    said = adapt_mod.compared_with_parent(parent, "cevae_t1_default.cevae")
    assert said == f"the model it was adapted from, cevae_t1_default.cevae, has {parent.default_threshold():.3g} there"
    assert adapt_mod.compared_with_parent(replace(parent, calibration={}), "old.cevae") == (
        "the model it was adapted from, old.cevae, has no threshold to compare with: it is not calibrated for "
        "its own default settings")
    assert adapt_mod.compared_with_parent(replace(parent, default_fpr=0.5), "p.cevae") == (
        "the model it was adapted from, p.cevae, gets 0 there, which would flag the whole brain")


@pytest.mark.parametrize("key, value, said", [
    ("steps_per_run", "lots", r"adaptation\.steps_per_run must be a whole number"),
    ("steps_per_run", 0, r"adaptation\.steps_per_run must be a whole number"),
    ("steps_per_run", 2.5, r"adaptation\.steps_per_run must be a whole number"),
    ("lr", float("nan"), r"adaptation\.lr must be a finite number in \(0, "),
    ("lr", -1e-4, r"adaptation\.lr must be a finite number in \(0, "),
    ("lr", True, r"adaptation\.lr must be a finite number in \(0, "),
    ("folds", 3, r"adaptation\.folds must be a list of 1 or more folds"),
    ("folds", [], r"adaptation\.folds must be a list of 1 or more folds"),
    ("folds", [{"held_out": "scan_a", "trained_on": ["scan_b"]}], r"adaptation\.folds\[0\]\.held_out must be a list"),
    ("folds", [{"held_out": ["scan_a"]}], r"adaptation\.folds\[0\]\.trained_on must be a list"),
])
def test_the_adaptation_records_folds_steps_and_rate_are_checked_as_adapt_writes_them(
        tiny_bundle, site, tmp_path_factory, tmp_path, key, value, said):
    """read_header checked an adapted model's site scans but not its folds, steps per run and learning rate, which
    info prints ("lots steps per run", "learning rate nan"): they are checked as adapt writes them, and what this
    version writes loads."""
    from test_untrusted_bundles import rewrite

    adapted = tmp_path_factory.getbasetemp() / "adapted_for_record_checks.cevae"
    if not adapted.is_file():  # one adaptation for every case
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b"), adapted, QUICK)
    record = read_header(adapted).extra["adaptation"]
    assert (record["steps_per_run"], record["lr"], len(record["folds"])) == (4, QUICK.lr, 2)
    path = tmp_path / "edited.cevae"
    shutil.copyfile(adapted, path)
    rewrite(path, lambda h, t: h["adaptation"].update({key: value}))
    with pytest.raises(CeVAEError, match=said):
        read_header(path)
    rewrite(path, lambda h, t: [h["adaptation"].pop(k) for k in ("steps_per_run", "lr", "folds")])
    assert "folds" not in read_header(path).extra["adaptation"]  # (models adapted by earlier versions may lack them)


def test_a_stopped_overwrite_keeps_the_earlier_adaptation_s_checkpoints_and_logs(tiny_bundle, site, tmp_path):
    """--overwrite removed the earlier adaptation's checkpoints and loss logs as soon as the scans were prepared, so
    an adaptation then stopped before its first checkpoint (Ctrl-C, an error) left the kept earlier model without
    them, while train --overwrite keeps its earlier checkpoint and log until its first checkpoint. They now stay,
    byte for byte, until the new adaptation writes its first checkpoint; the earlier model stays until the new one is
    written."""
    out = tmp_path / "site.cevae"
    adapt_mod.adapt(tiny_bundle, masked(site, "a", "b"), out, QUICK)
    earlier = {p.name: p.read_bytes() for p in tmp_path.glob("site.cevae*")}
    assert {"site.cevae", "site.cevae.ckpt", "site.cevae.log.csv", "site.cevae.fold1.log.csv"} <= set(earlier)

    def stop_at_first_step(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 1/") and "step 1 " in message:  # its first checkpoint is at step 2
            raise Cancelled("stopped by the test")

    again = AdaptOptions(**{**QUICK.__dict__, "overwrite": True})
    with pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b", "c"), out, again, stop_at_first_step)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("site.cevae*")} == earlier
    with pytest.raises(CeVAEError, match="is complete .*nothing to resume"):  # nothing of the new run to continue
        adapt_mod.adapt(tiny_bundle, masked(site, "a", "b", "c"), out, AdaptOptions(**{**QUICK.__dict__,
                                                                                         "resume": True}))
