"""Batch detection over a cohort: a folder or a CSV list in, one set of outputs per volume out, with the record of
how they were made (``NAME_record.json``, as ``detect --record`` writes it).

Resumable (a volume is skipped when its outputs exist and a summary there with these settings, this run's or a
shard's, records their checksums and that they were made from its current image and mask; ``batch_settings.json``
records the model and options the outputs were made with, and a rerun with others is refused unless
``--overwrite``), shardable
(``--shard i/n`` takes every n-th volume of the sorted list, starting at the i-th, i = 1..n) and parallel
(``--workers K`` processes, each with its own copy of the model). A bad volume is recorded in the summary CSV,
which is rewritten atomically as the run goes (at most every 2 s and at the end), and the run goes on. The summary
keeps the rows of volumes the run does not list (another list's sharing the --out-dir) where its settings agree.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import (TYPE_CHECKING, AbstractSet, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Set, Tuple)

from ..errors import CeVAEError, RunFailed, one_line, out_of_memory
from ..io.atomic import atomic_write_text, remove_abandoned_temporaries
from ..io.checksum import FileMemo, hashed_files, sha256_of
from ..io.lock import OutputHeld, hold_output, hold_outputs
from ..io.images import refuse_image_as_mask
from ..io.manifest import read_rows
from ..io import strict_json
from ..io.naming import (BATCH_ROLES, IMAGE_EXTENSIONS, PANEL_RESULT, RESULT_TAGS, UNICODE_TWINS,
                         file_stem, image_stem, one_form, output_paths, subfolders_hint, unportable_character)
from ..io.spreadsheet import read_row, written_cell
from ..options import DetectionRequest
from ..progress import Cancelled, ProgressCallback, report
from ..system import command_word, threads_per_process
from ..interrupts import pool_worker_signals

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

log = logging.getLogger(__name__)

# <image>_mask.nii.gz is the brain mask of <image>.* (tags in any case; FSL's bet writes NAME_brain_mask)
MASK_TAGS = ("_brain_mask", "_brainmask", "_mask")
# a contrast tag (in any case) that may end an image's name but not its mask's: NAME_brainmask is the mask of
# NAME_t1 (or NAME_T1w) where no image NAME is beside it, as the project's sample data and many cohorts name them
CONTRAST_TAGS = ("_t1", "_t1w")
STRIPPED_TAG = "_brain"  # FSL's bet: NAME_brain is the skull-stripped copy of NAME (its mask: NAME_brain_mask)
BARE_MASKS = ("mask", "brainmask", "brain_mask")  # a whole name (any case): the mask of the one image beside it


def mask_key(stem: str) -> Optional[str]:
    """The stem of the image whose brain mask a file of stem ``stem`` is by its name (``a_mask``, ``A_MASK``: "a",
    "A"; a bare ``mask`` or ``brain_mask``, as a folder per person names it: "", the one image beside it), else
    None (an image)."""
    low = stem.lower()
    if low in BARE_MASKS:
        return ""
    tag = next((t for t in MASK_TAGS if low.endswith(t)), None)
    return stem[: len(stem) - len(tag)] if tag else None

MEASURES = ("flagged_ml", "components", "max_score", "top_slice_axis", "top_slice")
SOURCE_FIELDS = ("image_sha256", "mask_sha256")  # what a row's outputs were made from (older summaries lack them)
OUTPUT_FIELDS = tuple(f"{role}_sha256" for role in BATCH_ROLES)  # its outputs (output_paths' roles)
RECORD_ROLE = "record"  # NAME_record.json: how a volume's outputs were made (detect --record's), written with them
PICTURE_ROLE, PICTURE_NAME = "picture", "_picture.png"  # NAME_picture.png (--pictures): the key picture, written
# with them
REPORT_ROLE, REPORT_NAME = "report", "_report.html"  # NAME_report.html (--reports): the HTML report, written with them
RECORD_FIELD = "record_sha256"  # that record's; "": the volume has none (made by a version that wrote none, or the
# file is missing or not the one written with its outputs). Not what says a volume is done: it is not scored again
SUMMARY_FIELDS = ("name", "image", "mask", "status", "error", "warnings", *MEASURES, "seconds", *SOURCE_FIELDS,
                  *OUTPUT_FIELDS, RECORD_FIELD)
REFUSED = "refused"  # a failed row's key (not a column): whether its volume was refused, not out of memory or a bug
FOUND = "found"  # a scored row's key (not a column): its components as the log line says them (components_summary)
LATER_FIELDS = ("components", "warnings", *SOURCE_FIELDS, *OUTPUT_FIELDS, RECORD_FIELD)  # columns older summaries
# lack (rows without components, warnings or record_sha256 keep ""; rows without checksums are not trusted: their
# volumes are scored again, and so are those without components_sha256, of versions that wrote no component table, so
# that every volume gets its table)
UNTRUSTED_WITHOUT = frozenset(SUMMARY_FIELDS) - {"components", "warnings", RECORD_FIELD}  # a row lacking one is scored
# again
WARNINGS_APART = " | "  # between a volume's warnings in its summary row
RERUN_AFTER_OTHER = ("Run the batch again once the other run is done: it skips this volume if that run scored this "
                     "image and mask, refuses to replace another scan's outputs, and scores it again otherwise.")


class SaidForAVolume(logging.Filter):
    """On the console's handlers during a batch: drops a warning about the volume being scored (led by its name)
    that an earlier volume got in the same words, their name aside. 800 scans of one protocol logged the same
    400-character warnings 800 times each (1067 of a run's 1911 lines); each volume's stay in its summary row."""

    def __init__(self) -> None:
        super().__init__()
        self.said: Set[str] = set()
        self.volume: Optional[str] = None  # the name of the volume being scored

    def filter(self, record: logging.LogRecord) -> bool:
        lead = f"{self.volume}: "
        if record.levelno != logging.WARNING or self.volume is None or not record.getMessage().startswith(lead):
            return True
        if not hasattr(record, "said_before"):  # (decided once for all the handlers)
            words = record.getMessage()[len(lead):]
            record.said_before = words in self.said
            self.said.add(words)
        return not record.said_before


_said = SaidForAVolume()  # this process's: the command's, or a worker's


@contextlib.contextmanager
def each_volume_warning_once() -> Iterator[None]:
    """A batch during which the console says a warning about a volume only for the first volume that gets it."""
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(_said)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_said)
        _said.said.clear()
        _said.volume = None


def repeated_warnings(rows: Iterable[Mapping[str, object]]) -> int:
    """How many warnings of ``rows`` (their summary cells) another volume's row holds in the same words before."""
    seen: Set[str] = set()
    again = 0
    for row in rows:
        for words in filter(None, str(row.get("warnings") or "").split(WARNINGS_APART)):
            again += words in seen
            seen.add(words)
    return again


def owner(key: str) -> str:
    """The image a mask key names, in words: 'NAME', or for a bare ``mask`` (key "") the one image beside it."""
    return f"'{key}'" if key else "the one image beside them (a bare mask name)"


def mask_owners(masks: Iterable[str], images: AbstractSet[str]) -> Dict[str, List[str]]:
    """For each mask key (a mask's stem without its tag), the image stems (of ``images``) it may belong to: the
    image of that stem, or else every image whose stem is the key followed by a contrast tag (:data:`CONTRAST_TAGS`)
    or FSL's :data:`STRIPPED_TAG`; for the key "" (a bare ``mask``), every image (none: the mask has no image;
    several: which one would be a guess)."""
    untagged: Dict[str, List[str]] = {}  # an image stem without its contrast (or FSL's _brain) tag -> the image stems
    for name in sorted(images):
        for tag in (*CONTRAST_TAGS, STRIPPED_TAG):
            if name.lower().endswith(tag) and len(name) > len(tag):
                untagged.setdefault(name[: -len(tag)], []).append(name)
    return {key: sorted(images) if not key else [key] if key in images else untagged.get(key, []) for key in masks}


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
    model_sha256: str = ""  # the model file the batch records (settings_record); "": not checked
    pictures: bool = False  # also NAME_picture.png, the key picture (needs the research extra)
    reports: bool = False  # also NAME_report.html, the HTML report (with the key picture where the extra is there)


class ModelChanged(CeVAEError):
    """The model file is not the one the batch recorded when it started (another run replaced it)."""


# ---- the list of inputs -------------------------------------------------------------------
def collect_folder(folder: Path) -> List[BatchItem]:
    """Images of a folder (not its subfolders), each with its ``_mask``/``_brainmask``/``_brain_mask`` file if any;
    FSL's skull-stripped copy ``NAME_brain`` beside ``NAME`` is left out (:func:`leave_out_stripped_copies`), and so
    are detection results beside their scan (:func:`leave_out_detection_results`)."""
    images: Dict[str, Path] = {}
    masks: Dict[str, Path] = {}
    for p in leave_out_detection_results(sorted(folder.iterdir()), f"in {folder}"):
        stem = image_stem(p.name)
        dangling = p.is_symlink() and not p.exists()  # a file not yet fetched (git-annex, DataLad), a disk not mounted
        if stem is None or p.name.startswith(".") or not (p.is_file() or dangling):  # dangling: an error row says so
            if stem is not None and not p.name.startswith(".") and p.exists() and not p.is_dir():
                log.warning("%s in %s is not a regular file (a named pipe, device or socket); ignored.", p.name,
                            folder)
            continue  # hidden files include the temporary files of unfinished writes
        of = mask_key(stem)
        key, found, kind = (stem, images, "image") if of is None else (of, masks, "brain mask")
        if key in found:
            raise CeVAEError(f"{found[key].name} and {p.name} in {folder} are both the {kind} of {owner(key)}; "
                             "keep one, or list the inputs in a CSV.")
        found[key] = p
    images = leave_out_stripped_copies(images, f"in {folder}")
    mask_of = pair_masks(images, masks, f"in {folder}", "keep one, or list the inputs in a CSV")
    return [BatchItem(k, images[k], mask_of.get(k)) for k in sorted(images)]


def leave_out_detection_results(paths: Sequence[Path], where: str) -> List[Path]:
    """``paths`` without the anomaly maps, labelmaps and segmentations that detection wrote beside the scan they were
    made from (``NAME_score.nii.gz`` beside ``NAME.nii.gz``, :data:`RESULT_TAGS`): results, not scans. Each is left
    out with a warning; ``where`` ("in FOLDER") completes it."""
    scans = {(p.parent, stem): p for p in paths for stem in [image_stem(p.name)]
             if stem is not None and mask_key(stem) is None}
    kept = []
    for p in paths:
        stem = image_stem(p.name) or ""
        tags = [(stem[: -len(t)], t) for t in RESULT_TAGS if stem.endswith(t)]
        panel = PANEL_RESULT.match(stem)  # saved from the Slicer panel
        found = next(((name, tag) for name, tag in tags + ([panel.groups()] if panel else [])
                      if (p.parent, name) in scans), None)
        if found is None:
            kept.append(p)
        else:
            log.warning("%s %s is taken for a detection result of %s (NAME%s), not a scan: left out. To use it as a "
                        "volume of its own, list the inputs in a CSV (batch's list, or --manifest).", p.name, where,
                        scans[p.parent, found[0]].name, found[1])
    return kept


def leave_out_stripped_copies(images: Mapping[str, Path], where: str) -> Dict[str, Path]:
    """``images`` (stem -> file) without FSL's skull-stripped copies: ``NAME_brain`` beside ``NAME`` is a scan
    already counted, not a second person (a split would put one scan on both sides); each is left out with a
    warning. ``where`` ("in FOLDER") completes it."""
    kept = dict(images)
    for stem in sorted(images):
        whole = stem[: -len(STRIPPED_TAG)]
        if stem.lower().endswith(STRIPPED_TAG) and whole in images:
            del kept[stem]
            log.warning("%s %s is taken for the skull-stripped copy of %s (FSL's NAME_brain): left out, %s is read "
                        "with its brain mask (NAME_brain_mask, NAME_mask) or an automatic one. To use it as a volume "
                        "of its own, list the inputs in a CSV (batch's list, or --manifest).", images[stem].name, where,
                        images[whole].name, images[whole].name)
    return kept


def pair_masks(images: Mapping[str, Path], masks: Mapping[str, Path], where: str, advice: str) -> Dict[str, Path]:
    """The brain mask of each image stem of ``images`` that has one, of ``masks`` (a mask's stem without its tag ->
    its file; :func:`mask_owners` pairs them). A mask without an image is left out with a warning; a mask that may
    be that of several images, and two masks of one image, are refused. ``where`` ("in FOLDER") and ``advice`` (what
    to do instead) complete the messages."""
    candidates = mask_owners(masks, images.keys())
    mask_of: Dict[str, Path] = {}
    for key in sorted(masks):
        owners = candidates[key]
        if not owners:
            log.warning("%s has no matching image %s (the mask of NAME.nii.gz, else of NAME_t1.nii.gz or "
                        "NAME_brain.nii.gz, is NAME_mask, NAME_brainmask or NAME_brain_mask; a bare mask.* is that of "
                        "the one image beside it); ignored.", masks[key].name, where)
        elif len(owners) > 1:
            names = " or of ".join(images[o].name for o in owners[:3]) + (" ..." if len(owners) > 3 else "")
            raise CeVAEError(f"{masks[key].name} {where} may be the brain mask of {names}; name it after the one it "
                             f"belongs to ({owners[0]}_mask), or list the scans and their masks in a CSV.")
        elif mask_of.setdefault(owners[0], masks[key]) != masks[key]:
            raise CeVAEError(f"{mask_of[owners[0]].name} and {masks[key].name} {where} are both the brain mask "
                             f"of '{owners[0]}'; {advice}.")
    return mask_of


def read_list(path: Path) -> List[BatchItem]:
    """Items of a CSV with columns ``image`` and optionally ``mask`` and ``name``.

    Relative paths are relative to the CSV's folder; ``name`` defaults to the image file's stem, led by its folder
    where several images share it (:func:`named_after_folders`).
    """
    items: List[BatchItem] = []
    unnamed: List[int] = []  # the items named by default
    for row in read_rows(path, "image", ("image", "mask"), "list", others=("name",)):
        image = row.files["image"]
        refuse_image_as_mask(image, row.files["mask"], f"{path}, line {row.line}: ")
        name = row.cells["name"] or file_stem(image)
        if name != Path(name).name or name in ("", ".", ".."):
            raise CeVAEError(f"{path}, line {row.line}: the name {name!r} cannot prefix output files.")
        odd = unportable_character(row.cells["name"] or "")  # (a file's own name is one this system holds)
        if odd is not None:
            raise CeVAEError(f"{path}, line {row.line}: the name {name!r} holds {odd!r}, which Windows does not allow "
                             "in a file name; choose a name without < > : \" / \\ | ? * or control characters.")
        for column in ("image", "mask"):
            _refuse_paths_from_the_current_folder(path, row.line, column, row.files[column])
        if not row.cells["name"]:
            unnamed.append(len(items))
        items.append(BatchItem(name, image, row.files["mask"]))
    return named_after_folders(items, unnamed)


def _refuse_paths_from_the_current_folder(path: Path, line: int, what: str, file: Optional[Path]) -> None:
    """Refuse a path of the list at ``path`` that does not exist below the list's folder but does, as written, from
    the current folder: the list was written relative to where the command runs, and every such volume would fail
    (a path missing from both is that volume's error row)."""
    folder = path.parent
    if file is None or os.path.lexists(file) or not file.is_relative_to(folder):
        return
    cell = file.relative_to(folder)
    if folder.resolve() != Path.cwd().resolve() and os.path.exists(cell):
        raise CeVAEError(f"{path}, line {line}: the {what} {cell} is read relative to the list's folder, as {file}, "
                         "which does not exist; it exists relative to the current folder. Write the list's paths "
                         f"relative to {folder}, or absolute.")


def named_after_folders(items: Sequence[BatchItem], unnamed: Sequence[int]) -> List[BatchItem]:
    """``items`` with the default names that several of them share (the stem of ``subj1/T1/`` and ``subj2/T1/``,
    DICOM series folders, or of ``subj1/t1.nii.gz`` and ``subj2/t1.nii.gz``) led by the folder each image is in:
    ``subj1_T1``, ``subj2_T1``. Only where that tells them apart: the new names differ from each other and from
    every other item's name (in any case and Unicode form, as collect_inputs compares them); otherwise those items
    keep the shared name, which collect_inputs refuses, asking for a name column. ``unnamed``: the indices of the
    items named by default (a name the list gives is never changed). A name no other item shares stays as it was,
    so that a rerun of a list that ran before finds its outputs."""
    def key(name: str) -> str:
        return one_form(name).casefold()

    shared: Dict[str, List[int]] = {}
    for i in unnamed:
        shared.setdefault(key(items[i].name), []).append(i)
    led = {i: f"{items[i].image.parent.name}_{items[i].name}" for group in shared.values() if len(group) > 1
           for i in group if items[i].image.parent.name not in ("", ".", "..")}
    renamed = list(items)
    for group in (g for g in shared.values() if len(g) > 1 and all(i in led for i in g)):
        others = {key(name) for j, item in enumerate(items) if j not in group  # (as given, or led by its folder)
                  for name in (item.name, led.get(j, item.name))}
        new = [key(led[i]) for i in group]
        if len(set(new)) == len(new) and not others.intersection(new):
            for i in group:
                renamed[i] = replace(items[i], name=led[i])
            log.info("%s share the name '%s'; their outputs are named after their folders: %s (a 'name' column in "
                     "the CSV chooses others).", " and ".join(str(items[i].image) for i in group), items[group[0]].name,
                     ", ".join(f"{led[i]}_*" for i in group))
    return renamed


def collect_inputs(source: Path) -> List[BatchItem]:
    """The sorted, uniquely named items of a folder or a CSV list."""
    if source.is_dir():
        items = collect_folder(source)
    elif source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        items = read_list(source)
    elif source.exists():
        raise CeVAEError(f"{source} is neither a folder of images nor a CSV list of them (.csv; .tsv: tab-separated).")
    else:
        raise CeVAEError(f"The input {source} does not exist.")
    if not items:
        hint = subfolders_hint(source, "list the images or DICOM series folders in a CSV (column 'image')") \
            if source.is_dir() else ""
        if source.is_dir() and not hint:
            from ..io.dicom import holds_dicom_series

            hint = (f"; it is the folder of one DICOM series: score it with cevae-anomaly detect "
                    f"{command_word(str(source))} --score SCORE.nii.gz, or list series folders in a CSV (column "
                    "'image') for batch") if holds_dicom_series(source) else ""
        raise CeVAEError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}){hint}.")
    seen: Dict[str, BatchItem] = {}  # by the name in any case and Unicode form: S1 and s1 share their outputs on
    for item in items:  # macOS and Windows, café as é and as e + U+0301 on macOS
        other = seen.get(one_form(item.name).casefold())
        if other is not None:
            names = f"'{item.name}_*'" if other.name == item.name else (
                f"'{item.name}_*', {UNICODE_TWINS}, one file on macOS" if one_form(other.name) == one_form(item.name)
                else f"'{other.name}_*' and '{item.name}_*', one file on a case-insensitive file system (macOS, "
                     "Windows)")
            raise CeVAEError(f"{other.image} and {item.image} would both write outputs named {names}; give them "
                             "distinct names (a 'name' column in the CSV).")
        seen[one_form(item.name).casefold()] = item
    return sorted(items, key=lambda it: it.name)


