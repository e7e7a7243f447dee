"""Batch detection over a cohort: a folder or a CSV list in, one set of outputs per volume out.

Resumable (volumes whose outputs exist are skipped), shardable (``--shard i/n`` takes every n-th
volume of the sorted list, starting at the i-th, i = 1..n) and parallel (``--workers K``
processes, each with its own copy of the model). A bad volume is recorded in the summary CSV,
which is rewritten atomically as the run goes (at most every 2 s and at the end), and the run goes on.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CeVAEError, one_line
from ..io.atomic import atomic_write_text
from ..io.manifest import read_rows
from ..io.naming import IMAGE_EXTENSIONS, file_stem, image_stem, output_paths
from ..options import DetectionRequest
from ..progress import ProgressCallback, report
from ..system import usable_cores
from .interrupts import raise_terminated

log = logging.getLogger(__name__)

MASK_TAGS = ("_brainmask", "_mask")  # <image>_mask.nii.gz is the brain mask of <image>.*
SUMMARY_FIELDS = ("name", "image", "mask", "status", "error", "flagged_ml", "max_score",
                  "top_slice_axis", "top_slice", "seconds")


@dataclass(frozen=True)
class BatchItem:
    """One volume to score; ``name`` prefixes its outputs and must be unique in the batch."""

    name: str
    image: Path
    mask: Optional[Path] = None


@dataclass(frozen=True)
class DetectSettings:
    """What every worker needs to score volumes the same way (plain data, so it pickles)."""

    model: Path
    request: DetectionRequest
    out_dir: Path
    overwrite: bool = False


# ---- the list of inputs -------------------------------------------------------------------
def collect_folder(folder: Path) -> List[BatchItem]:
    """Images of a folder (not its subfolders), each with its ``_mask``/``_brainmask`` file if any."""
    images: Dict[str, Path] = {}
    masks: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        stem = image_stem(p.name)
        if stem is None or p.name.startswith(".") or not p.is_file():
            continue  # hidden files include the temporary files of unfinished writes
        tag = next((t for t in MASK_TAGS if stem.endswith(t)), "")
        key = stem[: len(stem) - len(tag)]
        found = masks if tag else images
        if key in found:
            kind = "brain mask" if tag else "image"
            raise CeVAEError(f"{found[key].name} and {p.name} in {folder} are both the {kind} of '{key}'; "
                             "keep one, or list the inputs in a CSV.")
        found[key] = p
    for key in sorted(set(masks) - set(images)):
        log.warning("%s has no matching image in %s; ignored.", masks[key].name, folder)
    return [BatchItem(k, images[k], masks.get(k)) for k in sorted(images)]


def read_list(path: Path) -> List[BatchItem]:
    """Items of a CSV with columns ``image`` and optionally ``mask`` and ``name``.

    Relative paths are relative to the CSV's folder; ``name`` defaults to the image file's stem.
    """
    items = []
    for row in read_rows(path, "image", ("image", "mask"), "list", others=("name",)):
        image = row.files["image"]
        name = row.cells["name"] or file_stem(image)
        if name != Path(name).name or name in ("", ".", ".."):
            raise CeVAEError(f"{path}, line {row.line}: the name {name!r} cannot prefix output files.")
        items.append(BatchItem(name, image, row.files["mask"]))
    return items


def collect_inputs(source: Path) -> List[BatchItem]:
    """The sorted, uniquely named items of a folder or a CSV list."""
    if source.is_dir():
        items = collect_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        items = read_list(source)
    elif source.exists():
        raise CeVAEError(f"{source} is neither a folder of images nor a CSV list of them.")
    else:
        raise CeVAEError(f"The input {source} does not exist.")
    if not items:
        raise CeVAEError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    seen: Dict[str, BatchItem] = {}
    for item in items:
        if item.name in seen:
            raise CeVAEError(f"{seen[item.name].image} and {item.image} would both write outputs named "
                             f"'{item.name}_*'; give them distinct names (a 'name' column in the CSV).")
        seen[item.name] = item
    return sorted(items, key=lambda it: it.name)


def parse_shard(text: str) -> Tuple[int, int]:
    """'i/n' with 1 <= i <= n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CeVAEError(f"--shard must look like i/n (e.g. 2/8), got {text!r}.") from None
    if n < 1 or not 1 <= i <= n:
        raise CeVAEError(f"--shard {text}: i must be between 1 and n (shards are numbered from 1).")
    return i, n


