"""Implementations of the command-line subcommands (imported lazily by cli.py)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .errors import CeVAEError

log = logging.getLogger("cevae_anomaly")


def run_train(args: argparse.Namespace) -> Path:
    from .cli import ConsoleProgress
    from .config import LossConfig, ModelConfig
    from .data import AugmentConfig, Subject, read_manifest
    from .train import TrainConfig, Trainer

    subjects = list(read_manifest(args.manifest)) if args.manifest else []
    subjects += [Subject(Path(p)) for p in args.images]
    if not subjects:
        raise CeVAEError("No training images: give --manifest CSV and/or image paths.")
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise CeVAEError(f"--channels must be comma-separated integers, got {args.channels!r}.") from None
    orientations = tuple(o.strip() for o in args.orientations.split(",") if o.strip())
    for o in orientations:
        if o not in ("axial", "coronal", "sagittal"):
            raise CeVAEError(f"Unknown orientation {o!r}; use axial, coronal and/or sagittal.")
    no_aug = AugmentConfig(flip=0, rotate_deg=0, scale=0, translate=0, elastic=0, gamma=0,
                           intensity_scale=0, intensity_shift=0, bias_field=0, noise=0)
    cfg = TrainConfig(
        out=args.out,
        model=ModelConfig(input_size=args.input_size, channels=channels, z_dim=args.z_dim),
        loss=LossConfig(ce_weight=args.ce_weight, beta=args.beta, rec=args.rec_loss),
        augment=no_aug if args.no_augment else AugmentConfig(),
        orientations=orientations, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
        max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every, val_fraction=args.val_fraction,
        seed=args.seed, device=args.device, resume=args.resume, half_bundle=args.half, amp=args.amp,
    )
    rank0 = os.environ.get("RANK", "0") == "0"
    trainer = Trainer(cfg, subjects, progress=ConsoleProgress("train") if rank0 else None)
    path = trainer.run()
    if path is not None:
        log.info("Model bundle written to %s (log: %s).", path, cfg.log_path)
    return path


def run_detect(args: argparse.Namespace) -> None:
    from .bundle import load_bundle
    from .cli import ConsoleProgress
    from .devices import resolve_device
    from .imageio import read_image
    from .outputs import check_paths, components_csv, slice_scores_csv, write_all
    from .pipeline import default_postprocess, default_score_options, detect
    from .postprocess import PostprocessOptions
    from .resources import default_model_path

    outputs = {args.score: None}
    for path in (args.labelmap, args.slice_scores, args.components):
        if path is not None:
            outputs[path] = None
    inputs = (args.image, args.mask)
    check_paths(outputs, args.overwrite, inputs)
    image = read_image(args.image)
    mask = read_image(args.mask, "brain mask") if args.mask else None
    bundle = load_bundle(args.model or default_model_path(), resolve_device(args.device))
    opts = default_score_options(bundle, args.score_type)
    if args.mc_samples is not None:
        opts = type(opts)(**dict(opts.to_dict(), mc_samples=args.mc_samples))
    post = default_postprocess(bundle).to_dict()
    for key, value in (("rim_mm", args.rim_mm), ("median_radius", args.median_radius),
                       ("min_volume_mm3", args.min_volume)):
        if value is not None:
            post[key] = value
    _warn_modality(image)
    result = detect(image, bundle, mask, opts, PostprocessOptions(**post), threshold=args.threshold,
                    fpr=args.fpr, batch_size=args.batch_size, amp=args.amp, progress=ConsoleProgress("detect"))
    files = {args.score: result.score}
    if args.labelmap:
        files[args.labelmap] = result.labelmap
    if args.slice_scores:
        files[args.slice_scores] = slice_scores_csv(result)
    if args.components:
        files[args.components] = components_csv(result)
    write_all(files, args.overwrite, inputs)
    top = result.top_slice
    log.info("Threshold %.4g (%s); %d component(s), %.2f ml flagged; most anomalous slice: %s.",
             result.threshold, result.threshold_source, len(result.components), result.flagged_ml,
             f"index {top.index} on axis {'IJK'[top.axis]}" if top else "none")
    log.info("Wrote %s.", ", ".join(str(p) for p in files))


def _warn_modality(image) -> None:
    """Warn when the intensities look like CT (Hounsfield units) rather than MRI."""
    import SimpleITK as sitk

    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() <= -500:
        log.warning("The intensities reach %.0f, like a CT in Hounsfield units; this model is for T1 MRI "
                    "and its scores will not be meaningful.", stats.GetMinimum())
