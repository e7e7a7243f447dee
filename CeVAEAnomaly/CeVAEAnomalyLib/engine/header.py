"""The JSON header of a model bundle, typed (:class:`BundleHeader`), read without torch or safetensors.

A bundle is a safetensors file: an 8-byte little-endian header length, a JSON header (tensor
table plus ``__metadata__``) and the raw tensor bytes. The model's own header is the JSON string
stored under ``__metadata__["cevae_anomaly"]``. Reading it needs only the standard library, so
the Slicer module can show a model's settings before PyTorch is installed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .. import __version__
from ..errors import CeVAEError
from ..io.checksum import content_sha256
from ..io.targets import refuse_unsearchable, special_file_kind
from ..options import DetectionRequest, PostprocessOptions, ScoreOptions, ThresholdPolicy
from .bundle_checks import BASE_VOLUMES_KEY, UTC_FORMAT, check_model_section, check_sections
from .calibration import DEFAULT_FPR, acquisition_difference, find_calibration, thin_tail, threshold_for_fpr
from .config import LossConfig, ModelConfig, PreprocessConfig

FORMAT = "cevae-anomaly-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".cevae"
META_KEY = "cevae_anomaly"
WEIGHTS_DIGEST_KEY = "weights_sha256"  # the header's record of the weights' SHA-256 (engine/bundle.py)
WRITER_KEY = "written_by"  # the version of CeVAEAnomaly that wrote the file (save_bundle; "versions": the training's)
_MAX_TABLE_BYTES = 100_000_000  # safetensors' own limit on the header size (100 MB, not 100 MiB)
USE_A_MODEL = "use a CeVAEAnomaly model file (.cevae)"  # what to do with a file that is no model bundle
EDITED = "the model file is damaged or was edited: use an original copy"  # and with a bundle that is damaged
# what is said, after the file's name, of a bundle whose weights' digest is not its header's (load, info, share)
CHANGED_WEIGHTS = ("its weights are not those its header records (a checksum differs); the model file is damaged or "
                   "was edited. Use an original copy.")
CONTENT_KEY = "content_sha256"  # a training volume's record of its io.checksum.content_sha256 (training/packaging.py)
# the bundled model's training volumes (the sample data), recorded by file sha256 alone: their content_sha256, so that
# a copy of one saved in another format is told too
SAMPLE_CONTENTS = {
    "8177054747951db0e5438eae70163f06197233f6140cd69c8177224929835e11":  # colin27_t1.nii.gz
        "f569c7a29b5ffec570cb64319f9971dbb2a3312ebc06f431dd2b3d6d661158c6",
    "a68c49a18d6579bff650b43a61066b21eecf67e3c51fa2d24de46d6195554c89":  # mni152_t1.nii.gz
        "fb4ebf76cd7d9c14b1d8a4ea229350bb8e8d2fe35716679d5a212e28dfe5bb90",
    "fa6c9402bcb21dd606490cb14dde792bbb036edd415857c8bb652c9180573bba":  # robex_t1.nii.gz
        "523192e4443eb65059155e114da63448b07aba458264559ca262eda4e072e9af",
}


@dataclass
class BundleHeader:
    """What a model is and what it recommends: the one typed reading of a bundle's header.

    A section absent from an older bundle takes its default here, and nowhere else. ``extra`` keeps
    the keys that are only carried along (format, versions, calibration subjects, the model card's).
    """

    preprocess: PreprocessConfig
    name: str = ""
    modality: str = "T1"
    model: Optional[ModelConfig] = None  # set by save_bundle from the network it writes
    loss: LossConfig = LossConfig()
    score_options: ScoreOptions = ScoreOptions()
    postprocess: PostprocessOptions = PostprocessOptions()
    calibration: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    default_fpr: float = DEFAULT_FPR
    training: Optional[Dict[str, Any]] = None
    weights_dtype: str = "float32"
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BundleHeader":
        """The typed header of a JSON header that :func:`check_model_section` and :func:`check_sections` accepted."""
        typed = {"preprocess", "name", "modality", "model", "loss", "score_options", "postprocess", "calibration",
                 "default_fpr", "training", "weights_dtype"}
        return cls(
            preprocess=PreprocessConfig.from_dict(data["preprocess"]), name=str(data.get("name", "")),
            modality=str(data.get("modality", "T1")),
            model=ModelConfig.from_dict(data["model"]) if "model" in data else None,
            loss=LossConfig.from_dict(data.get("loss") or {}),
            score_options=ScoreOptions.from_dict(data.get("score_options") or {}, "score option(s) in the model"),
            postprocess=PostprocessOptions.from_dict(data.get("postprocess") or {},
                                                     "post-processing option(s) in the model"),
            calibration=dict(data.get("calibration") or {}), default_fpr=float(data.get("default_fpr", DEFAULT_FPR)),
            training=finite_record(data.get("training")), weights_dtype=str(data.get("weights_dtype", "float32")),
            extra={k: v for k, v in data.items() if k not in typed},
        )

    def to_dict(self) -> Dict[str, Any]:
        """The JSON header (``extra`` first, the typed sections over it)."""
        out: Dict[str, Any] = dict(self.extra)
        out.update(name=self.name, modality=self.modality, preprocess=self.preprocess.to_dict(),
                   loss=self.loss.to_dict(), score_options=self.score_options.to_dict(),
                   postprocess=self.postprocess.to_dict(), default_fpr=self.default_fpr,
                   weights_dtype=self.weights_dtype)
        if self.model is not None:
            out["model"] = self.model.to_dict()
        if self.training is not None:
            out["training"] = self.training
        if self.calibration:
            out["calibration"] = self.calibration
        return out

    def trained_scans(self, images: Sequence[Path], checksums: Mapping[Path, str]) -> List[Path]:
        """Those of ``images`` (their file sha256: ``checksums``) that the header names as a volume the model learned
        from (:meth:`learned_from`: it scores lower than a new scan): the same file, or the same scan saved again in
        another file (format, compression, Slicer's copy), told by its :func:`~..io.checksum.content_sha256` where
        the record holds that of a volume (read only then, and only for an image whose file is none of them)."""
        records = self.learned_from()
        files = {r.get("sha256") for r in records}
        contents = {r.get(CONTENT_KEY) or SAMPLE_CONTENTS.get(r.get("sha256")) for r in records} - {None}
        return [p for p in images if checksums[p] in files or (bool(contents) and content_sha256(p) in contents)]

    def learned_from(self) -> List[Dict[str, Any]]:
        """The records of every volume the model learned from: its training run's (an adapted model's: its site
        scans) and, for an adapted model, those its base model had learned from, where it records them (models
        adapted by earlier versions do not)."""
        training = self.training if isinstance(self.training, dict) else {}
        adaptation = self.extra.get("adaptation")
        base = adaptation.get(BASE_VOLUMES_KEY) if isinstance(adaptation, dict) else None
        return [r for r in (*(training.get("subjects") or ()), *(base or ())) if isinstance(r, dict)]

    def trained_orientations(self) -> Tuple[str, ...]:
        """The slice orientations the model was trained on (axial where the training record names none)."""
        return tuple((self.training or {}).get("orientations") or ("axial",))

    def recalibrated_from(self) -> Optional[Dict[str, Optional[str]]]:
        """The model this one is a calibrated copy of: its name, file name and sha256 (the ``recalibration`` record of
        engine/calibrate.py); None where it is none, or was calibrated before copies recorded it."""
        record = self.extra.get("recalibration")
        parent = record.get("parent") if isinstance(record, dict) else None
        return {k: parent.get(k) for k in ("name", "file", "sha256")} if isinstance(parent, dict) else None

    def is_calibrated(self, score: ScoreOptions, post: PostprocessOptions) -> bool:
        """Whether the model holds a threshold calibration for this scoring and post-processing."""
        try:
            find_calibration(self.calibration, score, post)
        except CeVAEError:
            return False
        return True

    def threshold(self, score: ScoreOptions, post: PostprocessOptions, policy: ThresholdPolicy) -> Tuple[float, str]:
        """(threshold, description): absolute if the policy gives one, else from the calibration at the
        policy's false-positive rate (the model's default rate if none)."""
        if policy.threshold is not None:
            return float(policy.threshold), "absolute"
        rate = self._rate(policy)
        entry = find_calibration(self.calibration, score, post)
        source = _source_of(entry)  # e.g. "site scans, each scored by ...": its first words say which calibration
        first = re.split("[:,;(]", source, maxsplit=1)[0].strip() if source else ""
        scans = self.calibration_scans(entry)
        counted = f"{scans} scan{'' if scans == 1 else 's'}" if scans else ""
        said = f"{first} ({counted})" if first and counted else first or counted  # "site scans (2 scans)"
        on = f" on {said}" if said else ""
        thin = thin_tail(entry, rate)  # (said with the threshold, and so in every result's summary)
        return threshold_for_fpr(entry, rate), f"calibrated{on}, healthy false-positive rate {rate:g}" + (
            f"; {thin}" if thin else "")

    def calibration_scans(self, entry: Mapping[str, Any]) -> Optional[int]:
        """How many healthy scans the calibration table ``entry`` measured: its count of each scan's voxels, else (a
        table written before it kept one) the header's list of calibration scans; None where neither says."""
        scans = entry.get("scan_voxels")
        if not isinstance(scans, list):
            scans = self.calibration_names()
        return len(scans) if isinstance(scans, list) and scans else None

    def calibration_names(self) -> Optional[List[Any]]:
        """The names of the scans the model is calibrated on: those a calibrated copy lists; else, for an adapted
        model (calibrated on every site scan, each by the fold model that did not see it), its site scans'; None
        where neither is recorded."""
        names = self.extra.get("calibration_subjects")
        adaptation = self.extra.get("adaptation")
        if names is None and isinstance(adaptation, dict) and isinstance(adaptation.get("site_scans"), list):
            return [s.get("name") if isinstance(s, dict) else None for s in adaptation["site_scans"]]
        return names if isinstance(names, list) else None

    def unmeasured_rate(self, score: ScoreOptions, post: PostprocessOptions, policy: ThresholdPolicy) -> Optional[str]:
        """Why the rate of the calibrated threshold ``policy`` gets is not measured (engine/calibration.thin_tail), in
        words; None when it is, or for an absolute threshold."""
        if policy.threshold is not None:
            return None
        return thin_tail(find_calibration(self.calibration, score, post), self._rate(policy))

    def calibrated_on(self, score: ScoreOptions, post: PostprocessOptions, policy: ThresholdPolicy) -> Optional[str]:
        """What the calibration that gives ``policy``'s threshold says it was measured on (its ``source``); None for
        an absolute threshold or a calibration that does not say."""
        if policy.threshold is not None:
            return None
        return _source_of(find_calibration(self.calibration, score, post))

    def _rate(self, policy: ThresholdPolicy) -> float:
        """The healthy false-positive rate a calibrated ``policy`` asks for (the model's default rate if none)."""
        return self.default_fpr if policy.fpr is None else float(policy.fpr)

    def acquisition_difference(self, score: ScoreOptions, post: PostprocessOptions, policy: ThresholdPolicy,
                               spacing: Sequence[float], tail: Optional[float] = None) -> Optional[str]:
        """How a scan of voxel ``spacing`` and bright tail ``tail`` (engine/modality.py) differs from the healthy
        scans that the calibrated threshold ``policy`` gets was taken on, in words; None when alike, for an absolute
        threshold, or when the calibration does not record them (calibrated before it did)."""
        if policy.threshold is not None:
            return None
        return acquisition_difference(find_calibration(self.calibration, score, post), spacing, tail)

    def default_threshold(self) -> Optional[float]:
        """The threshold of the default scoring at the default rate; None where the model holds no calibration for
        it (for the summaries of calibrate and adapt)."""
        try:
            return self.threshold(self.score_options, self.postprocess, ThresholdPolicy())[0]
        except CeVAEError:
            return None

    def threshold_of(self, request: DetectionRequest) -> Tuple[float, str]:
        """The threshold ``request`` gets with this model (refused if it has none: e.g. ``--fpr`` for a scoring
        the model is not calibrated for). Entry points call this before reading a volume."""
        score, post = request.checked_options(self.score_options, self.postprocess)
        return self.threshold(score, post, request.policy)


