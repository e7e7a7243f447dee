"""Adapting to a site, measured: each acquisition variant of the healthy volumes is a "site".

For a held-out subject S and a variant V: the fold model that never saw S (``--runs``, from
``scripts/benchmark_train.py``) is adapted (``training.adapt.adapt``) on the OTHER subjects'
healthy scans of V, and three models are compared on S's lesion cases and healthy scan of V:
the base as it is, the base recalibrated on the site scans (what ``calibrate`` offers), and the
adapted model. S's scans are never used to adapt or calibrate. Figures: pooled AUPRC, Dice at the
model's default false-positive rate, flagged ml on S's healthy scan there, and the minutes adapting took.

    python scripts/benchmark_adapt.py --profiles            # modality check: profiles of variants
    python scripts/benchmark_adapt.py --rate                # training steps/s on this machine
    python scripts/benchmark_adapt.py --held-out colin27 --variants clean,thick6,noisy [--steps N]

Variants are made here (the acquisition-variant module of the quality benchmark was not on main
when this was written): ``clean`` (as acquired, 1 mm), ``2mm`` (resampled to 2 mm isotropic),
``thick6`` (6 mm axial slabs: 6 slices averaged, 1 x 1 x 6 mm voxels), ``noisy`` (Rician noise of
5 % of the brain's 99th percentile and a gamma 0.7 contrast change); ``inverted`` (brain intensities
reversed: a T2-like contrast) only for --profiles. Lesions are inserted in the 1 mm scan before the
variant is made, as a scan of that site would show them.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.training.data import subject_slices
from CeVAEAnomalyLib.training.modality import T1_DEPTH_CONTRAST, depth_contrast

SUBJECTS = ("colin27", "mni152", "robex")
VARIANTS = ("clean", "2mm", "thick6", "noisy")


def _brain_p99(a: np.ndarray, brain: np.ndarray) -> float:
    return float(np.percentile(a[brain], 99))


def make_variant(image: sitk.Image, mask: sitk.Image, variant: str, seed: int = 0) -> Tuple[sitk.Image, sitk.Image]:
    """(image, mask) of ``variant`` (see the module docstring); the inputs are not modified."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if variant == "clean":
        return image, mask
    if variant == "2mm":
        return _resample(image, (2.0, 2.0, 2.0), sitk.sitkLinear), _resample(mask, (2.0, 2.0, 2.0), sitk.sitkNearestNeighbor)
    a = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayFromImage(mask) > 0
    if variant == "thick6":
        n = max(1, int(round(6.0 / image.GetSpacing()[2])))
        depth = (a.shape[0] // n) * n
        slabs = a[:depth].reshape(depth // n, n, *a.shape[1:]).mean(1)
        masks = brain[:depth].reshape(depth // n, n, *a.shape[1:]).mean(1) >= 0.5
        spacing = (*image.GetSpacing()[:2], image.GetSpacing()[2] * n)
        return _like(slabs, image, spacing), _like(masks.astype(np.uint8), mask, spacing)
    if variant in ("noisy", "inverted"):
        p99 = _brain_p99(a, brain)
        if variant == "inverted":
            out = np.where(brain, np.clip(p99 - a, 0, None), a)
        else:
            rng = np.random.default_rng(seed)
            g = p99 * (np.clip(a, 0, None) / p99) ** 0.7
            sd = 0.05 * p99
            out = np.sqrt((g + rng.normal(0, sd, a.shape)) ** 2 + rng.normal(0, sd, a.shape) ** 2)
        return _like(out.astype(np.float32), image, image.GetSpacing()), mask
    raise ValueError(f"unknown variant {variant!r}")


def _resample(image: sitk.Image, spacing, interpolator) -> sitk.Image:
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def _like(array: np.ndarray, reference: sitk.Image, spacing) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.SetOrigin(reference.GetOrigin())
    out.SetDirection(reference.GetDirection())
    out.SetSpacing(tuple(float(s) for s in spacing))
    return out


def profiles(data: Path) -> dict:
    """Each subject's and variant's depth contrast (training/modality.py), and the pooled clean T1 value."""
    pre = PreprocessConfig()
    rows: Dict[str, float] = {}
    pooled: List[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in SUBJECTS:
            image = read_image(data / f"{subject}_t1.nii.gz")
            mask = read_image(data / f"{subject}_brainmask.nii.gz", "brain mask")
            for variant in (*VARIANTS, "inverted"):
                img, msk = make_variant(image, mask, variant)
                paths = [Path(tmp) / f"{subject}-{variant}.nii.gz", Path(tmp) / f"{subject}-{variant}_mask.nii.gz"]
                sitk.WriteImage(img, str(paths[0]))
                sitk.WriteImage(msk, str(paths[1]))
                slices = subject_slices(Subject(*paths), pre, ("axial",))[0]
                if variant == "clean":
                    pooled.append(slices)
                rows[f"{subject} {variant}"] = depth_contrast(slices)
                print(f"{subject:8s} {variant:9s} depth contrast {rows[f'{subject} {variant}']:+.3f} "
                      f"(T1 reference {T1_DEPTH_CONTRAST:+.3f})", flush=True)
    reference = depth_contrast(np.concatenate(pooled))
    print(f"pooled clean T1 depth contrast (T1_DEPTH_CONTRAST): {reference:+.4f}")
    return {"depth_contrast": rows, "t1_reference": reference}


def variant_scan(data: Path, work: Path, subject: str, variant: str) -> Subject:
    """The healthy scan of ``subject`` in ``variant`` (written once under ``work``)."""
    image_path, mask_path = work / f"{subject}-{variant}.nii.gz", work / f"{subject}-{variant}_mask.nii.gz"
    if not mask_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        image = read_image(data / f"{subject}_t1.nii.gz")
        mask = read_image(data / f"{subject}_brainmask.nii.gz", "brain mask")
        img, msk = make_variant(image, mask, variant)
        sitk.WriteImage(img, str(image_path))
        sitk.WriteImage(msk, str(mask_path))
    return Subject(image_path, mask_path)


def sweep(data: Path, work: Path, base: Path, variant: str, train: str, val: str, lrs: List[float],
          steps: int) -> dict:
    """Validation loss on ``val``'s scan of ``variant`` while fine-tuning ``base`` on ``train``'s (per learning rate)."""
    import csv

    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.training.config import TrainConfig
    from CeVAEAnomalyLib.training.trainer import Trainer

    bundle = load_bundle(base)
    scans = [variant_scan(data, work, s, variant) for s in (val, train)]  # seed 0 holds out the first
    curves = {}
    for lr in lrs:
        out = work / f"sweep-{variant}-lr{lr:g}.cevae"
        cfg = TrainConfig(out=out, model=bundle.model_config, loss=bundle.header.loss,
                          lr=lr, max_steps=steps, checkpoint_every=max(1, steps // 12), val_fraction=0.5,
                          seed=0, device="cpu", init_from=base)
        trainer = Trainer(cfg, scans, bundle.preprocess)
        assert [s.image for s in trainer.val_subjects] == [scans[0].image], "the split must validate on --val"
        t = time.perf_counter()
        trainer.fit()
        with open(cfg.log_path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["val_loss"]]
        curves[f"{lr:g}"] = {"steps": [int(r["step"]) for r in rows], "val_loss": [float(r["val_loss"]) for r in rows],
                             "seconds": time.perf_counter() - t}
        print(f"lr {lr:g}: " + " ".join(f"{r['step']}:{float(r['val_loss']):.4f}" for r in rows), flush=True)
    return curves


def lesion_cases(data: Path, subject: str, variant: str) -> List[Tuple[str, sitk.Image, sitk.Image, np.ndarray]]:
    """(name, image, brain mask, ground truth) of ``subject``'s lesion cases in ``variant``: two lesions of one
    kind per case, one case per kind, inserted in the 1 mm scan, then the variant made of image and truth."""
    from CeVAEAnomalyResearch.lesions import LESION_KINDS, insert_lesions

    image = read_image(data / f"{subject}_t1.nii.gz")
    mask = read_image(data / f"{subject}_brainmask.nii.gz", "brain mask")
    _, brain = make_variant(image, mask, variant)
    cases = []
    for k, kind in enumerate(LESION_KINDS):
        img, gt, _ = insert_lesions(image, mask, 1000 * SUBJECTS.index(subject) + 10 * k, n=2, kinds=(kind,),
                                    min_separation_mm=10.0)
        var_img, var_gt = make_variant(img, gt, variant, seed=k)
        cases.append((f"{subject}-{variant}-{kind}", var_img, brain, sitk.GetArrayFromImage(var_gt) > 0))
    return cases


def evaluate_model(bundle, cases, healthy: Tuple[sitk.Image, sitk.Image], fpr: float) -> dict:
    """Pooled AUPRC, mean Dice at the threshold of rate ``fpr``, and flagged ml on the healthy scan."""
    from CeVAEAnomalyLib.engine.detector import detect
    from CeVAEAnomalyResearch.evaluate import dice, pooled_metrics

    pooled, dices = [], []
    for _, image, mask, gt in cases:
        result = detect(image, bundle, mask, fpr=fpr)
        brain = sitk.GetArrayViewFromImage(mask) > 0
        pooled.append((sitk.GetArrayViewFromImage(result.score)[brain].astype(np.float32), gt[brain]))
        dices.append(dice(sitk.GetArrayViewFromImage(result.labelmap)[brain] > 0, gt[brain]))
    metrics = pooled_metrics(pooled)
    result = detect(healthy[0], bundle, healthy[1], fpr=fpr)
    return {"auprc": metrics["auprc"], "auroc": metrics["auroc"], "dice_at_threshold": float(np.mean(dices)),
            "healthy_ml": result.flagged_ml, "threshold": result.threshold}


def compare(data: Path, work: Path, base_path: Path, held_out: str, variant: str, options, fpr: float) -> dict:
    """Base, base recalibrated on the site scans, and adapted model on ``held_out``'s scans of ``variant``."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.training.adapt import adapt

    base = load_bundle(base_path)
    tag = f"{base_path.stem}-{held_out}-{variant}"
    site = [variant_scan(data, work, s, variant) for s in SUBJECTS if s != held_out]
    recal_path = work / f"recalibrated-{tag}.cevae"
    if not recal_path.exists():
        recalibrate(base, site, recal_path, base.header.score_options, base.header.postprocess,
                    source="site scans (benchmark_adapt)")
    adapted_path = work / f"adapted-{tag}.cevae"
    minutes = None
    if not adapted_path.exists():
        t = time.perf_counter()
        adapt(base_path, site, adapted_path, options, inputs=())
        minutes = (time.perf_counter() - t) / 60
    cases = lesion_cases(data, held_out, variant)
    healthy = make_variant(read_image(data / f"{held_out}_t1.nii.gz"),
                           read_image(data / f"{held_out}_brainmask.nii.gz", "brain mask"), variant)
    out = {"base": str(base_path), "adapt_minutes": minutes, "steps": options.steps, "lr": options.lr}
    for name, path in (("base model", base_path), ("base recalibrated on the site", recal_path), ("adapted", adapted_path)):
        out[name] = evaluate_model(load_bundle(path), cases, healthy, fpr)
        print(f"{held_out} {variant:7s} {name:32s} " + " ".join(f"{k} {v:.4f}" for k, v in out[name].items()),
              flush=True)
    return out


def bundle_from_checkpoint(checkpoint: Path, held_out: str, data: Path, out: Path) -> Path:
    """A fold base model from a checkpoint of ``scripts/benchmark_train.py``'s run without ``held_out`` (read only),
    packaged as that run would (calibrated on its training subjects), for when the run has not finished."""
    import torch

    from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig, PreprocessConfig
    from CeVAEAnomalyLib.engine.model import CeVAE
    from CeVAEAnomalyLib.training.packaging import TrainingRecord, package, training_header

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = CeVAE(ModelConfig.from_dict(state["model_cfg"]))
    model.load_state_dict(state["model"])
    train = [Subject(data / f"{s}_t1.nii.gz", data / f"{s}_brainmask.nii.gz") for s in SUBJECTS if s != held_out]
    record = TrainingRecord(subjects=[{"name": s.name, "sha256": ""} for s in train], validation_subjects=[],
                            train_slices=0, orientations=["axial"], steps=int(state["step"]), batch_size=64,
                            lr=2e-4, seed=0, seconds=0.0, ranks=1, augment={}, val_loss=float("nan"))
    header = training_header(out.stem, PreprocessConfig(), LossConfig(), record)
    return package(out, model.eval(), header, train, "training subjects (no held-out subject)",
                   torch.device("cpu"), half=False)


def torch_step(checkpoint: Path) -> int:
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])


def rate(seconds: float = 60.0) -> dict:
    """Training steps/s of the default architecture (batch 64, 64 px, augmentation on) on the CPU."""
    import torch

    from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig
    from CeVAEAnomalyLib.engine.corruption import random_rectangles
    from CeVAEAnomalyLib.engine.model import CeVAE, cevae_loss
    from CeVAEAnomalyLib.training.augment import augment
    from CeVAEAnomalyLib.training.config import AugmentConfig

    model = CeVAE(ModelConfig())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 64, 64)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        xa = augment(x, AugmentConfig(), g)
        xc, _ = random_rectangles(xa, g, value_range=(0.0, 1.5))
        loss, _ = cevae_loss(model, xa, xc, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - start
    out = {"steps_per_s": steps / elapsed, "threads": torch.get_num_threads(), "steps": steps}
    print(json.dumps(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/healthy"))
    p.add_argument("--profiles", action="store_true")
    p.add_argument("--rate", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--work", type=Path, default=Path("runs/adapt"), help="variant scans and adapted models")
    p.add_argument("--sweep", help="VARIANT:TRAIN:VAL: validation curves of fine-tuning --base (learning rates --lrs)")
    p.add_argument("--base", type=Path, help="the model to adapt in --sweep; with --held-out, instead of the fold "
                   "model without the subject (say so: it saw the held-out subject)")
    p.add_argument("--lrs", default="1e-4,3e-4")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (default: AdaptOptions')")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: AdaptOptions')")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark/cevae"), help="fold models without-S.cevae")
    p.add_argument("--held-out", help="comma-separated held-out subjects to compare base and adapted models on")
    p.add_argument("--variants", default="clean,thick6,noisy")
    p.add_argument("--base-from-checkpoint", type=Path,
                   help="with --held-out S: package this checkpoint of the run without S as the base first")
    p.add_argument("--fpr", type=float, help="operating point (default: the bundled model's default rate)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.profiles:
        result = profiles(args.data)
        atomic_write_text(args.out / "benchmark_adapt_profiles.json", json.dumps(result, indent=1))
    if args.rate:
        rate()
    if args.sweep:
        variant, train, val = args.sweep.split(":")
        curves = sweep(args.data, args.work, args.base, variant, train, val,
                       [float(x) for x in args.lrs.split(",")], args.steps or 300)
        atomic_write_text(args.out / f"benchmark_adapt_sweep_{variant}.json", json.dumps(curves, indent=1))
    if args.held_out:
        from dataclasses import replace

        from CeVAEAnomalyLib.data import default_model_path
        from CeVAEAnomalyLib.engine.header import read_header
        from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

        options = AdaptOptions(device="cpu")
        options = replace(options, steps=args.steps or options.steps, lr=args.lr or options.lr)
        fpr = args.fpr or read_header(default_model_path()).default_fpr
        results_path = args.out / "benchmark_adapt.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        for subject in args.held_out.split(","):
            if args.base_from_checkpoint:
                args.base = args.work / f"without-{subject}-step{torch_step(args.base_from_checkpoint)}.cevae"
                if not args.base.exists():
                    bundle_from_checkpoint(args.base_from_checkpoint, subject, args.data, args.base)
            for variant in args.variants.split(","):
                base = args.base or args.runs / f"without-{subject}.cevae"
                results[f"{base.stem} {subject} {variant} {options.steps}"] = compare(
                    args.data, args.work, base, subject, variant, options, fpr)
                atomic_write_text(results_path, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
