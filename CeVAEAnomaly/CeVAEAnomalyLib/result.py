"""What a detection produces, and its files: the result types, their tables, save and load (torch-free).

The engine makes a :class:`DetectionResult`; the command line, batch, the Slicer worker and the
Slicer script write it with the functions here, and the Slicer module reads a worker's result
back (:func:`load_result`) without importing torch.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import AbstractSet, Any, Dict, List, Mapping, Optional, Sequence, Tuple, get_args, get_type_hints

import numpy as np
import SimpleITK as sitk

from .errors import CeVAEError, one_line
from .io import strict_json
from .io.images import PathLike
from .io.naming import table_delimiter
from .options import PostprocessOptions, ScoreOptions


@dataclass
class SliceScoreRow:
    """Scores of one input slice (``index`` along the input IJK axis ``axis``)."""

    axis: int
    index: int
    kl: float
    rec: float
    neg_elbo: float
    anomaly: float = 0.0  # the slice score that follows lesions: rank fusion of map_max and neg_elbo, in [0, 1]
    map_max: float = 0.0  # a high quantile of the final map over the slice's brain (the highest score)
    flagged: bool = False  # the slice holds a labelmap voxel (after the minimum component volume)


@dataclass
class Component:
    """One connected anomaly region of the labelmap."""

    label: int
    voxels: int
    volume_ml: float
    max_score: float
    mean_score: float
    centroid_lps: Tuple[float, float, float]
    peak_lps: Optional[Tuple[float, float, float]] = None  # the centre of its highest-scoring voxel (of equal ones,
    # the first in array order): a point in the component, which the centroid need not be (a ring's lies in its hole);
    # None where it is not known (a result saved before components recorded it)
    side: str = ""  # the patient's side of the brain's mid-sagittal plane it lies on: "left", "right" or "both"
    # (crossing the midline; engine.postprocess.component_sides); "" where not known (components made without a
    # plane, a brain that matches its mirror image poorly or goes on past the image's left or right face, a result
    # saved before components recorded it)

    @property
    def summed_score(self) -> float:
        """The component's score mass: mean score × voxels."""
        return self.mean_score * self.voxels

    @property
    def centroid_ras(self) -> Tuple[float, float, float]:
        """The centroid in RAS (mm), as Slicer shows positions: ``centroid_lps`` with x and y negated."""
        return _ras(self.centroid_lps)

    @property
    def peak_ras(self) -> Optional[Tuple[float, float, float]]:
        """The highest-scoring voxel in RAS (mm): ``peak_lps`` with x and y negated (None where it is not known)."""
        return None if self.peak_lps is None else _ras(self.peak_lps)


def _ras(lps: Tuple[float, float, float]) -> Tuple[float, float, float]:
    x, y, z = lps
    return (-x + 0.0, -y + 0.0, z)  # (+ 0.0: a point at x = 0 is at R 0, not -0.0)


@dataclass(frozen=True)
class ModelRecord:
    """Which model made a detection."""

    name: str
    modality: str
    path: Optional[str]  # the bundle file it was loaded from (None: a model not loaded from a file)
    sha256: Optional[str]  # that file's SHA-256 as it was loaded (None: not loaded from a file)
    calibrated_on: Optional[str]  # the header's "source" of the calibration that gave the threshold (None: an
    # absolute threshold, or a calibration that does not say)
    recalibrated_from: Optional[Dict[str, Optional[str]]] = None  # the model a calibrated copy was made from (name,
    # file, sha256: engine/calibrate.py); None for a model that is none (or was calibrated before copies recorded it)