def _source_of(entry: Mapping[str, Any]) -> Optional[str]:
    """What a calibration table says it was measured on (its ``source``), or None where it does not say."""
    source = entry.get("source")
    return source if isinstance(source, str) else None


def read_header(path: Union[str, Path]) -> BundleHeader:
    """The bundle's header, validated and typed, without loading the weights."""
    if not isinstance(path, (str, os.PathLike)):
        raise CeVAEError(f"The model bundle must be a file path, got {type(path).__name__}.")
    p = _check_file(Path(path))
    header = _written_header(p)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CeVAEError(f"{p} is not a CeVAEAnomaly model bundle (format {found!r}); {USE_A_MODEL}.")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CeVAEError(f"{p} has an invalid bundle format version {version!r}; {EDITED}.")
    if version > FORMAT_VERSION:
        raise CeVAEError(
            f"{p} has bundle format version {version}; this CeVAEAnomaly reads up to version "
            f"{FORMAT_VERSION}. Update CeVAEAnomaly to use it."
        )
    for key in ("model", "preprocess"):
        if not isinstance(header.get(key), dict):
            raise CeVAEError(f"The header of {p} lacks its '{key}' section; {EDITED}.")
    try:
        model = check_model_section(header)
        check_sections(header, model)
    except CeVAEError as exc:
        later = later_writer(header)
        if later is not None:  # (a later version may add keys and values to a section: it cannot be told from an edit)
            raise CeVAEError(f"{p} was written by CeVAEAnomaly {later}, newer than this one ({__version__}), and its "
                             f"header holds what this version does not know: {exc}. Update CeVAEAnomaly to use it."
                             ) from None
        raise CeVAEError(f"The header of {p} is invalid: {exc}. The model file is damaged or was edited; "
                         "use an original copy.") from None
    # a number that is not finite where no check above refused it (a copy's writer refuses it: calibrate failed after
    # scoring every scan); a training record of a version before headers were strict JSON holds NaN: finite_record
    problem = _json_problem(dict(header, training=finite_record(header.get("training"))), f"The header of {p}",
                            strict=False)
    if problem is not None:
        raise CeVAEError(f"{problem}, which no CeVAEAnomaly writes; {EDITED}.")
    excess = model.cost_excess()  # (before any weight is read: a small file may declare huge layers)
    if excess is not None:
        raise CeVAEError(f"{p} holds a network too costly to run: it {excess} (detection's memory and time grow "
                         "with both). Use a model with narrower layers.")
    return BundleHeader.from_dict(header)


