"""Shareable copies of a model bundle, without the names of the scans it was made from.

A bundle records each training, validation, site and calibration scan by name (its file stem, or the name Slicer gave
it) beside its sha256. In a hospital a file name often carries a patient's ID or name, so a model file adapted or
calibrated on a site's own scans would pass those on to whoever it is shared with. :func:`share_model` writes a copy
whose records call the scans "scan 1", "scan 2", ..., the same scan (by its sha256) the same number in every record,
numbers the persons scanned (older models recorded their labels) and keeps everything else as it is: the checksums,
the weights (their bytes) and the calibration tables, so the copy detects exactly as the model does. The header
records that the names were removed (:data:`NAMES_REMOVED`). No torch.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, Set, Tuple, Union

from .. import __version__
from ..data import refuse_bundled_output
from ..errors import CeVAEError
from ..io.atomic import atomic_path
from ..io.lock import hold_output
from ..io.naming import refuse_misnamed
from ..io.targets import check_paths
from .bundle_checks import BASE_VOLUMES_KEY, NAMES_REMOVED
from .header import (BUNDLE_SUFFIX, CHANGED_WEIGHTS, META_KEY, WEIGHTS_DIGEST_KEY, bundle_layout, finite_record,
                     later_writer, read_header, weights_digest)

# the records of scans with their sha256: (section, list) of the header
VOLUME_RECORDS = (("training", "subjects"), ("training", "validation_subjects"), ("adaptation", "site_scans"),
                  ("recalibration", "scans"), ("adaptation", BASE_VOLUMES_KEY))
# the places that hold the model's own name, options, calibration tables and references to other models, and those
# this project fills from its own words, numbers and versions (a list's items as "[]"), never a scan's name: a scan
# named "T1" or "1" is no name left in the modality or a person's number
UNNAMED = frozenset({"name", "preprocess", "loss", "model", "score_options", "postprocess", "calibration",
                     "recalibration.options", "recalibration.software", "recalibration.parent",
                     "recalibration.original", "adaptation.parent", "format", "modality", "weights_dtype",
                     "weights_sha256", "written_by", "versions", "training.orientations", "training.device",
                     "training.parts[].device", "training.subjects[].person", "training.validation_subjects[].person",
                     "adaptation.site_scans[].person", "adaptation.calibration", "recalibration.calibrated_utc",
                     "training.trained_utc"})
ALREADY_SHARED = "is already a shareable copy (its scans are called scan 1, scan 2, ...): give it as it is"
_SCAN = re.compile(r"scan [1-9][0-9]*\Z")  # a name this module gives
_SCAN_OR_DIGEST = re.compile(r"(?:scan [1-9][0-9]*|[0-9a-fA-F]{64})\Z")  # a name this module gives, or a sha256
_INDEX = re.compile(r"\[[0-9]+\]")  # a list item's index in a place
# the keys this project writes outside :data:`UNNAMED` (never a scan's name it is told): the header's sections, the
# training record's (training/packaging.TrainingRecord, its augmentation's training/config.AugmentConfig, its parts'),
# a volume record's (training/packaging.subject_records), the adaptation record's (training/adapt.py), its folds', a
# calibrated copy's (engine/calibrate.py), the training contrast's and the record of removed names. Any other key,
# "john_doe" as much as "DOE_JOHN", may be a person's name
KEYS = frozenset({
    "format_version", "calibration_subjects", "default_fpr", "training", "adaptation", "recalibration",
    "training_contrast", NAMES_REMOVED,
    "subjects", "validation_subjects", "train_slices", "steps", "batch_size", "lr", "seed", "seconds", "ranks",
    "augment", "val_loss", "amp", "parts", "from_step",
    "flip", "rotate_deg", "scale", "translate", "elastic", "gamma", "intensity_scale", "intensity_shift", "bias_field",
    "noise", "slab",
    "name", "sha256", "content_sha256", "mask_sha256", "person",
    "site_scans", BASE_VOLUMES_KEY, "folds", "steps_per_run", "depth_contrast", "scan_depth_contrast", "held_out",
    "trained_on", "scans"})


class _Numbers:
    """Each scan's new name, "scan N": by its sha256 where a record gives it, else by its old name."""

    def __init__(self) -> None:
        self._new: Dict[Tuple[str, str], str] = {}  # ("sha256", digest) or ("name", old name) -> "scan N"
        self._by_name: Dict[str, Set[str]] = {}  # old name -> the new names of the scans so named

    def of_volume(self, record: Mapping[str, Any]) -> str:
        """The new name of a volume's record (its name and sha256)."""
        name, sha256 = record.get("name"), record.get("sha256")
        new = self._number(("sha256", sha256)) if isinstance(sha256, str) and sha256 else self.of_name(name)
        if isinstance(name, str):
            self._by_name.setdefault(name, set()).add(new)
        return new

    def of_name(self, name: Any) -> str:
        """The new name of a scan a record names without its sha256: that of the one volume so named, else its own."""
        known = self._by_name.get(name, set()) if isinstance(name, str) else set()
        return next(iter(known)) if len(known) == 1 else self._number(("name", str(name)))

    def _number(self, key: Tuple[str, str]) -> str:
        return self._new.setdefault(key, f"scan {len(self._new) + 1}")

    @property
    def count(self) -> int:
        """How many scans were given a number."""
        return len(self._new)