def unique_items(items: Sequence[BatchItem]) -> List[BatchItem]:
    """``items`` without repeats of a volume already listed under another name (the same image and brain mask
    content, by their sha256, as evaluate tells a case listed again), in their order, each repeat warned of once,
    naming both: it would be scored twice, into two sets of outputs of one scan. Only images of a size that another
    shares are read, each once while unchanged (the command drops repeats before it picks a shard, :func:`run_batch`
    again for callers from Python); a missing or unreadable one is told by its path (scoring it says what is
    wrong)."""
    def size(path: Path) -> object:
        try:
            return sum(f.stat().st_size for f in hashed_files(path))
        except OSError:
            return str(path)

    def content(path: Optional[Path]) -> str:
        try:
            return _HASHED.sha256(path) if path else ""
        except OSError:
            return str(path)

    sizes = [size(item.image) for item in items]
    shared = {s for s, n in Counter(sizes).items() if n > 1}
    seen: Dict[Tuple[str, str], BatchItem] = {}
    kept: List[BatchItem] = []
    for item, s in zip(items, sizes):
        first = seen.setdefault((content(item.image), content(item.mask)), item) if s in shared else item
        if first is item:
            kept.append(item)
            continue
        mask = f"the brain mask {item.mask}" if item.mask else "no brain mask"
        log.warning("'%s' (%s) repeats the scan of '%s' (%s): the same image content, with %s; it is scored once, "
                    "as '%s'.", item.name, item.image, first.name, first.image, mask, first.name)
    return kept