def later_writer(header: Mapping[str, Any]) -> Optional[str]:
    """The version of CeVAEAnomaly a bundle's JSON header says wrote it (:data:`WRITER_KEY`) or trained it
    (``versions``), the later of the two, where it is later than this one's; else None."""
    versions = header.get("versions")
    recorded = [header.get(WRITER_KEY), versions.get("cevae_anomaly") if isinstance(versions, dict) else None]
    later = [(_release(v), v) for v in recorded if isinstance(v, str) and _release(v) > _release(__version__)]
    return max(later)[1] if later else None


def _release(version: str) -> Tuple[int, ...]:
    """The release numbers a version starts with ("0.2.1rc1": (0, 2, 1)); () where it starts with none."""
    numbers = re.match(r"[0-9]+(\.[0-9]+)*", version)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def written_sections(path: Union[str, Path]) -> List[str]:
    """The sections a bundle's header holds as written (the typed header fills in defaults for missing ones)."""
    header = _written_header(_check_file(Path(path)))
    return list(header) if isinstance(header, dict) else []


def _written_header(p: Path) -> Any:
    """The model header's JSON as the file holds it, unchecked."""
    return bundle_layout(p).written_header()


def weights_digest(path: Union[str, Path]) -> str:
    """SHA-256 of the weights a bundle file holds, as ``save_bundle`` records it in the header (engine/bundle.py), read
    without torch: a bundle whose digest differs from its header's is damaged or was edited."""
    return weights_record(path)[0]