def without_scan_names(header: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a bundle's JSON header whose records name every scan "scan N" (:class:`_Numbers`) and number the
    persons scanned (:func:`_number_persons`), and that records how many scans it renamed under
    :data:`NAMES_REMOVED`. Refused where a scan's old name is still left in it (a record this version does not
    know)."""
    out = copy.deepcopy(dict(header))
    numbers = _Numbers()
    old: Set[Any] = set()
    adaptation = out.get("adaptation")
    site = _named_once(adaptation.get("site_scans") if isinstance(adaptation, dict) else None)  # renamed below
    for volume in _volumes(out):  # first: the names without a sha256 are matched with these
        old.add(volume.get("name"))
        volume["name"] = numbers.of_volume(volume)
    _number_persons(out)
    calibrated = out.get("calibration_subjects")
    if isinstance(calibrated, list):
        old.update(calibrated)
        out["calibration_subjects"] = _calibration_names(out, calibrated, numbers)
    if isinstance(adaptation, dict) and isinstance(adaptation.get("folds"), list):
        old.update(n for fold in adaptation["folds"] if isinstance(fold, dict) for names in fold.values()
                   if isinstance(names, list) for n in names)
        adaptation["folds"] = [_renamed_fold(fold, site, numbers) for fold in adaptation["folds"]]
    out[NAMES_REMOVED] = {"scans": numbers.count}
    _refuse_left(out, {n for n in old if isinstance(n, str) and not _SCAN.match(n)})
    return out


def _volumes(header: Mapping[str, Any]) -> Iterator[Dict[str, Any]]:
    """The records of scans with their sha256 (:data:`VOLUME_RECORDS`), in order."""
    for section, key in VOLUME_RECORDS:
        record = header.get(section)
        volumes = record.get(key) if isinstance(record, dict) else None
        yield from (v for v in volumes or () if isinstance(v, dict))


def _number_persons(header: Mapping[str, Any]) -> None:
    """Number the persons of the volume records "1", "2", ... in order of first appearance, one numbering for all
    records: a model made before persons were numbered records each by its label (a manifest's subject column, a BIDS
    sub- label), which may be a patient's ID."""
    numbers: Dict[str, str] = {}
    for volume in _volumes(header):
        if isinstance(volume.get("person"), str):
            volume["person"] = numbers.setdefault(volume["person"], str(len(numbers) + 1))


def _calibration_names(header: Mapping[str, Any], names: List[Any], numbers: _Numbers) -> List[str]:
    """The new names of a calibrated copy's ``calibration_subjects``: those of its recalibration record's scans
    (renamed already), which list the same scans in the same order; else each by its old name."""
    record = header.get("recalibration")
    scans = record.get("scans") if isinstance(record, dict) else None
    if isinstance(scans, list) and len(scans) == len(names) and all(isinstance(s, dict) for s in scans):
        return [str(s.get("name")) for s in scans]
    return [numbers.of_name(n) for n in names]


def _named_once(volumes: Any) -> Dict[str, Dict[str, Any]]:
    """The records of ``volumes`` by name, of each name that one of them has."""
    records = [v for v in volumes or () if isinstance(v, dict) and isinstance(v.get("name"), str)]
    counts = Counter(v["name"] for v in records)
    return {v["name"]: v for v in records if counts[v["name"]] == 1}


def _renamed_fold(fold: Any, site: Mapping[str, Mapping[str, Any]], numbers: _Numbers) -> Any:
    """An adaptation fold's lists of scans (held out, trained on) with their new names: those of the site scans
    (``site``: by old name, renamed), which the folds name; a calibration scan of the same name is another scan."""
    if not isinstance(fold, dict):
        return fold
    new = {n: str(v["name"]) for n, v in site.items()}
    return {k: [new[n] if isinstance(n, str) and n in new else numbers.of_name(n) for n in v] if isinstance(v, list)
            else v for k, v in fold.items()}


def _refuse_left(header: Mapping[str, Any], old: Set[str]) -> None:
    """Refuse a header that still holds one of the ``old`` scan names outside :data:`UNNAMED`, or there any text but
    a name this module gives and a checksum (a record this version does not write may hold a scan's path, or a name
    another tool gave it). (Its format version is not newer than this one's, read_header saw to that: updating helps
    only where a later version wrote the record.)"""
    found = list(_texts(header, ""))  # (place, text, whether it is a key)
    said = ("no shareable copy was written. If a later CeVAEAnomaly made the model, share it with that one; else the "
            "file was edited: share an original copy.")
    for where, text, key in found:
        if text in old:
            raise CeVAEError(f"The model's header holds the scan name {text!r}{' as a key' if key else ''} in "
                             f"'{where}', a record this version cannot rename; {said}")
    for where, text, key in found:  # (the text itself is not said: it may be a patient's name)
        if not (text in KEYS if key else _SCAN_OR_DIGEST.match(text)):
            place = f"in '{where}'" if where else "at its top level"
            raise CeVAEError(f"The model's header holds a {'key' if key else 'text'} {place}, a record this version "
                             f"does not write and cannot tell to hold no scan's name or path; {said}")