_HASHED = FileMemo()  # the checksums unique_items took: the command's and then run_batch's call read each file once


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
                        out_dir: Path, summary: Path, pictures: bool = False, reports: bool = False) -> None:
    """Refuse before any work an --out-dir under a file, or an output (summary and settings file included; the
    pictures where ``pictures``, the reports where ``reports``) that would replace an input of the batch, is a
    folder, a device, FIFO or socket, or too long a name."""
    from ..io.targets import Inputs, file_in_the_way, refuse_overlong_name, refuse_special_output

    blocker = file_in_the_way(out_dir)
    if blocker == out_dir:
        raise CeVAEError(f"--out-dir {out_dir} is a file, not a folder; give a folder for the outputs.")
    if blocker is not None:
        raise CeVAEError(f"--out-dir {out_dir} is under {blocker}, which is a file, not a folder.")
    inputs = Inputs([source if source.is_file() else None, model, *(i.image for i in every),
                     *(i.mask for i in every)])
    outputs = (p for item in items for p in volume_files(out_dir, item.name, pictures, reports).values())
    for target in [summary, settings_path(summary), *outputs]:
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


def settings_path(summary: Path) -> Path:
    """Beside a summary, the record of the model and options its rows' outputs were made with, one per summary so
    that shards sharing an --out-dir each check their own (``batch_settings.json``,
    ``batch_settings_shard-i-of-n.json``)."""
    return summary.with_name(summary.stem.replace("summary", "batch_settings", 1) + ".json")


def volume_files(out_dir: Path, name: str, pictures: bool = False, reports: bool = False) -> Dict[str, Path]:
    """Every file batch writes for volume ``name`` in ``out_dir``, by role: its outputs (:func:`output_paths`, which
    say whether it is done), its record (:data:`RECORD_ROLE`), with ``pictures`` its key picture
    (:data:`PICTURE_ROLE`) and with ``reports`` its report (:data:`REPORT_ROLE`; neither says whether it is done)."""
    files = output_paths(out_dir, name, (*BATCH_ROLES, RECORD_ROLE))
    if pictures:  # (not among naming.OUTPUT_NAMES, every one of which the Slicer script writes)
        files[PICTURE_ROLE] = Path(out_dir) / f"{name}{PICTURE_NAME}"
    if reports:
        files[REPORT_ROLE] = Path(out_dir) / f"{name}{REPORT_NAME}"
    return files


def picture_of_outputs(item: BatchItem, out_dir: Path, threshold: float) -> bytes:
    """The key picture of a done volume drawn from its scan and saved outputs (score map, labelmap, component and
    slice tables), without scoring it again: what ``--pictures`` makes for a volume done without one."""
    import SimpleITK as sitk
    from CeVAEAnomalyResearch.figures import key_picture_png

    from ..io.images import read_image
    from ..result import read_components_csv

    paths = output_paths(out_dir, item.name)
    top = top_of_table(paths["slices"].read_text(encoding="utf-8"))
    return key_picture_png(read_image(item.image), sitk.ReadImage(str(paths["score"])),
                           sitk.ReadImage(str(paths["labelmap"])), threshold,
                           read_components_csv(paths["components"].read_text(encoding="utf-8")), top, item.name)


def report_of_outputs(item: BatchItem, out_dir: Path, picture: Optional[bytes] = None) -> str:
    """The report of a done volume made from its saved outputs (record, component and slice tables; the key picture
    ``picture``, else drawn from them where the research extra is installed), without scoring it again: what
    ``--reports`` makes for a volume done without one."""
    from ..report import report_html
    from ..result import PICTURE_MODULES, DetectionRecord, read_components_csv, read_slices_csv
    from ..system import missing_modules

    paths = volume_files(out_dir, item.name)
    record = DetectionRecord.from_dict(json.loads(paths[RECORD_ROLE].read_text(encoding="utf-8")))
    if picture is None and not missing_modules(PICTURE_MODULES):
        picture = picture_of_outputs(item, out_dir, record.threshold)
    return report_html(item.name, record, read_components_csv(paths["components"].read_text(encoding="utf-8")),
                       read_slices_csv(paths["slices"].read_text(encoding="utf-8")), picture)


def kept_record(out_dir: Path, name: str, recorded: str) -> str:
    """The ``record_sha256`` of a done volume whose outputs a run keeps: ``recorded`` (that of the summary row that
    describes them) where its record file is still that file, else "" (none: missing, changed, or never written)."""
    try:
        return recorded if recorded and sha256_of(volume_files(out_dir, name)[RECORD_ROLE]) == recorded else ""
    except OSError:
        return ""


# ---- what outputs are made from -----------------------------------------------------------
def made_from(item: BatchItem) -> Dict[str, str]:
    """The sha256 of the volume's image and brain mask ("" without one): what its outputs are made from."""
    return {"image_sha256": sha256_of(item.image), "mask_sha256": sha256_of(item.mask) if item.mask else ""}


def inputs_of(item: BatchItem, source: Dict[str, str]) -> Dict[str, Dict[str, str]]:
    """A volume's record's ``inputs`` as ``detect --record`` gives them (:func:`~..result.input_files`: absolute path
    and sha256), of the checksums ``source`` (:func:`made_from`) taken before reading them (hashed here where it has
    none)."""
    from ..result import input_files

    if not source:
        return input_files(image=item.image, mask=item.mask)
    return {role: {"path": os.path.abspath(path), "sha256": source[f"{role}_sha256"]}
            for role, path in (("image", item.image), ("mask", item.mask)) if path is not None}