def select_shard(items: Sequence[BatchItem], i: int, n: int) -> List[BatchItem]:
    """Shard i of n: the items at sorted positions i-1, i-1+n, i-1+2n, ..."""
    return list(items[i - 1 :: n])


def check_outputs_apart(items: Sequence[BatchItem], every: Sequence[BatchItem], source: Path, model: Path,
                        out_dir: Path, summary: Path) -> None:
    """Refuse before any work an --out-dir under a file, or an output (summary included) that would replace an
    input of the batch, is a folder, a device, FIFO or socket, or too long a name."""
    from ..io.targets import Inputs, file_in_the_way, refuse_overlong_name, refuse_special_output

    blocker = file_in_the_way(out_dir)
    if blocker is not None:
        raise CeVAEError(f"--out-dir {out_dir} is under {blocker}, which is a file, not a folder.")
    inputs = Inputs([source if source.is_file() else None, model, *(i.image for i in every),
                     *(i.mask for i in every)])
    for target in [summary, *(p for item in items for p in output_paths(out_dir, item.name).values())]:
        src = inputs.which(target)
        if src is not None:
            raise CeVAEError(f"The output {target} would replace the input {src}; choose another --out-dir "
                             "or other names (a 'name' column in the CSV).")
        refuse_overlong_name(target)
        refuse_special_output(target)
        if target.is_dir():
            raise CeVAEError(f"The output {target} is a folder; remove it or choose another --out-dir.")


def summary_name(shard: Optional[Tuple[int, int]]) -> str:
    return "summary.csv" if shard is None else f"summary_shard-{shard[0]}-of-{shard[1]}.csv"


# ---- one volume ---------------------------------------------------------------------------
def measure(score, labelmap, top: Optional[Tuple[int, int]]) -> Dict[str, object]:
    """Summary values of one volume's outputs: flagged volume, highest score, top slice (IJK axis, index)."""
    import numpy as np
    import SimpleITK as sitk

    from ..io.images import voxel_volume_ml

    voxel_ml = voxel_volume_ml(labelmap)
    flagged = int(np.count_nonzero(sitk.GetArrayViewFromImage(labelmap)))
    return {"flagged_ml": f"{flagged * voxel_ml:.4f}",
            "max_score": f"{float(sitk.GetArrayViewFromImage(score).max()):.6g}",
            "top_slice_axis": "IJK"[top[0]] if top else "", "top_slice": top[1] if top else ""}


def top_of_table(slices_csv: str) -> Optional[Tuple[int, int]]:
    """(axis, index) of the first row of a slice table (which lists the most anomalous slice first)."""
    top = next(csv.DictReader(io.StringIO(slices_csv)), None)
    return (int(top["axis"]), int(top["index"])) if top else None


def _row(item: BatchItem, status: str, seconds: Optional[float], error: str = "", **values) -> Dict[str, object]:
    row = {k: "" for k in SUMMARY_FIELDS}
    row.update(name=item.name, image=str(item.image), mask=str(item.mask or ""), status=status, error=error,
               seconds="" if seconds is None else f"{seconds:.2f}", **values)
    return row


def read_back(item: BatchItem, out_dir: Path) -> Dict[str, object]:
    """The summary row of a volume whose outputs exist from an earlier run (checked complete first)."""
    import SimpleITK as sitk

    paths = output_paths(out_dir, item.name)
    problem = incomplete_outputs(paths)
    if problem:
        raise ValueError(problem)
    values = measure(sitk.ReadImage(str(paths["score"])), sitk.ReadImage(str(paths["labelmap"])),
                     top_of_table(paths["slices"].read_text()))
    return _row(item, "skipped", None, **values)


def incomplete_outputs(paths: Dict[str, Path]) -> str:
    """Why a volume's outputs on disk are not a complete set ("" if they are): the checks of a fresh write
    (:mod:`..io.verify`), and for the slice table its header, row lengths and final line end."""
    from ..io.verify import incomplete_reason

    for role, path in paths.items():
        if not path.is_file():
            return f"{path.name} is missing"
        reason = incomplete_reason(path, path)
        if reason is None and role == "slices":
            reason = _slice_table_reason(path.read_text())
        if reason:
            return f"{path.name} is incomplete ({reason})"
    return ""


def _slice_table_reason(text: str) -> Optional[str]:
    from ..result import SLICE_FIELDS

    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != SLICE_FIELDS:
        return "no slice-score header"
    if not text.endswith("\n") or any(len(r) != len(SLICE_FIELDS) for r in rows):
        return "a row is cut short"
    return None


