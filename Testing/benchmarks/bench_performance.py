"""Performance benchmark of detection and training on this machine (issue 5); prints a Markdown table.

    .venv/bin/python Testing/benchmarks/bench_performance.py [--repeats 3] [--quick] [--threads N]
                                                             [--data T1 --mask MASK] [--model BUNDLE]

Measures, with medians over ``--repeats`` runs:

- ``detect`` on a 256^3 1 mm T1 (colin27 from the shared healthy data resampled onto that grid, float32
  .nii.gz, unless ``--data`` is given): wall time per stage (read, preprocess, network and maps, inverse
  mapping, post-processing, write; the detector's stages timed through its progress callback), end to end (read to written files), and the bare network for the same
  slices (every orientation the scoring averages) in the same run (encode, KL gradient to the input, decode of mu;
  nothing else) and their ratio;
  the same for ``--score-type rec``, for MC sampling with N = 1, 4, 16, and for combi with uncompressed
  .nii input and outputs (what gzip costs);
- peak resident memory of ``cevae-anomaly detect`` on a 512x512x400 float32 volume (uncompressed .nii);
- ``cevae-anomaly --help`` wall time;
- training throughput (slices/s) of the Trainer on the real data with augmentation against the bare
  train step on a batch already in memory, same batch size.

The model is the bundled default if present, else an untrained bundle with the default architecture
(same compute; the output says so). Generated inputs are cached in ``--workdir``. ``--threads`` sets the
torch threads (default: the cores); on a machine loaded by other jobs, 1 gives steadier figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from CeVAEAnomalyLib.engine.bundle import Bundle, BundleHeader, load_bundle, save_bundle
from CeVAEAnomalyLib.engine.config import ModelConfig, PreprocessConfig
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.images import read_image
from CeVAEAnomalyLib.engine.model import CeVAE, cevae_loss, kl_per_sample
from CeVAEAnomalyLib.io.atomic import write_all
from CeVAEAnomalyLib.result import components_csv, slice_scores_csv
from CeVAEAnomalyLib.engine.detector import Detector
from CeVAEAnomalyLib.options import RECOMMENDED_POSTPROCESS as RECOMMENDED, PostprocessOptions
from CeVAEAnomalyLib.engine.preprocess import mask_array, prepare
from CeVAEAnomalyLib.options import ScoreOptions, ThresholdPolicy

REPO = Path(__file__).resolve().parents[2]
HEALTHY = Path(os.environ.get("CEVAE_DATA_DIR", REPO.parent / "shared" / "data" / "healthy"))
STAGES = ("read", "preprocess", "network", "inverse", "postprocess", "write")
# The detector's progress messages that open each of its stages (timed from outside the algorithm).
STAGE_MESSAGES = {"Preparing the volume": "preprocess", "Scoring slices": "network",
                  "Mapping scores back onto the input grid": "inverse", "Post-processing": "postprocess"}


class StageClock:
    """A progress callback that records when each stage of the detector begins."""

    def __init__(self) -> None:
        self.starts: Dict[str, float] = {}

    def __call__(self, fraction: float, message: str) -> None:
        stage = STAGE_MESSAGES.get(message)
        if stage is not None and stage not in self.starts:
            self.starts[stage] = time.perf_counter()

    def durations(self, end: float) -> Dict[str, float]:
        marks = sorted(self.starts.items(), key=lambda kv: kv[1]) + [("", end)]
        return {name: marks[i + 1][1] - t for i, (name, t) in enumerate(marks[:-1])}
BATCH = 64


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ---- machine and inputs ------------------------------------------------------------------------
def machine() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__,
        "python": platform.python_version(), "load average (1/5/15 min) at start": load_average(),
    }


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def model_bundle(workdir: Path, requested: Optional[Path]) -> Tuple[Path, str]:
    """The bundle to benchmark and a note on what it is."""
    from CeVAEAnomalyLib.data import default_model_path

    if requested is not None:
        return requested, f"given bundle {requested}"
    default = default_model_path()
    if default.is_file():
        return default, f"bundled default model {default.name}"
    path = workdir / "untrained_default_arch.cevae"  # made anew each time: option names may change
    torch.manual_seed(0)
    header = BundleHeader(preprocess=PreprocessConfig(), name="untrained", postprocess=RECOMMENDED)
    save_bundle(path, CeVAE(ModelConfig()), header)
    return path, ("UNTRAINED bundle with the default architecture (the bundled default model is absent): "
                  "same compute, meaningless scores")


def _grid_like(source: sitk.Image, size: Tuple[int, int, int], spacing: float) -> sitk.Image:
    """An empty grid with ``source``'s direction, centred on ``source``'s centre."""
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(source.GetDirection())
    centre = np.array(source.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in source.GetSize()]))
    d = np.array(source.GetDirection()).reshape(3, 3)
    grid.SetOrigin((centre - d @ ((np.array(size) - 1) / 2 * spacing)).tolist())
    return grid


def resampled_subject(out_image: Path, out_mask: Path, size, spacing: float, compress: bool) -> None:
    """colin27 T1 (float32, linear) and its brain mask (nearest) resampled onto a centred grid."""
    t1 = sitk.ReadImage(str(HEALTHY / "colin27_t1.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(HEALTHY / "colin27_brainmask.nii.gz"))
    grid = _grid_like(t1, size, spacing)
    img = sitk.Resample(t1, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(img, str(out_image), compress)
    del img
    msk = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(msk, str(out_mask), compress)


# ---- the bare network ----------------------------------------------------------------------------
def bare_network(model: CeVAE, slices: torch.Tensor, opts: ScoreOptions, batch_size: int = BATCH) -> float:
    """Seconds for the network alone on these slices: encode, KL gradient to the input (combi/grad),
    decode of mu (or of ``mc_samples`` samples of z)."""
    device = next(model.parameters()).device
    need_grad = opts.score_type in ("grad", "combi")
    t0 = time.perf_counter()
    for start in range(0, slices.shape[0], batch_size):
        x = slices[start : start + batch_size, None].to(device)
        if need_grad:
            x.requires_grad_(True)
            with torch.enable_grad():
                mu, logvar = model.encode(x)
                torch.autograd.grad(kl_per_sample(mu, logvar).sum(), x)
        with torch.no_grad():
            if not need_grad:
                mu, logvar = model.encode(x)
            if opts.mc_samples > 0:
                std = torch.exp(0.5 * logvar.detach())
                for _ in range(opts.mc_samples):
                    model.decode(mu.detach() + torch.randn_like(std) * std)
            else:
                model.decode(mu.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---- detection -----------------------------------------------------------------------------------
@dataclass
class DetectRuns:
    label: str
    stages: Dict[str, List[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    end_to_end: List[float] = field(default_factory=list)
    bare: List[float] = field(default_factory=list)
    ratios: List[float] = field(default_factory=list)
    slices: int = 0


def detect_once(image_path: Path, mask_path: Path, bundle: Bundle, opts: ScoreOptions, post: PostprocessOptions,
                threshold: Optional[float], out_dir: Path, suffix: str = ".nii.gz") -> Tuple[Dict[str, float], float, object]:
    """One detection as ``cevae-anomaly detect`` does it (read, detect, write four outputs)."""
    t0 = time.perf_counter()
    image = read_image(image_path)
    mask = read_image(mask_path, "brain mask")
    t_read = time.perf_counter() - t0
    clock = StageClock()
    result = Detector(bundle, opts, post, ThresholdPolicy(threshold=threshold), BATCH)(image, mask, clock)
    t1 = time.perf_counter()
    files = {out_dir / f"score{suffix}": result.score, out_dir / f"labelmap{suffix}": result.labelmap,
             out_dir / "slices.csv": slice_scores_csv(result), out_dir / "components.csv": components_csv(result)}
    write_all(files, overwrite=True, inputs=(image_path, mask_path))
    t_end = time.perf_counter()
    stages = dict(clock.durations(t1), read=t_read, write=t_end - t1)
    return stages, t_end - t0, result


def calibrated_or_fixed_threshold(bundle: Bundle, opts: ScoreOptions, post: PostprocessOptions, image_path: Path,
                                  mask_path: Path, out_dir: Path) -> Optional[float]:
    """None when the bundle is calibrated for these options; else the 99.9th brain-score percentile."""
    try:
        bundle.header.threshold(opts, post, ThresholdPolicy())
        return None
    except CeVAEError:
        _, _, result = detect_once(image_path, mask_path, bundle, opts, post, float("inf"), out_dir)
        score = sitk.GetArrayViewFromImage(result.score)
        brain = sitk.GetArrayViewFromImage(result.brain_mask) > 0
        return float(np.percentile(score[brain], 99.9))


def model_slices(image_path: Path, mask_path: Path, preprocess: PreprocessConfig, opts: ScoreOptions) -> torch.Tensor:
    """The slices the detection's network passes score: those of every orientation the options average (the
    bundled model's default: axial, coronal and sagittal), so that the bare network does the same work."""
    image = read_image(image_path)
    brain = mask_array(read_image(mask_path, "brain mask"), image)
    return torch.cat([torch.from_numpy(prepare(image, brain, preprocess, o).slices) for o in opts.orientation_list])