def _texts(value: Any, where: str) -> Iterator[Tuple[str, str, bool]]:
    """(place, text, whether it is a key) of every text and record key in ``value`` (at ``where``; a key's place is
    its record's) but those at the places of :data:`UNNAMED` and in them."""
    if isinstance(value, str):
        yield where, value, False
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _texts(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            place = f"{where}.{key}" if where else str(key)
            if _INDEX.sub("[]", place) not in UNNAMED:
                yield where, str(key), True
                yield from _texts(item, place)


def share_model(model: Union[str, Path], out: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a copy of the bundle ``model`` to ``out`` without the names of its scans (:func:`without_scan_names`),
    atomically; its weights and calibration are the model's, byte for byte. ``out`` may not be ``model`` nor the
    bundled default model, and an existing ``out`` is replaced only with ``overwrite``. A shareable copy is refused:
    it is the file to give."""
    source, target = Path(model), Path(out)
    if NAMES_REMOVED in read_header(source).extra:  # (a damaged file or no bundle is refused as such first)
        raise CeVAEError(f"{source} {ALREADY_SHARED}; no copy was written.")
    refuse_bundled_output(target)  # even with overwrite
    check_paths([target], overwrite, [source])
    refuse_misnamed(target, "model", "a .cevae bundle", BUNDLE_SUFFIX)
    with hold_output(target, "share"):  # against a calibrate or another share writing it
        check_paths([target], overwrite, [source])  # again: one of them may have written it since
        try:  # one open file: the copy is of one whole file, even one replaced meanwhile
            stream = open(source, "rb")
        except OSError as exc:  # removed or made unreadable since its header was read
            raise CeVAEError(f"The model bundle {source} cannot be read ({exc.strerror or exc}).") from None
        try:
            with stream, atomic_path(target, durable=True) as tmp:
                header, start = _copy_header(stream, source)
                Path(tmp).write_bytes(header)
                with open(tmp, "ab") as copy_stream:  # a chunk at a time: never the whole file in memory
                    stream.seek(start)
                    shutil.copyfileobj(stream, copy_stream, _CHUNK)
                _refuse_damaged(Path(tmp), source)
        except OSError as exc:  # e.g. the disk is full: the temporary is removed, an existing ``out`` kept
            raise CeVAEError(f"Could not write the shareable copy {target} ({exc.strerror or exc}); {source} is "
                             "unchanged.") from None
    return target


_CHUNK = 1 << 20  # bytes of tensors copied at a time


def _copy_header(stream: BinaryIO, source: Path) -> Tuple[bytes, int]:
    """The new header of the bundle file ``stream`` (opened from ``source``), with its scans' names removed from its
    model header and its tensor table as it was, and where in ``stream`` its tensor bytes start."""
    layout = bundle_layout(source, stream)  # (read_header accepted the file: one replaced since is refused here)
    written = layout.written_header()
    _refuse_later_writer(written, source)
    if "training" in written:  # (as read_header takes it: an old bundle's NaN validation loss as None)
        written["training"] = finite_record(written["training"])
    try:  # (NaN elsewhere in a header is no strict JSON: refused here)
        header = json.dumps(without_scan_names(written), sort_keys=True, allow_nan=False)
    except (ValueError, TypeError):
        raise CeVAEError(f"{source} is damaged or was edited (its header cannot be copied); use an original "
                         "copy.") from None
    table = dict(layout.table, __metadata__=dict(layout.metadata, **{META_KEY: header}))
    text = json.dumps(table, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # (safetensors pads its header with spaces: the tensors start 8-byte aligned)
    return len(text).to_bytes(8, "little") + text, layout.data_start


def _refuse_later_writer(header: Mapping[str, Any], source: Path) -> None:
    """Refuse a header a later CeVAEAnomaly wrote: it may record scans in sections or keys this version does not know,
    which :func:`without_scan_names` would copy with their names."""
    later = later_writer(header)
    if later is not None:
        raise CeVAEError(f"{source} was written by CeVAEAnomaly {later}, newer than this one ({__version__}): its "
                         "header may record scans where this version does not look, so no shareable copy was written. "
                         f"Share it with CeVAEAnomaly {later} or later.")


def _refuse_damaged(copy_path: Path, source: Path) -> None:
    """Refuse a written copy that is no valid bundle or whose weights are not those its header records (the model it
    was copied from is damaged: the copy holds its bytes)."""
    try:
        recorded = read_header(copy_path).extra.get(WEIGHTS_DIGEST_KEY)
    except CeVAEError:
        raise CeVAEError(f"{source} is damaged (its copy is not a valid model bundle); use an original copy.") from None
    if recorded is not None and recorded != weights_digest(copy_path):
        raise CeVAEError(f"{source}: {CHANGED_WEIGHTS}")
