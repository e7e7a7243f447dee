"""``cevae-anomaly prepare``: fill a slice cache for a cohort, optionally with several processes."""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ..errors import CeVAEError
from ..interrupts import pool_worker_signals
from ..engine.config import PreprocessConfig
from ..io.checksum import sha256_of
from ..progress import ProgressCallback, report
from ..system import usable_cores
from .cache import SliceCache, Unreadable, UnreadVolumes
from .config import train_orientations
from .data import Subject, unique_subjects

log = logging.getLogger(__name__)

# A spawned process starts a Python, imports torch and SimpleITK and warms them up: 2.6-4.5 s more than preparing
# its volumes here (measured on 2 cores), while a 1 mm volume takes 0.2 s (input size 64, axial: the defaults) to
# 0.5 s (128, three orientations) to preprocess. A process pays for its start-up only with about this many volumes.
VOLUMES_PER_PROCESS = 15


def prepare_cohort(subjects: Sequence[Subject], root: Path, pre: PreprocessConfig, orientations: Sequence[str],
                   workers: int = 1, progress: Optional[ProgressCallback] = None) -> str:
    """Preprocess what the cache lacks for every subject, in ``orientations`` (those train takes, refused as
    train refuses them: :func:`.config.train_orientations`); return a one-line summary."""
    wanted = train_orientations(orientations)
    cache = SliceCache(root, pre)
    cache.refuse_inside_inputs(subjects)  # and a file given as the folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CeVAEError(f"Cannot make the slice cache folder {root} ({exc.strerror or exc}); choose a --cache-dir "
                         "you can write to.") from None
    cache.remove_orphans()
    cache.say_other_versions()
    t = time.perf_counter()
    jobs = [(s, root, pre, wanted) for s in subjects]
    workers, why = process_count(workers, len(jobs), usable_cores())
    if why:
        log.info("Preprocessing with %d process(es): %s.", workers, why)
    results = []
    if workers == 1:
        for n, job in enumerate(jobs):
            results.append(_prepare_one(job))
            report(progress, (n + 1) / len(jobs), f"prepared {n + 1} of {len(jobs)} volumes")
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=pool_worker_signals) as pool:
            for n, result in enumerate(pool.map(_prepare_one, jobs)):
                results.append(result)
                report(progress, (n + 1) / len(jobs), f"prepared {n + 1} of {len(jobs)} volumes")
    unread = [r[3] for r in results if r[3] is not None]
    if unread:  # every damaged volume named at once, the others prepared
        raise UnreadVolumes(unread, len(subjects))
    unique_subjects(subjects, {s.image: r[1] for s, r in zip(subjects, results)})  # warns of repeats, as train does
    entries = {name: size for r in results for name, size in r[2].items()}  # a shared entry counted once
    made = sum(r[0] for r in results)
    return (f"Slice cache {root}: {len(subjects)} volume(s), {made} preprocessed now and "
            f"{len(subjects) - made} found ready, {sum(n for n, _ in entries.values())} slices in {', '.join(wanted)} "
            f"({sum(b for _, b in entries.values()) / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s.")


def process_count(asked: int, volumes: int, cores: int) -> Tuple[int, str]:
    """The processes worth starting for ``volumes`` volumes, and why fewer than ``asked`` ("" when all are).

    Preprocessing is CPU-bound, so no more than the cores; and each extra process must have at least
    :data:`VOLUMES_PER_PROCESS` volumes to repay its start-up, so a small cohort is prepared in this process.
    """
    paying = max(1, volumes // VOLUMES_PER_PROCESS)
    count = max(1, min(asked, cores, paying))
    if count == asked:
        return count, ""
    if count == paying and paying < min(asked, cores):
        return count, (f"{asked} asked, but a process takes about as long to start as {VOLUMES_PER_PROCESS} volumes "
                       f"take to preprocess, so {volumes} volume(s) repay no more than {paying}")
    return count, f"{asked} asked, but this process may use {cores} core(s)"


def _prepare_one(job: Tuple[Subject, Path, PreprocessConfig, Tuple[str, ...]]
                 ) -> Tuple[bool, str, Dict[str, Tuple[int, int]], Optional[str]]:
    """(made now, the image's sha256, {entry file name: (slices, bytes)}, None) of one subject; for one that cannot
    be read for its slices, (False, its sha256, {}, the error naming it), so that the others are prepared."""
    subject, root, pre, orientations = job
    checksums = {p: sha256_of(p) for p in (subject.image, subject.mask) if p is not None}
    try:
        entries, made = SliceCache(root, pre).entries_for(subject, checksums, orientations)
    except Unreadable as exc:
        return False, checksums[subject.image], {}, str(exc)
    return made, checksums[subject.image], {e.path.name: (e.slices, e.path.stat().st_size) for e in entries}, None