def output_checksums(paths: Dict[str, Path]) -> Dict[str, str]:
    """The sha256 of each of a volume's output files, by summary column: the files a rerun may keep (OSError if one
    cannot be read)."""
    return {f"{role}_sha256": sha256_of(path) for role, path in paths.items()}


def settings_record(settings: DetectSettings) -> Dict[str, object]:
    """What makes every volume's outputs besides its input: the model file's sha256, the scoring and
    post-processing options and threshold the request resolves to with it, mixed precision and the batch size
    (sampled scores draw per batch). Not the device: it changes a map by float noise at most."""
    from ..engine.header import read_header

    model_sha256 = sha256_of(settings.model)  # first: a model replaced after it fails the detectors' check
    header = read_header(settings.model)
    score, post = settings.request.checked_options(header.score_options, header.postprocess)
    threshold, _ = header.threshold(score, post, settings.request.policy)
    run = settings.request.run
    record = {"model_sha256": model_sha256, **score.to_dict(), **post.to_dict(), "threshold": threshold,
              "amp": run.amp, "batch_size": run.batch_size}
    return json.loads(strict_json.dumps(record))  # as the file reads back (a threshold of inf as "inf")


def _settings_known(path: Path, record: Dict[str, object], overwrite: bool) -> bool:
    """Whether the settings file ``path`` records ``record`` (False if there is none). Other settings, or a
    file that is not a settings record, are refused unless ``overwrite``."""
    if not path.exists():
        return False
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: not JSON, or not UTF-8; RecursionError: too deep
        earlier = None
    if not isinstance(earlier, dict) or set(earlier) != set(record):
        if overwrite:
            return False
        raise CeVAEError(f"{path} is not a batch settings record; choose another --out-dir or pass --overwrite.")
    # (an older version wrote a threshold of inf as the Infinity token, which reads back as the number)
    changed = [k for k in record if strict_json.number(earlier[k]) != strict_json.number(record[k])]
    if changed and not overwrite:
        what = "; ".join(f"model sha256 {str(earlier[k])[:12]} -> {str(record[k])[:12]}" if k == "model_sha256"
                         else f"{k} {_change(earlier[k], record[k])}" for k in changed)
        raise CeVAEError(f"The outputs in {path.parent} were made with other settings ({what}; see {path}); pass "
                         "--overwrite to score every volume again with these, or choose another --out-dir.")
    return not changed


def other_settings(out_dir: Path, record: Dict[str, object], remove: bool = False) -> Optional[str]:
    """A settings record in ``out_dir`` (of this run, another shard or another run) that differs from ``record``,
    described ("batch_settings_shard-1-of-2.json: threshold 1 -> 4.88"); None if every one agrees. ``remove``
    (--overwrite): such records are removed instead (what they describe is scored again), and None returned."""
    for path, other in settings_records(out_dir, record):
        changed = [k for k in record if strict_json.number(other[k]) != strict_json.number(record[k])]
        if changed and remove:
            log.info("--overwrite: %s recorded other settings; removed (the outputs it describes are made "
                     "again by the runs that score them).", path.name)
            path.unlink(missing_ok=True)
        elif changed:
            return f"{path.name}: " + "; ".join(f"{k} {_change(other[k], record[k])}" for k in changed)
    return None


def settings_records(out_dir: Path, record: Dict[str, object]) -> Iterator[Tuple[Path, Dict[str, object]]]:
    """(path, content) of each batch settings record in ``out_dir`` (of this run, a shard or another run) with the
    fields of ``record``; files that are no such record are passed over (refused where they are this run's own)."""
    for path in sorted(out_dir.glob("batch_settings*.json")):
        try:
            other = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(other, dict) and set(other) == set(record):
            yield path, other


def _change(before: object, now: object) -> str:
    """``before -> now``, numbers to 6 significant digits where that still tells them apart."""
    if all(isinstance(v, float) for v in (before, now)) and f"{before:.6g}" != f"{now:.6g}":
        return f"{before:.6g} -> {now:.6g}"
    return f"{before!r} -> {now!r}"


# ---- one volume ---------------------------------------------------------------------------
def measure(score, labelmap, top: Optional[Tuple[int, int]]) -> Dict[str, object]:
    """Summary values of one volume's outputs: flagged volume, number of components (26-connected, as the
    component table counts them), highest score, top slice (IJK axis, index)."""
    import numpy as np
    import SimpleITK as sitk

    from ..io.images import voxel_volume_ml

    voxel_ml = voxel_volume_ml(labelmap)
    flagged = int(np.count_nonzero(sitk.GetArrayViewFromImage(labelmap)))
    return {"flagged_ml": f"{flagged * voxel_ml:.4f}", "components": labelmap_components(labelmap),
            "max_score": f"{float(sitk.GetArrayViewFromImage(score).max()):.6g}",
            "top_slice_axis": "IJK"[top[0]] if top else "", "top_slice": top[1] if top else ""}


def labelmap_components(labelmap) -> int:
    """How many components a labelmap holds: 26-connected, as the component table lists them."""
    import SimpleITK as sitk

    parts = sitk.LabelShapeStatisticsImageFilter()
    parts.Execute(sitk.ConnectedComponent(sitk.Cast(labelmap > 0, sitk.sitkUInt8), True))
    return parts.GetNumberOfLabels()


def top_of_table(slices_csv: str) -> Optional[Tuple[int, int]]:
    """(axis, index) of the first row of a slice table (which lists the most anomalous slice first)."""
    top = next(csv.DictReader(io.StringIO(slices_csv)), None)
    return (int(top["axis"]), int(top["index"])) if top else None


def _row(item: BatchItem, status: str, seconds: Optional[float], error: str = "", **values) -> Dict[str, object]:
    row = {k: "" for k in SUMMARY_FIELDS}
    row.update(name=item.name, image=str(item.image), mask=str(item.mask or ""), status=status, error=error,
               seconds="" if seconds is None else f"{seconds:.2f}", **values)
    return row


def read_back(item: BatchItem, out_dir: Path, source: Dict[str, str]) -> Dict[str, object]:
    """The "skipped" row of a volume whose outputs exist (checked complete first), made from ``source``."""
    import SimpleITK as sitk

    paths = output_paths(out_dir, item.name)
    problem = incomplete_outputs(paths)
    if problem:
        raise ValueError(problem)
    values = measure(sitk.ReadImage(str(paths["score"])), sitk.ReadImage(str(paths["labelmap"])),
                     top_of_table(paths["slices"].read_text(encoding="utf-8")))
    return _row(item, "skipped", None, **values, **source, **output_checksums(paths))


def recorded_row(out_dir: Path, record: Dict[str, object], row: Dict[str, object]) -> Optional[Dict[str, str]]:
    """The finished row, in a batch summary in ``out_dir`` of the settings ``record``, of the volume and output files
    (checksums) of ``row`` that also records what they were made from: that of the run that wrote them. None where
    none does (another run still to write its row, one that was killed, or a file no batch wrote)."""
    for path in sorted(out_dir.glob("summary*.csv")):
        if not _records(settings_path(path), record):
            continue
        for other in _summary_rows(path) or ():
            if (other.get("name") == row["name"] and other.get("status") in ("ok", "skipped")
                    and all(other.get(k) for k in ("image_sha256", *OUTPUT_FIELDS)) and other.get("mask_sha256")
                    is not None and all(other.get(k) == row[k] for k in OUTPUT_FIELDS)):
                return other
    return None


def incomplete_outputs(paths: Dict[str, Path]) -> str:
    """Why a volume's outputs on disk are not a complete set ("" if they are): the checks of a fresh write
    (:mod:`..io.verify`), for the slice and component tables their header, row lengths and final line end, for the
    component table its rows against the labelmap's components, and for the slice table its rows against the slices
    the score map scores."""
    from ..io.verify import incomplete_reason
    from ..result import COMPONENT_FIELDS, PEAK_FIELDS, SIDE_FIELD, SLICE_FIELDS

    before_side = [f for f in COMPONENT_FIELDS if f != SIDE_FIELD]  # tables of versions without the side column,
    before_peaks = [f for f in before_side if f not in PEAK_FIELDS]  # and without the peak columns too
    headers = {"slices": ("slice-score", [SLICE_FIELDS]),
               "components": ("component", [COMPONENT_FIELDS, before_side, before_peaks])}
    for role, path in paths.items():
        if not path.is_file():
            return f"{path.name} is missing"
        reason = incomplete_reason(path, path)
        if reason is None and role in headers:
            reason = _table_reason(path.read_text(encoding="utf-8"), *headers[role])
        if reason:
            return f"{path.name} is incomplete ({reason})"
    return _missing_components(paths) or _unlisted_slices(paths)