@dataclass(frozen=True)
class DetectionRecord:
    """How a detection was made (its provenance), torch-free and JSON-able (:meth:`to_dict`): the tool, the
    versions of Python and of the libraries that computed it (``software``: python, torch, SimpleITK, numpy), the model,
    the threshold and where it came from, the scoring and post-processing options it used, where the network ran,
    its slices per network pass (``batch_size``: sampled scores, ``mc_samples`` > 0, draw batch by batch),
    whether the brain mask was given or computed from the image (``mask``), the warnings the detection logged (in
    order, as logged) and when it ended (UTC, ISO 8601). ``inputs``: the files it read, by role ("image", "mask":
    their ``path`` and ``sha256``, :func:`input_files`), where an entry point read files; empty for images given in
    memory (``write_result(..., like=SCAN)`` names the scan in the file it writes). ``image_voxels_sha256`` and
    ``mask_voxels_sha256``: the digest of the image scored, and of the brain mask given (None: the automatic one),
    as given, in memory or read from a file (:func:`~.io.checksum.image_voxel_sha256`: voxels, pixel type and grid;
    the same scan in memory and in any file gives one digest: :func:`~.io.checksum.voxel_sha256`)."""

    tool: str
    version: str
    model: ModelRecord
    threshold: float
    threshold_source: str
    score_options: Dict[str, Any]
    postprocess: Dict[str, Any]
    device: str
    amp: bool
    batch_size: Optional[int]  # None: a record of an earlier version, which did not say
    mask: Optional[str]  # "given", or "automatic": computed from the image (None: not said, as batch_size)
    software: Dict[str, str]  # the versions of python, torch, SimpleITK and numpy (engine/detector.py); {}: not said
    warnings: Tuple[str, ...]
    created_utc: str
    inputs: Dict[str, Dict[str, str]] = field(default_factory=dict)
    image_voxels_sha256: Optional[str] = None  # None: a record of an earlier version, which did not say
    mask_voxels_sha256: Optional[str] = None  # None: no mask given (or not said, as image_voxels_sha256)

    def to_dict(self) -> Dict[str, Any]:
        """The record as JSON-able data (a threshold of inf stays a float: write it with ``strict_json``)."""
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out

    @classmethod
    def from_dict(cls, data: object) -> "DetectionRecord":
        """The record :meth:`to_dict` gave, every field checked for its type (a ValueError names the first that
        is not). A record of an earlier version, without the fields in ``_LATER_RECORD_FIELDS``, reads them as not
        said."""
        if isinstance(data, dict):
            data = {**{k: v for k, v in _LATER_RECORD_FIELDS.items() if k not in data}, **data}
        _holds_fields(data, {f.name for f in fields(cls)}, "the record")
        model = data["model"]
        _holds_fields(model, {f.name for f in fields(ModelRecord)}, "the record's model")
        for name, value in model.items():
            if name == "recalibrated_from":
                if value is not None and not (isinstance(value, dict) and set(value) == {"name", "file", "sha256"}
                                              and all(v is None or isinstance(v, str) for v in value.values())):
                    raise ValueError(f"the record's model {name} {value!r} is not a model's name, file and sha256")
            elif not isinstance(value, str) and (value is not None or name in ("name", "modality")):
                raise ValueError(f"the record's model {name} {value!r} is not text")
        for name in ("tool", "version", "threshold_source", "device", "created_utc"):
            if not isinstance(data[name], str):
                raise ValueError(f"the record's {name} {data[name]!r} is not text")
        threshold = strict_json.number(data["threshold"])
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"the record's threshold {threshold!r} is not a number")
        if not isinstance(data["amp"], bool):
            raise ValueError(f"the record's amp {data['amp']!r} is not true or false")
        size = data["batch_size"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"the record's batch_size {size!r} is not a number of slices")
        if data["mask"] not in ("given", "automatic", None):
            raise ValueError(f"the record's mask {data['mask']!r} is not 'given' or 'automatic'")
        software = data["software"]
        if not isinstance(software, dict) or not all(isinstance(v, str) for v in software.values()):
            raise ValueError(f"the record's software {software!r} is not versions by name")
        warnings = data["warnings"]
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise ValueError("the record's warnings are not a list of texts")
        inputs = data["inputs"]
        if not isinstance(inputs, dict) or not all(
                isinstance(v, dict) and set(v) == {"path", "sha256"} and all(isinstance(t, str) for t in v.values())
                for v in inputs.values()):
            raise ValueError("the record's inputs are not files with their path and sha256")
        for name in ("image_voxels_sha256", "mask_voxels_sha256"):
            if data[name] is not None and not _is_sha256(data[name]):
                raise ValueError(f"the record's {name} {data[name]!r} is not a SHA-256 digest")
        options = {}
        for name, kind in (("score_options", ScoreOptions), ("postprocess", PostprocessOptions)):
            _holds_fields(data[name], {f.name for f in fields(kind)}, f"the record's {name}")
            try:
                options[name] = kind.from_dict(data[name]).to_dict()
            except CeVAEError as exc:
                raise ValueError(f"the record's {name}: {exc}") from None
        return cls(**dict(data, model=ModelRecord(**model), threshold=float(threshold), warnings=tuple(warnings),
                          inputs={k: dict(v) for k, v in inputs.items()}, software=dict(software),
                          **options))


