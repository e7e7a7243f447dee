"""The training loop: data from the slice cache, steps, validation, checkpoints, then the bundle.

Rank 0 alone writes the log, checkpoints and the bundle. Checkpoints hold the model,
optimiser, gradient scaler, sampler position and RNG states, so ``--resume`` continues the same run.
Distributed set-up lives in distributed.py, checkpoint files in checkpoint.py, the bundle in packaging.py.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist

from ..engine.calibration import largest_side
from ..engine.config import ModelConfig, PreprocessConfig
from ..engine.corruption import random_rectangles
from ..engine.devices import mixed_precision, resolve_device
from ..engine.modality import TOLERANCE, depth_contrast, unlike
from ..engine.model import CeVAE, cevae_loss
from ..errors import COMMAND_LINE_TRAIN, CeVAEError, RunFailed, Wording, out_of_memory
from ..io.atomic import remove_stale_temporaries, write_all
from ..io.checksum import FileMemo, content_checksums, sha256_of
from ..io.manifest import distinct_names, unknown_persons_note
from ..io.naming import full_suffix
from ..io.targets import write_remedy
from ..progress import ProgressCallback, checked, report
from ..system import usable_cores
from .augment import augment
from .cache import (SLICING_VERSION, Entry, SliceCache, SliceSet, UnreadVolumes, refuse_cache_among_inputs,
                    temporary_cache)
from .checkpoint import (CHECKPOINT_VERSION, check_same_run, damaged, optimizer_problem, read_checkpoint,
                         run_differences, run_identity, truncate_log, weights_problem, with_slicing,
                         write_checkpoint)
from .config import LOG_HEADER, TrainConfig
from .data import Subject, person_groups, persons_to_hold_out, split_subjects, unique_subjects, voxel_checksums
from .distributed import (DistInfo, any_rank, barrier, check_replicas, file_checksums, gather_objects, mean_over_ranks,
                          shared_map, init_distributed, rank_device, rank_seed, shutdown_distributed,
                          wait_for_ranks)
from .packaging import TrainingRecord, package, person_numbers, subject_records, training_header, with_contrast
from .said_once import each_warning_once
from .sampler import EpochSampler, resumed_offset

log = logging.getLogger(__name__)
VALIDATION_SEED = 12345


@contextmanager
def _own_randomness(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with torch's global random streams (the CPU's and ``device``'s) seeded with ``seed``, then
    put them back as they were."""
    cpu, accelerator = torch.get_rng_state(), _device_rng(device)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        _set_device_rng(device, accelerator)


class _RunLog:
    """The loss log, ``OUT.log.csv``. A fresh run over an earlier run's log holds its rows in memory until its first
    checkpoint replaces the earlier run's, so that a run stopped before that leaves the earlier run's files (bundle,
    checkpoint, log) together. The earlier bundle is never removed here: it stays in place, usable, until this run's
    bundle replaces it (:meth:`Trainer.run`). ``after_failure(error)`` ends the error of a write that failed (what
    is kept, what to do)."""

    def __init__(self, path: Path, fresh: bool, after_failure: Callable[[BaseException], str]) -> None:
        self.path, self._after_failure, self._failed = path, after_failure, False
        self._held: Optional[io.StringIO] = io.StringIO() if fresh and path.exists() else None
        self._file = self._held if self._held is not None else _log_file(path, "a" if not fresh else "w")
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._writer.writerow(LOG_HEADER)
            self._file.flush()  # a run killed before its first row leaves a log that says what it is

    def row(self, values: List[object]) -> None:
        with self._writing():
            self._writer.writerow(values)
            self._file.flush()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write of the log (a full disk, between checkpoints) as an error in words, with what is kept."""
        try:
            yield
        except OSError as exc:
            self._failed = True
            raise CeVAEError(f"Could not write the training log {self.path}: {exc.strerror or exc}. "
                             f"{self._after_failure(exc)}") from None

    def publish(self) -> None:
        """This run has a checkpoint now: its rows replace the earlier run's log."""
        if self._held is not None:
            rows, self._held = self._held.getvalue(), None
            with self._writing():
                self._file = _log_file(self.path, "w")
                self._file.write(rows)
                self._file.flush()
            self._writer = csv.writer(self._file)

    def close(self) -> None:
        """Close the file (rows still held are dropped with this run: the earlier log stays)."""
        if self._held is None:
            try:
                self._file.close()
            except OSError:  # (the rows it could not flush: a write that failed already says so)
                if not self._failed:
                    raise


def _csv_cells(values: List[object]) -> List[str]:
    """A log row's cells as the log's reader gets them back (:func:`~.checkpoint.truncate_log`)."""
    text = io.StringIO()
    csv.writer(text).writerow(values)
    return next(csv.reader(io.StringIO(text.getvalue())))


def _cells_or_none(value: object) -> Optional[List[str]]:
    """A log row as a checkpoint records it (a list of text cells); None for anything else."""
    return list(value) if isinstance(value, list) and all(isinstance(c, str) for c in value) else None


def _log_file(path: Path, mode: str) -> TextIO:
    """The log opened for writing (``mode`` "w") or appending; a symbolic link there is replaced, not written through,
    when a fresh log is written (as the bundle and checkpoint replace theirs): the file it points to is not the
    run's. A log that shares its file with another name (a hard link: a backup made with ``cp -al`` or ``rsync
    --link-dest``) gets a file of its own first, so that the other name keeps what it held."""
    if mode == "w" and path.is_symlink():
        path.unlink()
    elif _hard_linked(path):
        if mode == "w":
            path.unlink()
        else:
            write_all({path: path.read_bytes()}, overwrite=True)  # a copy under its name: a new file, the same rows
    return open(path, mode, newline="", encoding="utf-8")


def _hard_linked(path: Path) -> bool:
    """Whether the regular file at ``path`` (not a symbolic link) has other names too."""
    try:
        return not path.is_symlink() and path.stat().st_nlink > 1
    except OSError:  # no file yet
        return False