_FLOAT_TYPES = {"F32": "<f4", "F16": "<f2"}  # the weight types a bundle holds, as numpy reads them


def weights_record(path: Union[str, Path]) -> Tuple[str, List[str]]:
    """(:func:`weights_digest`, the names of the tensors that hold NaN or infinite values, which detect and calibrate
    refuse) of a bundle file, read one tensor at a time, without torch."""
    import numpy as np

    p = _check_file(Path(path))
    layout = bundle_layout(p)
    table = layout.table
    digest = hashlib.sha256()
    not_finite = []
    with open(p, "rb") as fh:
        for name in sorted(k for k in table if k != "__metadata__"):
            begin, end = table[name]["data_offsets"]
            fh.seek(layout.data_start + begin)
            data = fh.read(end - begin)
            add_tensor(digest, name, table[name]["dtype"], table[name]["shape"], data)
            kind = _FLOAT_TYPES.get(table[name]["dtype"])
            if kind is not None and not np.isfinite(np.frombuffer(data, kind)).all():
                not_finite.append(name)
    return digest.hexdigest(), not_finite


def add_tensor(digest: Any, name: str, dtype: str, shape: Sequence[int], data: bytes) -> None:
    """Add one tensor to a weights digest (``digest``: a hashlib object): its name, safetensors type (F32, F16),
    shape and raw little-endian bytes; the tensors go in name order."""
    digest.update(f"{name}\0{dtype}\0{','.join(map(str, shape))}\0{len(data)}\0".encode())
    digest.update(data)


