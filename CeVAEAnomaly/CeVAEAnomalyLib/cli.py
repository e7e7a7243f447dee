"""The ``cevae-anomaly`` command: train, detect, evaluate, demo.

Heavy modules (torch, SimpleITK) are imported inside the commands so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import CeVAEError

log = logging.getLogger("cevae_anomaly")


class ConsoleProgress:
    """A one-line progress bar on a terminal, periodic log lines otherwise."""

    def __init__(self, label: str, stream=sys.stderr) -> None:
        self.label, self.stream = label, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.last = -1.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if self.tty:
            bar = "#" * int(30 * fraction)
            self.stream.write(f"\r{self.label} [{bar:<30}] {100 * fraction:5.1f}% {message[:50]:<50}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
        elif fraction >= 1.0 or now - self.last >= 10.0:
            self.last = now
            self.stream.write(f"{self.label}: {100 * fraction:5.1f}% {message} ({now - self.t0:.0f} s)\n")
            self.stream.flush()


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cevae-anomaly",
        description="Unsupervised anomaly localisation in brain MRI with a context-encoding VAE (ceVAE).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model on healthy volumes")
    t.add_argument("images", nargs="*", type=Path, help="healthy image files (besides or instead of --manifest)")
    t.add_argument("--manifest", type=Path, help="CSV with columns image,mask (paths relative to the CSV)")
    t.add_argument("--out", type=Path, required=True, help="model bundle to write (.cevae)")
    t.add_argument("--max-steps", type=int, default=2000)
    t.add_argument("--max-minutes", type=float, help="stop after this many minutes")
    t.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--input-size", type=int, default=64, help="64 or 128")
    t.add_argument("--channels", default="16,32,64,256", help="encoder widths, comma-separated")
    t.add_argument("--z-dim", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--beta", type=float, default=0.01, help="KL weight")
    t.add_argument("--ce-weight", type=float, default=0.5, help="weight c of the context-encoding loss")
    t.add_argument("--rec-loss", choices=("l1", "l2"), default="l1")
    t.add_argument("--orientations", default="axial", help="slice orientations: axial,coronal,sagittal")
    t.add_argument("--val-fraction", type=float, default=0.2, help="share of subjects held out")
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--half", action="store_true", help="store fp16 weights in the bundle")
    t.add_argument("--amp", action="store_true", help="mixed precision")
    _add_device(t)

    d = sub.add_parser("detect", help="score a volume: anomaly map, labelmap, slice scores")
    d.add_argument("image", type=Path, help="image file or DICOM folder")
    d.add_argument("--mask", type=Path, help="brain mask (>0 is brain); computed automatically if absent")
    d.add_argument("--model", type=Path, help="model bundle (default: the bundled default model)")
    d.add_argument("--score", type=Path, required=True, help="output anomaly map (float32)")
    d.add_argument("--labelmap", type=Path, help="output labelmap (uint8 0/1)")
    d.add_argument("--slice-scores", type=Path, help="output CSV of per-slice scores")
    d.add_argument("--components", type=Path, help="output CSV of anomaly components")
    d.add_argument("--score-type", default=None, help="combi (default), rec or grad")
    d.add_argument("--mc-samples", type=int, help="average the reconstruction over N samples of z")
    d.add_argument("--fpr", type=float, help="healthy false-positive rate for the calibrated threshold (default 0.001)")
    d.add_argument("--threshold", type=float, help="absolute score threshold (overrides --fpr)")
    d.add_argument("--rim-mm", type=float, help="ignore scores within this distance of the brain edge")
    d.add_argument("--median-radius", type=int, help="3D median filter radius (voxels)")
    d.add_argument("--min-volume", type=float, help="drop components smaller than this (mm^3)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--amp", action="store_true", help="mixed precision")
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_device(d)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s: %(message)s")
    try:
        if args.command == "train":
            from .commands import run_train

            run_train(args)
        elif args.command == "detect":
            from .commands import run_detect

            run_detect(args)
        return 0
    except CeVAEError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
