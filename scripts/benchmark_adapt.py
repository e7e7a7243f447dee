"""Adapting to a site, measured: each acquisition variant of the healthy volumes is a "site".

For a held-out subject S and a variant V (``CeVAEAnomalyResearch.acquisition.VARIANTS``): the fold model
that never saw S (``--runs``, from ``scripts/benchmark_train.py``) is adapted (``training.adapt.adapt``) on
the OTHER subjects' healthy scans of V, and three models are compared on S's lesion cases and healthy scan
of V: the base as it is, the base recalibrated on the site scans (what ``calibrate`` offers), and the
adapted model. S's scans are never used to adapt or calibrate. Figures: pooled AUPRC, Dice at the
operating point (the bundled model's default false-positive rate on each model's own calibration),
flagged ml and components (26-connected, after the minimum-volume rule) on S's healthy scan there, and
the minutes adapting took.

Scans and lesion cases are those of the acquisition benchmark (``scripts/benchmark_acquisition_maps.py``:
its lesion recipes and seeds, inserted into the 1 mm scan, then degraded with ``derive`` and that
script's variant seed), so the base rows can be compared with ``docs/benchmark.md``.

``--postprocess recommended`` first writes a copy of each fold model (under ``--work``) whose header chain
is ``RECOMMENDED_POSTPROCESS``, calibrated on its training subjects' clean scans; that copy is the base,
so recalibration and adaptation calibrate for the same chain.

    python scripts/benchmark_adapt.py --profiles [--variants "clean;thick 6.5 mm"]   # modality check
    python scripts/benchmark_adapt.py --rate                # training steps/s on this machine
    python scripts/benchmark_adapt.py --held-out colin27 --variants "post-contrast;noise 7 %" [--steps N]

``--variants`` takes exact names of ``VARIANTS`` separated by ";" (their names hold commas). ``--profiles``
adds other resolutions (integrated as a scanner acquires, and point-sampled as a plain resampling makes them)
and ``inverted`` (brain intensities reversed: a T2-like contrast) to the variants asked for; ``--heads`` picks
the heads of ``--data`` (default: the three subjects, whose clean scans pooled give the T1 reference).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from benchmark_acquisition_maps import RECIPES, SUBJECTS, lesion_case

from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.io.atomic import atomic_write_text
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.training.data import subject_slices
from CeVAEAnomalyLib.engine.modality import T1_DEPTH_CONTRAST, depth_contrast
from CeVAEAnomalyResearch.acquisition import VARIANTS, Recipe, derive

DEFAULT_VARIANTS = "clinical: post-contrast, 6.5 mm, noise 3 %;post-contrast"


def variant_names(arg: str) -> List[str]:
    """The ``;``-separated variant names of ``arg``, each checked against ``VARIANTS``."""
    names = [v.strip() for v in arg.split(";") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    return names


def variant_seed(subject: str, variant: str) -> int:
    """The acquisition benchmark's seed for ``subject``'s scans of ``variant``."""
    return 1000 * SUBJECTS.index(subject) + 10 * list(VARIANTS).index(variant) + 1


def clean_scan(data: Path, subject: str) -> Tuple[sitk.Image, sitk.Image]:
    """``subject``'s 1 mm healthy image (float32) and brain mask."""
    return (sitk.Cast(read_image(data / f"{subject}_t1.nii.gz"), sitk.sitkFloat32),
            read_image(data / f"{subject}_brainmask.nii.gz", "brain mask"))


def healthy_variant(data: Path, subject: str, variant: str) -> Tuple[sitk.Image, sitk.Image]:
    """(image, mask) of ``subject``'s healthy scan in ``variant`` (as the acquisition benchmark makes it)."""
    image, mask = clean_scan(data, subject)
    img, msk, _ = derive(VARIANTS[variant], image, mask, sitk.Cast(mask * 0, sitk.sitkUInt8),
                         variant_seed(subject, variant))
    return img, msk