def run_detect_config(label: str, image_path: Path, mask_path: Path, bundle: Bundle, opts: ScoreOptions,
                      post: PostprocessOptions, repeats: int, out_dir: Path, suffix: str = ".nii.gz") -> DetectRuns:
    runs = DetectRuns(label)
    threshold = calibrated_or_fixed_threshold(bundle, opts, post, image_path, mask_path, out_dir)
    slices = model_slices(image_path, mask_path, bundle.preprocess, opts)
    runs.slices = int(slices.shape[0])
    for _ in range(repeats):
        stages, total, _ = detect_once(image_path, mask_path, bundle, opts, post, threshold, out_dir, suffix)
        bare = bare_network(bundle.model, slices, opts)
        for s in STAGES:
            if s in stages:
                runs.stages[s].append(stages[s])
        runs.end_to_end.append(total)
        runs.bare.append(bare)
        runs.ratios.append(total / bare)
        print(f"  {label}: end to end {total:.2f} s, bare network {bare:.2f} s, ratio {total / bare:.2f} "
              f"({', '.join(f'{k} {v:.2f}' for k, v in stages.items())})", file=sys.stderr, flush=True)
    return runs


def cli_detect_wall(image_path: Path, mask_path: Path, bundle_path: Path, threshold: Optional[float],
                    out_dir: Path, repeats: int) -> List[float]:
    """Wall time of the whole ``cevae-anomaly detect`` process (start-up, model load, detection, writing)."""
    cmd = [cli_path(), "detect", str(image_path), "--mask", str(mask_path), "--model", str(bundle_path),
           "--score", str(out_dir / "cli_score.nii.gz"), "--labelmap", str(out_dir / "cli_labelmap.nii.gz"),
           "--overwrite", "--device", "cpu"]
    if threshold is not None:
        cmd += ["--threshold", repr(threshold)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def cli_path() -> str:
    exe = Path(sys.executable).with_name("cevae-anomaly")
    return str(exe) if exe.is_file() else "cevae-anomaly"


# ---- memory, start-up ----------------------------------------------------------------------------
def peak_rss_mb(cmd: List[str]) -> Tuple[float, float]:
    """(peak RSS in MB of the child process, its wall time in s)."""
    with tempfile.TemporaryFile() as err:  # not a pipe: nobody reads it while the child runs
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read()[-2000:].decode(errors='replace')}")
    scale = 1024.0 if sys.platform != "darwin" else 1.0  # ru_maxrss: KiB on Linux, bytes on macOS
    return usage.ru_maxrss * scale / 1e6, wall