class VolumeDetector:
    """Loads the model once and scores volumes, turning any failure into an error row."""

    def __init__(self, settings: DetectSettings) -> None:
        from ..engine.bundle import load_bundle
        from ..engine.detector import Detector
        from ..engine.devices import resolve_device

        self.s = settings
        bundle = load_bundle(settings.model, resolve_device(settings.request.run.device))
        self.detector = Detector.from_request(bundle, settings.request)

    def __call__(self, item: BatchItem, overwrite: bool) -> Dict[str, object]:
        import torch

        from ..io.images import read_image
        from ..io.atomic import write_all
        from ..result import result_files

        t0 = time.perf_counter()
        try:
            done = None if overwrite else self.done_by_another_run(item)
            if done is not None:
                return done
            image = read_image(item.image)
            mask = read_image(item.mask, "brain mask") if item.mask else None
            torch.manual_seed(0)  # sampled scores do not depend on the order or the worker
            result = self.detector(image, mask)
            try:
                write_all(result_files(result, output_paths(self.s.out_dir, item.name)), overwrite,
                          (item.image, item.mask))
            except CeVAEError:
                done = None if overwrite else self.done_by_another_run(item)
                if done is None:
                    raise
                return done
            top = result.top_slice
            return _row(item, "ok", time.perf_counter() - t0,
                        **measure(result.score, result.labelmap, (top.axis, top.index) if top else None))
        except Exception as exc:  # one bad volume must not stop the cohort
            log.debug("%s failed.", item.name, exc_info=True)
            message = one_line(exc) if isinstance(exc, CeVAEError) else f"unexpected {type(exc).__name__}: {one_line(exc)}"
            return _row(item, "error", time.perf_counter() - t0, error=message)

    def done_by_another_run(self, item: BatchItem) -> Optional[Dict[str, object]]:
        """The "skipped" row of a volume whose complete outputs appeared since this run started (another
        batch on the same --out-dir finished it); None if they are not all there and complete."""
        try:
            row = read_back(item, self.s.out_dir)
        except (RuntimeError, OSError, ValueError, KeyError, csv.Error):
            return None
        log.info("%s was finished by another run meanwhile; its outputs are kept.", item.name)
        return row


_worker: Optional[VolumeDetector] = None


def _init_worker(settings: DetectSettings, threads: int, log_level: int) -> None:
    import SimpleITK as sitk
    import torch

    global _worker
    signal.signal(signal.SIGTERM, raise_terminated)  # a worker cleans up its temporary files too
    logging.basicConfig(level=log_level, format=f"%(levelname)s: [worker {os.getpid()}] %(message)s")
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    _worker = VolumeDetector(settings)


def _work(item: BatchItem, overwrite: bool) -> Dict[str, object]:
    if _worker is None:
        raise RuntimeError("the worker process was not initialised")
    return _worker(item, overwrite)


# ---- the batch ----------------------------------------------------------------------------
class Summary:
    """Rows by volume name, written to the CSV atomically: at most every ``interval`` s, and on flush."""

    def __init__(self, path: Path, interval: float = 2.0) -> None:
        self.path, self.interval = path, interval
        self.rows: Dict[str, Dict[str, object]] = {}
        self._written = -math.inf

    def add(self, row: Dict[str, object]) -> None:
        self.rows[str(row["name"])] = row
        if time.monotonic() - self._written >= self.interval:
            self.flush()

    def flush(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for name in sorted(self.rows):
            writer.writerow(self.rows[name])
        atomic_write_text(self.path, buf.getvalue())
        self._written = time.monotonic()

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows.values())


def _earlier_rows(summary_path: Path) -> Tuple[Dict[str, Dict[str, str]], float]:
    """Finished rows of the summary an earlier run left at this path, and its modification time."""
    if not summary_path.exists():
        return {}, -math.inf
    try:
        with open(summary_path, newline="", encoding="utf-8") as fh:
            rows = {r["name"]: r for r in csv.DictReader(fh) if r.get("status") in ("ok", "skipped")}
        return rows, summary_path.stat().st_mtime
    except (OSError, csv.Error, KeyError, ValueError) as exc:  # ValueError: not UTF-8 text
        log.warning("The summary %s cannot be read (%s); it is rebuilt from the outputs on disk.", summary_path,
                    one_line(exc))
        return {}, -math.inf


