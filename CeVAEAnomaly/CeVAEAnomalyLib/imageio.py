"""Reading volumes and writing outputs safely (atomic, never over the input)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import SimpleITK as sitk

from .errors import CeVAEError

log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


def read_image(path: PathLike, what: str = "image") -> sitk.Image:
    """Read a scalar 3D volume from a file SimpleITK reads or from a DICOM series folder."""
    p = Path(path)
    if not p.exists():
        raise CeVAEError(f"The {what} {p} does not exist.")
    if p.is_dir():
        image = _read_dicom_folder(p, what)
    else:
        if p.stat().st_size == 0:
            raise CeVAEError(f"The {what} file {p} is empty.")
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise CeVAEError(
                f"The {what} file {p} could not be read as an image "
                f"(corrupt, truncated or not a medical image format): {_first_line(exc)}"
            ) from None
    return check_volume(image, f"{what} {p.name}")


def _read_dicom_folder(folder: Path, what: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise CeVAEError(f"The {what} folder {folder} contains no DICOM series.")
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; reading the first (%s).", folder, len(series), series[0])
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise CeVAEError(f"The DICOM series in {folder} could not be read: {_first_line(exc)}") from None


def check_volume(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Refuse what the model cannot score: not 3D, several components, too small."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CeVAEError(
            f"The {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour or vector image); a single-channel MRI volume is needed."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        extra = " (a time series or multi-volume file: extract one volume first)" if dim == 4 else ""
        raise CeVAEError(f"The {what} is {dim}D{extra}; a 3D volume is needed.")
    size = image.GetSize()
    if sum(s > 1 for s in size) < 2 or min(sorted(size)[1:]) < 8:
        raise CeVAEError(f"The {what} is too small to analyse ({'x'.join(map(str, size))} voxels).")
    return image


def write_image(image: sitk.Image, path: PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the target folder, then rename into place."""
    target = Path(path)
    check_output_path(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, target)
    except RuntimeError as exc:
        raise CeVAEError(f"Could not write {target}: {_first_line(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def check_output_path(target: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse to clobber an input, or an existing file unless ``overwrite``."""
    resolved = target.resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == resolved:
            raise CeVAEError(f"The output {target} is the same file as an input; choose another path.")
    if target.exists() and not overwrite:
        raise CeVAEError(f"The output {target} already exists; pass --overwrite to replace it.")


def atomic_write_text(path: PathLike, text: str, overwrite: bool = True) -> Path:
    """Write a text file atomically (temp file in the same folder + rename)."""
    target = Path(path)
    check_output_path(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages put the useful part after a "Description:" tag or at the end
    for ln in lines:
        if ln.startswith("Description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__
