"""Train the leave-one-subject-out models of the synthetic-lesion benchmark.

For every healthy subject, train each ablation variant (AE, VAE, CE-only, ceVAE) on the other
subjects; bundles land in ``runs/benchmark/<variant>/without-<subject>.cevae``. Existing bundles
are kept, so the script can be rerun to finish an interrupted benchmark.

    python scripts/benchmark_train.py [--steps 1000] [--variants cevae,vae,ce,ae]
        [--orientations axial,coronal,sagittal]   # fold models for the three-orientation fusion
        [--input-size 128]                          # slices resampled to 128 px instead of 64
        [--subjects colin27,mni152,robex,cortex_s1 --held-out cortex_s1 --data DIR]   # a larger pool of training heads
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.trainer import Trainer

SUBJECTS = ("colin27", "mni152", "robex")
# AE: no KL and no CE (the posterior variance collapses, so it acts as a plain autoencoder)
VARIANTS = {
    "cevae": LossConfig(ce_weight=0.5, beta=0.01),
    "vae": LossConfig(ce_weight=0.0, beta=0.01),
    "ce": LossConfig(ce_weight=1.0, beta=0.01),
    "ae": LossConfig(ce_weight=0.0, beta=0.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--orientations", default="axial", help="slice orientations to train on (comma-separated)")
    p.add_argument("--input-size", type=int, default=ModelConfig().input_size, help="slice side in pixels (64 or 128)")
    p.add_argument("--subjects", default=",".join(SUBJECTS), help="the pool of healthy heads the folds come from")
    p.add_argument("--held-out", help="folds to train (held-out subjects; default: every subject of the pool)")
    p.add_argument("--data", type=Path, help="folder with <name>_t1/_brainmask.nii.gz (default: find or fetch)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    pool = args.subjects.split(",")
    subjects = {s: Subject(args.data / f"{s}_t1.nii.gz", args.data / f"{s}_brainmask.nii.gz") for s in pool}
    for variant in args.variants.split(","):
        for held_out in (args.held_out or args.subjects).split(","):
            out = args.out / variant / f"without-{held_out}.cevae"
            if out.exists():
                continue
            train = [subjects[s] for s in pool if s != held_out]
            cfg = TrainConfig(out=out, model=ModelConfig(input_size=args.input_size), loss=VARIANTS[variant], max_steps=args.steps,
                              checkpoint_every=args.steps, val_fraction=0.0, seed=args.seed, device="auto",
                              orientations=tuple(args.orientations.split(",")))
            logging.info("Training %s without %s.", variant, held_out)
            Trainer(cfg, train).run()


if __name__ == "__main__":
    main()
