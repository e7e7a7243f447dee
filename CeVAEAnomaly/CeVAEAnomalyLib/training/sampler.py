"""Which slices each rank trains on, batch by batch: a resumable, endless, sharded shuffle."""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Tuple

import torch


def epoch_order(n: int, world: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's slice indices in one epoch: the order ``torch.utils.data.DistributedSampler``
    (shuffled, padded to a multiple of ``world``) gives, as a tensor rather than a list of ints."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world) * world
    if total > n:
        perm = perm.repeat(math.ceil((total - n) / n) + 1)[:total]
    return perm[rank:total:world]


def resumed_offset(n: int, offset: int, was: Tuple[int, int], now: Tuple[int, int]) -> int:
    """The batch at which a run of ``now`` (batch size per rank, ranks) goes on in an epoch of ``n`` slices where a
    run of ``was`` stopped after ``offset`` batches. The ranks' shares of an epoch interleave one permutation, so
    batch b of every rank together is its slices from b × batch size × ranks on, whatever the ranks: the run goes
    on from the batch holding the first slice not consumed (at most one effective batch is trained again)."""
    def effective(batch_size: int, world: int) -> int:  # (as :class:`EpochSampler` caps it)
        return min(batch_size, math.ceil(n / world)) * world

    return offset * effective(*was) // effective(*now)


class EpochSampler(torch.utils.data.Sampler):
    """Endless ``(epoch, batch number, indices)`` from a given position.

    The batch size is read at the start of each epoch (after an out-of-memory retry halves it, the trainer goes on
    with a new sampler from the slice where it stopped);
    an epoch has ``len(order) // batch size`` batches (at least one), the rest is dropped.
    """

    def __init__(self, n: int, world: int, rank: int, seed: int, batch_size: Callable[[], int],
                 epoch: int = 0, offset: int = 0) -> None:
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.batch_size = batch_size
        self.epoch, self.offset = epoch, offset

    def __iter__(self) -> Iterator[Tuple[int, int, List[int]]]:
        epoch, offset = self.epoch, self.offset
        while True:
            order = epoch_order(self.n, self.world, self.rank, self.seed, epoch)
            bs = min(self.batch_size(), len(order))
            for b in range(offset, max(1, len(order) // bs)):
                yield epoch, b, order[b * bs : (b + 1) * bs].tolist()
            epoch, offset = epoch + 1, 0