@dataclass(frozen=True)
class BundleLayout:
    """The parts of a bundle's safetensors file (:func:`bundle_layout`)."""

    path: Path  # (named in messages)
    table: Dict[str, Any]  # the tensor table, its ``__metadata__`` included
    metadata: Dict[str, str]  # the table's ``__metadata__``
    data_start: int  # where the tensor bytes start

    def written_header(self) -> Any:
        """The model header's JSON as the file holds it, unchecked."""
        text = self.metadata[META_KEY]
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as exc:  # (ValueError: also a number of more than 4300 digits)
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
            raise CeVAEError(f"The header of {self.path} is not valid JSON ({reason}); {EDITED}.") from None
        # (copies and writers of it recurse: share, calibrate)
        if _json_problem(header, "", strict=False, finite=False):
            raise CeVAEError(f"The header of {self.path} is not valid JSON (nested too deeply); {EDITED}.")
        twice = _key_twice(text)  # (save_bundle never writes one: which of the two a reader takes is its own choice)
        if twice is not None:
            raise CeVAEError(f"In the header of {self.path}, {twice}; {EDITED}.")
        return header


def bundle_layout(path: Path, stream: Optional[BinaryIO] = None) -> BundleLayout:
    """The tensor table, metadata and data offset of the model bundle ``path`` (``stream``: the file, where it is open
    already: read from its start), checked: the table exactly covers the file. The one reader of a bundle's
    safetensors header; it refuses a file that is no safetensors file, one that is no bundle, a bundle cut short and
    one damaged or edited, each in its own words."""
    size, length, text = _table_text(path, stream)
    if not 2 <= length <= _MAX_TABLE_BYTES or (length > size - 8 and text[:1] not in (b"{", b"")):
        raise _not_safetensors(path, f"header length {length} does not fit the file of {size} bytes")
    if length > size - 8:  # the start of a tensor table, cut short
        raise _cut_short(path, size, f"at least {8 + length}")
    try:
        table = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (ValueError: not UTF-8 or JSON, or a 4300-digit number)
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise _not_safetensors(path, f"unreadable header: {reason}") from None
    if not isinstance(table, dict) or not isinstance(table.get("__metadata__", {}), dict):
        raise _not_safetensors(path, "the header is not a tensor table")
    metadata = dict(table.get("__metadata__") or {})
    if META_KEY not in metadata:
        raise CeVAEError(f"{path} is a safetensors file but not a CeVAEAnomaly model bundle (no model header); "
                         f"{USE_A_MODEL}.")
    problem = _key_twice(text) or _json_problem(table, "its tensor table") or _table_problem(table)
    if problem is not None:
        raise damaged_or_edited(path, problem)
    needed = 8 + length + max((e["data_offsets"][1] for k, e in table.items() if k != "__metadata__"), default=0)
    if needed > size:
        raise _cut_short(path, size, str(needed))
    if needed < size:
        raise damaged_or_edited(path, f"{size - needed} bytes follow its tensors")
    return BundleLayout(path, table, metadata, 8 + length)