def _inverted(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """Brain intensities reversed about their 99th percentile (a T2-like contrast; for --profiles only)."""
    a = sitk.GetArrayFromImage(image)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    p99 = float(np.percentile(a[brain], 99))
    out = sitk.GetImageFromArray(np.where(brain, np.clip(p99 - a, 0, None), a).astype(np.float32))
    out.CopyInformation(image)
    return out


# Resolutions beyond the acquisition benchmark's, for the modality check only: integrated (as a scanner
# acquires) and point-sampled (a plain linear resampling, as a script might make a copy), in mm.
PROFILE_ISOTROPIC_MM = (2.5, 3.0, 4.0)
PROFILE_RESAMPLED_MM = (2.0, 2.5, 3.0, 3.5, 4.0)


def _resampled(image: sitk.Image, mask: sitk.Image, mm: float) -> Tuple[sitk.Image, sitk.Image]:
    """``image`` point-sampled (linear, no integration) and ``mask`` (nearest) on an ``mm`` isotropic grid."""
    size = [int(round(n * s / mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([mm] * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return (sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear),
            sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def _profile_scans(data: Path, subject: str, variants: Sequence[str]):
    """(name, image, mask) of each scan of ``subject`` whose depth contrast --profiles reports."""
    image, mask = clean_scan(data, subject)
    blank = sitk.Cast(mask * 0, sitk.sitkUInt8)
    for variant in dict.fromkeys(("clean", *variants)):
        img, msk, _ = derive(VARIANTS[variant], image, mask, blank, 7)
        yield variant, img, msk
    for mm in PROFILE_ISOTROPIC_MM:
        img, msk, _ = derive(Recipe(iso_mm=mm), image, mask, blank, 7)
        yield f"{mm:g} mm isotropic", img, msk
    for mm in PROFILE_RESAMPLED_MM:
        yield (f"{mm:g} mm resampled", *_resampled(image, mask, mm))
    inverted = _inverted(image, mask)
    yield "inverted", inverted, mask
    for mm in (3.0,):
        img, msk, _ = derive(Recipe(iso_mm=mm), inverted, mask, blank, 7)
        yield f"inverted, {mm:g} mm isotropic", img, msk
        yield (f"inverted, {mm:g} mm resampled", *_resampled(inverted, mask, mm))


def profiles(data: Path, variants: Sequence[str], heads: Sequence[str]) -> dict:
    """The depth contrast (engine/modality.py) of each head's scans (:func:`_profile_scans`; ``heads``: the
    subjects of ``data``, each NAME_t1.nii.gz with NAME_brainmask.nii.gz), and the three SUBJECTS' clean scans
    pooled (the T1 reference)."""
    pre = PreprocessConfig()
    rows: Dict[str, float] = {}
    pooled: List[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in heads:
            for variant, img, msk in _profile_scans(data, subject, variants):
                paths = [Path(tmp) / f"{subject}.nii.gz", Path(tmp) / f"{subject}_mask.nii.gz"]
                sitk.WriteImage(img, str(paths[0]))
                sitk.WriteImage(msk, str(paths[1]))
                slices = subject_slices(Subject(*paths), pre, ("axial",))[0]
                if variant == "clean" and subject in SUBJECTS:
                    pooled.append(slices)
                rows[f"{subject} {variant}"] = depth_contrast(slices)
                print(f"{subject:14s} {variant:44s} depth contrast {rows[f'{subject} {variant}']:+.3f} "
                      f"(T1 reference {T1_DEPTH_CONTRAST:+.3f})", flush=True)
    reference = depth_contrast(np.concatenate(pooled)) if len(pooled) == len(SUBJECTS) else None
    if reference is not None:
        print(f"pooled clean T1 depth contrast (T1_DEPTH_CONTRAST): {reference:+.4f}")
    return {"depth_contrast": rows, "t1_reference": reference}


def _tag(variant: str) -> str:
    """``variant`` as a file-name part."""
    return variant.split(":")[0].replace(" ", "_").replace("%", "pc").replace(",", "").replace(".", "p")


def variant_scan(data: Path, work: Path, subject: str, variant: str) -> Subject:
    """The healthy scan of ``subject`` in ``variant`` (written once under ``work``)."""
    image_path = work / f"{subject}-{_tag(variant)}.nii.gz"
    mask_path = work / f"{subject}-{_tag(variant)}_mask.nii.gz"
    if not mask_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        img, msk = healthy_variant(data, subject, variant)
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
    """(name, image, brain mask, ground truth) of ``subject``'s lesion cases in ``variant``: one per recipe of
    the acquisition benchmark, inserted in the 1 mm scan with its seeds, then degraded with image and truth."""
    image, mask = clean_scan(data, subject)
    cases = []
    for r, recipe in enumerate(RECIPES):
        img, gt, _ = lesion_case(image, mask, recipe, 100 * SUBJECTS.index(subject) + r)
        v_img, v_mask, v_gt = derive(VARIANTS[variant], img, mask, gt, variant_seed(subject, variant))
        cases.append((f"{subject}-{_tag(variant)}-{recipe}", v_img, v_mask, sitk.GetArrayFromImage(v_gt) > 0))
    return cases


def evaluate_model(bundle, cases, healthy: Tuple[sitk.Image, sitk.Image], fpr: float) -> dict:
    """Pooled AUPRC, mean Dice at the threshold of rate ``fpr``, and flagged ml and components on the healthy scan."""
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
            "healthy_ml": result.flagged_ml, "healthy_components": len(result.components),
            "threshold": result.threshold}


def recommended_base(data: Path, work: Path, fold: Path, held_out: str) -> Path:
    """A copy of the fold model ``fold`` under ``work`` whose header chain is ``RECOMMENDED_POSTPROCESS``,
    calibrated on its training subjects' clean scans (``fold`` itself is only read)."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.options import RECOMMENDED_POSTPROCESS

    out = work / f"{fold.stem}-recommended.cevae"
    if not out.exists():
        work.mkdir(parents=True, exist_ok=True)
        bundle = load_bundle(fold)
        train = [Subject(data / f"{s}_t1.nii.gz", data / f"{s}_brainmask.nii.gz") for s in SUBJECTS if s != held_out]
        recalibrate(bundle, train, out, bundle.header.score_options, RECOMMENDED_POSTPROCESS,
                    source="training subjects' clean scans (benchmark_adapt, recommended chain)")
    return out


def compare(data: Path, work: Path, base_path: Path, held_out: str, variant: str, options, fpr: float) -> dict:
    """Base, base recalibrated on the site scans, and adapted model on ``held_out``'s scans of ``variant``."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.training.adapt import adapt

    base = load_bundle(base_path)
    tag = f"{base_path.stem}-{held_out}-{_tag(variant)}"
    site = [variant_scan(data, work, s, variant) for s in SUBJECTS if s != held_out]
    recal_path = work / f"recalibrated-{tag}.cevae"
    if not recal_path.exists():
        recalibrate(base, site, recal_path, base.header.score_options, base.header.postprocess,
                    source="site scans (benchmark_adapt)")
    adapted_path = work / f"adapted-{tag}-{options.steps}.cevae"
    minutes = None
    if not adapted_path.exists():
        t = time.perf_counter()
        adapt(base_path, site, adapted_path, options, inputs=())
        minutes = (time.perf_counter() - t) / 60
    cases = lesion_cases(data, held_out, variant)
    healthy = healthy_variant(data, held_out, variant)
    out = {"base": str(base_path), "postprocess": base.header.postprocess.to_dict(), "adapt_minutes": minutes,
           "steps": options.steps, "lr": options.lr, "fpr": fpr, "cases": [c[0] for c in cases]}
    for name, path in (("base model", base_path), ("base recalibrated on the site", recal_path), ("adapted", adapted_path)):
        out[name] = evaluate_model(load_bundle(path), cases, healthy, fpr)
        print(f"{held_out} {variant} | {name:30s} " + " ".join(f"{k} {v:.4f}" for k, v in out[name].items()),
              flush=True)
    return out


MODELS = ("base model", "base recalibrated on the site", "adapted")
FIGURES = (("auprc", "{:.3f}"), ("dice_at_threshold", "{:.3f}"), ("healthy_ml", "{:.2f}"), ("healthy_components", "{:.3g}"))


def table(results: dict, base_suffix: str) -> str:
    """A markdown table of the runs whose base name ends with ``base_suffix``: per variant and held-out subject,
    then the mean over the subjects of each variant; each cell base / recalibrated / adapted."""
    runs = [(k, v) for k, v in results.items() if k.split(" ")[0].endswith(base_suffix)]
    by_variant: Dict[str, list] = {}
    for key, run in runs:
        subject = key.split(" ")[1]
        variant = key[len(key.split(" ")[0]) + len(subject) + 2:].rsplit(" ", 1)[0]
        by_variant.setdefault(variant, []).append((subject, run))
    lines = ["| Variant | Held out | AUPRC | Dice at the operating point | Healthy ml | Healthy components | "
             "Minutes to adapt |", "|---|---|---|---|---|---|---|"]
    for variant, rows in by_variant.items():
        for subject, run in [*rows, ("mean", None)] if len(rows) > 1 else rows:
            group = [r for _, r in rows] if run is None else [run]
            cells = [" / ".join(fmt.format(np.mean([r[m][f] for r in group])) if all(f in r[m] for r in group)
                                else "–" for m in MODELS) for f, fmt in FIGURES]
            minutes = [r["adapt_minutes"] for r in group if r.get("adapt_minutes")]
            label = f"**mean of {len(group)}**" if run is None else subject
            spent = f"{np.mean(minutes):.1f}" if minutes else ""
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) + f" | {spent} |")
    return "\n".join(lines)


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
    p.add_argument("--heads", default=",".join(SUBJECTS), help="--profiles: the heads of --data to measure")
    p.add_argument("--rate", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--work", type=Path, default=Path("runs/adapt"), help="variant scans and adapted models")
    p.add_argument("--postprocess", choices=("header", "recommended"), default="header",
                   help="the fold models' own chain, or copies calibrated for RECOMMENDED_POSTPROCESS (see above)")
    p.add_argument("--sweep", help="VARIANT;TRAIN;VAL: validation curves of fine-tuning --base (learning rates --lrs)")
    p.add_argument("--base", type=Path, help="the model to adapt in --sweep; with --held-out, instead of the fold "
                   "model without the subject (say so: it saw the held-out subject)")
    p.add_argument("--lrs", default="1e-4,3e-4")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (default: AdaptOptions')")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: AdaptOptions')")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark/cevae"), help="fold models without-S.cevae")
    p.add_argument("--held-out", help="comma-separated held-out subjects to compare base and adapted models on")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="names of VARIANTS separated by ';'")
    p.add_argument("--base-from-checkpoint", type=Path,
                   help="with --held-out S: package this checkpoint of the run without S as the base first")
    p.add_argument("--table", metavar="SUFFIX", help="print the markdown table of the results whose base name ends "
                   "with SUFFIX (e.g. --table=-recommended) from --out's benchmark_adapt.json")
    p.add_argument("--fpr", type=float, help="operating point (default: the bundled model's default rate)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.profiles:
        result = profiles(args.data, variant_names(args.variants), args.heads.split(","))
        atomic_write_text(args.out / "benchmark_adapt_profiles.json", json.dumps(result, indent=1))
    if args.rate:
        rate()
    if args.table:
        print(table(json.loads((args.out / "benchmark_adapt.json").read_text()), args.table))
    if args.sweep:
        variant, train, val = args.sweep.split(";")
        variant_names(variant)
        curves = sweep(args.data, args.work, args.base, variant, train, val,
                       [float(x) for x in args.lrs.split(",")], args.steps or 300)
        atomic_write_text(args.out / f"benchmark_adapt_sweep_{_tag(variant)}.json", json.dumps(curves, indent=1))
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
            for variant in variant_names(args.variants):
                base = args.base or args.runs / f"without-{subject}.cevae"
                if args.postprocess == "recommended":
                    base = recommended_base(args.data, args.work, base, subject)
                results[f"{base.stem} {subject} {variant} {options.steps}"] = compare(
                    args.data, args.work, base, subject, variant, options, fpr)
                atomic_write_text(results_path, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