def big_volume_rss(workdir: Path, bundle_path: Path, threshold: Optional[float]) -> Tuple[float, float]:
    image, mask = workdir / "big_512x512x400_float32.nii", workdir / "big_512x512x400_mask.nii"
    if not (image.is_file() and mask.is_file()):
        print("  generating the 512x512x400 float32 volume ...", file=sys.stderr, flush=True)
        resampled_subject(image, mask, (512, 512, 400), 0.5, compress=False)
    cmd = [cli_path(), "detect", str(image), "--mask", str(mask), "--model", str(bundle_path),
           "--score", str(workdir / "big_score.nii.gz"), "--labelmap", str(workdir / "big_labelmap.nii.gz"),
           "--overwrite", "--device", "cpu"]
    if threshold is not None:
        cmd += ["--threshold", repr(threshold)]
    return peak_rss_mb(cmd)


def help_wall(repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([cli_path(), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


# ---- training ------------------------------------------------------------------------------------
def training_throughput(workdir: Path, steps: int, repeats: int) -> Tuple[List[float], List[float], int]:
    """(Trainer slices/s, bare step slices/s, training slices), alternating the two ``repeats`` times."""
    from CeVAEAnomalyLib.engine.corruption import random_rectangles
    from CeVAEAnomalyLib.training.augment import augment
    from CeVAEAnomalyLib.training.config import TrainConfig
    from CeVAEAnomalyLib.training.data import Subject
    from CeVAEAnomalyLib.training.trainer import Trainer

    subjects = [Subject(p, p.with_name(p.name.replace("_t1.", "_brainmask.")))
                for p in sorted(HEALTHY.glob("*_t1.nii.gz"))]
    if not subjects:
        raise SystemExit(f"No *_t1.nii.gz training volumes in {HEALTHY} (set CEVAE_DATA_DIR).")
    cfg = TrainConfig(out=workdir / "train_bench.cevae", batch_size=BATCH, device="cpu", val_fraction=0.0)
    trainer = Trainer(cfg, subjects)
    trainer.open_data()
    trainer.model.train()
    batches = trainer.batches()
    # the bare step's batch: made once the way the Trainer makes every batch
    gen = torch.Generator().manual_seed(1)
    x = augment(next(batches)[2], cfg.augment, gen)
    xc, _ = random_rectangles(x, gen, value_range=(0.0, trainer.pre.clip_max))

    def bare_step() -> None:
        loss, _ = cevae_loss(trainer.net, x, xc, cfg.loss)
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.opt.step()

    def real_step() -> None:  # reads the batch from the slice cache, as training does
        trainer._train_step(next(batches)[2])

    def rate(step: Callable[[], None]) -> float:
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * BATCH / (time.perf_counter() - t0)

    real, bare = [], []
    for _ in range(repeats):
        real.append(rate(real_step))
        bare.append(rate(bare_step))
        print(f"  training: Trainer {real[-1]:.0f} slices/s, bare step {bare[-1]:.0f} slices/s",
              file=sys.stderr, flush=True)
    return real, bare, len(trainer.train)


# ---- report --------------------------------------------------------------------------------------
def fmt(v: float, unit: str = "s") -> str:
    return f"{v:.2f} {unit}" if v == v else "—"


def report(info: Dict[str, str], bundle_note: str, input_note: str, repeats: int, detects: List[DetectRuns],
           cli_wall: List[float], rss: Optional[Tuple[float, float]], help_times: List[float],
           train: Optional[Tuple[List[float], List[float], int]]) -> str:
    lines = ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", f"Model: {bundle_note}.", f"Input: {input_note}.", f"Medians of {repeats} run(s).", ""]
    lines += ["## Detection (256³, 1 mm)", ""]
    head = ["stage"] + [d.label for d in detects]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in STAGES:
        lines.append(f"| {s} | " + " | ".join(fmt(median(d.stages[s])) for d in detects) + " |")
    lines.append("| **end to end** | " + " | ".join(f"**{fmt(median(d.end_to_end))}**" for d in detects) + " |")
    lines.append("| bare network | " + " | ".join(fmt(median(d.bare)) for d in detects) + " |")
    lines.append("| **ratio end to end / bare** | "
                 + " | ".join(f"**{median(d.ratios):.2f}×**" for d in detects) + " |")
    lines.append("| model slices | " + " | ".join(str(d.slices) for d in detects) + " |")
    mc = {d.label: median(d.end_to_end) for d in detects if d.label.startswith("MC")}
    if "MC N=1" in mc:
        lines += ["", "| MC samples N | end to end | × single sample (N=1) | target ≤ 1 + 0.5·N |", "|---|---|---|---|"]
        for label, t in mc.items():
            n = int(label.split("=")[1])
            lines.append(f"| {n} | {fmt(t)} | {t / mc['MC N=1']:.2f}× | {1 + 0.5 * n:.1f}× |")
    if cli_wall:
        lines += ["", f"Whole `cevae-anomaly detect` process (start-up, model load, combi detection, writing "
                      f"score + labelmap): {fmt(median(cli_wall))}."]
    lines += ["", "## Memory, start-up, training", "", "| measure | value | target |", "|---|---|---|"]
    if rss:
        lines.append(f"| peak RSS, `cevae-anomaly detect` on 512×512×400 float32 (.nii), combi | "
                     f"{rss[0]:.0f} MB (wall {rss[1]:.1f} s) | ≤ 2000 MB |")
    if help_times:
        lines.append(f"| `cevae-anomaly --help` wall time | {fmt(median(help_times))} | < 1 s |")
    if train:
        real, bare, n = train
        lines.append(f"| training, Trainer (real data, augmentation), batch {BATCH} | {median(real):.0f} slices/s | |")
        lines.append(f"| training, bare step on a batch in memory, batch {BATCH} | {median(bare):.0f} slices/s | |")
        ratios = [r / b for r, b in zip(real, bare)]
        lines.append(f"| training ratio Trainer / bare ({n} training slices) | {median(ratios):.2f}× | ≥ 0.9× |")
    lines += ["", f"Load average (1/5/15 min) at the end: {load_average()}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (medians are reported)")
    p.add_argument("--quick", action="store_true", help="one run each, MC N=1 and 4 only, fewer training steps")
    p.add_argument("--data", type=Path, help="T1 volume to detect on (default: colin27 resampled to 256³ 1 mm)")
    p.add_argument("--mask", type=Path, help="brain mask of --data (required with --data)")
    p.add_argument("--model", type=Path, help="model bundle (default: the bundled model, else an untrained one)")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench", help="generated inputs and outputs")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: detect,cli,rss,help,train")
    p.add_argument("--json", type=Path, help="also write the raw measurements here")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: the cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the same for the command-line runs
    if args.quick:
        args.repeats = 1
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    out_dir = args.workdir / "out"
    out_dir.mkdir(exist_ok=True)
    info = machine()
    bundle_path, bundle_note = model_bundle(args.workdir, args.model)
    bundle = load_bundle(bundle_path, "cpu")
    if args.data is not None:
        if args.mask is None:
            raise SystemExit("--data needs --mask (the automatic brain mask is not part of this benchmark).")
        image_path, mask_path = args.data, args.mask
        input_note = f"{args.data}"
    else:
        image_path, mask_path = args.workdir / "colin27_256_float32.nii.gz", args.workdir / "colin27_256_mask.nii.gz"
        if not (image_path.is_file() and mask_path.is_file()):
            resampled_subject(image_path, mask_path, (256, 256, 256), 1.0, compress=True)
        input_note = "colin27 T1 resampled to 256³ 1 mm, float32 .nii.gz, with its brain mask (uint8 .nii.gz)"

    post = bundle.header.postprocess
    combi = bundle.header.score_options
    configs = [("combi", combi), ("rec", combi.replace(score_type="rec"))]
    for n in (1, 4) if args.quick else (1, 4, 16):
        configs.append((f"MC N={n}", ScoreOptions(**dict(combi.to_dict(), mc_samples=n))))
    detects: List[DetectRuns] = []
    if "detect" not in skip:
        for label, opts in configs:
            detects.append(run_detect_config(label, image_path, mask_path, bundle, opts, post, args.repeats, out_dir))
        plain = [args.workdir / f"uncompressed_{p.name.split('.')[0]}.nii" for p in (image_path, mask_path)]
        for src, dst in zip((image_path, mask_path), plain):
            sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), False)
        detects.append(run_detect_config("combi, .nii in/out", *plain, bundle, combi, post, args.repeats, out_dir,
                                         ".nii"))
    threshold = calibrated_or_fixed_threshold(bundle, combi, post, image_path, mask_path, out_dir)
    cli_wall = [] if "cli" in skip else cli_detect_wall(image_path, mask_path, bundle_path, threshold, out_dir,
                                                        args.repeats)
    rss = None if "rss" in skip else big_volume_rss(args.workdir, bundle_path, threshold)
    help_times = [] if "help" in skip else help_wall(max(3, args.repeats))
    train = None if "train" in skip else training_throughput(args.workdir, 5 if args.quick else 15, args.repeats)
    text = report(info, bundle_note, input_note, args.repeats, detects, cli_wall, rss, help_times, train)
    print(text)
    if args.json:
        raw = {"machine": info, "detect": [d.__dict__ for d in detects], "cli_wall": cli_wall, "rss": rss,
               "help": help_times, "train": train}
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