def input_files(**paths: Optional[Path]) -> Dict[str, Dict[str, str]]:
    """A record's ``inputs``: each file given by role (``image=``, ``mask=``; None: not given) as its absolute path
    and SHA-256 (io/checksum.py; a DICOM folder's covers its files)."""
    from .io.checksum import sha256_of

    return {role: {"path": os.path.abspath(path), "sha256": sha256_of(Path(path))}
            for role, path in paths.items() if path is not None}


# the record's fields that records written by earlier versions lack, with what they read as (not said)
_LATER_RECORD_FIELDS: Dict[str, Any] = {"batch_size": None, "mask": None, "software": {}, "image_voxels_sha256": None,
                                        "mask_voxels_sha256": None}


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _holds_fields(data: object, names: AbstractSet[str], what: str) -> None:
    if not isinstance(data, dict) or set(data) != names:
        raise ValueError(f"{what} does not hold the fields {sorted(names)}")


@dataclass(repr=False)
class DetectionResult:
    """Everything one detection produces, on the input's exact grid; ``record``: how it was made (the detector
    fills it; None for a result made otherwise)."""

    score: sitk.Image  # float32
    labelmap: sitk.Image  # uint8 {0,1}
    brain_mask: sitk.Image  # uint8 {0,1}
    threshold: float
    threshold_source: str
    slices: List[SliceScoreRow]
    components: List[Component]
    record: Optional[DetectionRecord] = None

    @property
    def top_slice(self) -> Optional[SliceScoreRow]:
        """The most anomalous slice: the highest ``anomaly`` (ties by the highest map score, then by the
        paper's sample score, the negative ELBO)."""
        ranked = self.ranked_slices()
        return ranked[0] if ranked else None

    def ranked_slices(self) -> List[SliceScoreRow]:
        """Slices from most to least anomalous (``anomaly``, then ``map_max``, then negative ELBO)."""
        return sorted(self.slices, key=lambda r: (-r.anomaly, -r.map_max, -r.neg_elbo, r.index))

    @property
    def flagged_ml(self) -> float:
        """The labelmap's volume in millilitres: the components' volumes summed (0.0 without components)."""
        return sum((c.volume_ml for c in self.components), 0.0)

    def __repr__(self) -> str:  # at the console: one line, not every slice row and component
        size = "x".join(map(str, self.score.GetSize()))
        return (f"<DetectionResult on {size} voxels: {len(self.components)} component(s), "
                f"{flagged_text(self.flagged_ml)} ml flagged, {len(self.slices)} slice row(s); threshold "
                f"{self.threshold:.4g} ({self.threshold_source})>")


def threshold_text(value: Optional[float]) -> str:
    """A threshold as written for reuse as ``--threshold`` (evaluate's table, the report): the shortest text that reads
    back as the same float (Python's repr), so the same float32 score too; 7 significant digits can name the next
    float32 above the score and drop the voxel at it. Empty for None, nan where undefined."""
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