def _device_rng(device: torch.device) -> Dict[str, object]:
    """The random state of ``device``'s own generator (CUDA, MPS: the latent samples drawn there), for a checkpoint;
    empty on the CPU, whose state is saved on its own."""
    if device.type == "cuda":
        return {"type": "cuda", "state": torch.cuda.get_rng_state(device)}
    if device.type == "mps":
        return {"type": "mps", "state": torch.mps.get_rng_state()}
    return {}


def _set_device_rng(device: torch.device, saved: object) -> None:
    """Restore what :func:`_device_rng` saved, when the run resumes on the same kind of device."""
    if not isinstance(saved, dict) or saved.get("type") != device.type:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["state"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(saved["state"])


def _grad_scaler(enabled: bool):
    """A gradient scaler for fp16 autocast on CUDA (a no-op when disabled)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


class Trainer:
    """One training run; ``run()`` returns the bundle path (on rank 0)."""

    def __init__(
        self,
        cfg: TrainConfig,
        subjects: Sequence[Subject],
        preprocess: Optional[PreprocessConfig] = None,
        progress: Optional[ProgressCallback] = None,
        start_weights: Optional[Mapping[str, torch.Tensor]] = None,
        wording: Wording = COMMAND_LINE_TRAIN,
        memo: Optional[FileMemo] = None,
        start_sha256: Optional[str] = None,
        on_first_checkpoint: Optional[Callable[[], None]] = None,
    ) -> None:
        """``start_weights``: those of ``cfg.init_from``, already loaded and checked (adapt loads its base model once
        for all its runs, so a file replaced meanwhile cannot start some of them); None reads them from the file.
        ``wording``: the caller's words for what its errors advise (resuming, starting anew, using less memory).
        ``memo``: what the caller read of the volumes already (adapt's, shared by its runs: a volume unchanged since
        it was hashed is not read again). ``start_sha256``: that of the file ``start_weights`` were loaded from, which
        the checkpoints record (the file is not hashed again: one replaced meanwhile is not what the run started from).
        ``on_first_checkpoint``: called (rank 0) once this run's first checkpoint and log are written (adapt
        --overwrite removes the earlier adaptation's other files then).
        """
        cfg.validate()
        if cfg.cache_dir is not None:  # before any volume is hashed
            refuse_cache_among_inputs(Path(cfg.cache_dir), subjects, wording)
        self.cfg = cfg
        self.wording = wording
        self.progress = checked(progress)
        self.pre = preprocess or PreprocessConfig(input_size=cfg.model.input_size)
        if self.pre.input_size != cfg.model.input_size:
            raise CeVAEError("Preprocessing and model input sizes differ.")
        self.device = rank_device(resolve_device(cfg.device, strict=True))
        self.dist = init_distributed(self.device)
        self.memo = memo if memo is not None else FileMemo()
        self.start_sha256 = start_sha256
        self._on_first_checkpoint = on_first_checkpoint
        self.checksums = file_checksums(subjects, self.dist, self.memo)
        self._identity: Optional[Dict[str, object]] = None
        self._resume_state: Optional[Dict[str, object]] = None  # the checkpoint a resume continues, once checked
        self._checkpoint: Optional[Dict[str, object]] = None  # the checkpoint a resume continues, once read
        subjects = content_order(subjects, self.checksums)  # not as listed: how they are listed or named is no matter
        # the same scan in two files (another format, compressed or not) is one scan: by its voxels, not its bytes
        subjects = unique_subjects(subjects, _shared_voxel_checksums(subjects, self.checksums, self.dist))
        self.train_subjects, self.val_subjects = split_subjects(subjects, cfg.val_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = CeVAE(cfg.model).to(self.device)
        if cfg.init_from is not None:  # fine-tuning: start from a trained model's weights
            self.model.load_state_dict(start_weights if start_weights is not None else
                                       initial_weights(cfg.init_from, cfg.model))
        self.net: torch.nn.Module = self.model
        if self.dist.world > 1:  # the wrapper averages gradients over ranks during backward
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if not self.dist.main:  # own latent-sampling noise per rank
                torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.fp16 = cfg.amp and self.device.type == "cuda"  # bf16 (CPU) needs no loss scaling
        self.scaler = _grad_scaler(self.fp16)
        self.autocast = mixed_precision(self.device, cfg.amp)  # (refused here where torch has none)
        self.gen = torch.Generator().manual_seed(rank_seed(cfg.seed, self.dist.rank))
        self.step = 0
        self.epoch = 0
        self.offset = 0  # batches consumed in the current epoch
        self._offset_of: Optional[Tuple[int, int]] = None  # (batch size, ranks) of a resumed offset counted in others
        self.batch_size = cfg.batch_size
        self.saved_step: Optional[int] = None  # step of the last checkpoint written or resumed from
        self._validated: Optional[Tuple[int, float]] = None  # (step, validation loss) of the last validation
        self.seconds_before = 0.0  # training seconds of the parts of this run before a resume
        self.parts: List[Dict[str, object]] = []  # from which step the run trained with which lr and ranks
        self._started: Optional[float] = None  # when this part's training loop started
        self._step_ended = 0.0  # when its last step ended: the time a checkpoint and the log row of that step record
        self._temp_cache: Optional[str] = None
        self._said_workers = False  # that fewer loader workers than asked read the slices (said once a run)
        self.contrasts: List[Optional[float]] = []  # each training volume's depth contrast (engine/modality.py)
        # the sha256 of the earlier model at --out that this run replaces when it writes its own (it stays until
        # then), as its checkpoints record it: a resume knows that model for the earlier one, not this run's
        self.replaces: Optional[str] = None
        # the first row of this run's loss log (its cells), as its checkpoints record it: a resume knows the log of
        # its run from another's (an earlier run's, left by a fresh run stopped before it wrote its own log)
        self.log_first_row: Optional[List[str]] = None
        # the log row of the step a checkpoint is written at, which it records: a stop raised right after the write
        # comes before the row is, and a resume puts the row back (it goes on from the next step)
        self.checkpoint_row: Optional[List[str]] = None

    # ---- data -------------------------------------------------------------------------
    def open_data(self) -> None:
        """Preprocess what the cache lacks, then open the training and validation slice sets."""
        t = time.perf_counter()
        root = self.cfg.cache_dir
        if root is None:  # a private cache for this run (each rank its own), removed at the end
            root = temporary_cache("cevae-slices-", self.wording)
            self._temp_cache = str(root)
        cache = SliceCache(root, self.pre, self.wording, self.memo)
        if self.dist.world > 1 and self.cfg.cache_dir is not None:  # a shared cache: ranks split the work
            self._prepare_share(cache)
        unread: Optional[UnreadVolumes] = None
        try:
            train = cache.prepare(self.train_subjects, self.checksums, self.cfg.orientations)
        except UnreadVolumes as exc:  # the held-out volumes are read too: all a cohort's damaged scans said at once
            unread = exc
        try:
            val = cache.prepare(self.val_subjects, self.checksums, ("axial",))
        except UnreadVolumes as exc:
            unread = exc if unread is None else unread.joined(exc)
        if unread is not None:
            raise unread
        self.train = SliceSet([e for entries in train for e in entries], self.pre.input_size, self.wording)
        self.contrasts = [_contrast(s, entries[0]) for s, entries in zip(self.train_subjects, train)]
        self.val = SliceSet([e for entries in val for e in entries], self.pre.input_size, self.wording)
        if self.dist.main:
            axial = list(self.cfg.orientations).index("axial")
            _warn_of_rewritten_repeats([*zip(self.train_subjects, (e[axial] for e in train)),
                                        *zip(self.val_subjects, (e[0] for e in val))], len(self.train_subjects))
            held_out = [_contrast(s, e[0], "the check of the volumes' contrasts")
                        for s, e in zip(self.val_subjects, val)]
            _warn_of_other_contrasts([*self.train_subjects, *self.val_subjects], [*self.contrasts, *held_out])
        if len(self.train) < self.cfg.batch_size:
            log.warning("Only %d training slices for batch size %d.", len(self.train), self.cfg.batch_size)
        if len(self.train) == 0:
            raise CeVAEError("No training slices: the images have no brain voxels.")
        log.info("Loaded %d training slices (%s), %d validation slices (%s) in %.1f s.", len(self.train),
                 _of_persons(self.train_subjects), len(self.val), _of_persons(self.val_subjects),
                 time.perf_counter() - t)

    def _prepare_share(self, cache: SliceCache) -> None:
        """Preprocess this rank's share of the subjects; every rank stops if any of them failed. The volumes that
        cannot be read, of every rank's share, held-out ones included, are named together in one error (as one
        process names them), not each rank's first."""
        share = slice(self.dist.rank, None, self.dist.world)
        unread: List[List[str]] = [[], []]  # this share's training, then held-out volumes that cannot be read
        error: Optional[CeVAEError] = None
        try:
            for n, (subjects, orientations) in enumerate(((self.train_subjects[share], self.cfg.orientations),
                                                          (self.val_subjects[share], ("axial",)))):
                try:
                    cache.prepare(subjects, self.checksums, orientations)
                except UnreadVolumes as exc:
                    unread[n] = exc.problems
        except CeVAEError as exc:
            error = exc
        wait_for_ranks(self.dist)  # (the shares may take very different times)
        ranks = gather_objects(self.dist, (unread, error is not None))
        problems = [p for part in (0, 1) for mine, _ in ranks for p in mine[part]]
        if error is not None:
            raise error
        if problems:
            raise UnreadVolumes(problems, len(self.train_subjects) + len(self.val_subjects))
        if any(failed for _, failed in ranks):
            raise CeVAEError("Another rank could not preprocess its share of the volumes; see its error message.")

    def batches(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Endless (epoch, batch number, slices) from the current sampler position; ranks see disjoint
        shards of each epoch. Worker processes read ahead; the position is what the loop consumed."""
        workers, why = loader_workers(self.cfg.loader_workers, self.device.type, usable_cores())
        if why and self.dist.main and not self._said_workers:
            log.warning("%s: the slices are read by %d worker process(es).", why, workers)
            self._said_workers = True
        sampler = EpochSampler(len(self.train), self.dist.world, self.dist.rank, self.cfg.seed,
                               lambda: self.batch_size, self.epoch, self.offset)
        loader = torch.utils.data.DataLoader(
            _Batches(self.train, self.cfg.augment.slab, self.cfg.seed), sampler=sampler, batch_size=None,
            num_workers=workers, pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
            generator=torch.Generator())  # its seed draw must not advance the global RNG (exact resume)
        return _unwrapped(iter(loader))

    # ---- steps --------------------------------------------------------------------------
    def _train_step(self, batch: torch.Tensor) -> Dict[str, float]:
        x = augment(batch.to(self.device, non_blocking=True), self.cfg.augment, self.gen)
        xc, _ = random_rectangles(x, self.gen, value_range=(0.0, float(self.pre.clip_max)))
        with self.autocast:
            loss, terms = cevae_loss(self.net, x, xc, self.cfg.loss)
        if not torch.isfinite(loss):
            raise CeVAEError(f"The loss became {loss.item()} at step {self.step}; training stopped. "
                             f"{self._last_good()} Try a lower learning rate.")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return {k: float(v) for k, v in terms.items()}

    def step_with_oom_retry(self, batch: torch.Tensor, step_fn: Optional[Callable] = None) -> Dict[str, float]:
        """Run a step; on out-of-memory halve the batch size and retry (saying so)."""
        step_fn = step_fn or self._train_step
        while True:
            try:
                return step_fn(batch[: self.batch_size])
            except RuntimeError as exc:
                if not out_of_memory(exc):  # CUDA's, MPS's, or the CPU allocator's words
                    raise
                if self.batch_size <= 1:
                    raise RunFailed(f"Out of memory even with batch size 1 on {self.device}; "
                                    f"{self.wording.less_memory}.") from None
                if self.dist.world > 1:  # ranks cannot shrink their batches independently
                    resume = "" if self.saved_step is None else " and --resume"
                    raise RunFailed(f"Out of memory on rank {self.dist.rank} with batch size {self.batch_size} "
                                    f"per rank; rerun with a smaller --batch-size{resume}.") from None
                self.opt.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size //= 2
                log.warning("Out of memory; retrying with batch size %d.", self.batch_size)

    @torch.no_grad()
    def validate(self) -> float:
        """The mean loss on the validation slices (NaN without any), with randomness of its own: it leaves the
        training's random streams as they were, so how often it runs (every checkpoint) does not change the
        training, and a resumed run continues exactly."""
        if len(self.val) == 0:
            return float("nan")
        if self._validated is not None and self._validated[0] == self.step:
            return self._validated[1]
        self.model.eval()
        g = torch.Generator().manual_seed(VALIDATION_SEED)
        losses = []
        with _own_randomness(self.device, VALIDATION_SEED):  # the latent samples of the loss
            for start in range(0, len(self.val), 128):
                x = self.val[range(start, min(start + 128, len(self.val)))].to(self.device)
                xc, _ = random_rectangles(x, g, value_range=(0.0, float(self.pre.clip_max)))
                losses.append(cevae_loss(self.model, x, xc, self.cfg.loss)[0].item() * len(x))
        self.model.train()
        self._validated = (self.step, sum(losses) / len(self.val))
        return self._validated[1]

    # ---- checkpoints --------------------------------------------------------------------
    def _last_good(self) -> str:
        if self.saved_step is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint (step {self.saved_step}) is kept at {self.cfg.checkpoint_path}."

    def _after_write_failure(self, exc: BaseException) -> str:
        """What a failed write of the log or a checkpoint says after its cause ``exc``: the checkpoint kept, if any,
        and what to do (:func:`~..io.targets.write_remedy`)."""
        then = self.wording.run_again if self.saved_step is None else f"{self.wording.resume} to go on from it"
        return f"{self._last_good()} {write_remedy(exc, self.cfg.checkpoint_path.parent)}, then {then}."

    def save_checkpoint(self) -> None:
        """Every rank: gather the ranks' random streams (a collective), then rank 0 writes the resumable state."""
        streams = gather_objects(self.dist, {"gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                                             "device_rng": _device_rng(self.device)})
        self._write_checkpoint(streams)
        self.saved_step = self.step

    def _write_checkpoint(self, streams: List[Dict[str, object]]) -> None:
        """(Rank 0) write the resumable state atomically, with every rank's random ``streams``; refuse weights that
        are no longer finite."""
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
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "device_rng": _device_rng(self.device),
            "rank_streams": streams[1:],  # the other ranks' (rank 1 first)
            "parts": self.parts or [self._part(0)],
            "seconds": self.seconds_before + (self._step_ended - self._started if self._started else 0.0),
            "model_cfg": self.cfg.model.to_dict(), "run": self.run_identity(), "replaces": self.replaces,
            "log_first_row": self.log_first_row, "log_row": self.checkpoint_row,
        }
        if self.fp16:
            state["scaler"] = self.scaler.state_dict()
        write_checkpoint(state, self.cfg.checkpoint_path, advice=self._after_write_failure)

    def _part(self, step: int) -> Dict[str, object]:
        """This session's settings that a resume may change, from ``step`` on (the training record's ``parts``): the
        learning rate, ranks, batch size and the kind of device (with --amp, float16 on CUDA, bfloat16 on the CPU)."""
        return {"from_step": step, "lr": self.cfg.lr, "ranks": self.dist.world, "batch_size": self.cfg.batch_size,
                "device": self.device.type}

    def run_identity(self) -> Dict[str, object]:
        """This run's options (preprocessing included), volumes and split, as checkpoints record them; made once
        (the base model of a fine-tuning is read for its checksum once, not at every checkpoint)."""
        if self._identity is None:
            self._identity = self._identity_with(self.train_subjects, self.val_subjects)
        return self._identity

    def _identity_with(self, train: Sequence[Subject], val: Sequence[Subject]) -> Dict[str, object]:
        options = dict(self.cfg.run_options(self.start_sha256), preprocess=self.pre.to_dict(), slicing=SLICING_VERSION)
        return run_identity(options, train, val, self.checksums)

    def check_resume(self) -> Dict[str, object]:
        """The state of the checkpoint a resume continues from, refused if it is damaged, of another run, or its
        weights or optimiser state are not this model's (before any work: adapt checks every run's checkpoint before
        its first run trains); read and checked once."""
        if self._resume_state is None:
            path = self.cfg.checkpoint_path
            state = self.resume_checkpoint()
            saved = with_slicing(state, SLICING_VERSION, path, self.wording)
            self._follow_checkpoint_order(saved)
            check_same_run(saved, self.run_identity(), path, self.wording)
            step = state.get("step")
            if isinstance(step, int) and step > self.cfg.max_steps:  # the run would end at the checkpoint's step
                raise CeVAEError(f"{self.wording.resume_request} refused: the checkpoint {path} is at step {step}, "
                                 f"{self.wording.past_the_end.format(steps=self.cfg.max_steps, step=step)}.")
            problem = weights_problem(self.model, state["model"])  # (load_state_dict would cast their dtype)
            if problem:
                raise damaged(path, f"its weights do not fit this run: {problem}", self.wording)
            problem = optimizer_problem(self.opt, state["opt"])
            if problem:
                raise damaged(path, f"its optimiser state does not fit this run: {problem}", self.wording)
            self._resume_state = state
        return self._resume_state

    def resume_checkpoint(self) -> Dict[str, object]:
        """The checkpoint a resume continues from, read once (refused if damaged), not yet checked to be of this run
        (:meth:`check_resume`)."""
        if self._checkpoint is None:
            hint = " (with several nodes, --out must be on a disk all nodes share)" if self.dist.world > 1 else ""
            self._checkpoint = read_checkpoint(self.cfg.checkpoint_path, self.cfg.model.to_dict(), hint, self.wording)
        return self._checkpoint

    def _follow_checkpoint_order(self, saved: object) -> None:
        """Where this run lists the checkpoint's volumes in another order (a manifest regenerated, a folder given
        instead) and is otherwise its run, go on with the checkpoint's order and split: the restored sampler's place
        counts slices in that order, and the split depends on it. Anything else is left to :func:`check_same_run`
        to name."""
        def key(subject: Subject) -> Tuple[str, Optional[str]]:
            return self.checksums[subject.image], self.checksums[subject.mask] if subject.mask is not None else None

        mine = {key(s): s for s in (*self.train_subjects, *self.val_subjects)}
        try:
            train, val = ([mine[(v["image_sha256"], v["mask_sha256"])] for v in saved[role]]  # type: ignore[index]
                          for role in ("train", "validation"))
        except (KeyError, TypeError):
            return
        if len(train) + len(val) != len(mine) or (train, val) == (self.train_subjects, self.val_subjects):
            return
        changed, volumes, _ = run_differences(saved, self._identity_with(train, val))  # type: ignore[arg-type]
        if changed or volumes:
            return
        if self.dist.main:  # (a fact of the run: every rank follows the checkpoint's order)
            log.info("The volumes are listed in another order than in the run being resumed; it goes on with its "
                     "own order and training/validation split.")
        self.train_subjects, self.val_subjects, self._identity = train, val, None

    def load_checkpoint(self) -> None:
        """Every rank reads the checkpoint that rank 0 wrote (with several nodes, on a shared disk)."""
        path = self.cfg.checkpoint_path
        state = self.check_resume()
        self._resume_state = None  # (held only for this load: its weights and optimiser state are not kept)
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            others = state.get("rank_streams")  # (earlier checkpoints held rank 0's alone)
            fits = isinstance(others, list) and len(others) == self.dist.world - 1
            own = state if self.dist.main else others[self.dist.rank - 1] if fits else None
            if own is not None:
                self.gen.set_state(own["gen"])
                torch.set_rng_state(own["torch_rng"])
                _set_device_rng(self.device, own.get("device_rng"))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise damaged(path, f"its weights or states do not fit this run: {type(exc).__name__}",
                          self.wording) from None
        parts = state.get("parts")
        self.parts = list(parts) if isinstance(parts, list) and all(isinstance(p, dict) for p in parts) else [
            {"from_step": 0, "lr": self.opt.param_groups[0]["lr"], "ranks": state.get("world", 1)}]  # (earlier)
        # the batch size the run was given (parts of earlier versions lack it: it defined their whole run)
        asked = self.parts[-1].get("batch_size", state["run"]["options"].get("batch_size", state["batch_size"]))
        self.parts = [{**p, "batch_size": p.get("batch_size", asked)} for p in self.parts]
        now, last = self._part(state["step"]), self.parts[-1]
        device = last.get("device", now["device"])  # (parts of earlier versions name none: taken as no change)
        if (now["lr"], now["ranks"], now["batch_size"], now["device"]) != (last.get("lr"), last.get("ranks"), asked,
                                                                           device):
            self.parts.append(now)  # resumed with another lr, number of ranks, batch size or kind of device
        # the changes below are the whole run's: rank 0 says them (every rank did, 8 ranks 8 times each)
        for group in self.opt.param_groups:  # --lr applies on resume (e.g. lowered after a NaN stop)
            if group["lr"] != self.cfg.lr:
                if self.dist.main:
                    log.info("Learning rate %g (the checkpoint used %g).", self.cfg.lr, group["lr"])
                group["lr"] = self.cfg.lr
        if self.fp16 and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.offset = state["step"], state["epoch"], state["offset"]
        seconds = state.get("seconds", 0.0)  # (older checkpoints of this version did not record it)
        self.seconds_before = float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 0.0
        self.batch_size = state["batch_size"]  # (halved after running out of memory: kept)
        if self.cfg.batch_size != asked:
            if self.dist.main:
                log.warning("Batch size %d per rank (the checkpoint's run was given %d); the learning rate is not "
                            "rescaled.", self.cfg.batch_size, asked)
            self.batch_size = self.cfg.batch_size
        saved_world = state.get("world", 1)
        if saved_world != self.dist.world and self.dist.main:
            log.warning("The checkpoint was written by %d rank(s), this run has %d: the effective batch size is %d "
                        "(it was %d).", saved_world, self.dist.world, self.batch_size * self.dist.world,
                        state["batch_size"] * saved_world)
        if (state["batch_size"], saved_world) != (self.batch_size, self.dist.world):  # placed once the data is open
            self._offset_of = (state["batch_size"], saved_world)
        if own is None:  # a rank whose streams the checkpoint lacks draws new ones, offset by rank and step
            self.gen.manual_seed(rank_seed(self.cfg.seed, self.dist.rank, self.step))
            torch.manual_seed(rank_seed(self.cfg.seed, self.dist.rank, self.step))
        self.saved_step = self.step
        if self.dist.main:
            log.info("Resumed from %s at step %d.", path, self.step)
        first = state.get("log_first_row")  # (checkpoints of earlier versions lack it: the log's own first row then)
        self.log_first_row = _cells_or_none(first)
        self.checkpoint_row = _cells_or_none(state.get("log_row"))  # (checkpoints of earlier versions lack it)
        replaces = state.get("replaces")  # (checkpoints of earlier versions lack it)
        self.replaces = replaces if isinstance(replaces, str) else None
        if self.dist.main and self.replaces is not None and self.cfg.out.is_file() \
                and sha256_of(self.cfg.out) == self.replaces:
            log.info("%s is still the earlier model this run replaces: it stays in place until this run writes its "
                     "own.", self.cfg.out)

    # ---- the run ------------------------------------------------------------------------
    def run(self) -> Optional[Path]:
        """Train, then (rank 0) write the bundle; leave the process group and remove a temporary cache. A resume of
        a run that wrote its model at its last step is refused: it would write that model again without a step."""
        with self._session(), each_warning_once():  # a held-out scan is masked for its slices and its scores
            if self.cfg.resume:
                self._refuse_finished()
            self._say_before()
            elapsed = self._train()
            return self._write_bundle(elapsed) if self.dist.main else None

    def _say_before(self) -> None:
        """What rank 0 says of the volumes and the earlier model before training."""
        note = unknown_persons_note([*self.train_subjects, *self.val_subjects], self.wording.unknown_persons,
                                    self.wording.same_person)
        if note and self.dist.main:
            log.info("%s", note)
        if not self.val_subjects and self.dist.main:
            enough = persons_to_hold_out(self.cfg.val_fraction)
            remedy = (f"Give volumes of at least {enough} persons at this fraction" if enough
                      else "Raise --val-fraction above 0")
            log.warning("No volume is held out for validation (%d different volume(s) of %d person(s), "
                        "--val-fraction %g): the model is calibrated on the volumes it was trained on, and its "
                        "threshold will flag more of a new healthy scan than the rate says. %s, or calibrate it "
                        "afterwards on other healthy scans (cevae-anomaly calibrate).", len(self.train_subjects),
                        len(person_groups(self.train_subjects)), self.cfg.val_fraction, remedy)
        elif len(person_groups(self.val_subjects)) == 1 and self.dist.main:  # as calibrate warns of one person's
            log.warning("The model is calibrated on the held-out volume(s) of a single person (%s): no scan of another "
                        "person can show whether they are typical of the protocol (a lesion or an artefact in them "
                        "would raise the threshold unnoticed). Hold out volumes of 2 or more persons (a larger "
                        "--val-fraction, or more volumes), or calibrate it afterwards on healthy scans of 2 or more "
                        "persons (cevae-anomaly calibrate).", ", ".join(str(s.image) for s in self.val_subjects))
        if self.dist.main and not self.cfg.resume and self.cfg.out.is_file():
            log.info("The earlier model %s stays in place, usable, until this run writes the new one (an earlier "
                     "checkpoint and log are replaced at this run's first checkpoint).", self.cfg.out)

    def _refuse_finished(self) -> None:
        """Refuse a resume whose checkpoint is at --max-steps beside the model its run wrote (not the earlier model
        that run replaces, which stays until it writes its own: a run stopped before that still resumes to write
        it), in the words adapt refuses a finished adaptation's."""
        state = self.check_resume()
        step, out = state.get("step"), self.cfg.out
        if step != self.cfg.max_steps or not out.is_file():
            return
        replaces = state.get("replaces")
        if isinstance(replaces, str) and sha256_of(out) == replaces:
            return
        raise CeVAEError(f"The training to {out} is complete (its model file is written, at step {step}); there is "
                         f"nothing to resume at --max-steps {step}: give a higher --max-steps to train it further, or "
                         f"{self.wording.replace_model}.")

    def fit(self) -> float:
        """Train without writing a bundle (the caller packages ``self.model``); the seconds it took."""
        with self._session():
            return self._train()

    @contextmanager
    def _session(self) -> Iterator[None]:
        try:
            yield
        finally:
            shutdown_distributed(self.dist)
            for slices in (getattr(self, "train", None), getattr(self, "val", None)):  # (made by open_data)
                if slices is not None:  # its open files: Windows removes no open file (a later read reopens them)
                    slices.close()
            if self._temp_cache is not None:
                shutil.rmtree(self._temp_cache, ignore_errors=True)

    def _train(self) -> float:
        cfg = self.cfg
        if cfg.resume:  # before the data: a missing or foreign checkpoint is refused before hours of preprocessing
            self.load_checkpoint()
            if self.dist.main:  # (a log of another run is started again)
                self.log_first_row = truncate_log(cfg.log_path, self.step, self.log_first_row, self.checkpoint_row)
        if self.dist.main:
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
            # a checkpoint's temporary that a killed write left (as large as a checkpoint): this run is the output's
            # only writer (the commands hold its lock), so it goes whatever its age
            remove_stale_temporaries(cfg.checkpoint_path, older_than_s=0.0)
            if not cfg.resume and cfg.out.is_file():
                self.replaces = sha256_of(cfg.out)
        self.open_data()
        wait_for_ranks(self.dist)  # (each rank prepared its data in its own time; the first collective follows)
        if self._offset_of is not None:  # the epoch goes on where the checkpoint's batches of another size stopped
            self.offset = resumed_offset(len(self.train), self.offset, self._offset_of,
                                         (self.batch_size, self.dist.world))
            self._offset_of = None
        if self.dist.main:
            log.info("Device %s, %d rank(s)%s; batch size %d per rank, effective batch size %d; learning rate %g "
                     "(one step per effective batch, gradients averaged over it).", self.device, self.dist.world,
                     f" ({dist.get_backend()})" if self.dist.world > 1 else "", self.batch_size,
                     self.batch_size * self.dist.world, cfg.lr)
        self.model.train()
        start = self._started = time.perf_counter()
        batches = self.batches()
        deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        run_log = _RunLog(cfg.log_path, fresh=not cfg.resume, after_failure=self._after_write_failure) \
            if self.dist.main else None
        t_last, steps_since = time.perf_counter(), 0
        try:
            out_of_time = any_rank(self.dist, time.perf_counter() >= deadline, self.device)
            while self.step < cfg.max_steps and not out_of_time:
                epoch, number, batch = next(batches)
                size = self.batch_size
                terms = self.step_with_oom_retry(batch)
                self.epoch, self.offset = epoch, number + 1
                if self.batch_size < size:  # halved (out of memory): the epoch goes on in batches of the new size
                    # from its first slice not trained (the rest of this batch), the position a checkpoint records
                    self.offset = (number * len(batch) + self.batch_size) // self.batch_size
                    batches = self.batches()
                self.step += 1
                steps_since += 1
                self._step_ended = time.perf_counter()  # (a resumed run's rows go on from its checkpoint's time)
                out_of_time = any_rank(self.dist, self._step_ended >= deadline, self.device)
                val: object = ""  # (not measured: between checkpoints, or no volume held out)
                # the last step (--max-steps or --max-minutes) is a checkpoint too, with its row and validation loss
                checkpointed = self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or out_of_time
                if checkpointed and self.dist.main and len(self.val):
                    val = self.validate()
                if checkpointed:  # (the other ranks waited for rank 0's validation)
                    wait_for_ranks(self.dist)
                logged = self.step % 10 == 0 or checkpointed  # the same steps on every rank
                if logged:  # the loss of the effective batch: every rank's share, not rank 0's alone
                    terms = mean_over_ranks(self.dist, terms, self.device)
                row: Optional[List[object]] = None
                if run_log and logged:
                    now = self._step_ended
                    rate = steps_since * self.batch_size * self.dist.world / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    row = [self.step, terms["loss"], terms.get("kl", ""), terms.get("rec_vae", ""),
                           terms.get("rec_ce", ""), val, round(self.seconds_before + now - start, 2), round(rate, 1),
                           1 if checkpointed else ""]
                    if self.log_first_row is None:  # (before the checkpoint of its step, which records it)
                        self.log_first_row = _csv_cells(row)
                if checkpointed:
                    self.checkpoint_row = _csv_cells(row) if row is not None else None
                    self.save_checkpoint()  # (every rank: their random streams are gathered)
                    if run_log:
                        run_log.publish()
                    if self._on_first_checkpoint is not None and self.dist.main:
                        self._on_first_checkpoint()
                        self._on_first_checkpoint = None
                if run_log and row is not None:
                    run_log.row(row)
                report(self.progress, self.step / cfg.max_steps,
                       f"step {self.step} loss {terms['loss']:.4f}")
            if self.step == 0:
                raise CeVAEError(f"No training step was completed: --max-minutes {cfg.max_minutes:g} ran out before "
                                 "the first one. No model or checkpoint was written; allow more minutes.")
            if self.dist.world > 1:
                check_replicas(self.dist, self.model)
            if run_log:
                run_log.publish()
        finally:
            del batches  # stops loader workers
            if run_log:
                run_log.close()
        if self.dist.world > 1:  # all ranks leave the group together, before rank 0's bundle work
            barrier(self.dist)
        shutdown_distributed(self.dist)
        return time.perf_counter() - start

    def record(self, elapsed: float) -> TrainingRecord:
        """How this run trained (the bundle header's ``training`` section)."""
        loss = self.validate()
        names = distinct_names([s.image for s in (*self.train_subjects, *self.val_subjects)])
        persons = person_numbers([*self.train_subjects, *self.val_subjects])
        contents = content_checksums([s.image for s in self.train_subjects], self.checksums, self.memo)
        return TrainingRecord(
            subjects=subject_records(self.train_subjects, self.checksums, names, persons, contents),
            validation_subjects=subject_records(self.val_subjects, self.checksums, names, persons),
            train_slices=len(self.train), orientations=list(self.cfg.orientations), steps=self.step,
            batch_size=min(self.batch_size, math.ceil(len(self.train) / self.dist.world)) * self.dist.world,
            lr=self.cfg.lr, seed=self.cfg.seed,
            seconds=round(self.seconds_before + elapsed, 1), ranks=self.dist.world, augment=asdict(self.cfg.augment),
            val_loss=loss if math.isfinite(loss) else None, amp=self.cfg.amp, device=self.device.type,
            parts=self.parts if len(self.parts) > 1 else None)

    def _write_bundle(self, elapsed: float) -> Path:
        header = with_contrast(training_header(self.cfg.out.stem, self.pre, self.cfg.loss, self.record(elapsed)),
                               self.contrasts)
        calib_subjects = self.val_subjects or self.train_subjects
        source = "validation subjects" if self.val_subjects else "training subjects (no held-out subject)"
        return package(self.cfg.out, self.model, header, calib_subjects, source, self.device, self.cfg.half_bundle,
                       checksums=self.checksums, wording=self.wording, memo=self.memo)


def _warn_of_rewritten_repeats(axial: Sequence[Tuple[Subject, Entry]], trained: int) -> None:
    """Warn of volumes whose axial slices (``axial``: each volume's entry, the first ``trained`` of them training
    volumes) are identical: the same scan saved twice in one format with other file bytes (compressed again, a header
    field changed), which :func:`_shared_voxel_checksums` leaves unread, so it was not used once."""
    first: Dict[str, int] = {}
    for n, (subject, entry) in enumerate(axial):
        if entry.slices == 0:
            continue
        was = first.setdefault(entry.slices_sha256, n)
        if was == n:
            continue
        roles = ["validation" if i >= trained else "training" for i in (was, n)]
        harm = ("the model is validated and calibrated on a scan it was trained on, so its threshold flags more of "
                "a new healthy scan than the rate says" if len(set(roles)) > 1 else
                f"it counts twice among the {roles[0]} volumes")
        log.warning("%s (%s) gives the same slices as %s (%s): the same scan saved twice; %s. Remove one of them "
                    "and train anew.", subject.image, roles[1], axial[was][0].image, roles[0], harm)


def content_order(subjects: Sequence[Subject], checksums: Mapping[Path, str]) -> List[Subject]:
    """``subjects`` in one order that depends on their files' contents alone (``checksums``: each file's sha256), not
    on how they were listed or named: by image sha256, then brain mask sha256 and person. Train and adapt take their
    scans in it before anything else, so the same files listed in any order (a shell glob, a folder listing or a
    manifest on another system), or renamed, give the same split, folds, slice order and so weights for one seed."""
    return sorted(subjects, key=lambda s: (checksums[s.image], checksums[s.mask] if s.mask is not None else "",
                                           s.person or ""))


def _of_persons(subjects: Sequence[Subject]) -> str:
    """How many volumes of how many persons (:attr:`Subject.group`) ``subjects`` are, in words."""
    return f"{len(subjects)} volume(s) of {len(person_groups(subjects))} person(s)"


def _shared_voxel_checksums(subjects: Sequence[Subject], checksums: Dict[Path, str],
                            info: DistInfo) -> Dict[Path, str]:
    """What tells the subjects' images apart, so that the same scan saved in two formats (.nii and .nii.gz, NIfTI
    and NRRD) is one: :func:`~.data.voxel_checksums` of the images whose voxel grid (read from their headers) an
    image of another format shares, the ranks reading a share each; the file checksums of the others, unread
    (reading a large cohort's voxels at every start would cost minutes)."""
    images = sorted({s.image for s in subjects})
    kinds = {p: "series" if p.is_dir() else full_suffix(p).lower() for p in images}
    if len(set(kinds.values())) <= 1:
        return dict(checksums)
    grids = {p: header_grid(p) for p in images}
    formats: Dict[object, set] = {}
    for p in images:
        formats.setdefault(grids[p], set()).add(kinds[p])
    twins = [p for p in images if grids[p] is None or len(formats[grids[p]]) > 1]
    digests = shared_map(lambda share: voxel_checksums(share, checksums), twins, info)
    return {p: digests.get(p, checksums[p]) for p in images}


def _header(path: Path) -> Optional[sitk.ImageFileReader]:
    """A reader holding a volume file's header; None for a series folder or a header ITK cannot read."""
    if path.is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def header_largest_side(path: Path) -> Optional[float]:
    """A volume's largest voxel side (mm, engine.calibration.largest_side) from its header, unrounded, as reading it
    gives it; None for a series folder or a header ITK cannot read."""
    reader = _header(path)
    return None if reader is None else largest_side(reader.GetSpacing())


def header_grid(path: Path) -> Optional[tuple]:
    """A volume's size and geometry (to 0.01 mm) from its header; None for a series folder or a header ITK cannot
    read (compared by voxels then)."""
    reader = _header(path)
    if reader is None:
        return None
    geometry = np.round(np.array([*reader.GetSpacing(), *reader.GetOrigin(), *reader.GetDirection()]), 2) + 0.0
    return tuple(reader.GetSize()), tuple(geometry)


def loader_workers(asked: Optional[int], device_type: str, cores: int) -> Tuple[int, str]:
    """The loader's worker processes for --loader-workers ``asked`` (None: 0 on the CPU, 4 on CUDA) on a device of
    ``device_type``, at most the ``cores`` this process may use (more only contend for them, and torch warned twice
    of each loader that had more), and why fewer than asked ("" when not)."""
    if asked is None:
        return (min(4, cores) if device_type == "cuda" else 0), ""
    if asked <= cores:
        return asked, ""
    return cores, f"--loader-workers {asked} asked, but this process may use {cores} core(s)"


def _unwrapped(batches: Iterator[Tuple[int, int, torch.Tensor]]) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``batches``, with an error of ours raised in a loader worker given as its own message: torch raises it again
    in this process with "Caught CeVAEError in DataLoader worker process 0. Original Traceback ..." as its text."""
    try:
        yield from batches
    except CeVAEError as exc:
        message = _worker_message(exc)
        if message == str(exc):  # raised in this process (no workers)
            raise
        raise CeVAEError(message) from None


def _worker_message(exc: BaseException) -> str:
    """The message of the exception torch wrapped in ``exc`` (:class:`torch._utils.ExceptionWrapper`: its text is
    the worker's whole traceback, whose last line is ``module.Type: message``); ``exc``'s own text otherwise."""
    text = str(exc)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    kind = type(exc)
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind(name)
        if at >= 0:
            return text[at + len(name):].strip()
    return text


def _contrast(subject: Subject, entry: Entry, left_out_of: str = "the model's contrast record") -> Optional[float]:
    """The depth contrast of a volume's slices in the orientation of ``entry`` (a training volume's first one: within
    0.08 of the axial one on the three healthy brains); None, with a warning naming it and what it is
    ``left_out_of``, where its brain is too small to tell."""
    try:
        return depth_contrast(np.load(entry.path))
    except CeVAEError as exc:
        log.warning("%s: %s It is left out of %s.", subject.image, exc, left_out_of)
        return None


def _warn_of_other_contrasts(subjects: Sequence[Subject], contrasts: Sequence[Optional[float]]) -> None:
    """Warn of volumes whose depth contrast lies further than :data:`TOLERANCE` from the cohort's median: scans of
    another modality (or masks holding the head) among the others, which the model would learn, or be calibrated
    on, as healthy brains of its modality."""
    known = [(s, c) for s, c in zip(subjects, contrasts) if c is not None]
    if len(known) < 2:
        return
    median = float(np.median([c for _, c in known]))
    far = [f"{s.image} ({c:+.2f})" for s, c in known if unlike(c, median)]
    if far:
        log.warning("The volumes do not share one contrast: the depth contrast (deep brain minus brain rim) of %s is "
                    "further than %g from the cohort's median, %+.2f. A model trained or calibrated on a mix of "
                    "modalities models none of them well: give scans of one modality, or check these volumes' brain "
                    "masks (a mask holding the head changes this too).", ", ".join(far), TOLERANCE, median)


def initial_weights(path: Path, model_cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The weights of the bundle at ``path`` (checked like any bundle), which must have architecture ``model_cfg``."""
    from ..engine.bundle import load_bundle

    bundle = load_bundle(path, "cpu")
    if bundle.model_config != model_cfg:
        raise CeVAEError(f"The model {path} has another architecture ({bundle.model_config.to_dict()}) than this "
                         f"training run ({model_cfg.to_dict()}); its weights cannot be the starting point.")
    return bundle.model.state_dict()


class _Batches(torch.utils.data.Dataset):
    """Maps the sampler's (epoch, batch number, indices) to (epoch, batch number, slices); with ``slab`` > 0
    each slice is a slab of 0..slab neighbours on each side, drawn from (seed, epoch, batch number), so a
    resumed run and any loader worker read the same batch."""

    def __init__(self, slices: SliceSet, slab: int = 0, seed: int = 0) -> None:
        self.slices, self.slab, self.seed = slices, slab, seed

    def __getitem__(self, item: Tuple[int, int, List[int]]) -> Tuple[int, int, torch.Tensor]:
        epoch, number, indices = item
        half = (np.random.default_rng([self.seed, epoch, number]).integers(0, self.slab + 1, len(indices))
                if self.slab else None)
        return epoch, number, self.slices.read(indices, half)

    def __len__(self) -> int:
        return len(self.slices)
