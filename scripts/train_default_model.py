"""Recipe of the bundled default model: train on the healthy sample subjects, calibrate, write the card.

    python scripts/train_default_model.py [--steps N] [--out CeVAEAnomaly/CeVAEAnomalyLib/data/cevae_t1_default.cevae]

Trains the MICCAI-19 ceVAE (64 px, axial slices, seed 0, augmentation on) on all three healthy
T1 subjects, stores fp16 weights, calibrates the scoring chosen by the benchmark on the same
subjects and sets the default false-positive rate that the leave-one-subject-out benchmark showed
to hold on unseen healthy scans. Finally writes Resources/Models/MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyResearch.modelcard import write_model_card
from CeVAEAnomalyLib.engine.calibrate import recalibrate
from CeVAEAnomalyLib.options import RECOMMENDED_POSTPROCESS as RECOMMENDED
from CeVAEAnomalyLib.options import ScoreOptions
from CeVAEAnomalyLib.training.trainer import TrainConfig, Trainer

SUBJECTS = ("colin27", "mni152", "robex")
# chosen on the leave-one-subject-out benchmark (docs/benchmark.md)
SCORING = ScoreOptions()
POSTPROCESS = RECOMMENDED
# In-sample calibration underestimates the rate on unseen scans: with the leave-one-subject-out
# models, a nominal 0.0005 flagged 0-5.2 ml (achieved rate up to 0.0029) on the held-out healthy
# subject and 0.0002 flagged 0-1.9 ml, so the default asks for 0.0002.
DEFAULT_FPR = 0.0002


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5083)  # the shipped model: 5083 steps (a 50-min cap on 2 shared cores)
    p.add_argument("--out", type=Path, default=Path("CeVAEAnomaly/CeVAEAnomalyLib/data/cevae_t1_default.cevae"))
    p.add_argument("--data", type=Path, help="folder with <name>_t1/_brainmask.nii.gz (default: find or fetch)")
    p.add_argument("--calibrate-only", action="store_true", help="recalibrate an existing --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.data is None:
        from CeVAEAnomalyResearch.sampledata import ensure_healthy_data

        args.data = ensure_healthy_data()
    subjects = [Subject(args.data / f"{s}_t1.nii.gz", args.data / f"{s}_brainmask.nii.gz") for s in SUBJECTS]
    if not args.calibrate_only:
        cfg = TrainConfig(out=args.out, max_steps=args.steps, checkpoint_every=500, val_fraction=0.0,
                          seed=0, half_bundle=True)
        Trainer(cfg, subjects).run()
    bundle = load_bundle(args.out)
    recalibrate(bundle, subjects, args.out, SCORING, POSTPROCESS, DEFAULT_FPR,
                source="the training subjects; default FPR set from the leave-one-subject-out benchmark")
    write_model_card(load_bundle(args.out), args.out.parent / "MODEL_CARD.md", Path("docs/benchmark.md"))


if __name__ == "__main__":
    main()