def _table_text(path: Path, stream: Optional[BinaryIO]) -> Tuple[int, int, bytes]:
    """(the file's size, the tensor table's length its first 8 bytes give, the table's bytes as far as the file holds
    them: none where the length is beyond any table's) of the file ``path``, or of the file ``stream`` opened."""
    if stream is not None:
        return _read_table(stream)
    with open(path, "rb") as fh:
        return _read_table(fh)


def _read_table(fh: BinaryIO) -> Tuple[int, int, bytes]:
    """:func:`_table_text` of the open file ``fh``."""
    fh.seek(0)
    length = int.from_bytes(fh.read(8), "little")
    return os.fstat(fh.fileno()).st_size, length, fh.read(length) if length <= _MAX_TABLE_BYTES else b""


def _not_safetensors(path: Path, problem: str) -> CeVAEError:
    return CeVAEError(f"{path} is not a CeVAEAnomaly model bundle (not a valid safetensors file: {problem}); "
                      f"{USE_A_MODEL}.")


def _cut_short(path: Path, size: int, needed: str) -> CeVAEError:
    """A model file whose tensor table says it needs ``needed`` bytes, of which it holds ``size``."""
    return CeVAEError(f"The model file {path} is cut short: {size} of {needed} bytes (an interrupted copy or "
                      "download?); copy it again.")


def damaged_or_edited(path: Path, problem: str) -> CeVAEError:
    """The refusal of the bundle ``path`` whose safetensors layout is invalid (``problem``): its header was read."""
    return CeVAEError(f"The model file {path} is damaged or was edited (not a valid safetensors file: {problem}); use "
                      "an original copy.")


