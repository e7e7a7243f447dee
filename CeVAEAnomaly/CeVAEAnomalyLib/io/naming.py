"""File names: image extensions, the stem of a file, and the names of detection outputs.

The output table is shared by ``cevae-anomaly batch`` and the Slicer script
``Scripts/DetectVolume.py``, so a volume ``NAME`` gives the same file names everywhere.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Dict, Optional, Sequence

APPLE_DOUBLE = b"\x00\x05\x16\x07"  # how a macOS resource fork ('._NAME', beside NAME on a non-Mac disk) starts
RESOURCE_FORK = "a macOS resource fork (an AppleDouble '._' file, which macOS writes beside a file copied to another " \
    "disk), not an image; leave it out"


def is_resource_fork(path: Path) -> bool:
    """Whether the file ``path`` starts as a macOS resource fork does (False where it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(APPLE_DOUBLE)) == APPLE_DOUBLE
    except OSError:
        return False


IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr")  # .hdr: of an .hdr/.img pair
OUTPUT_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")  # one file each, as ITK's writers name them
_MULTI_SUFFIXES = (".seg.nrrd", ".seg.nii.gz", ".nii.gz")

# role -> file name after "NAME"; "{ext}" is the volume format (".nii.gz", ".nrrd", ...)
OUTPUT_NAMES: Dict[str, str] = {
    "score": "_score{ext}",
    "labelmap": "_labelmap{ext}",
    "slices": "_slices.csv",
    "components": "_components.csv",
    "segmentation": "_segmentation.seg.nrrd",
    "record": "_record.json",  # how the outputs were made (the Slicer script; batch; detect --record)
}
BATCH_ROLES = ("score", "labelmap", "slices", "components")  # `batch`'s outputs per volume, beside its record
# role -> what follows "NAME " in the names of the nodes the Slicer panel makes for volume NAME (slicer/mrml.py;
# " (frame N)" follows for a sequence frame's, and Slicer adds "_1" where the name is taken), which Slicer's Save writes
# as file names
PANEL_OUTPUT_NAMES: Dict[str, str] = {role: f"anomaly {role}" for role in ("score", "labelmap", "segmentation",
                                                                          "components")}
# the name of a volume the Slicer panel made for NAME, as Slicer's Save names its file and Add Data names the node it
# loads from that file: "NAME anomaly score", with " (frame N)" for a sequence frame's and "_1" where the node's name
# was taken, once per taking: "_1_1" for a file named "..._1" loaded twice (group 1: NAME, 2: what follows it)
_PANEL_ROLES = "|".join(re.escape(PANEL_OUTPUT_NAMES[role]) for role in ("score", "labelmap", "segmentation"))
PANEL_RESULT = re.compile(rf"(.+)( (?:{_PANEL_ROLES})(?: \(frame \d+\))?(?:_\d+)*(?:\.seg)?(?:_\d+)*)$")  # (.seg.nrrd)


WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*') | frozenset(map(chr, range(32)))  # never in a Windows file name


def unportable_character(name: str) -> Optional[str]:
    """The first character of ``name`` that Windows never allows in a file name (``< > : " / \\ | ? *`` and the
    control characters; a ":" there even writes into a hidden stream of another file), or None."""
    return next((c for c in name if c in WINDOWS_FORBIDDEN), None)


def one_form(name: str) -> str:
    """``name`` in one Unicode form (NFC: an accent written as a letter and a combining mark, 'e' + U+0301, as the
    one character 'é'), as macOS compares file names: two names equal in it are one file there."""
    return unicodedata.normalize("NFC", name)


UNICODE_TWINS = "one name in two Unicode forms (an accent as one character, or as a letter and a combining mark)"


def misnamed(path: Path) -> bool:
    """Whether a file written as text or as a model bundle has an image or compressed (.gz) name."""
    return Path(path).name.lower().endswith((*IMAGE_EXTENSIONS, ".hdr", ".img", ".gz"))


def refuse_misnamed(path: Path, what: str, written_as: str, example: str) -> None:
    """Refuse, before any work, an output whose name says another format than the one it is written in: an image
    or compressed (.gz) name for ``what`` written as ``written_as`` (CSV text, a model bundle). The check that a
    written file is whole goes by its name, so such a file would be taken for a damaged one after the work."""
    if misnamed(path):
        from ..errors import CeVAEError

        raise CeVAEError(f"The {what} {path} is written as {written_as}; give it a name such as one ending in "
                         f"{example} (not compressed, not an image name).")


def table_delimiter(path: Path) -> str:
    """A tab for a table file named ``.tsv`` (any case), else a comma: how tables are written and lists read."""
    return "\t" if Path(path).name.lower().endswith(".tsv") else ","


def full_suffix(path: Path) -> str:
    """The file type suffix that writers go by (".seg.nrrd", ".nii.gz", ".nrrd", ...)."""
    return next((ext for ext in _MULTI_SUFFIXES if path.name.lower().endswith(ext)), path.suffix)


def image_stem(filename: str) -> Optional[str]:
    """The file name without its image extension; None if it is not an image file."""
    low = filename.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)]
    return None


# what ends the name of a volume that detection wrote for NAME (detect, batch, Slicer's DetectVolume.py), before its
# extension: "_score", "_labelmap", "_segmentation.seg"
RESULT_TAGS = tuple(str(image_stem("N" + OUTPUT_NAMES[role].format(ext=".nrrd")))[1:]
                    for role in ("score", "labelmap", "segmentation"))


def file_stem(path: Path) -> str:
    """The name that prefixes a file's outputs: its name without the (image) extension; a folder's (a DICOM series)
    whole name, which has no extension (series folders are often named by their UID, 1.3.12.2.1107.5.2.43.66012)."""
    name = Path(path).name
    if Path(path).is_dir():
        return name
    stem = image_stem(name)
    if stem is not None:
        return stem
    return name[: len(name) - len(full_suffix(Path(name)))] or name


def output_paths(out_dir: Path, name: str, roles: Sequence[str] = BATCH_ROLES,
                 volume_ext: str = ".nii.gz") -> Dict[str, Path]:
    """The output files of volume ``name`` in ``out_dir``, by role (see :data:`OUTPUT_NAMES`)."""
    return {role: Path(out_dir) / (name + OUTPUT_NAMES[role].format(ext=volume_ext)) for role in roles}


def subfolders_hint(folder: Path, advice: str) -> str:
    """Where a folder given as a volume or a cohort holds subfolders (a DICOM export: one folder per series), a
    clause saying that they are not searched, naming two, and ``advice``; "" where it holds none."""
    try:
        names = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    return f"; its subfolders ({shown}) are not searched: {advice}"