def flagged_text(ml: float) -> str:
    """A flagged volume in ml as the one-line summaries say it: 2 decimals, or, for a volume that would read 0.00 (a
    component under 5 mm³, which a lower --min-volume keeps), as many as its first digit needs (0.003, 0.00003; never
    an exponent)."""
    if ml == 0 or round(ml, 2) > 0:
        return f"{ml:.2f}"
    return f"{ml:.{max(2, -math.floor(math.log10(ml)))}f}"


SIDE_WORDS = {"left": "the patient's left", "right": "the patient's right", "both": "crossing the midline", "": ""}


def components_summary(components: Sequence[Component]) -> str:
    """What the one-line summaries (the Slicer panel's status line, detect's and batch's log lines) say of a
    detection's components, ranked first to last as the component table lists them: how many, the volume flagged and
    the first (top-ranked) one's volume and side, e.g. "3 component(s), 5.20 ml flagged; the first: 4.07 ml, the
    patient's left" (a side not known or withheld: none said)."""
    text = f"{len(components)} component(s), {flagged_text(sum((c.volume_ml for c in components), 0.0))} ml flagged"
    if not components:
        return text
    first = components[0]
    side = SIDE_WORDS.get(first.side, "")
    return f"{text}; the first: {flagged_text(first.volume_ml)} ml{', ' + side if side else ''}"


@dataclass(frozen=True, repr=False)
class ScoreTerms:
    """The parts of a detection's score map (:meth:`~.engine.detector.Detector.terms`), each float32 on the input's
    exact grid and 0 outside the box around the brain that detection post-processes: which term marks a voxel."""

    network: sitk.Image  # the model's pixel score of the detector's score type, averaged over its orientations
    asymmetry: Optional[sitk.Image]  # the smoothed intensity asymmetry fused with it (None: the fusion is off)
    score: sitk.Image  # the detection's map: the two fused, refined and normalised
    brain_mask: sitk.Image  # uint8 {0,1}
    reflection: Optional[sitk.Transform]  # about the mid-sagittal plane the asymmetry was estimated on (None: off)

    def __repr__(self) -> str:  # at the console: one line, not the images
        size = "x".join(map(str, self.score.GetSize()))
        fused = "network and asymmetry" if self.asymmetry is not None else "network only (no asymmetry fusion)"
        return f"<ScoreTerms on {size} voxels: {fused}>"


# ---- the tables ----------------------------------------------------------------------------------
SLICE_FIELDS = ["axis", "index", "anomaly", "kl", "rec", "neg_elbo", "map_max", "flagged"]


def slice_scores_csv(result: DetectionResult, delimiter: str = ",") -> str:
    """Per-slice scores, the most anomalous slice first (``delimiter``: see :func:`table_delimiter`)."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter)
    w.writerow(SLICE_FIELDS)
    for r in result.ranked_slices():
        w.writerow(slice_cells(r))
    return buf.getvalue()


def slice_cells(row: SliceScoreRow) -> List[str]:
    """A slice's row of the slice table (:data:`SLICE_FIELDS`), each value as the table writes it."""
    return [str(row.axis), str(row.index), f"{row.anomaly:.6g}", f"{row.kl:.6g}", f"{row.rec:.6g}",
            f"{row.neg_elbo:.6g}", f"{row.map_max:.6g}", str(int(row.flagged))]


def read_slices_csv(text: str) -> List[SliceScoreRow]:
    """The rows of a table :func:`slice_scores_csv` wrote, in its order (the most anomalous slice first)."""
    return [SliceScoreRow(int(row["axis"]), int(row["index"]), float(row["kl"]), float(row["rec"]),
                          float(row["neg_elbo"]), float(row["anomaly"]), float(row["map_max"]), row["flagged"] == "1")
            for row in csv.DictReader(io.StringIO(text))]


PEAK_FIELDS = ["peak_r", "peak_a", "peak_s"]  # a component's highest-scoring voxel (tables written before lack them)
SIDE_FIELD = "side"  # the patient's side of the midline (Component.side; tables written before lack it)
COMPONENT_FIELDS = ["component", "voxels", "volume_ml", "summed_score", "max_score", "mean_score", "r", "a", "s",
                    *PEAK_FIELDS, SIDE_FIELD]


