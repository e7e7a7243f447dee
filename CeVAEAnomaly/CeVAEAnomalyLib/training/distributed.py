"""Distributed set-up under torchrun: the process group, per-rank seeds and replica checks."""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..errors import CeVAEError
from ..io.checksum import FileMemo, sha256_by
from ..system import torchrun_number
from .data import Subject

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the process group and destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's random streams: distinct per rank, and per resumed step on ranks > 0."""
    return seed * 1000 + rank + 7919 * step


def rank_device(device: torch.device) -> torch.device:
    """This process's GPU under torchrun (``LOCAL_RANK``, one GPU per rank of a machine) where ``device`` is CUDA;
    ``device`` otherwise. More ranks on a machine than its visible GPUs are refused in words (torch raised "invalid
    device ordinal", said as a bug), and so is a GPU named by its index (it was replaced by the rank's without a
    word): under torchrun the GPUs are chosen with ``CUDA_VISIBLE_DEVICES``."""
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    if device.index is not None:
        raise CeVAEError(f"--device {device} names one GPU, but under torchrun each rank uses the GPU of its "
                         "LOCAL_RANK; pass --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES (e.g. "
                         f"CUDA_VISIBLE_DEVICES={device.index} torchrun ...).")
    local = torchrun_number("LOCAL_RANK", 0)
    count = torch.cuda.device_count()
    if local >= count:
        raise CeVAEError(f"This process is rank {local} of its machine (LOCAL_RANK) and would use GPU cuda:{local}, "
                         f"but the machine has {count} visible GPU(s): start at most {count} process(es) per machine "
                         "(torchrun --nproc_per_node gpu), or train with --device cpu.")
    return torch.device("cuda", local)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU. A GPU named by
    its index (cuda:N, or a rank's) is made the current one first: NCCL needs it so, and torch does its own work there
    (the loader pins memory on the current GPU, which made a CUDA context on cuda:0 for a run on cuda:1)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    world = torchrun_number("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if device.type not in ("cuda", "cpu"):
        raise CeVAEError(f"Distributed training runs on CUDA or the CPU, not on {device.type}; "
                         "pass --device cuda or --device cpu.")
    local = torchrun_number("LOCAL_RANK", 0)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, owns)


FAILURE_KEY = "cevae-anomaly/failed"


def _agent_store() -> Optional[dist.Store]:
    """The store of the torchrun that started this process (its agent's, which outlives the ranks), or None where
    there is none: not under torchrun, or torchrun keeps no store of its own, or it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=5))
    except (KeyError, ValueError, RuntimeError):
        return None


def _attempt() -> str:
    """This attempt of the torchrun run (torchrun may restart the ranks: each attempt has its own keys)."""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _failure_key() -> str:
    """The key of this attempt's first failure."""
    return f"{FAILURE_KEY}/{_attempt()}"


def _decoded(value: bytes) -> Tuple[int, str]:
    rank, _, message = value.decode("utf-8", "replace").partition("\n")
    return int(rank), message


def claim_failure(rank: int, message: str) -> Optional[Tuple[int, str]]:
    """Record in torchrun's store that rank ``rank`` fails with ``message``, unless another rank failed first: then
    that one's (rank, message). None where this rank is the first, or there is no store."""
    store = _agent_store()
    if store is None:
        return None
    try:
        first = _decoded(store.compare_set(_failure_key(), "", f"{rank}\n{message}"))
    except (RuntimeError, ValueError):
        return None
    return None if first[0] == rank else first


def failed_rank() -> Optional[int]:
    """The rank recorded in torchrun's store as the first to fail (torchrun then stops the others with SIGTERM), or
    None where none failed or there is no store."""
    store = _agent_store()
    try:
        if store is None or not store.check([_failure_key()]):
            return None
        return _decoded(store.get(_failure_key()))[0]
    except (RuntimeError, ValueError):
        return None


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group if this process created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


# the meetings of wait_for_ranks in this process so far, each its own key (every rank holds the same count: they call
# it together; a second Trainer in one process goes on counting, where a count of its own reused keys already full)
_MEETINGS = itertools.count(1)


def wait_for_ranks(info: DistInfo) -> None:
    """Wait until every rank has come here, however long the work before took on some of them (preprocessing,
    hashing, rank 0's validation). A collective waits only up to the process group's timeout (30 minutes): a rank
    that prepared its share of a large cohort that much later than another ended the run with gloo's "Timed out
    waiting 1800000ms" (NCCL's watchdog likewise). Under torchrun the ranks count in its agent's store instead, which
    waits as long as it takes: torchrun stops every rank once one ends, so the wait ends with it. Elsewhere (no agent
    store) a barrier."""
    if info.world <= 1:
        return
    store = _agent_store()
    if store is None:
        dist.barrier()
        return
    key = f"cevae-anomaly/arrived/{_attempt()}/{next(_MEETINGS)}"
    store.add(key, 1)
    while store.add(key, 0) < info.world:
        time.sleep(0.1)


def gather_objects(info: DistInfo, value: object) -> List[object]:
    """Every rank's ``value``, in rank order, on every rank (a collective: all ranks call it together)."""
    if info.world <= 1:
        return [value]
    out: List[object] = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if info.world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(info: DistInfo, values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """The mean of each of ``values`` over the ranks (a collective: all ranks call it together, with the same keys)."""
    if info.world <= 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def file_checksums(subjects: Sequence[Subject], info: DistInfo, memo: Optional[FileMemo] = None) -> Dict[Path, str]:
    """sha256 of every image and mask; with several ranks each hashes a share and they swap results. ``memo``: one
    that may have hashed them already (a file unchanged since is not read again)."""
    paths = sorted({p for s in subjects for p in (s.image, s.mask) if p is not None})
    return shared_map(lambda share: {p: sha256_by(p, memo) for p in share}, paths, info)


def shared_map(compute: Callable[[Sequence[Path]], Dict[Path, str]], paths: Sequence[Path],
               info: DistInfo) -> Dict[Path, str]:
    """``compute`` of ``paths``: with several ranks each computes a share (every world-th path from its rank) and they
    swap results, so every rank gets all."""
    mine = compute(list(paths[info.rank::info.world]))
    if info.world <= 1:
        return mine
    wait_for_ranks(info)  # (the shares may take very different times)
    parts: List[Optional[Dict[Path, str]]] = [None] * info.world
    dist.all_gather_object(parts, mine)
    return {p: h for part in parts for p, h in (part or {}).items()}


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of the model's float32 state, in state-dict order (equal models, equal sums)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas(info: DistInfo, model: torch.nn.Module) -> None:
    """Log every rank's parameter checksum; rank 0 says whether the replicas agree."""
    mine = parameter_checksum(model)
    log.info("Rank %d of %d: parameter checksum %s.", info.rank, info.world, mine)
    sums: List[Optional[str]] = [None] * info.world
    dist.all_gather_object(sums, mine)
    if not info.main:
        return
    if len(set(sums)) == 1:
        log.info("The model replicas of all %d ranks are identical.", info.world)
    else:
        log.error("The model replicas differ between ranks (checksums %s); the bundle holds rank 0's.",
                  ", ".join(str(s)[:12] for s in sums))