def _missing_components(paths: Dict[str, Path]) -> str:
    """Why a component table, whole by its own lines, is not the labelmap's ("" if it is): a table cut where a row
    ends reads whole, but lists fewer components than the labelmap holds."""
    import SimpleITK as sitk

    if "components" not in paths or "labelmap" not in paths:
        return ""
    listed = len(list(csv.reader(io.StringIO(paths["components"].read_text(encoding="utf-8"))))) - 1
    held = labelmap_components(sitk.ReadImage(str(paths["labelmap"])))
    if listed != held:
        return (f"{paths['components'].name} is incomplete (it lists {listed} of the {held} components of "
                f"{paths['labelmap'].name})")
    return ""


def _unlisted_slices(paths: Dict[str, Path]) -> str:
    """Why a slice table, whole by its own lines, is not the score map's ("" if it is): a table cut where a row ends
    reads whole, but the brain has a row for each of its slices and the map scores brain voxels only, so a slice the
    map scores that the table does not list was cut from it. (A cut that takes only slices without scores, the
    brain's outermost and least anomalous, is not seen: nothing written records the table's length.)"""
    import numpy as np
    import SimpleITK as sitk

    if "slices" not in paths or "score" not in paths:
        return ""
    table, score = paths["slices"], paths["score"]
    rows = list(csv.DictReader(io.StringIO(table.read_text(encoding="utf-8"))))
    if not rows:
        return f"{table.name} is incomplete (it lists no slice)"
    axes = {row["axis"] for row in rows}
    if len(axes) != 1 or not axes <= {"0", "1", "2"}:
        return f"{table.name} is not a slice table of {score.name} (its rows are not of one of its axes)"
    image = sitk.ReadImage(str(score))  # (held while its array view is read)
    values = np.moveaxis(sitk.GetArrayViewFromImage(image), 2 - int(axes.pop()), 0)  # the array's axes: (k, j, i)
    scored = {str(i) for i in np.flatnonzero(values.any(axis=(1, 2)))}
    missing = scored - {row["index"] for row in rows}
    if missing:
        return (f"{table.name} is incomplete (it does not list {len(missing)} of the {len(scored)} slices that "
                f"{score.name} scores)")
    return ""


def _table_reason(text: str, what: str, headers: Sequence[Sequence[str]]) -> Optional[str]:
    """Why the text of a CSV table with the columns of one of ``headers`` is not whole (None if it is)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] not in [list(h) for h in headers]:
        return f"no {what} header"
    if not text.endswith("\n") or any(len(r) != len(rows[0]) for r in rows):
        return "a row is cut short"
    return None


class VolumeDetector:
    """Loads the model once and scores volumes, turning any failure into an error row. Once ``stopping()`` is
    true it raises :class:`Cancelled` at the next step of a volume, up to the start of its writing."""

    def __init__(self, settings: DetectSettings, stopping: Callable[[], bool] = lambda: False) -> None:
        from ..engine.bundle import load_bundle
        from ..engine.detector import Detector
        from ..engine.devices import resolve_device

        self.s, self.stopping = settings, stopping
        bundle = load_bundle(settings.model, resolve_device(settings.request.run.device))
        if settings.model_sha256 and bundle.sha256 != settings.model_sha256:  # (the file its weights came from)
            raise ModelChanged(f"The model {settings.model} was replaced after this batch started (by another run?), "
                               "so its outputs would not be those of the model and threshold it records; nothing "
                               "was scored with it. Run the batch again.")
        self.detector = Detector.from_request(bundle, settings.request)

    def __call__(self, item: BatchItem, overwrite: bool) -> Dict[str, object]:
        from ..engine.detector import warnings_logged
        from ..io.images import read_image
        from ..io.nifti_codes import nifti_codes
        from ..io.atomic import write_all
        from ..report import report_picture, result_report_html
        from ..result import components_summary, result_files

        t0 = time.perf_counter()
        try:
            self.go_on()
            try:  # hashed before reading: an input replaced meanwhile gets scored again by a rerun
                source = made_from(item)
            except OSError:
                source = {}  # read_image says what is wrong with the file
            done = None if overwrite else self.done_by_another_run(item, source)
            if done is not None:
                return done
            _said.volume = item.name
            with warnings_logged() as read:  # (a DICOM series that may lack slices), kept with the detection's
                image = read_image(item.image)
                mask = read_image(item.mask, "brain mask") if item.mask else None
            where = f"{item.name}: "
            result = self.detector(image, mask, progress=self.go_on, where=where)  # the console's warnings name it
            warnings = tuple(w[len(where):] if w.startswith(where) else w for w in (*read, *result.record.warnings))
            result.record = dataclasses.replace(result.record, warnings=warnings, inputs=inputs_of(item, source))
            self.go_on()  # past here the outputs are written and their row returned
            paths = output_paths(self.s.out_dir, item.name)
            # outputs, record, picture, report: all or none
            files = volume_files(self.s.out_dir, item.name, self.s.pictures, self.s.reports)
            contents = result_files(result, {r: p for r, p in files.items() if r not in (PICTURE_ROLE, REPORT_ROLE)},
                                    nifti_codes(item.image))
            # a report embeds the picture where the research extra can draw it
            picture = report_picture(image, result, item.name) if self.s.pictures or self.s.reports else None
            if self.s.pictures:
                contents[files[PICTURE_ROLE]] = picture
            if self.s.reports:
                contents[files[REPORT_ROLE]] = result_report_html(item.name, result, picture)
            every = volume_files(self.s.out_dir, item.name, True, True)  # an earlier run's picture and report
            stale = {role: every[role] for role, wanted in ((PICTURE_ROLE, self.s.pictures),
                                                            (REPORT_ROLE, self.s.reports)) if not wanted}
            try:  # the checksums are of the files this run wrote
                with hold_outputs({*files.values(), *stale.values()}, "batch"):
                    write_all(contents, overwrite, (item.image, item.mask), command="batch")
                    written = {**output_checksums(paths), RECORD_FIELD: sha256_of(files[RECORD_ROLE])}
                    for role, path in stale.items():
                        _remove_stale(path, item.name, role)
            except CeVAEError as exc:
                done = None if overwrite else self.done_by_another_run(item, source)
                if done is not None:
                    return done
                if isinstance(exc, OutputHeld):  # a rerun once the other run is done resolves it
                    rerun = "Run the batch again once the other run is done." if overwrite else RERUN_AFTER_OTHER
                    raise CeVAEError(f"{exc.holder} was writing its outputs in {self.s.out_dir} meanwhile; they are "
                                     f"not taken for this run's. {rerun}") from None
                raise
            top = result.top_slice
            return _row(item, "ok", time.perf_counter() - t0, warnings=WARNINGS_APART.join(warnings),
                        **measure(result.score, result.labelmap, (top.axis, top.index) if top else None), **source,
                        **written, **{FOUND: components_summary(result.components)})
        except Cancelled:
            raise
        except Exception as exc:  # one bad volume must not stop the cohort
            log.debug("%s failed.", item.name, exc_info=True)
            message = (one_line(exc) if isinstance(exc, CeVAEError) else
                       "out of memory; give a smaller --batch-size or fewer --workers" if out_of_memory(exc) else
                       f"unexpected {type(exc).__name__}: {one_line(exc)}")
            refused = {REFUSED: isinstance(exc, CeVAEError)}
            return _row(item, "error", time.perf_counter() - t0, error=message, **refused)

    def go_on(self, fraction: float = 0.0, message: str = "") -> None:
        """Raise :class:`Cancelled` once the batch is stopping (also the detector's progress callback)."""
        if self.stopping():
            raise Cancelled("The batch was interrupted.")

    def done_by_another_run(self, item: BatchItem, source: Dict[str, str]) -> Optional[Dict[str, object]]:
        """The "skipped" row of a volume whose complete outputs appeared since this run started (another
        batch on the same --out-dir, with the same settings, finished it), with that run's warnings; None if they are
        not all there and complete. Refused (and kept) where a run with other settings writes there, or where no
        summary there records them as made from this volume's current image and mask: another list's volume of
        the same name, or files a run has not recorded (yet), would be taken for this one's."""
        try:
            row = read_back(item, self.s.out_dir, source)
        except (RuntimeError, OSError, ValueError, KeyError, csv.Error):
            return None
        record = settings_record(self.s)
        other = other_settings(self.s.out_dir, record)
        if other:
            raise CeVAEError(f"Its outputs were written meanwhile by a run with other settings ({other}); they are "
                             "not taken for this run's. Give each set of settings its own --out-dir.")
        theirs = recorded_row(self.s.out_dir, record, row)
        if theirs is None:
            raise CeVAEError(f"Its outputs in {self.s.out_dir} were written meanwhile by another run, and no batch "
                             "summary there records what they were made from (yet); they are kept, not taken for "
                             f"this run's. {RERUN_AFTER_OTHER}")
        if any(theirs[k] != source.get(k) for k in SOURCE_FIELDS):
            raise CeVAEError(f"Its outputs in {self.s.out_dir} were written meanwhile by another run from another "
                             f"image or brain mask ({theirs['image']}); they are kept, not taken for this run's. "
                             "Give each list its own --out-dir, or its volumes other names (a 'name' column in "
                             "the CSV).")
        log.info("%s was finished by another run meanwhile; its outputs are kept.", item.name)
        row["warnings"] = theirs.get("warnings") or ""
        row[RECORD_FIELD] = kept_record(self.s.out_dir, item.name, theirs.get(RECORD_FIELD) or "")
        return row


_worker: Optional[VolumeDetector] = None
_worker_error: Optional[CeVAEError] = None  # why the worker has no detector (raised for each volume it is given)


def _init_worker(settings: DetectSettings, threads: int, log_level: int, stop: Event) -> None:
    import SimpleITK as sitk
    import torch

    global _worker, _worker_error
    pool_worker_signals()
    logging.basicConfig(level=log_level, format=f"%(levelname)s: [worker {os.getpid()}] %(message)s")
    torch.set_num_threads(threads)
    if not os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):  # the user's wins, as in cli.main.fit_threads
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_said)
    try:
        _worker = VolumeDetector(settings, stop.is_set)
    except ModelChanged as exc:  # raised in the initializer, it would break the pool ("a worker process died")
        _worker_error = exc