def components_csv(result: DetectionResult, delimiter: str = ",") -> str:
    """The anomaly components in the result's order (``component`` 1 first: the highest summed score), with
    centroids and highest-scoring voxels in the input's RAS (mm; a peak not known is left empty) and the patient's
    side of the midline they lie on (left, right, both; empty where not known). The labelmap marks every component 1;
    ``component`` is their rank."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter)
    w.writerow(COMPONENT_FIELDS)
    for c in result.components:
        w.writerow(component_cells(c))
    return buf.getvalue()


def component_cells(c: Component) -> List[str]:
    """A component's row of the component table (:data:`COMPONENT_FIELDS`), each value as the table writes it."""
    peak = ["", "", ""] if c.peak_ras is None else [_mm(v) for v in c.peak_ras]
    return [str(c.label), str(c.voxels), f"{c.volume_ml:.4f}", f"{c.summed_score:.6g}", f"{c.max_score:.6g}",
            f"{c.mean_score:.6g}", *(_mm(v) for v in c.centroid_ras), *peak, c.side]


def read_components_csv(text: str) -> List[Component]:
    """The components of a table :func:`components_csv` wrote (RAS back to LPS; tables of versions before the peak
    and side columns: peak None, side "")."""
    def point(r: str, a: str, s: str) -> Tuple[float, float, float]:
        return _ras((float(row[r]), float(row[a]), float(row[s])))  # (its own inverse)

    out = []
    for row in csv.DictReader(io.StringIO(text)):
        peak = point(*PEAK_FIELDS) if row.get(PEAK_FIELDS[0]) else None
        out.append(Component(int(row["component"]), int(row["voxels"]), float(row["volume_ml"]),
                             float(row["max_score"]), float(row["mean_score"]), point("r", "a", "s"), peak,
                             row.get(SIDE_FIELD) or ""))
    return out


def _mm(value: float) -> str:
    """A coordinate in mm as the component table writes it: 2 decimals, one that rounds to 0 as "0.00" (not
    "-0.00")."""
    return f"{round(value, 2) + 0.0:.2f}"


def record_json(result: DetectionResult) -> str:
    """The result's record as a JSON file's text (standard JSON: a threshold of inf as "inf")."""
    if result.record is None:
        raise ValueError("the result holds no record of how it was made")
    return strict_json.dumps(result.record.to_dict(), indent=2) + "\n"


IMAGE_OUTPUTS = {"score": "score map", "labelmap": "labelmap", "brain_mask": "brain mask"}
TABLE_OUTPUTS = {"slices": "slice table", "components": "component table"}
RECORD_OUTPUT = "record"  # the JSON record of how the other outputs were made
PICTURE_OUTPUT = "picture"  # a PNG key picture (detect --picture; drawn by the research extra, not result_files)
PICTURE_MODULES = ("CeVAEAnomalyResearch", "matplotlib")  # what drawing it needs (see system.require_research)
REPORT_OUTPUT = "report"  # a one-file HTML report (detect --report; report.py, not result_files)
REPORT_EXTENSIONS = (".html", ".htm")  # the names it may have (any case)