def _skipped_row(item: BatchItem, out_dir: Path, earlier: Dict[str, Dict[str, str]], earlier_time: float):
    """The row of a finished volume: from the earlier summary if it is newer than the outputs, else read back."""
    row = earlier.get(item.name)
    paths = output_paths(out_dir, item.name)
    outputs_time = max(p.stat().st_mtime for p in paths.values())
    if row is not None and earlier_time >= outputs_time and all(row.get(k) is not None for k in SUMMARY_FIELDS):
        problem = incomplete_outputs(paths)  # (read_back checks them itself)
        if problem:
            raise ValueError(problem)
        skipped = _row(item, "skipped", None, **{k: row[k] for k in ("flagged_ml", "max_score", "top_slice_axis",
                                                                     "top_slice")})
        skipped["seconds"] = row["seconds"]  # the time the earlier run took
        return skipped
    return read_back(item, out_dir)


def run_batch(
    items: Sequence[BatchItem],
    settings: DetectSettings,
    summary_path: Path,
    workers: int = 1,
    progress: Optional[ProgressCallback] = None,
) -> Summary:
    """Score every item (skipping those with all outputs present unless ``overwrite``)."""
    if workers < 1:
        raise CeVAEError(f"--workers must be 1 or more, got {workers}.")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    earlier, earlier_time = _earlier_rows(summary_path)
    summary = Summary(summary_path)
    total = len(items)
    t0 = time.perf_counter()

    def record(row: Dict[str, object]) -> None:
        summary.add(row)
        done = len(summary.rows)
        if row["status"] == "ok":
            detail = f"{row['flagged_ml']} ml flagged, max score {row['max_score']}, {row['seconds']} s"
        else:
            detail = str(row["error"])
        log.info("[%d/%d] %s: %s (%s).", done, total, row["name"], row["status"], detail)
        report(progress, done / total, f"{row['name']} {row['status']}")

    try:
        todo: List[Tuple[BatchItem, bool]] = []
        for item in items:
            paths = list(output_paths(settings.out_dir, item.name).values())
            present = [p.exists() for p in paths]
            if any(present) and not all(present) and not settings.overwrite:
                log.warning("The outputs of %s are incomplete (%s missing); scoring it again, replacing %s.", item.name,
                            ", ".join(p.name for p, there in zip(paths, present) if not there),
                            ", ".join(p.name for p, there in zip(paths, present) if there))
            if all(present) and not settings.overwrite:
                try:
                    summary.add(_skipped_row(item, settings.out_dir, earlier, earlier_time))
                    continue
                except (RuntimeError, OSError, ValueError, KeyError, csv.Error) as exc:  # incomplete: score again
                    log.warning("The outputs of %s are incomplete or unreadable (%s); scoring it again.", item.name,
                                one_line(exc))
            todo.append((item, settings.overwrite or any(present)))
        log.info("%d volume(s) to score, %d already done (skipped; --overwrite redoes them); %d worker(s).",
                 len(todo), total - len(todo), min(workers, max(1, len(todo))))
        report(progress, (total - len(todo)) / max(total, 1), "finished volumes skipped")
        if workers == 1 or len(todo) <= 1:
            detector = VolumeDetector(settings) if todo else None
            for item, overwrite in todo:
                record(detector(item, overwrite))
        else:
            _run_pool(todo, settings, min(workers, len(todo)), record)
    finally:
        summary.flush()
    seconds = time.perf_counter() - t0
    scored = summary.count("ok") + summary.count("error")
    log.info("Done: %d ok, %d skipped, %d error(s) in %.0f s%s; summary %s.", summary.count("ok"),
             summary.count("skipped"), summary.count("error"), seconds,
             f" ({60 * scored / seconds:.1f} volumes/min)" if scored else "", summary_path)
    return summary


def _run_pool(todo: Sequence[Tuple[BatchItem, bool]], settings: DetectSettings, workers: int,
              record: Callable[[Dict[str, object]], None]) -> None:
    """Score ``todo`` in ``workers`` spawned processes that share the machine's cores."""
    threads = max(1, usable_cores() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(settings, threads, logging.getLogger().getEffectiveLevel()))
    try:
        futures = [pool.submit(_work, item, overwrite) for item, overwrite in todo]
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except BrokenProcessPool:
                raise CeVAEError("A worker process died (out of memory, or killed). Finished volumes are in the "
                                 "summary and a rerun skips them; try fewer --workers.") from None
            record(row)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