def _work(item: BatchItem, overwrite: bool) -> Dict[str, object]:
    if _worker_error is not None:
        raise _worker_error
    if _worker is None:
        raise RuntimeError("the worker process was not initialised")
    return _worker(item, overwrite)


# ---- the batch ----------------------------------------------------------------------------
REWRITE_SHARE = 50  # a summary is rewritten at most once per this many times its last rewrite took (2 %)


class Summary:
    """Rows by volume name, written to the CSV atomically: at most every ``interval`` s, and on flush. Each write
    rewrites every row, so a large one waits :data:`REWRITE_SHARE` times as long as its last write took: rewriting
    20000 rows every 2 s kept a batch writing its summary most of the time.

    ``carried``: an earlier run's rows of volumes this run has not reached yet. They stay in the file until this
    run gives the volume a row of its own, so a run stopped early (Ctrl-C while it checks what is done) never
    loses what the earlier one recorded; :meth:`finish` drops those this run never reached. ``kept``: the rows of
    volumes this run does not list (another list's sharing the --out-dir), written on unchanged."""

    def __init__(self, path: Path, interval: float = 2.0, carried: Optional[Dict[str, Dict[str, str]]] = None,
                 kept: Optional[Dict[str, Dict[str, str]]] = None) -> None:
        self.path, self.interval = path, interval
        self.rows: Dict[str, Dict[str, object]] = {}
        self.carried: Dict[str, Dict[str, str]] = dict(carried or {})
        self.kept: Dict[str, Dict[str, str]] = dict(kept or {})
        self._written = -math.inf
        self._wait = 0.0  # REWRITE_SHARE times the last write's seconds

    def add(self, row: Dict[str, object]) -> None:
        self.rows[str(row["name"])] = row
        self.carried.pop(str(row["name"]), None)
        self.kept.pop(str(row["name"]), None)
        if time.monotonic() - self._written >= max(self.interval, self._wait):
            self.flush()

    def finish(self) -> None:
        """Every listed volume has its row: the earlier run's rows of listed volumes are not carried on (``kept``,
        of volumes not listed, are)."""
        self.carried.clear()

    def flush(self, replace: bool = False) -> None:
        """Write the rows; with nothing recorded yet the summary there stays as it was, unless ``replace`` (its
        rows describe outputs of other settings)."""
        if not replace and not self.rows and not self.carried and self.path.exists():
            return  # stopped before anything was recorded: the summary there stays as it was
        start = time.monotonic()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        rows = {**self.kept, **self.carried, **self.rows}
        for name in sorted(rows):
            writer.writerow({k: written_cell(v) for k, v in rows[name].items()})
        atomic_write_text(self.path, buf.getvalue())
        self._written = time.monotonic() if rows else -math.inf  # the first row is written at once
        self._wait = REWRITE_SHARE * (self._written - start) if rows else 0.0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows.values())

    def refused_only(self) -> bool:
        """Whether every volume of this run that failed was refused (not out of memory, not an unexpected error)."""
        return all(r.get(REFUSED, True) for r in self.rows.values() if r["status"] == "error")


Summaries = Dict[str, Tuple[Optional[List[Dict[str, str]]], float]]  # by file name: rows (None: not one), mtime


def _summaries_in(out_dir: Path) -> Summaries:
    """Each file ``summary*.csv`` in ``out_dir``, read once for the checks before a run: its rows
    (:func:`_summary_rows`) and modification time."""
    found: Summaries = {}
    for path in out_dir.glob("summary*.csv"):
        try:
            when = path.stat().st_mtime
        except OSError:  # removed meanwhile, or a broken link
            continue
        found[path.name] = (_summary_rows(path), when)
    return found


def _earlier_rows(summary_path: Path, there: Summaries) -> Dict[str, Dict[str, str]]:
    """Finished rows of the summary an earlier run left at this path (a byte-order mark, as Excel saves one, is
    allowed; ``there``: the summaries in its folder). Another file there (without the summary's columns, or not UTF-8
    text) is refused: the run would replace it."""
    if summary_path.name not in there:
        return {}
    rows = there[summary_path.name][0]
    if rows is None:
        raise CeVAEError(f"{summary_path} is not a batch summary; choose another --out-dir or pass --overwrite.")
    return {r["name"]: r for r in rows if r.get("status") in ("ok", "skipped")}


def _rows_not_listed(summary_path: Path, listed: AbstractSet[str], there: Summaries) -> Dict[str, Dict[str, str]]:
    """The rows (any status) of the summary at ``summary_path`` of volumes not named in ``listed``: another list's
    sharing the --out-dir, whose rows a run keeps so that a rerun of that list still skips them. Not those that a
    newer batch summary beside it (``there``: those in its folder) lists too (a shard's that took the volume over
    since): its row supersedes them."""
    if summary_path.name not in there:
        return {}
    rows, when = there[summary_path.name]
    newer = {row["name"] for name, (others, later) in there.items() if name != summary_path.name and later > when
             for row in others or ()}
    return {row["name"]: row for row in rows or () if row["name"] not in listed and row["name"] not in newer}