def refuse_unwritable_names(targets: Mapping[str, Optional[Path]]) -> None:
    """Refuse, before any work, an output whose name does not say the format it gets: an image output
    without a single-file image extension as ITK's writers know it (lower case; a detached header, .nhdr or
    .mhd, would point at a data file of a temporary name), or a CSV table or the JSON record under an image or
    compressed name."""
    from .io.naming import OUTPUT_IMAGE_EXTENSIONS, refuse_misnamed

    for role, path in targets.items():
        if path is None:
            continue
        name = Path(path).name.lower()
        writable = Path(path).name.endswith(OUTPUT_IMAGE_EXTENSIONS) or name.endswith(".nrrd")  # (NRRD: any case)
        if role in IMAGE_OUTPUTS and not writable:
            detached = " (a single file, not a detached header)" if name.endswith((".nhdr", ".mhd")) else ""
            raise CeVAEError(f"The {IMAGE_OUTPUTS[role]} output {path} needs an image file name ending in "
                             f"{', '.join(OUTPUT_IMAGE_EXTENSIONS)}{detached}, in lower case.")
        if role in TABLE_OUTPUTS:
            refuse_misnamed(Path(path), f"{TABLE_OUTPUTS[role]} output", "CSV text", ".csv")
        if role == RECORD_OUTPUT:
            refuse_misnamed(Path(path), "record output", "JSON text", ".json")
        if role == PICTURE_OUTPUT and not name.endswith(".png"):
            raise CeVAEError(f"The picture output {path} is written as a PNG image; give it a name ending in .png.")
        if role == REPORT_OUTPUT and not name.endswith(REPORT_EXTENSIONS):
            raise CeVAEError(f"The report output {path} is written as an HTML page; give it a name ending in .html "
                             "(or .htm).")


def result_files(result: DetectionResult, targets: Mapping[str, Optional[Path]],
                 codes: Optional[Tuple[int, int]] = None) -> Dict[Path, object]:
    """What :func:`~.io.atomic.write_all` writes for each wanted output (a None target is not wanted):
    ``score``, ``labelmap``, ``brain_mask`` (images), ``slices``, ``components`` (CSV tables; tab-separated for a
    ``.tsv`` name), ``record`` (JSON, :func:`record_json`). ``codes``: the scan's qform and sform codes
    (:func:`~.io.nifti_codes.nifti_codes`), which NIfTI image outputs get in place of ITK's (1, 1)."""
    from .io.nifti_codes import write_image

    def image(value: sitk.Image, target: Path) -> object:  # a NIfTI output gets the scan's qform and sform codes
        return value if codes is None else (lambda tmp: write_image(value, tmp, codes, target))

    content = {"score": lambda path: image(result.score, path), "labelmap": lambda path: image(result.labelmap, path),
               "brain_mask": lambda path: image(result.brain_mask, path),
               "slices": lambda path: slice_scores_csv(result, table_delimiter(path)),
               "components": lambda path: components_csv(result, table_delimiter(path)),
               RECORD_OUTPUT: lambda path: record_json(result)}
    unknown = sorted(set(targets) - set(content))
    if unknown:
        raise ValueError(f"unknown result output(s) {unknown}")
    return {Path(path): content[role](path) for role, path in targets.items() if path is not None}


def write_result(result: DetectionResult, *, score: Optional[PathLike] = None, labelmap: Optional[PathLike] = None,
                 brain_mask: Optional[PathLike] = None, slices: Optional[PathLike] = None,
                 components: Optional[PathLike] = None, record: Optional[PathLike] = None,
                 like: Optional[PathLike] = None, overwrite: bool = False) -> List[Path]:
    """Write the outputs given a path as ``detect`` writes them; the paths written, in the order of the arguments.

    Images (``score``, ``labelmap``, ``brain_mask``: by their extension, a NIfTI file compressed where named .gz),
    CSV tables (``slices``, ``components``: tab-separated for a ``.tsv`` name) and the JSON ``record``, all or none,
    each checked complete before it is renamed into place. ``like``: the scan's path, which no output may be, and
    whose NIfTI qform and sform codes NIfTI outputs keep (an MNI-space scan's maps say MNI space; without it, or for
    another format, ITK's (1, 1), scanner space), and which a ``record`` whose inputs are empty (a result of images
    in memory) names as its image input, as ``detect`` does (path and sha256; ``result`` itself is left unchanged).
    Refused before anything is written: an existing output unless ``overwrite``, an output named twice or onto
    ``like``, and a name that does not say its format (a map named .csv, a table named .nii.gz)."""
    from .io.atomic import remove_abandoned_temporaries, write_all
    from .io.lock import hold_outputs
    from .io.nifti_codes import nifti_codes
    from .io.targets import check_paths

    given = {"score": score, "labelmap": labelmap, "brain_mask": brain_mask, "slices": slices,
             "components": components, RECORD_OUTPUT: record}
    targets = {role: Path(path) for role, path in given.items() if path is not None}
    if not targets:
        raise CeVAEError("write_result was given no output; name one, e.g. score=\"score.nii.gz\".")
    if like is not None and not os.path.exists(like):
        raise CeVAEError(f"The scan {like} (like=) does not exist; give the path of the scan the result is of.")
    inputs = [None if like is None else Path(like)]
    check_paths(list(targets.values()), overwrite, inputs)
    refuse_unwritable_names(targets)
    started = time.time()
    with hold_outputs(list(targets.values()), "write_result"):
        remove_abandoned_temporaries(targets.values(), started)  # of killed writes
        if RECORD_OUTPUT in targets and like is not None and result.record is not None and not result.record.inputs:
            result = replace(result, record=replace(result.record, inputs=input_files(image=Path(like))))
        files = result_files(result, targets, None if like is None else nifti_codes(like))
        return write_all(files, overwrite, inputs, command="write_result")


