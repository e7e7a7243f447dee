"""Headless training: loop, checkpoints, resume, devices and DDP (under torchrun).

Rank 0 alone writes the log, checkpoints and the bundle. Checkpoints hold the model,
optimiser, sampler position and RNG states, so ``--resume`` continues the same run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ..io.atomic import atomic_path
from ..engine.bundle import load_bundle, save_bundle
from ..engine.config import LossConfig, ModelConfig, PreprocessConfig
from .data import AugmentConfig, Subject, augment, load_slices, split_subjects
from ..io.checksum import sha256_of
from ..engine.devices import resolve_device
from ..errors import CeVAEError
from ..engine.corruption import random_rectangles
from ..engine.model import CeVAE, cevae_loss
from ..engine.calibrate import calibrate_model
from ..options import RECOMMENDED_POSTPROCESS as RECOMMENDED
from ..progress import ProgressCallback, report
from ..options import ScoreOptions

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data."""

    out: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    orientations: Sequence[str] = ("axial",)
    batch_size: int = 64
    lr: float = 2e-4
    max_steps: int = 2000
    max_minutes: Optional[float] = None
    checkpoint_every: int = 200
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    half_bundle: bool = False
    amp: bool = False

    @property
    def checkpoint_path(self) -> Path:
        return self.out.with_name(self.out.name + ".ckpt")

    @property
    def log_path(self) -> Path:
        return self.out.with_name(self.out.name + ".log.csv")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.type not in ("cuda", "cpu"):
        raise CeVAEError(f"Distributed training runs on CUDA or the CPU, not on {device.type}; "
                         "pass --device cuda or --device cpu.")
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group if this process created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the model's float32 state, in state-dict order (equal models, equal sums)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """Save to a temporary file in the same folder, then rename: never a partial file under ``path``."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as exc:
        raise CeVAEError(f"Could not write the checkpoint {path}: {exc}; the previous one is kept.") from None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (they are trained again)."""
    if not path.is_file():
        return
    from ..io.atomic import atomic_write_text

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) < len(rows):
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write_text(path, text.getvalue())


class Trainer:
    """One training run; ``run()`` returns the bundle path (on rank 0)."""

    def __init__(
        self,
        cfg: TrainConfig,
        subjects: Sequence[Subject],
        preprocess: Optional[PreprocessConfig] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.pre = preprocess or PreprocessConfig(input_size=cfg.model.input_size)
        if self.pre.input_size != cfg.model.input_size:
            raise CeVAEError("Preprocessing and model input sizes differ.")
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.dist = init_distributed(self.device)
        self.train_subjects, self.val_subjects = split_subjects(subjects, cfg.val_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = CeVAE(cfg.model).to(self.device)
        self.net: torch.nn.Module = self.model
        if self.dist.world > 1:  # the wrapper averages gradients over ranks during backward
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if not self.dist.main:  # own latent-sampling noise per rank
                torch.manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.step = 0
        self.epoch = 0
        self.offset = 0  # batches consumed in the current epoch
        self.batch_size = cfg.batch_size
        self.saved_step: Optional[int] = None  # step of the last checkpoint written or resumed from

    # ---- data -------------------------------------------------------------------------
    def _load_data(self) -> None:
        t = time.perf_counter()
        self.train = load_slices(self.train_subjects, self.pre, self.cfg.orientations)
        self.val = load_slices(self.val_subjects, self.pre, ("axial",))
        if len(self.train) < self.cfg.batch_size:
            log.warning("Only %d training slices for batch size %d.", len(self.train), self.cfg.batch_size)
        if len(self.train) == 0:
            raise CeVAEError("No training slices: the images have no brain voxels.")
        log.info("Loaded %d training slices (%d subjects), %d validation slices (%d subjects) in %.1f s.",
                 len(self.train), len(self.train_subjects), len(self.val), len(self.val_subjects),
                 time.perf_counter() - t)

    def _batches(self):
        """Endless batches of slice indices; ranks see disjoint shards of each epoch."""
        sampler = DistributedSampler(range(len(self.train)), num_replicas=self.dist.world,
                                     rank=self.dist.rank, shuffle=True, seed=self.cfg.seed)
        while True:
            sampler.set_epoch(self.epoch)
            order = list(sampler)
            bs = min(self.batch_size, len(order))
            n_batches = max(1, len(order) // bs)
            while self.offset < n_batches:
                idx = order[self.offset * bs : (self.offset + 1) * bs]
                self.offset += 1
                yield torch.as_tensor(idx)
            self.epoch += 1
            self.offset = 0

    # ---- steps --------------------------------------------------------------------------
    def _train_step(self, idx: torch.Tensor) -> Dict[str, float]:
        x = augment(self.train[idx].to(self.device), self.cfg.augment, self.gen)
        xc, _ = random_rectangles(x, self.gen, value_range=(0.0, float(self.pre.clip_max)))
        autocast = torch.autocast(self.device.type, enabled=self.cfg.amp,
                                  dtype=torch.bfloat16 if self.device.type == "cpu" else torch.float16)
        with autocast:
            loss, terms = cevae_loss(self.net, x, xc, self.cfg.loss)
        if not torch.isfinite(loss):
            raise CeVAEError(f"The loss became {loss.item()} at step {self.step}; training stopped. "
                             f"{self._last_good()} Try a lower learning rate.")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {k: float(v) for k, v in terms.items()}

    def step_with_oom_retry(self, idx: torch.Tensor, step_fn: Optional[Callable] = None) -> Dict[str, float]:
        """Run a step; on out-of-memory halve the batch size and retry (saying so)."""
        step_fn = step_fn or self._train_step
        while True:
            try:
                return step_fn(idx[: self.batch_size])
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                if self.batch_size <= 1:
                    raise CeVAEError(f"Out of memory even with batch size 1 on {self.device}; use a smaller "
                                     "--input-size or --channels, or another device.") from None
                if self.dist.world > 1:  # ranks cannot shrink their batches independently
                    raise CeVAEError(f"Out of memory on rank {self.dist.rank} with batch size {self.batch_size} "
                                     "per rank; rerun with a smaller --batch-size.") from None
                self.opt.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size //= 2
                log.warning("Out of memory; retrying with batch size %d.", self.batch_size)

    @torch.no_grad()
    def validate(self) -> float:
        if len(self.val) == 0:
            return float("nan")
        self.model.eval()
        g = torch.Generator().manual_seed(12345)
        losses = []
        for start in range(0, len(self.val), 128):
            x = self.val[start : start + 128].to(self.device)
            xc, _ = random_rectangles(x, g, value_range=(0.0, float(self.pre.clip_max)))
            losses.append(cevae_loss(self.model, x, xc, self.cfg.loss)[0].item() * len(x))
        self.model.train()
        return sum(losses) / len(self.val)

    # ---- checkpoints --------------------------------------------------------------------
    def _last_good(self) -> str:
        if self.saved_step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (step {self.saved_step}) is kept at {self.cfg.checkpoint_path}."

    def save_checkpoint(self) -> None:
        """Write the resumable state atomically; refuse weights that are no longer finite."""
        if not self.dist.main:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise CeVAEError(f"The model weights became NaN or infinite by step {self.step}; training "
                             f"stopped. {self._last_good()} Try a lower learning rate.")
        state = {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step, "epoch": self.epoch, "offset": self.offset,
            "batch_size": self.batch_size, "world": self.dist.world,
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "model_cfg": self.cfg.model.to_dict(),
        }
        _atomic_torch_save(state, self.cfg.checkpoint_path)
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        """Every rank reads the checkpoint that rank 0 wrote (with several nodes, on a shared disk)."""
        path = self.cfg.checkpoint_path
        if not path.is_file():
            shared = " (with several nodes, --out must be on a disk all nodes share)" if self.dist.world > 1 else ""
            raise CeVAEError(f"--resume was given but there is no checkpoint at {path}{shared}.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling is restricted to tensors and plain containers
            raise CeVAEError(f"The checkpoint {path} cannot be read safely: {exc}") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("model_cfg") != self.cfg.model.to_dict():
            raise CeVAEError(f"The checkpoint {path} belongs to another model configuration.")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:  # --lr applies on resume (e.g. lowered after a NaN stop)
            if group["lr"] != self.cfg.lr:
                log.info("Learning rate %g (the checkpoint used %g).", self.cfg.lr, group["lr"])
                group["lr"] = self.cfg.lr
        self.step, self.epoch, self.offset = state["step"], state["epoch"], state["offset"]
        self.batch_size = state["batch_size"]
        saved_world = state.get("world", 1)
        if saved_world != self.dist.world:
            log.warning("The checkpoint was written by %d rank(s), this run has %d: the effective batch size "
                        "becomes %d and the current epoch starts over.", saved_world, self.dist.world,
                        self.batch_size * self.dist.world)
            self.offset = 0
        if self.dist.main:  # other ranks keep their own streams, offset by rank
            self.gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
        else:
            self.gen.manual_seed(self.cfg.seed * 1000 + self.dist.rank + 7919 * self.step)
            torch.manual_seed(self.cfg.seed * 1000 + self.dist.rank + 7919 * self.step)
        self.saved_step = self.step
        log.info("Resumed from %s at step %d.", path, self.step)

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> Optional[Path]:
        """Train, then (rank 0) write the bundle; leave the process group when done."""
        try:
            return self._run()
        finally:
            shutdown_distributed(self.dist)

    def _run(self) -> Optional[Path]:
        cfg = self.cfg
        if self.dist.main:
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
        self._load_data()
        if cfg.resume:
            self.load_checkpoint()
            if self.dist.main:
                _truncate_log(cfg.log_path, self.step)
        elif self.dist.main and cfg.log_path.exists():
            cfg.log_path.unlink()
        if self.dist.main:
            log.info("Device %s, %d rank(s)%s; batch size %d per rank, effective batch size %d; learning rate %g "
                     "(one step per effective batch, gradients averaged over it).", self.device, self.dist.world,
                     f" ({dist.get_backend()})" if self.dist.world > 1 else "", self.batch_size,
                     self.batch_size * self.dist.world, cfg.lr)
        self.model.train()
        start = time.perf_counter()
        batches = self._batches()
        deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        logf = open(cfg.log_path, "a", newline="") if self.dist.main else None
        writer = csv.writer(logf) if logf else None
        if writer and logf.tell() == 0:
            writer.writerow(["step", "loss", "kl", "rec_vae", "rec_ce", "val_loss", "seconds", "slices_per_s"])
        t_last, steps_since = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps and not self._time_up(deadline):
                terms = self.step_with_oom_retry(next(batches))
                self.step += 1
                steps_since += 1
                val = ""
                if (self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps) and self.dist.main:
                    val = self.validate()
                    self.save_checkpoint()
                if writer and (self.step % 10 == 0 or val != ""):
                    now = time.perf_counter()
                    rate = steps_since * self.batch_size * self.dist.world / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    writer.writerow([self.step, terms["loss"], terms.get("kl", ""), terms.get("rec_vae", ""),
                                     terms.get("rec_ce", ""), val, round(now - start, 2), round(rate, 1)])
                    logf.flush()
                report(self.progress, self.step / cfg.max_steps,
                       f"step {self.step} loss {terms['loss']:.4f}")
        finally:
            if logf:
                logf.close()
        if self.dist.world > 1:
            self._check_replicas()
        self.save_checkpoint()
        if self.dist.world > 1:  # all ranks leave the group together, before rank 0's bundle work
            dist.barrier()
        shutdown_distributed(self.dist)
        elapsed = time.perf_counter() - start
        if not self.dist.main:
            return None
        return self._write_bundle(elapsed)

    def _time_up(self, deadline: float) -> bool:
        up = time.perf_counter() >= deadline
        if self.dist.world > 1:  # all ranks must stop at the same step
            flag = torch.tensor([1.0 if up else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            up = bool(flag.item())
        return up

    def _check_replicas(self) -> None:
        """Log every rank's parameter checksum; rank 0 says whether the replicas agree."""
        mine = parameter_checksum(self.model)
        log.info("Rank %d of %d: parameter checksum %s.", self.dist.rank, self.dist.world, mine)
        sums: List[Optional[str]] = [None] * self.dist.world
        dist.all_gather_object(sums, mine)
        if not self.dist.main:
            return
        if len(set(sums)) == 1:
            log.info("The model replicas of all %d ranks are identical.", self.dist.world)
        else:
            log.error("The model replicas differ between ranks (checksums %s); the bundle holds rank 0's.",
                      ", ".join(s[:12] for s in sums))

    def _write_bundle(self, elapsed: float) -> Path:
        from .. import __version__

        score_opts = ScoreOptions()
        post = RECOMMENDED
        header = {
            "name": self.cfg.out.stem,
            "modality": "T1",
            "preprocess": self.pre.to_dict(),
            "loss": self.cfg.loss.to_dict(),
            "score_options": score_opts.to_dict(),
            "postprocess": post.to_dict(),
            "training": {
                "subjects": [{"name": s.name, "sha256": sha256_of(s.image)} for s in self.train_subjects],
                "validation_subjects": [{"name": s.name, "sha256": sha256_of(s.image)} for s in self.val_subjects],
                "train_slices": len(self.train), "orientations": list(self.cfg.orientations),
                "steps": self.step, "batch_size": self.batch_size * self.dist.world, "lr": self.cfg.lr,
                "seed": self.cfg.seed, "seconds": round(elapsed, 1), "ranks": self.dist.world,
                "augment": asdict(self.cfg.augment), "val_loss": self.validate(),
            },
            "versions": {"cevae_anomaly": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        path = save_bundle(self.cfg.out, self.model, header, half=self.cfg.half_bundle)
        calib_subjects = self.val_subjects or self.train_subjects
        source = "validation subjects" if self.val_subjects else "training subjects (no held-out subject)"
        bundle = load_bundle(path, self.device)
        header["calibration"] = calibrate_model(bundle, calib_subjects, source, score_opts, post)
        return save_bundle(self.cfg.out, self.model, header, half=self.cfg.half_bundle)