def _summary_rows(path: Path) -> Optional[List[Dict[str, str]]]:
    """The rows of the batch summary at ``path`` (a byte-order mark, as Excel saves one, is allowed), their text cells
    as they were before the quote that keeps them text in a spreadsheet (:mod:`..io.spreadsheet`); None if the file is
    not one (without the summary's columns, not UTF-8 text, unreadable)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if set(SUMMARY_FIELDS) - set(LATER_FIELDS) <= set(reader.fieldnames or ()):
                return [read_row(row) for row in reader]
    except (OSError, csv.Error, ValueError):  # ValueError: not UTF-8 text
        pass
    return None


def refuse_unrecorded_outputs(items: Sequence[BatchItem], out_dir: Path, record: Dict[str, object],
                              summaries: Summaries) -> None:
    """Refuse, before any work, outputs of ``items`` already in ``out_dir`` that no batch record there accounts for:
    of a volume that no batch summary there lists (any shard's, any status), in a folder without a batch settings
    record like ``record`` (a batch writes one before its first outputs, and its summary may lag behind them: a run
    killed, or another run still going). Such files are not a batch's (the user's, or ``detect``'s), and scoring
    would replace them. ``summaries``: those in ``out_dir``."""
    listed: Optional[Set[str]] = None
    found: List[Path] = []
    for item in items:
        there = [p for p in volume_files(out_dir, item.name).values() if p.exists()]
        if there:
            if listed is None:
                if next(settings_records(out_dir, record), None) is not None:
                    return
                listed = {row["name"] for rows, _ in summaries.values() for row in rows or ()}
            if item.name not in listed:
                found += there
    if found:
        shown = ", ".join(p.name for p in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise CeVAEError(f"{out_dir} already holds {shown}, which no batch wrote there (no batch summary lists their "
                         "volume, and there is no batch_settings.json); they are kept. Pass --overwrite to replace "
                         "them, or choose another --out-dir.")


def refuse_other_volumes_outputs(items: Sequence[BatchItem], described: Mapping[str, Tuple[Dict[str, str], float]],
                                 out_dir: Path) -> None:
    """Refuse, before any work, outputs in ``out_dir`` of a volume of an item's name, in any case and Unicode form
    (one file on macOS and Windows), that a batch summary there (``described``: :func:`_described_rows`) records as
    made from another image file, which still exists, and other content than the item's image and mask: another
    list's volume of the same name (``A/head.nii.gz`` and ``B/head.nii.gz``, both 'head'; 'Head' and 'head'),
    which scoring would replace. A scan changed in place, or moved (its recorded path gone), is scored again as
    before."""
    twins: Dict[str, List[str]] = {}
    for name in described:
        twins.setdefault(one_form(name).casefold(), []).append(name)
    for item in items:
        for name in sorted(twins.get(one_form(item.name).casefold(), ()), key=lambda n: n != item.name):
            _refuse_other_volumes(item, name, described[name][0], out_dir)


def _refuse_other_volumes(item: BatchItem, name: str, row: Dict[str, str], out_dir: Path) -> None:
    """Refuse outputs of the volume ``name`` (``item``'s name, or one that is the same file on macOS or Windows) in
    ``out_dir`` where ``row``, its summary row, records them as made from another scan than ``item``'s."""
    theirs = Path(row["image"]) if row.get("image") else None
    if theirs is None or not os.path.exists(theirs) or not any(
            p.exists() for p in volume_files(out_dir, name).values()):
        return
    try:
        if os.path.samefile(theirs, item.image) or all(v == row.get(k) for k, v in made_from(item).items()):
            return
    except OSError:  # a missing or unreadable image: scoring it says what is wrong
        return
    alike = "" if name == item.name else f", and '{name}_*' and '{item.name}_*' are " + (
        f"{UNICODE_TWINS}, one file on macOS" if one_form(name) == one_form(item.name) else
        "one file on a case-insensitive file system (macOS, Windows)")
    raise CeVAEError(f"{out_dir} holds outputs of '{name}' that a batch summary there records as made from "
                     f"{theirs}, another scan than {item.image} (another list sharing this --out-dir?){alike}; they "
                     "are kept. Give each list its own --out-dir, or its volumes other names (a 'name' column in the "
                     f"CSV); to replace them, remove them ({name}_*) or pass --overwrite.")


def _described_rows(out_dir: Path, record: Dict[str, object],
                    there: Summaries) -> Dict[str, Tuple[Dict[str, str], float]]:
    """For each volume name, its finished row in the newest batch summary in ``out_dir`` (``there``: those in it;
    this run's, a shard's or another run's) whose settings record is ``record``, with that summary's modification
    time."""
    described: Dict[str, Tuple[Dict[str, str], float]] = {}
    for name, (rows, when) in there.items():
        if not _records(settings_path(out_dir / name), record):
            continue
        for row in rows or ():
            if row.get("status") in ("ok", "skipped") and when > described.get(row["name"], ({}, -math.inf))[1]:
                described[row["name"]] = (row, when)
    return described


def _records(path: Path, record: Dict[str, object]) -> bool:
    """Whether the batch settings file ``path`` records ``record``."""
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(other, dict) and set(other) == set(record) and all(
        strict_json.number(other[k]) == strict_json.number(record[k]) for k in record)


def _skipped_row(item: BatchItem, paths: Dict[str, Path], earlier: Optional[Dict[str, str]],
                 unknown: List[str]) -> Optional[Dict[str, object]]:
    """The "skipped" row of a volume whose outputs are complete and, says a summary of these settings (``earlier``),
    are the files it recorded (checksums) and were made from its current image and mask. None if it is to be
    scored again: its outputs are incomplete, not the recorded ones, or its input changed (all logged here), or
    nothing records what they are (its name goes to ``unknown``). Outputs that are the recorded files were complete
    when written, so only others are read through (the completeness check takes far longer than the checksums)."""
    recorded = earlier is not None and all(earlier.get(k) for k in ("image_sha256", *OUTPUT_FIELDS)) and not any(
        earlier.get(k) is None for k in UNTRUSTED_WITHOUT)
    try:
        outputs: Optional[Dict[str, str]] = output_checksums(paths) if recorded else None
    except OSError:
        outputs = None  # said below: unreadable
    same = outputs is not None and earlier is not None and all(
        outputs[f"{role}_sha256"] == earlier[f"{role}_sha256"] for role in paths)
    if not same:
        try:
            problem = incomplete_outputs(paths)
            if problem:
                raise ValueError(problem)
        except (RuntimeError, OSError, ValueError, KeyError, csv.Error) as exc:
            log.warning("The outputs of %s are incomplete or unreadable (%s); scoring it again.", item.name,
                        one_line(exc))
            return None
    if not recorded:
        unknown.append(item.name)
        return None
    if outputs is None:
        log.warning("The outputs of %s are unreadable; scoring it again.", item.name)
        return None
    if not same:
        differ = [path.name for role, path in paths.items() if outputs[f"{role}_sha256"] != earlier[f"{role}_sha256"]]
        log.warning("The outputs of %s are not the files its summary records (%s differ%s: changed, damaged, or "
                    "restored from another run); scoring it again.", item.name, ", ".join(differ),
                    "s" if len(differ) == 1 else "")
        return None
    try:
        source = made_from(item)
    except OSError:
        return None  # scoring it says what is wrong with the file
    changed = [f"{what} {path or '(none)'}" for what, path, key in (
        ("image", item.image, "image_sha256"), ("brain mask", item.mask, "mask_sha256")) if earlier[key] != source[key]]
    if changed:
        log.warning("The input of %s changed since its outputs were made (%s); scoring it again.", item.name,
                    ", ".join(changed))
        return None
    skipped = _row(item, "skipped", None, **{k: earlier.get(k) or "" for k in (*MEASURES, "warnings")}, **source,
                   **outputs)
    skipped["seconds"] = earlier["seconds"]  # the time the earlier run took
    return skipped


EXTRAS = {PICTURE_ROLE: ("picture", "--pictures", "draw", "drawn"), REPORT_ROLE: ("report", "--reports", "make",
                                                                               "made")}
# role -> its name, its flag, and what the flag does to it (to do it, done)


def _remove_stale(path: Path, name: str, role: str) -> None:
    """Remove the key picture or report (``role``) an earlier run with --pictures or --reports made of volume
    ``name``, scored again now without: it showed the earlier result beside the new outputs. One that cannot be
    removed is warned of."""
    what, flag, do, _ = EXTRAS[role]
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("%s: its %s %s shows the earlier result and could not be removed (%s); remove it, or run "
                    "again with %s to %s it anew.", name, what, path, exc.strerror or exc, flag, do)
        return
    log.info("%s: its %s %s showed the earlier result; removed (%s %ss it anew).", name, what, path.name, flag, do)


def _add_missing(item: BatchItem, out_dir: Path, roles: Sequence[str], threshold: float, recorded: bool) -> None:
    """Make the key picture and report (``roles``) of a done (skipped) volume that has none from its saved outputs
    (one there is kept); one that cannot be made is warned of, and the volume stays done. A report needs the record
    written with the outputs (``recorded``: its file is that one). The picture is drawn once, for both."""
    from ..io.atomic import write_all

    picture: Optional[bytes] = None  # the key picture drawn for the picture file, which the report embeds
    for role in roles:
        path = volume_files(out_dir, item.name, True, True)[role]
        if os.path.lexists(path):
            continue
        what, _, _, made = EXTRAS[role]
        if role == REPORT_ROLE and not recorded:
            log.warning("%s: its report cannot be made from its saved outputs: its record %s is missing or not the "
                        "file written with them; its outputs are kept (--overwrite scores it again, with its record "
                        "and report).", item.name, volume_files(out_dir, item.name)[RECORD_ROLE].name)
            continue
        try:
            if role == PICTURE_ROLE:
                picture = content = picture_of_outputs(item, out_dir, threshold)
            else:
                content = report_of_outputs(item, out_dir, picture)
            write_all({path: content}, False, (item.image, item.mask), command="batch")
            log.info("%s: done before; its %s %s %s from its saved outputs.", item.name, what, path.name, made)
        except (CeVAEError, RuntimeError, OSError, ValueError, KeyError, csv.Error) as exc:
            log.warning("%s: its %s could not be %s from its saved outputs (%s); its outputs are kept.",
                        item.name, what, made, one_line(exc))


def _before_component_tables(paths: Dict[str, Path], earlier: Optional[Dict[str, str]]) -> bool:
    """Whether a volume's outputs are those of a version that wrote no component table: every one there but that
    table, which the summary row describing them (``earlier``, if any) does not record."""
    return not paths["components"].exists() and not (earlier or {}).get("components_sha256") and all(
        path.exists() for role, path in paths.items() if role != "components")


def _some(names: Sequence[str]) -> str:
    """The first five ``names``, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def run_batch(
    items: Sequence[BatchItem],
    settings: DetectSettings,
    summary_path: Path,
    workers: int = 1,
    progress: Optional[ProgressCallback] = None,
) -> Summary:
    """Score every item, skipping those whose complete outputs a summary in the folder (this run's or a shard's)
    records as made from their current image and mask with these settings; ``overwrite`` scores every item.
    Without it, a file at the summary path that is not a batch summary, and outputs made with other settings, are
    refused before any work. Another run writing the same summary (the same --out-dir and shard) is refused at
    once. A scan listed again under another name is scored once (:func:`unique_items`). The summary keeps the rows
    of volumes not in ``items`` (:func:`_rows_not_listed`) where the settings record beside it is of these settings."""
    if workers < 1:
        raise CeVAEError(f"--workers must be 1 or more, got {workers}.")
    with hold_output(summary_path, "batch"):
        return _run_batch(unique_items(items), settings, summary_path, workers, progress)


def _run_batch(items: Sequence[BatchItem], settings: DetectSettings, summary_path: Path, workers: int,
               progress: Optional[ProgressCallback]) -> Summary:
    started = time.time()
    record_path = settings_path(summary_path)
    made_with = settings_record(settings)
    settings = replace(settings, model_sha256=str(made_with["model_sha256"]))  # what every detector must load
    there = {} if settings.overwrite else _summaries_in(settings.out_dir)  # each read once for the checks below
    earlier = {} if settings.overwrite else _earlier_rows(summary_path, there)
    known = _settings_known(record_path, made_with, settings.overwrite)
    unsharded = summary_path.name == summary_name(None)
    if not settings.overwrite:
        other = other_settings(settings.out_dir, made_with)
        if other:  # a shard or another run with other settings: their outputs would be taken for this run's
            raise CeVAEError(f"Another run wrote outputs in {settings.out_dir} with other settings ({other}); give "
                             "each set of settings its own --out-dir, or score every volume again with these in one "
                             "run without --shard and with --overwrite.")
        refuse_unrecorded_outputs(items, settings.out_dir, made_with, there)
    described = {} if settings.overwrite else _described_rows(settings.out_dir, made_with, there)  # shards' rows too
    refuse_other_volumes_outputs(items, described, settings.out_dir)
    if not known:
        earlier = {}  # nothing says which settings made the outputs there
    if known and settings.overwrite:  # (their rows are kept: read for that alone)
        there = _summaries_in(summary_path.parent)
    kept = _rows_not_listed(summary_path, {item.name for item in items}, there) if known else {}
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries([summary_path, record_path, *(p for item in items for p in volume_files(
        settings.out_dir, item.name, settings.pictures, settings.reports).values())], started)  # what killed runs
    # left (skipped volumes' too)
    summary = Summary(summary_path, carried=earlier, kept=kept)
    total = len(items)
    t0 = time.perf_counter()

    def record(row: Dict[str, object]) -> None:
        summary.add(row)
        done = len(summary.rows)
        if row["status"] == "ok":
            detail = f"{row[FOUND]}; max score {row['max_score']}, {row['seconds']} s"
        else:
            detail = str(row["error"])
        log.info("[%d/%d] %s: %s (%s).", done, total, row["name"], row["status"], detail)
        report(progress, done / total, f"{row['name']} {row['status']}")

    wrote_record = False
    try:
        todo: List[Tuple[BatchItem, bool]] = []
        unknown: List[str] = []
        tableless: List[str] = []  # outputs of a version that wrote no component table
        unrecorded: List[str] = []  # done volumes without their record (NAME_record.json)
        said: List[str] = []  # of those, the ones whose summary row says so already (a rerun's warning said it)
        for item in items:
            paths = output_paths(settings.out_dir, item.name)
            present = [p.exists() for p in paths.values()]
            described_by = described.get(item.name, (None,))[0]
            if all(present) and not settings.overwrite:
                row = _skipped_row(item, paths, described_by, unknown)
                if row is not None:
                    row[RECORD_FIELD] = kept_record(settings.out_dir, item.name, (described_by or {}).get(
                        RECORD_FIELD) or "")
                    if not row[RECORD_FIELD]:
                        (said if (described_by or {}).get(RECORD_FIELD) == "" else unrecorded).append(item.name)
                    _add_missing(item, settings.out_dir, [role for role, wanted in (
                        (PICTURE_ROLE, settings.pictures), (REPORT_ROLE, settings.reports)) if wanted],
                        strict_json.number(made_with["threshold"]), bool(row[RECORD_FIELD]))
                    summary.add(row)
                    continue
            elif _before_component_tables(paths, described_by) and not settings.overwrite:
                tableless.append(item.name)
            elif any(present) and not settings.overwrite:
                log.warning("The outputs of %s are incomplete (%s missing); scoring it again, replacing %s.", item.name,
                            ", ".join(p.name for p, there in zip(paths.values(), present) if not there),
                            ", ".join(p.name for p, there in zip(paths.values(), present) if there))
            written = volume_files(settings.out_dir, item.name, settings.pictures, settings.reports)
            todo.append((item, settings.overwrite or any(present) or any(os.path.lexists(written[role]) for role in (
                RECORD_ROLE, PICTURE_ROLE, REPORT_ROLE) if role in written)))
        if unknown:
            log.warning("Nothing records the input and settings that made the outputs of %d volume(s) (no row with "
                        "input and output checksums in a summary in %s beside a settings record like %s); "
                        "scoring them again to be safe: %s.", len(unknown), settings.out_dir, record_path.name,
                        _some(unknown))
        if unrecorded:
            log.warning("%d volume(s) done have no record of how their outputs were made (NAME_record.json missing, "
                        "or not the file written with them; an earlier version of batch wrote none): their "
                        "record_sha256 in the summary is empty (--overwrite scores every volume again, with its "
                        "record): %s.", len(unrecorded), _some(unrecorded))
        if said:
            log.info("%d volume(s) done have no record of how their outputs were made, as the summary says already "
                     "(record_sha256 empty; --overwrite scores every volume again, with its record): %s.", len(said),
                     _some(said))
        if tableless:
            log.warning("The outputs of %d volume(s) have no component table (NAME_components.csv), as earlier "
                        "versions of batch wrote them; scoring them again once, so that every volume has its table: "
                        "%s.", len(tableless), _some(tableless))
        log.info("%d volume(s) to score, %d already done (skipped; --overwrite redoes them); %d worker(s).",
                 len(todo), total - len(todo), min(workers, max(1, len(todo))))
        report(progress, (total - len(todo)) / max(total, 1), "finished volumes skipped")
        recorded = bool(todo) and not known
        alone = workers == 1 or len(todo) <= 1
        detector = VolumeDetector(settings) if todo and alone else None  # loaded (and checked) before the record
        if recorded:  # before the first outputs: a run killed while writing them is still known as a batch
            summary.flush(replace=True)  # first: an earlier summary's rows, of other settings, would be trusted
            atomic_write_text(record_path, strict_json.dumps(made_with, indent=2) + "\n", inputs=(settings.model,))
            wrote_record = True
        with each_volume_warning_once():
            if detector is not None:
                for item, overwrite in todo:
                    record(detector(item, overwrite))
            elif todo:
                _run_pool(todo, settings, min(workers, len(todo)), record, summary.add)
        again = repeated_warnings(r for r in summary.rows.values() if r["status"] == "ok")
        if again:
            log.info("%d of the volumes' warnings repeated an earlier volume's in the same words: each was said "
                     "once%s; every volume's warnings are in the warnings column of %s.", again,
                     "" if detector is not None else " per worker", summary_path.name)
        summary.finish()
        if recorded and not summary.count("ok") and not summary.count("skipped"):  # no outputs to describe (all
            record_path.unlink(missing_ok=True)  # failed, e.g. a full disk): a later run may use other settings
        if settings.overwrite and unsharded and not summary.count("error"):  # every volume scored again: other
            other_settings(settings.out_dir, made_with, remove=True)  # runs' records are superseded (a shard's
            # --overwrite replaces its own only: the other shards' outputs are still what theirs describe)
    except ModelChanged:  # (in the workers, which load the model after the record is written)
        if wrote_record and not summary.count("ok"):  # it describes no outputs: a rerun must not be held to it
            record_path.unlink(missing_ok=True)
        raise
    finally:
        summary.flush()
    seconds = time.perf_counter() - t0
    scored = summary.count("ok") + summary.count("error")
    log.info("Done: %d ok, %d skipped, %d error(s) in %.0f s%s; summary %s.", summary.count("ok"),
             summary.count("skipped"), summary.count("error"), seconds,
             f" ({60 * scored / seconds:.1f} volumes/min)" if scored else "", summary_path)
    return summary


def _run_pool(todo: Sequence[Tuple[BatchItem, bool]], settings: DetectSettings, workers: int,
              record: Callable[[Dict[str, object]], None], keep: Callable[[Dict[str, object]], None]) -> None:
    """Score ``todo`` in ``workers`` spawned processes that share the machine's cores, passing each row to
    ``record``. Interrupted (or a worker lost), it hands out no more volumes, the workers give up theirs at their
    next step unless already writing, and ``keep`` gets the row of every volume that finished meanwhile."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    threads = threads_per_process(workers)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(settings, threads, logging.getLogger().getEffectiveLevel(), stop))
    futures: List[Future] = []
    try:
        for item, overwrite in todo:
            futures.append(pool.submit(_work, item, overwrite))
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except BrokenProcessPool:
                raise RunFailed("A worker process died (out of memory, or killed). Finished volumes are in the "
                                "summary and a rerun skips them; try fewer --workers.") from None
            record(row)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                keep(fut.result())
        raise
    pool.shutdown(wait=True)