# ---- a whole result in a folder (the Slicer worker's hand-over) ---------------------------------------
RESULT_FILES = {"score": "score.nrrd", "labelmap": "labelmap.nrrd", "brain_mask": "brain_mask.nrrd"}
SUMMARY_FILE = "detection.json"  # {"format_version", "threshold", "threshold_source", "slices", "components",
# "record"}
SUMMARY_VERSION = 5  # 2: with the detection's record (components gained peak_lps later; one without reads as None);
# 3: the record with batch_size, mask and software (a version that reads 2 only refuses it by its version, not as
# damaged; 2 still reads, those fields as not said); 4: with image_voxels_sha256 and mask_voxels_sha256 (likewise: 3
# and 2 still read, those as None); 5: components with their side (likewise: 4 and before read it as ""); 1
# (2026-12-05 to 12-06) still reads, without a record
READ_SUMMARY_VERSIONS = (1, 2, 3, 4, SUMMARY_VERSION)


def save_result(result: DetectionResult, folder: PathLike, overwrite: bool = False) -> None:
    """The result as image files and a JSON summary in ``folder`` (a path or its text; made if missing; read back by
    :func:`load_result`), each checked complete before it is renamed into place; files of those names there are
    refused unless ``overwrite``. The images are not compressed (they only pass from the worker to the Slicer
    module), so that check reads their headers, not their voxels."""
    from .io.atomic import write_all

    folder = _folder(folder)
    files: Dict[Path, object] = {
        path: (lambda tmp, image=image: sitk.WriteImage(image, tmp))
        for path, image in result_files(result, {key: folder / name for key, name in RESULT_FILES.items()}).items()}
    summary = dict(format_version=SUMMARY_VERSION, threshold=result.threshold, threshold_source=result.threshold_source,
                   slices=[asdict(r) for r in result.slices], components=[asdict(c) for c in result.components],
                   record=None if result.record is None else result.record.to_dict())
    files[folder / SUMMARY_FILE] = strict_json.dumps(summary)
    there = [path.name for path in files if os.path.lexists(path)]
    if there and not overwrite:
        raise CeVAEError(f"{folder} holds {', '.join(there)} already; pass overwrite=True to replace "
                         f"{'it' if len(there) == 1 else 'them'}, or choose another folder.")
    write_all(files, overwrite=overwrite)