def _key_twice(text: Union[bytes, str]) -> Optional[str]:
    """Where the tensor table or model header ``text`` (valid JSON) holds a key twice in one object, in words; else
    None. Python's reader keeps the last of them, safetensors' refuses the file: such a file would pass ``info`` and
    ``share`` and be refused by ``detect``."""
    twice: List[str] = []

    def unique(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        twice.extend(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return dict(pairs)

    json.loads(text, object_pairs_hook=unique)  # (bytes: read as UTF-8)
    return f"the key {twice[0]!r} is written twice in one object" if twice else None


MAX_NESTING = 64  # how deep a model file's JSON may nest (this project's: 5): safetensors' reader stops at 128
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # half of a UTF-16 surrogate pair, which no UTF-8 text holds


def _json_problem(value: Any, what: str, strict: bool = True, finite: bool = True) -> Optional[str]:
    """Why ``what`` (a tensor table or model header, as Python's JSON reader read it) is refused, in words; else None:
    nested more than :data:`MAX_NESTING` deep; if ``finite``, a number that is not (NaN, Infinity or 1e400, which
    Python's reader takes); if ``strict`` (a tensor table, which safetensors' own reader refuses for it), text holding
    half of a UTF-16 surrogate pair."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth == MAX_NESTING:
                return f"{what} is nested too deeply"
            stack.extend((inner, depth + 1) for inner in ([*item, *item.values()] if isinstance(item, dict) else item))
        elif finite and isinstance(item, float) and not math.isfinite(item):
            return f"{what} holds a number that is not finite (NaN or infinity)"
        elif strict and isinstance(item, str) and _SURROGATE.search(item):
            return f"{what} holds text with half of a UTF-16 surrogate pair"
    return None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors dtypes: bytes per element


def _table_problem(table: Dict[str, Any]) -> Optional[str]:
    """Why a tensor table (with its metadata) is not valid safetensors, or None: its tensors' bytes must follow one
    another from the start of the data, with no overlap and no gap."""
    if not all(isinstance(v, str) for v in (table.get("__metadata__") or {}).values()):
        return "its metadata holds a value that is not text"
    spans = []
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data offsets"
        dtype, shape = entry.get("dtype"), entry.get("shape")
        itemsize = _DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None  # (a list or object is unhashable)
        if itemsize is None or not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            return f"tensor {name!r} has no valid type and shape"
        if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            return f"tensor {name!r} does not fill its data offsets (type {entry.get('dtype')}, shape {shape})"
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):  # each tensor's bytes follow the previous one's: no overlap, no gap
        if start != end:
            return f"tensor {name!r} {'overlaps another' if start < end else 'leaves a gap before it'}"
        end = stop
    return None


class PickleGivenAsModel(CeVAEError):
    """A Python pickle or a zip archive (``zipped``; PyTorch's checkpoints are both) given as a model bundle, refused
    unread, each named for what it is. Where it is the checkpoint of a
    run of train or adapt (OUT.ckpt, OUT.foldN.ckpt), the message names the run's model, or says how to resume the
    run, as a library caller and the Slicer panel's user do it; :meth:`for_command_line` with the commands' words."""

    def __init__(self, path: Path, zipped: bool = False) -> None:
        self.path, self.zipped = path, zipped
        own = path.name.endswith(".ckpt") and ".cevae" in path.name
        self.model = path.with_name(path.name[: path.name.index(".cevae") + len(".cevae")]) if own else None
        super().__init__(self._said(
            "use that one", "It looks like the checkpoint of an interrupted training or adaptation: resuming that run "
            "writes its model bundle. An adaptation started in Slicer is resumed with Adapt: choose the model and "
            "the healthy volumes it was started with and the file name {name}, press Adapt and choose to resume (it "
            "asks first)."))

    def for_command_line(self) -> str:
        """The message as the command line's user takes the model or resumes the run (train or adapt --resume)."""
        return self._said("give that", "It looks like a training checkpoint: run the train (or adapt) command that "
                                       "wrote it again with --resume, which writes the model bundle.")

    def _said(self, take: str, resume: str) -> str:
        """The message; where it is a run's checkpoint, ``take`` (the run's model) if that is written, else ``resume``
        (a template of the model's file ``{name}``)."""
        unzip = "; a zipped one must be unzipped first" if self.zipped else ""
        hint = f" Instead, {USE_A_MODEL}{unzip}." if self.model is None else (
            f" It is a training checkpoint; its run's model is {self.model}: {take}." if self.model.is_file()
            else " " + resume.format(name=self.model.name))
        if self.zipped:
            return (f"{self.path} is a zip archive (such as a PyTorch checkpoint), not a CeVAEAnomaly bundle. It is "
                    f"refused unread because loading a checkpoint can execute arbitrary code.{hint}")
        return (f"{self.path} is a Python pickle / PyTorch checkpoint, not a CeVAEAnomaly bundle. It is refused "
                f"unread because loading such files can execute arbitrary code.{hint}")


def _check_file(p: Path) -> Path:
    refuse_unsearchable(p, "model bundle")
    if p.is_dir():
        raise CeVAEError(f"The model bundle {p} is a folder; give the path of a {BUNDLE_SUFFIX} file.")
    if not p.exists():
        raise CeVAEError(f"The model bundle {p} does not exist.")
    kind = special_file_kind(p)
    if kind is not None:
        raise CeVAEError(f"The model bundle {p} is {kind}, not a file; give the path of a {BUNDLE_SUFFIX} file.")
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:  # no permission, an I/O error: one line, as for any other unusable model file
        raise CeVAEError(f"The model bundle {p} cannot be read ({exc.strerror or exc}).") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header; a length whose
    # lowest byte is 0x80 must not be taken for the start of a pickle
    safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_TABLE_BYTES
    if not safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise PickleGivenAsModel(p, zipped=head[:1] == b"P")
    if not head:
        raise CeVAEError(f"The model file {p} is empty (0 bytes); copy it again, or {USE_A_MODEL}.")
    if len(head) < 8:
        raise CeVAEError(f"{p} is too short to be a model bundle ({len(head)} bytes); {USE_A_MODEL}.")
    return p


def utc_now() -> str:
    """The time now as a model file records it (:data:`~.bundle_checks.UTC_FORMAT`)."""
    return datetime.now(timezone.utc).strftime(UTC_FORMAT)


def finite_record(record: Any) -> Any:
    """A training record with its non-finite numbers as None: bundles written before headers were strict JSON
    hold ``"val_loss": NaN``, which a calibrated or adapted copy would otherwise fail to write."""
    if not isinstance(record, dict):
        return record
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