def load_result(folder: PathLike) -> DetectionResult:
    """The result :func:`save_result` wrote into ``folder`` (a path or its text), every field's type and the images'
    common grid checked (a damaged or foreign folder is refused in one line, before anything uses it)."""
    folder = _folder(folder)
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or summary.get("format_version") not in READ_SUMMARY_VERSIONS:
            found = summary.get("format_version") if isinstance(summary, dict) else None
            raise ValueError(f"format version {found!r}, not {SUMMARY_VERSION}")
        threshold, source = strict_json.number(summary.get("threshold")), summary.get("threshold_source")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not isinstance(source, str):
            raise ValueError(f"threshold {threshold!r} ({source!r}) is not a number with its source")
        components = [_typed(Component, c, f"component {n}", _LATER_COMPONENT_FIELDS)
                      for n, c in enumerate(_listed(summary, "components"), 1)]
        rows = [_typed(SliceScoreRow, r, f"slice row {n}") for n, r in enumerate(_listed(summary, "slices"), 1)]
        if "record" not in summary and summary["format_version"] != 1:
            raise ValueError("it holds no 'record'")
        record = None if summary.get("record") is None else DetectionRecord.from_dict(summary["record"])
        images = {key: _read_image(folder / name) for key, name in RESULT_FILES.items()}
        _same_grid(images)
        return DetectionResult(images["score"], images["labelmap"], images["brain_mask"], float(threshold), source,
                               rows, components, record)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # (RecursionError is a RuntimeError)
        raise CeVAEError(f"The detection results in {folder} could not be read ({one_line(exc)}).") from None


def _read_image(path: Path) -> sitk.Image:
    """One image of a result folder; one written only in part, or damaged, refused in one line naming it and what is
    missing (ITK's message runs over several lines, with source paths and object addresses)."""
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        from .io.headers import error_text
        from .io.verify import incomplete_reason

        if not path.is_file():
            raise ValueError(f"{path.name} is missing") from None
        why = incomplete_reason(path, path) or error_text(exc)
        raise ValueError(f"{path.name} is cut short or damaged: {why}") from None


def _folder(folder: PathLike) -> Path:
    """A result folder given as a path or its text; anything else is refused in one line."""
    if not isinstance(folder, (str, os.PathLike)):
        raise CeVAEError(f"The result folder must be a path (a str or pathlib.Path), got {type(folder).__name__}.")
    return Path(folder)


def _listed(summary: dict, key: str) -> list:
    value = summary.get(key)
    if not isinstance(value, list):
        raise ValueError(f"'{key}' is not a list")
    return value


_LATER_COMPONENT_FIELDS = frozenset({"peak_lps", "side"})  # a Component's fields that results saved before lack
# (their default)
SIDES = ("left", "right", "both", "")  # Component.side


def _typed(cls: type, data: object, where: str, later: AbstractSet[str] = frozenset()):
    """``cls`` (SliceScoreRow, Component) from a JSON object holding exactly its fields (those in ``later`` may be
    missing: their default), each of its type (a point may be null where its type is Optional)."""
    hints = get_type_hints(cls)
    if not isinstance(data, dict) or not set(hints) - set(later) <= set(data) <= set(hints):
        raise ValueError(f"{where} does not hold the fields {sorted(hints)}")
    for name, kind in hints.items():
        if name not in data or (data[name] is None and type(None) in get_args(kind)):
            continue
        value = strict_json.number(data[name]) if kind is float else data[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {int: isinstance(value, int) and not isinstance(value, bool), float: number,
              bool: isinstance(value, bool), str: value in SIDES}.get(kind)  # (a str: a component's side)
        if ok is None:  # the centroid or peak: three numbers
            value = [strict_json.number(v) for v in value] if isinstance(value, list) else value
            ok = isinstance(value, list) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            value = tuple(value) if ok else value
        if not ok:
            raise ValueError(f"{where}: {name} {value!r} is not of its type")
        data = dict(data, **{name: value})
    return cls(**data)


def _same_grid(images: Mapping[str, sitk.Image]) -> None:
    """The hand-over's images lie on one grid, the labelmap and brain mask holding labels."""
    score = images["score"]
    for key in ("labelmap", "brain_mask"):
        image = images[key]
        if (image.GetSize() != score.GetSize() or not np.allclose(image.GetSpacing(), score.GetSpacing())
                or not np.allclose(image.GetOrigin(), score.GetOrigin())
                or not np.allclose(image.GetDirection(), score.GetDirection())):
            raise ValueError(f"the {key} is not on the score map's grid")
        if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16):
            raise ValueError(f"the {key} holds {image.GetPixelIDTypeAsString()}, not labels")
