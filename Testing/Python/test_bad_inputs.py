"""Every bad input to ``cevae-anomaly detect`` ends in a correct result or one clear line.

Each case builds real files in a temporary folder and runs the real command line. A refused
case must exit non-zero with its message on one stderr line, leave every input byte-identical
and create no file at all (not even a temporary one). An accepted case must write a finite
float32 score map on the input's exact grid, with the expected warning.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import locale
import logging
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.cli.main import main
from conftest import make_head, oblique_direction

REFUSED = 2


class MarkerPayload:
    """Unpickling this object creates ``marker``: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Inputs:
    """What a case hands to ``detect`` (paths inside the case's own folder)."""

    image: Path
    mask: Optional[Path]
    model: Path
    extra: List[str] = field(default_factory=list)
    score: Optional[Path] = None  # default: out/score.nii.gz
    marker: Optional[Path] = None  # must never come into existence


@dataclass
class Case:
    build: Callable[[Path, "Inputs"], Inputs]  # (folder, good inputs) -> inputs of the case
    rc: int
    message: str  # regex searched in stderr (refused) or in the log (accepted)


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def head_arrays(good: Inputs):
    image = sitk.ReadImage(str(good.image))
    return image, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(good.mask)))


# ---- builders: each returns the inputs of one case ---------------------------------------
def missing_image(d: Path, g: Inputs) -> Inputs:
    return Inputs(d / "absent.nii.gz", g.mask, g.model)


def text_file(d: Path, g: Inputs) -> Inputs:
    (d / "notes.nii.gz").write_text("patient notes, not an image\n")
    return Inputs(d / "notes.nii.gz", g.mask, g.model)


def empty_file(d: Path, g: Inputs) -> Inputs:
    (d / "empty.nii.gz").write_bytes(b"")
    return Inputs(d / "empty.nii.gz", g.mask, g.model)


def truncated_gz(d: Path, g: Inputs) -> Inputs:
    data = g.image.read_bytes()
    (d / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return Inputs(d / "cut.nii.gz", g.mask, g.model)


def truncated_nii(d: Path, g: Inputs) -> Inputs:
    data = gzip.decompress(g.image.read_bytes())
    (d / "cut.nii").write_bytes(data[: len(data) - 1000])
    return Inputs(d / "cut.nii", g.mask, g.model)


def truncated_plain_named_gz(d: Path, g: Inputs) -> Inputs:
    """Uncompressed NIfTI bytes under a .nii.gz name (ITK reads them, filling the missing voxels with zeros)."""
    data = gzip.decompress(g.image.read_bytes())
    (d / "plain.nii.gz").write_bytes(data[: len(data) // 2])
    return Inputs(d / "plain.nii.gz", g.mask, g.model)


def nan_voxels_plain_named_gz(d: Path, g: Inputs) -> Inputs:
    holes = nan_voxels(d, g).image
    (d / "plain.nii.gz").write_bytes(gzip.decompress(holes.read_bytes()))
    return Inputs(d / "plain.nii.gz", g.mask, g.model)


def image_2d(d: Path, g: Inputs) -> Inputs:
    _, arr, _ = head_arrays(g)
    return Inputs(write(sitk.GetImageFromArray(arr[18]), d / "slice2d.nii.gz"), g.mask, g.model)


def series_4d(d: Path, g: Inputs) -> Inputs:
    _, arr, _ = head_arrays(g)
    return Inputs(write(sitk.GetImageFromArray(np.stack([arr, arr, arr]), isVector=False), d / "fmri.nii.gz"), g.mask, g.model)


def rgb_volume(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    rgb = sitk.GetImageFromArray(np.repeat(arr[..., None], 3, axis=-1).astype(np.uint8), isVector=True)
    rgb.CopyInformation(image)
    return Inputs(write(rgb, d / "rgb.nrrd"), g.mask, g.model)


def constant_volume(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    return Inputs(write(like(np.full_like(arr, 42.0), image), d / "flat.nii.gz"), g.mask, g.model)


def all_nan(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    return Inputs(write(like(np.full_like(arr, np.nan), image), d / "nan.nii.gz"), g.mask, g.model)


def non_finite_at(shape) -> np.ndarray:
    """Where :func:`nan_voxels` puts NaN and ±Inf (9 voxels, most inside the brain)."""
    holes = np.zeros(shape, bool)
    holes[18, 20, 10:16] = holes[18, 22, 10:12] = holes[5, 5, 5] = True
    return holes


def nan_voxels(d: Path, g: Inputs, name: str = "holes.nii.gz") -> Inputs:
    image, arr, _ = head_arrays(g)
    holes = non_finite_at(arr.shape)
    arr[holes] = np.nan
    arr[18, 22, 10:12] = np.inf
    arr[5, 5, 5] = -np.inf
    return Inputs(write(like(arr, image), d / name), g.mask, g.model)


def without_mask(build: Callable[[Path, Inputs], Inputs]) -> Callable[[Path, Inputs], Inputs]:
    """The case ``build`` makes, with the brain mask computed automatically."""
    def case(d: Path, g: Inputs) -> Inputs:
        return replace(build(d, g), mask=None)

    return case


def empty_mask(d: Path, g: Inputs) -> Inputs:
    image, _, mask = head_arrays(g)
    return Inputs(g.image, write(like(np.zeros_like(mask), image), d / "mask0.nii.gz"), g.model)


def mask_other_grid(d: Path, g: Inputs) -> Inputs:
    mask = sitk.ReadImage(str(g.mask))
    coarse = sitk.Resample(mask, [20, 22, 18], sitk.Transform(), sitk.sitkNearestNeighbor, mask.GetOrigin(),
                           [2 * s for s in mask.GetSpacing()], mask.GetDirection())
    return Inputs(g.image, write(coarse, d / "mask_coarse.nii.gz"), g.model)


def mask_elsewhere(d: Path, g: Inputs) -> Inputs:
    mask = sitk.ReadImage(str(g.mask))
    mask.SetOrigin([o + 500.0 for o in mask.GetOrigin()])
    return Inputs(g.image, write(mask, d / "mask_far.nii.gz"), g.model)


def mask_tissue_labels(d: Path, g: Inputs) -> Inputs:
    image, _, mask = head_arrays(g)
    labels = mask.copy()
    labels[:12] *= 2
    labels[24:] *= 3
    return Inputs(g.image, write(like(labels, image), d / "tissues.nii.gz"), g.model)


def the_image_as_mask(d: Path, g: Inputs) -> Inputs:
    """A copy of the scan given as its brain mask (arguments swapped, or the wrong file picked)."""
    return Inputs(g.image, write(sitk.ReadImage(str(g.image)), d / "copy_of_scan.nii.gz"), g.model)


def mask_with_fractions(top: float):
    def build(d: Path, g: Inputs) -> Inputs:
        """A 0/``top`` mask resampled with linear interpolation: thousands of values at its edge, a mask still."""
        image, _, mask = head_arrays(g)
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
        turn = sitk.Euler3DTransform(centre, *np.deg2rad([3.0, 5.0, 4.0]), [0.37, 0.21, 0.13])  # from another grid
        moved = sitk.Resample(like(mask.astype(np.float32) * top, image), image, turn, sitk.sitkLinear, 0.0)
        assert len(np.unique(sitk.GetArrayViewFromImage(moved))) > 1000  # as many values as an image
        return Inputs(g.image, write(moved, d / "fractions.nii.gz"), g.model)
    return build


def mask_label_255(d: Path, g: Inputs) -> Inputs:
    image, _, mask = head_arrays(g)
    return Inputs(g.image, write(like(mask * 255, image), d / "mask255.nii.gz"), g.model)


def missing_mask(d: Path, g: Inputs) -> Inputs:
    return Inputs(g.image, d / "absent_mask.nii.gz", g.model)


def tiny_volume(d: Path, g: Inputs) -> Inputs:
    image = write(sitk.GetImageFromArray(np.random.default_rng(0).random((4, 4, 4), np.float32)), d / "t.nii.gz")
    return Inputs(image, write(sitk.Image([4, 4, 4], sitk.sitkUInt8) + 1, d / "t_mask.nii.gz"), g.model)


def single_slice(d: Path, g: Inputs) -> Inputs:
    _, arr, mask = head_arrays(g)
    return Inputs(write(sitk.GetImageFromArray(arr[18:19]), d / "one.nii.gz"),
                  write(sitk.GetImageFromArray(mask[18:19]), d / "one_mask.nii.gz"), g.model)


def name_too_long(d: Path, g: Inputs) -> Inputs:
    return Inputs(d / ("x" * 300 + ".nii.gz"), g.mask, g.model)


def link_loop(role: str) -> Callable[[Path, Inputs], Inputs]:
    """The image, mask or model given as a symbolic link that leads back to itself."""
    def case(d: Path, g: Inputs) -> Inputs:
        (d / "loop_a").symlink_to(d / "loop_b")
        (d / "loop_b").symlink_to(d / "loop_a")
        return replace(g, **{role: d / "loop_a"})

    return case


def thin_slab(index) -> Callable[[Path, Inputs], Inputs]:
    """A few slices of the head (``index`` selects them from the (k, j, i) array), with its mask or without."""
    def case(d: Path, g: Inputs) -> Inputs:
        _, arr, mask = head_arrays(g)
        return Inputs(write(sitk.GetImageFromArray(np.ascontiguousarray(arr[index])), d / "slab.nii.gz"),
                      write(sitk.GetImageFromArray(np.ascontiguousarray(mask[index])), d / "slab_mask.nii.gz"),
                      g.model)

    return case


def ct_like(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    air = np.round(np.random.default_rng(0).normal(-1000.0, 10.0, arr.shape))  # a CT's air is noisy
    hu = np.where(arr > 1, 20.0 + arr * 0.3, air).astype(np.int16)
    return Inputs(write(like(hu, image), d / "ct.nii.gz"), g.mask, g.model)


def anisotropic(d: Path, g: Inputs) -> Inputs:
    image, mask = make_head(size=(80, 80, 14), spacing=(0.5, 0.5, 10.0))
    return Inputs(write(image, d / "thick.nii.gz"), write(mask, d / "thick_mask.nii.gz"), g.model)


def dtype_case(dtype) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        image, _ = make_head(dtype=dtype)
        return Inputs(write(image, d / f"{np.dtype(dtype).name}.nii.gz"), g.mask, g.model)

    return build


def folder_of_nifti_files(d: Path, g: Inputs) -> Inputs:
    folder = d / "cohort"
    folder.mkdir()
    shutil.copy(g.image, folder / "a.nii.gz")
    shutil.copy(g.image, folder / "b.nii.gz")
    return Inputs(folder, g.mask, g.model)


def no_dicom(d: Path, g: Inputs) -> Inputs:
    folder = d / "export"
    folder.mkdir()
    (folder / "README.txt").write_text("no images here")
    (folder / "IM0001").write_bytes(b"\x00" * 300)
    return Inputs(folder, g.mask, g.model)


def empty_folder(d: Path, g: Inputs) -> Inputs:
    (d / "nothing").mkdir()
    return Inputs(d / "nothing", g.mask, g.model)


def model_random_bytes(d: Path, g: Inputs) -> Inputs:
    (d / "model.cevae").write_bytes(b"\x01" + np.random.default_rng(1).bytes(4095))
    return Inputs(g.image, g.mask, d / "model.cevae")


def model_pickle(suffix: str, protocol: int) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        marker = d / "PWNED"
        (d / f"model{suffix}").write_bytes(pickle.dumps(MarkerPayload(marker), protocol=protocol))
        return Inputs(g.image, g.mask, d / f"model{suffix}", marker=marker)

    return build


def model_torch_payload(d: Path, g: Inputs) -> Inputs:
    marker = d / "PWNED"
    torch.save({"state_dict": MarkerPayload(marker)}, d / "model.pt")
    return Inputs(g.image, g.mask, d / "model.pt", marker=marker)


def model_torch_state_dict(d: Path, g: Inputs) -> Inputs:
    torch.save({"conv1.weight": torch.zeros(8, 1, 3, 3), "fc.bias": torch.ones(10)}, d / "resnet.pth")
    return Inputs(g.image, g.mask, d / "resnet.pth")


def model_training_checkpoint(d: Path, g: Inputs) -> Inputs:
    torch.save({"step": 40, "model": {"fc.bias": torch.ones(10)}}, d / "site.cevae.ckpt")  # as a killed run leaves
    return Inputs(g.image, g.mask, d / "site.cevae.ckpt")


def model_zipped(d: Path, g: Inputs) -> Inputs:
    import zipfile

    with zipfile.ZipFile(d / "site.cevae", "w") as archive:  # a model zipped to send it, then named for it
        archive.write(g.model, "site.cevae")
    return Inputs(g.image, g.mask, d / "site.cevae")


def model_finished_runs_checkpoint(d: Path, g: Inputs) -> Inputs:
    shutil.copy(g.model, d / "site.cevae")  # the run finished: its model is beside its checkpoint
    return model_training_checkpoint(d, g)


def model_other_safetensors(d: Path, g: Inputs) -> Inputs:
    from safetensors.torch import save_file

    save_file({"embed.weight": torch.zeros(16, 4), "head.bias": torch.ones(3)}, str(d / "llm.safetensors"))
    return Inputs(g.image, g.mask, d / "llm.safetensors")


def model_wrong_tensors(d: Path, g: Inputs) -> Inputs:
    from CeVAEAnomalyLib.engine.bundle import read_header
    from safetensors.torch import save_file

    header = json.dumps(read_header(g.model).to_dict())
    save_file({"embed.weight": torch.zeros(16, 4)}, str(d / "odd.cevae"), metadata={"cevae_anomaly": header})
    return Inputs(g.image, g.mask, d / "odd.cevae")


def model_truncated(d: Path, g: Inputs) -> Inputs:
    data = g.model.read_bytes()
    (d / "half.cevae").write_bytes(data[: len(data) // 2])
    return Inputs(g.image, g.mask, d / "half.cevae")


def model_missing(d: Path, g: Inputs) -> Inputs:
    return Inputs(g.image, g.mask, d / "absent.cevae")


def model_folder(d: Path, g: Inputs) -> Inputs:
    (d / "models").mkdir()
    return Inputs(g.image, g.mask, d / "models")


def with_args(*extra: str) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        return Inputs(g.image, g.mask, g.model, list(extra))

    return build


def output_is_input(*extra: str) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        return Inputs(g.image, g.mask, g.model, list(extra), score=g.image)

    return build


def score_named(name: str) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        return Inputs(g.image, g.mask, g.model, [], score=d.parent / "out" / name)

    return build


def output_is_mask(d: Path, g: Inputs) -> Inputs:
    return Inputs(g.image, g.mask, g.model, ["--overwrite"], score=g.mask)


def output_exists(d: Path, g: Inputs) -> Inputs:
    (d / "previous.nii.gz").write_bytes(b"an earlier result")
    return Inputs(g.image, g.mask, g.model, score=d / "previous.nii.gz")


def output_is_folder(d: Path, g: Inputs) -> Inputs:
    (d / "results").mkdir()
    return Inputs(g.image, g.mask, g.model, ["--overwrite"], score=d / "results")


def output_under_a_file(d: Path, g: Inputs) -> Inputs:
    (d / "report.txt").write_text("not a folder")
    return Inputs(g.image, g.mask, g.model, score=d / "report.txt" / "score.nii.gz")


def mask_2d(d: Path, g: Inputs) -> Inputs:
    _, _, mask = head_arrays(g)
    return Inputs(g.image, write(sitk.GetImageFromArray(mask[18]), d / "mask2d.nii.gz"), g.model)


def output_named_twice(d: Path, g: Inputs) -> Inputs:
    score = d.parent / "out" / "score.nii.gz"
    return Inputs(g.image, g.mask, g.model, ["--labelmap", str(score)], score=score)


def complex_voxels(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    return Inputs(write(like(arr.astype(np.complex64), image), d / "kspace.nii.gz"), g.mask, g.model)


def edited_nifti(d: Path, g: Inputs, name: str, edit: Callable[[bytearray, sitk.Image], None],
                 mask: bool = True) -> Inputs:
    """The head as a float NIfTI ``d/NAME.nii`` whose header bytes ``edit`` changes (given the image written), with
    (``mask``) its brain mask on the grid ITK reads from the edited file, else the given one."""
    image, arr, _ = head_arrays(g)
    path = write(like(arr.astype(np.float32), image), d / f"{name}.nii")
    raw = bytearray(path.read_bytes())
    edit(raw, image)
    path.write_bytes(bytes(raw))
    if not mask:
        return Inputs(path, g.mask, g.model)
    brain = sitk.ReadImage(str(g.mask))
    brain.CopyInformation(sitk.ReadImage(str(path)))
    return Inputs(path, write(brain, d / f"{name}_mask.nii.gz"), g.model)


def negative_pixdim(sform: bool):
    """A float NIfTI whose pixdim[1] is negative: ITK's full read turns it into a flipped axis, which other software
    agrees with only without an sform (sform_code 0)."""
    def edit(raw: bytearray, image: sitk.Image) -> None:
        struct.pack_into("<f", raw, 80, -image.GetSpacing()[0])
        if not sform:
            struct.pack_into("<h", raw, 254, 0)
    return lambda d, g: edited_nifti(d, g, "negdim", edit)


def pixdim(value: float):
    """A float NIfTI whose pixdim[1] is ``value`` (0, NaN: ITK reads 1 mm whatever the sform says)."""
    def edit(raw: bytearray, image: sitk.Image) -> None:
        struct.pack_into("<f", raw, 80, value)
    return lambda d, g: edited_nifti(d, g, "pixdim", edit, mask=False)


def two_placements(code: int, shift_mm: float = 0.0, shear: float = 0.0):
    """A NIfTI whose sform (of ``code``) is moved ``shift_mm`` along x and sheared by ``shear`` (x grows with j) off
    its qform: ITK reads the qform unless the sform is a scanner one (code 1) it can decompose, and FSL, SPM and
    nibabel read the sform."""
    def edit(raw: bytearray, image: sitk.Image) -> None:
        srow_x = list(struct.unpack_from("<4f", raw, 280))
        struct.pack_into("<4f", raw, 280, srow_x[0], srow_x[1] + shear, srow_x[2], srow_x[3] + shift_mm)
        struct.pack_into("<h", raw, 254, code)
    return lambda d, g: edited_nifti(d, g, "placed", edit)


def sform_value(value: float):
    """A NIfTI whose sform (aligned, code 2) holds ``value`` (NaN, inf) in srow_x: no matrix at all, which ITK
    passes over (reading the qform) and other software would follow."""
    def edit(raw: bytearray, image: sitk.Image) -> None:
        struct.pack_into("<f", raw, 280, value)
        struct.pack_into("<h", raw, 254, 2)
    return lambda d, g: edited_nifti(d, g, "sform", edit)


def voxel_size(mm: float):
    """The image with voxels of ``mm`` along its first axis (a header in other units, or damaged)."""
    def build(d: Path, g: Inputs) -> Inputs:
        image, arr, _ = head_arrays(g)
        odd = like(arr, image)
        odd.SetSpacing((mm, *image.GetSpacing()[1:]))
        return Inputs(write(odd, d / "odd.nii.gz"), None, g.model)
    return build


def mask_of(kind: str):
    """A brain mask of every voxel (a head mask at most) or of 216 voxels: scored, with a warning."""
    def build(d: Path, g: Inputs) -> Inputs:
        image, arr, mask = head_arrays(g)
        odd = np.ones_like(mask)
        if kind == "few":
            odd[:] = 0
            odd[14:20, 16:22, 14:20] = 1  # 216 voxels of 1.8 mm3
        big = like(arr, image)
        big.SetSpacing((5.0, 5.0, 5.0))  # 40 x 44 x 36 voxels of 125 mm3: 7.9 L
        path = d / f"{kind}.nii.gz"
        return Inputs(write(big if kind == "all" else image, d / "image.nii.gz"),
                      write(like(odd, big if kind == "all" else image), path), g.model)
    return build


def gzip_trailer_lies(d: Path, g: Inputs) -> Inputs:
    """Half an int16 volume's gzip stream, then a size trailer claiming the whole file."""
    image, arr, _ = head_arrays(g)
    full = write(like(arr.astype(np.int16), image), d / "full.nii").read_bytes()
    compressed = gzip.compress(full)
    (d / "full.nii").unlink()
    path = d / "half.nii.gz"
    path.write_bytes(compressed[: len(compressed) // 2] + struct.pack("<I", len(full)))
    return Inputs(path, g.mask, g.model)


def gzip_claims_huge_volume(d: Path, g: Inputs) -> Inputs:
    """A small gzip file whose NIfTI header announces 30000^3 float voxels (108 TB)."""
    image, arr, _ = head_arrays(g)
    raw = bytearray(write(like(arr, image), d / "v.nii").read_bytes()[:4000])
    (d / "v.nii").unlink()
    struct.pack_into("<8h", raw, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path = d / "huge.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return Inputs(path, g.mask, g.model)


def text_header_claims_huge_volume(name: str, header: str, data: Optional[str] = None) -> Callable:
    """A NRRD or MetaImage file ``name`` of a few bytes (with ``data``: a detached header and its data file of a
    few bytes) whose header announces 30000^3 float voxels (108 TB; one of 1200^3, 6.9 GB, was allocated before
    the read failed)."""

    def build(d: Path, g: Inputs) -> Inputs:
        (d / name).write_text(header + ("" if data else "x" * 1000))
        if data:
            (d / data).write_bytes(b"x" * 1000)
        return Inputs(d / name, g.mask, g.model)

    return build


_HUGE_NRRD = "NRRD0004\ntype: float\ndimension: 3\nsizes: 30000 30000 30000\nspacings: 0.01 0.01 0.01\n" \
    "endian: little\nencoding: {}\n"
_HUGE_MHA = "ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_FLOAT\n" \
    "ElementSpacing = 0.01 0.01 0.01\nElementDataFile = {}\n"


def write_dicom_series(image: sitk.Image, folder: Path, skip=(), shift_mm: float = 0.0, turned_from: int = -1,
                       series: int = 2, decimals: int = 6, narrow: int = -1) -> Path:
    """One int16 DICOM file per slice, with the position and orientation tags scanners write. ``shift_mm``: each
    slice's position moves this far along the rows per slice (a gantry tilt); slices from ``turned_from`` on
    get an orientation turned by 15 degrees; ``series`` is the last number of the series UID; positions are
    written with ``decimals`` decimals (some scanners write one); slice ``narrow`` loses 4 columns.

    GDCM's writer sets the C locale; it is restored so that later reads of UTF-8 text are unaffected.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_slices(image, folder, skip, shift_mm, turned_from, series, decimals, narrow)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(image: sitk.Image, folder: Path, skip, shift_mm: float, turned_from: int,
                        series: int, decimals: int, narrow: int) -> Path:
    folder.mkdir(exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        piece = image[:-4, :, k] if k == narrow else image[:, :, k]
        rows, cols = (d[0], d[3], d[6]), (d[1], d[4], d[7])
        if 0 <= turned_from <= k:
            rows = (c * d[0] + s * d[1], c * d[3] + s * d[4], c * d[6] + s * d[7])
            cols = (-s * d[0] + c * d[1], -s * d[3] + c * d[4], -s * d[6] + c * d[7])
        origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + k * shift_mm * np.array(rows)
        tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": f"1.2.826.0.1.3680043.2.1125.{series}", "0020|0013": str(k + 1),
                "0008|0018": f"1.2.826.0.1.3680043.2.1125.{series}.{k + 1}", "0008|103e": f"series {series}",
                "0020|0037": "\\".join(str(v) for v in (*rows, *cols)),
                "0020|0032": "\\".join(str(round(float(v), decimals)) for v in origin)}
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series}_{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def dicom_case(skip=(), **geometry) -> Callable[[Path, Inputs], Inputs]:
    def build(d: Path, g: Inputs) -> Inputs:
        return Inputs(write_dicom_series(sitk.ReadImage(str(g.image)), d / "series", skip, **geometry), g.mask,
                      g.model)
    return build


def oblique_dicom_rounded(d: Path, g: Inputs) -> Inputs:
    """An oblique series of 0.6 mm slices whose positions are written to 0.1 mm, as some scanners do: still a
    regular stack."""
    image, mask = sitk.ReadImage(str(g.image)), sitk.ReadImage(str(g.mask))
    for volume in (image, mask):
        volume.SetDirection(oblique_direction())
        volume.SetSpacing((*volume.GetSpacing()[:2], 0.6))
    return Inputs(write_dicom_series(image, d / "series", decimals=1), write(mask, d / "mask.nii.gz"), g.model)


def dicom_last_slice_cut(d: Path, g: Inputs) -> Inputs:
    """A series whose last file was cut short (an interrupted copy): the reader read the others, 35 of 36."""
    folder = write_dicom_series(sitk.ReadImage(str(g.image)), d / "series")
    last = folder / "2_035.dcm"
    last.write_bytes(last.read_bytes()[:600])
    return Inputs(folder, g.mask, g.model)


def two_dicom_series(d: Path, g: Inputs) -> Inputs:
    image = sitk.ReadImage(str(g.image))
    write_dicom_series(image, d / "series", series=2)
    return Inputs(write_dicom_series(image[:, :, ::2], d / "series", series=3), g.mask, g.model)


def sheared_grid(d: Path, g: Inputs) -> Inputs:
    image = sitk.ReadImage(str(g.image))
    image.SetDirection((1.0, 0.5, 0.0, 0.0, -0.866, 0.0, 0.0, 0.0, 1.0))
    return Inputs(write(image, d / "sheared.nrrd"), g.mask, g.model)


def slightly_sheared_grid(d: Path, g: Inputs) -> Inputs:
    """Axes 0.03 degrees off perpendicular: a NIfTI output of it could not keep the grid (ITK makes it orthogonal)."""
    image = sitk.ReadImage(str(g.image))
    image.SetDirection((1.0, 5e-4, 0.0, 0.0, float(np.sqrt(1 - 2.5e-7)), 0.0, 0.0, 0.0, 1.0))
    return Inputs(write(image, d / "sheared.nrrd"), g.mask, g.model)


def header_without_data(d: Path, g: Inputs) -> Inputs:
    sitk.WriteImage(sitk.ReadImage(str(g.image)), str(d / "head.mhd"))
    (d / "head.raw").unlink()
    return Inputs(d / "head.mhd", g.mask, g.model)


def truncated_compressed_metaimage(d: Path, g: Inputs) -> Inputs:
    """A compressed .mha cut to half its length, without the CompressedDataSize line (ITK read it, zeros after)."""
    sitk.WriteImage(sitk.ReadImage(str(g.image)), str(d / "cut.mha"), True)
    data = re.sub(rb"CompressedDataSize = \d+\n", b"", (d / "cut.mha").read_bytes())
    (d / "cut.mha").write_bytes(data[: len(data) // 2])
    return Inputs(d / "cut.mha", g.mask, g.model)


def truncated_pair(d: Path, g: Inputs) -> Inputs:
    sitk.WriteImage(sitk.ReadImage(str(g.image)), str(d / "pair.hdr"))
    with open(d / "pair.img", "r+b") as fh:
        fh.truncate((d / "pair.img").stat().st_size // 2)
    return Inputs(d / "pair.hdr", g.mask, g.model)


def truncated_upper_case_pair(d: Path, g: Inputs) -> Inputs:
    """An SPM2/Windows export's SCAN.HDR/SCAN.IMG, the data file cut short (ITK reads it, zeros for the rest)."""
    truncated_pair(d, g)
    (d / "pair.hdr").rename(d / "SCAN.HDR")
    (d / "pair.img").rename(d / "SCAN.IMG")
    return Inputs(d / "SCAN.HDR", g.mask, g.model)


def truncated_gzipped_pair(d: Path, g: Inputs) -> Inputs:
    sitk.WriteImage(sitk.ReadImage(str(g.image)), str(d / "pair.hdr"))
    packed = gzip.compress((d / "pair.img").read_bytes())
    (d / "pair.img").unlink()
    (d / "pair.img.gz").write_bytes(packed[: len(packed) // 2])
    return Inputs(d / "pair.hdr", g.mask, g.model)


def gzipped_named_nii(d: Path, g: Inputs) -> Inputs:
    shutil.copy(g.image, d / "packed.nii")  # the fixture's scan is a .nii.gz
    return Inputs(d / "packed.nii", g.mask, g.model)


def freesurfer_mgz(d: Path, g: Inputs) -> Inputs:
    """The fixture's scan as FreeSurfer writes it (conformed scans are .mgz): a big-endian MGH header of 284 bytes
    (version 1, size, one frame, float32, spacing, directions, centre), the float32 voxels, gzip-compressed."""
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(g.image))).astype(">f4")
    header = struct.pack(">7i", 1, *voxels.shape[::-1], 1, 3, 0) + struct.pack(">h15f", 1, 1, 1, 1, -1, 0, 0, 0, 0, 1,
                                                                           0, -1, 0, 0, 0, 0)
    (d / "orig.mgz").write_bytes(gzip.compress(header.ljust(284, b"\0") + voxels.transpose(2, 1, 0).tobytes()))
    return Inputs(d / "orig.mgz", g.mask, g.model)


def gzipped_data_named_img(d: Path, g: Inputs) -> Inputs:
    sitk.WriteImage(sitk.ReadImage(str(g.image)), str(d / "pair.hdr"))
    (d / "pair.img").write_bytes(gzip.compress((d / "pair.img").read_bytes()))
    return Inputs(d / "pair.hdr", g.mask, g.model)


def nan_voxels_in_a_pair(d: Path, g: Inputs) -> Inputs:
    return nan_voxels(d, g, "holes.hdr")


def tiny_units(d: Path, g: Inputs) -> Inputs:
    image, arr, _ = head_arrays(g)
    return Inputs(write(like(arr.astype(np.float32) * 1e-8, image), d / "tiny_units.nii.gz"), g.mask, g.model)


def fifo_image(d: Path, g: Inputs) -> Inputs:
    os.mkfifo(d / "pipe.nii.gz")
    return Inputs(d / "pipe.nii.gz", g.mask, g.model)


def fifo_model(d: Path, g: Inputs) -> Inputs:
    os.mkfifo(d / "pipe.cevae")
    return Inputs(g.image, g.mask, d / "pipe.cevae")


def device_model(d: Path, g: Inputs) -> Inputs:
    return Inputs(g.image, g.mask, Path(os.devnull))


CASES: Dict[str, Case] = {
    "missing path": Case(missing_image, REFUSED, r"image .*absent\.nii\.gz does not exist"),
    "text file named .nii.gz": Case(text_file, REFUSED, r"could not be read as an image"),
    "empty file": Case(empty_file, REFUSED, r"empty\.nii\.gz is empty"),
    "truncated .nii.gz": Case(truncated_gz, REFUSED, r"cut\.nii\.gz is truncated or corrupt"),
    "truncated .nii": Case(truncated_nii, REFUSED, r"cut\.nii is truncated or corrupt .* of the \d+ bytes"),
    "truncated, uncompressed but named .nii.gz": Case(truncated_plain_named_gz, REFUSED,
                                                      r"plain\.nii\.gz is truncated or corrupt .* of the \d+ bytes"),
    "2D image": Case(image_2d, REFUSED, r"is 2D; a 3D volume is needed"),
    "4D series": Case(series_4d, REFUSED, r"is 4D \(a time series"),
    "RGB volume": Case(rgb_volume, REFUSED, r"has 3 components per voxel"),
    "constant volume": Case(constant_volume, REFUSED, r"nearly\) constant.*brain mask covers the brain"),
    "all voxels NaN": Case(all_nan, REFUSED, r"Every voxel inside the brain mask is NaN or infinite"),
    "NaN and Inf voxels": Case(nan_voxels, 0, r"8 brain voxels are NaN or infinite; they are left out"),
    "NaN and Inf voxels, uncompressed but named .nii.gz": Case(nan_voxels_plain_named_gz, 0,
                                                               r"8 brain voxels are NaN or infinite; they are left out"),
    "NaN and Inf voxels, automatic mask": Case(without_mask(nan_voxels), 0,
                                               r"\d brain voxels are NaN or infinite; they are left out"),
    "all voxels NaN, automatic mask": Case(without_mask(all_nan), REFUSED, r"Every voxel of the image is NaN"),
    "empty brain mask": Case(empty_mask, REFUSED, r"brain mask is empty"),
    "mask on another grid": Case(mask_other_grid, 0, r"another grid .* resampling it \(nearest neighbour\)"),
    "mask elsewhere in space": Case(mask_elsewhere, REFUSED, r"does not overlap the image in space"),
    "mask with tissue labels": Case(mask_tissue_labels, 0, r"several values \(1 to 3\); every voxel above 0"),
    "mask with label 255": Case(mask_label_255, 0, r"Wrote"),
    "mask of fractions (resampled linearly)": Case(mask_with_fractions(1.0), 0, r"several values \(.* to 1\); every "),
    "0/255 mask resampled linearly": Case(mask_with_fractions(255.0), 0, r"several values \(.* to 255\); every "),
    "a copy of the scan as mask": Case(the_image_as_mask, REFUSED, r"The brain mask is the image itself: give the "
                                       r"brain mask file, or none for the automatic one\."),
    "2D mask": Case(mask_2d, REFUSED, r"brain mask \S*/mask2d\.nii\.gz is 2D"),
    "missing mask file": Case(missing_mask, REFUSED, r"brain mask .*absent_mask\.nii\.gz does not exist"),
    "tiny 4x4x4 volume": Case(tiny_volume, REFUSED, r"too small to analyse \(4x4x4 voxels\)"),
    "single-slice volume": Case(single_slice, REFUSED, r"single slice \(40x44x1 voxels\)"),
    "image name too long": Case(name_too_long, REFUSED, r"The image .*/x+\.\.\. cannot be opened: file name too long"),
    "image a symbolic-link loop": Case(link_loop("image"), REFUSED,
                                       r"The image .*loop_a cannot be opened: too many levels of symbolic links"),
    "mask a symbolic-link loop": Case(link_loop("mask"), REFUSED, r"The brain mask .*loop_a cannot be opened"),
    "model a symbolic-link loop": Case(link_loop("model"), REFUSED, r"The model bundle .*loop_a cannot be opened"),
    "two-slice volume": Case(thin_slab(np.s_[17:19]), REFUSED,
                             r"only 2 voxels along one axis \(40x44x2 voxels\); at least 4 are needed"),
    "three-slice volume, sagittal": Case(thin_slab(np.s_[:, :, 18:21]), REFUSED,
                                         r"only 3 voxels along one axis \(3x44x36 voxels\)"),
    "3x9x9 volume, automatic mask": Case(without_mask(thin_slab(np.s_[10:19, 16:25, 18:21])), REFUSED,
                                         r"only 3 voxels along one axis \(3x9x9 voxels\)"),
    "four-slice volume": Case(thin_slab(np.s_[16:20]), 0, r"Wrote"),
    "CT-like int16": Case(ct_like, 0, r"look like a CT in Hounsfield units \(.*\); this model is for T1 MRI "
                                        r"and its scores will not be meaningful: give a T1-weighted MRI of the head\."),
    "0.5x0.5x10 mm anisotropy": Case(anisotropic, 0, r"Wrote"),
    "uint8 data": Case(dtype_case(np.uint8), 0, r"Wrote"),
    "float64 data": Case(dtype_case(np.float64), 0, r"Wrote"),
    "folder with no DICOM series": Case(no_dicom, REFUSED, r"export contains no DICOM series\.$"),
    "folder of image files": Case(folder_of_nifti_files, REFUSED, r"cohort contains no DICOM series; it holds image "
                                                                r"files \(a\.nii\.gz, b\.nii\.gz\): give one of "
                                                                r"them \(batch, train, calibrate and adapt read"),
    "empty folder": Case(empty_folder, REFUSED, r"nothing contains no DICOM series"),
    "random bytes as model": Case(model_random_bytes, REFUSED, r"not a valid safetensors file"),
    "pickle as .pt": Case(model_pickle(".pt", 2), REFUSED, r"pickle / PyTorch checkpoint.*refused unread"),
    "pickle as .pth": Case(model_pickle(".pth", 4), REFUSED, r"pickle / PyTorch checkpoint.*refused unread"),
    "pickle as .cevae": Case(model_pickle(".cevae", 5), REFUSED, r"pickle / PyTorch checkpoint.*refused unread"),
    "pickle as .safetensors": Case(model_pickle(".safetensors", 3), REFUSED, r"pickle / PyTorch checkpoint"),
    "protocol-0 pickle as .cevae": Case(model_pickle(".cevae", 0), REFUSED, r"not a valid safetensors file"),
    "torch.save payload as .pt": Case(model_torch_payload, REFUSED, r"zip archive \(such as a PyTorch checkpoint\)"),
    "zip archive as the model": Case(model_zipped, REFUSED, r"site\.cevae is a zip archive \(such as a PyTorch "
                                     r"checkpoint\), not a CeVAEAnomaly bundle\. It is refused unread"),
    "torch state dict, other keys": Case(model_torch_state_dict, REFUSED, r"resnet\.pth is a zip archive.*code\. "
                                         r"Instead, use a CeVAEAnomaly model file \(\.cevae\); a zipped one must be "
                                         r"unzipped first\.$"),
    "a finished run's checkpoint as the model": Case(model_finished_runs_checkpoint, REFUSED,
                                                     r"It is a training checkpoint; its run's model is .*site\.cevae: "
                                                     r"give that\.$"),
    "a training checkpoint as the model": Case(model_training_checkpoint, REFUSED,
                                               r"site\.cevae\.ckpt is a zip archive.*It looks like a training "
                                               r"checkpoint: run the train \(or adapt\) command that wrote it again "
                                               r"with --resume"),
    "safetensors, other tensors": Case(model_other_safetensors, REFUSED, r"not a CeVAEAnomaly model bundle"),
    "bundle header, other tensors": Case(model_wrong_tensors, REFUSED, r"does not match its declared architecture"),
    "truncated bundle": Case(model_truncated, REFUSED, r"half\.cevae is cut short: \d+ of \d+ bytes"),
    "missing model": Case(model_missing, REFUSED, r"model bundle .*absent\.cevae does not exist"),
    "model path is a folder": Case(model_folder, REFUSED, r"models is a folder"),
    "unknown --score-type": Case(with_args("--score-type", "entropy"), REFUSED,
                                 r"argument --score-type: invalid choice: 'entropy' \(choose from 'combi', 'rec', 'grad'\)"),
    "unknown --spread": Case(with_args("--spread", "iqr"), REFUSED,
                             r"argument --spread: invalid choice: 'iqr' \(choose from 'mad', 'tail'\)"),
    "--batch-size 0": Case(with_args("--batch-size", "0"), REFUSED, r"batch_size \(--batch-size\) must be a whole number in \[1, 4096\], got 0"),
    "--fpr 5": Case(with_args("--fpr", "5"), REFUSED, r"fpr \(--fpr\) must be a number in \[1e-06, 0\.5\], got 5"),
    "--fpr 0.7": Case(with_args("--fpr", "0.7"), REFUSED,  # a rate no calibration holds, as --default-fpr's
                      r"fpr \(--fpr\) must be a number in \[1e-06, 0\.5\], got 0\.7"),
    "negative --rim-mm": Case(with_args("--rim-mm", "-2"), REFUSED, r"rim_mm \(--rim-mm\) must be a number in \[0, 50\], got -2"),
    "output = input": Case(output_is_input(), REFUSED, r"same file as an input"),
    "output = input, --overwrite": Case(output_is_input("--overwrite"), REFUSED, r"same file as an input"),
    "output = mask, --overwrite": Case(output_is_mask, REFUSED, r"same file as an input"),
    "score map named .txt": Case(score_named("score.txt"), REFUSED,
                                 r"score map output .*score\.txt needs an image file name ending in \.nii\.gz"),
    "score map named .MHA": Case(score_named("score.MHA"), REFUSED, r"score\.MHA needs an image file name .*in lower case"),
    "score map named .mhd (detached)": Case(score_named("score.mhd"), REFUSED,
                                            r"score\.mhd needs .*\.mha \(a single file, not a detached header\)"),
    "slice table named .nii.gz": Case(with_args("--slice-scores", "slices.nii.gz"), REFUSED,
                                      r"slice table output slices\.nii\.gz is written as CSV text"),
    "existing output": Case(output_exists, REFUSED, r"previous\.nii\.gz already exists; pass --overwrite"),
    "output is a folder": Case(output_is_folder, REFUSED, r"results is a folder; give a file name"),
    "output under a file": Case(output_under_a_file, REFUSED,
                                r"report\.txt/score\.nii\.gz would be under .*report\.txt, which is a file"),
    "output named twice": Case(output_named_twice, REFUSED, r"score\.nii\.gz is named twice"),
    "complex voxels": Case(complex_voxels, REFUSED, r"kspace\.nii\.gz has complex-valued voxels"),
    "negative pixdim, float NIfTI without an sform": Case(negative_pixdim(sform=False), 0, r"Wrote"),
    "negative pixdim beside an sform (mirrored elsewhere)": Case(negative_pixdim(sform=True), REFUSED,
                                                                 r"negdim\.nii gives a negative voxel size \(pixdim "
                                                                 r"-1\.2\) along axis i beside an sform"),
    "pixdim 0 (a 1 mm grid by default)": Case(pixdim(0.0), REFUSED,
                                              r"pixdim\.nii gives a voxel size \(pixdim\) of 0 along axis i"),
    "a mask of every voxel (7.9 L)": Case(mask_of("all"), 0, r"The brain mask covers 7\.9 L, more than a brain"),
    "pixdim NaN": Case(pixdim(float("nan")), REFUSED, r"voxel size \(pixdim\) of nan along axis i"),
    "sform (aligned) 12 mm off the qform ITK reads": Case(two_placements(2, shift_mm=12.0), REFUSED,
                                                       r"placed\.nii places its voxels up to 12 mm from where ITK and "
                                                       r"3D Slicer read them: its sform, which FSL, SPM and nibabel "
                                                       r"follow"),
    "sform (MNI) sheared, the qform read": Case(two_placements(4, shear=0.2), REFUSED,
                                               r"placed\.nii places its voxels up to 8\.6 mm from where ITK"),
    "sform holding NaN": Case(sform_value(float("nan")), REFUSED,
                              r"sform\.nii has an sform \(srow_x/y/z\) that is not a valid matrix: "
                              r"it holds nan\. Fix the header's sform"),
    "sform holding inf": Case(sform_value(float("inf")), REFUSED,
                              r"sform\.nii has an sform \(srow_x/y/z\) that is not a valid matrix: "
                              r"it holds inf\. Fix the header's sform"),
    "sform a rounding off the qform": Case(two_placements(2, shift_mm=1e-4), 0, r"Wrote"),
    "scanner sform off the qform (read by ITK too)": Case(two_placements(1, shift_mm=12.0), 0, r"Wrote"),
    "voxels of a micrometre (748 GiB of slices)": Case(voxel_size(1e-6), REFUSED,
                                                       r"has voxels of 1e-06 x .* mm; an MRI of a head has voxels of "
                                                       r"0\.01 to 50 mm"),
    "voxels of a kilometre": Case(voxel_size(1e6), REFUSED, r"has voxels of 1e\+06 x"),
    "a head 2 m long (voxels of 50 mm; at 50 mm along every axis the automatic mask took 21 GB)":
        Case(voxel_size(50.0), REFUSED, r"odd\.nii\.gz spans 2 m along its i axis \(40 voxels of 50 mm\); an MRI of a "
                                        r"head spans well under 1 m"),
    "gzip size trailer lies": Case(gzip_trailer_lies, REFUSED, r"half\.nii\.gz is truncated or corrupt \(it holds"),
    "gzip claims 108 TB": Case(gzip_claims_huge_volume, REFUSED, r"huge\.nii\.gz is truncated or corrupt .*far too small"),
    "NRRD claims 108 TB": Case(text_header_claims_huge_volume("huge.nrrd", _HUGE_NRRD.format("raw") + "\n"), REFUSED,
                               r"huge\.nrrd is truncated or corrupt \(it is far too small for the 108000000000000 "),
    "gzip NRRD claims 108 TB": Case(text_header_claims_huge_volume("huge.nrrd", _HUGE_NRRD.format("gzip") + "\n"),
                                    REFUSED, r"huge\.nrrd is truncated or corrupt \(it is far too small for "),
    "MetaImage claims 108 TB": Case(text_header_claims_huge_volume("huge.mha", _HUGE_MHA.format("LOCAL")), REFUSED,
                                    r"huge\.mha is truncated or corrupt \(it is far too small for "),
    "detached NRRD header claims 108 TB": Case(text_header_claims_huge_volume(
        "huge.nhdr", _HUGE_NRRD.format("raw") + "data file: huge.raw\n", "huge.raw"), REFUSED,
        r"huge\.nhdr is truncated or corrupt \(its data file .*huge\.raw is far too small for the 108000000000000 "),
    "detached MetaImage header claims 108 TB": Case(text_header_claims_huge_volume(
        "huge.mhd", _HUGE_MHA.format("huge.raw"), "huge.raw"), REFUSED,
        r"huge\.mhd is truncated or corrupt \(its data file .*huge\.raw is far too small for "),
    "DICOM series": Case(dicom_case(), 0, r"Wrote"),
    "DICOM series, a slice missing": Case(dicom_case(skip=(17,)), REFUSED,
                                          r"unevenly spaced slices \(a gap of 3 mm after slice 17 of 35"),
    "DICOM series, oblique, positions to 0.1 mm": Case(oblique_dicom_rounded, 0, r"Wrote"),
    "DICOM series, gantry tilt": Case(dicom_case(shift_mm=0.5), REFUSED,
                                      r"not a stack along its slices' normal: slice 36 of 36 lies 17\.5 mm off"),
    "DICOM series, the last slices turned": Case(dicom_case(turned_from=30), REFUSED,
                                                 r"slices of different orientations \(slice 31 of 36 is turned"),
    "DICOM series, its last file cut short": Case(dicom_last_slice_cut, REFUSED,
                                                  r"series cannot be read whole: 2_035\.dcm is a DICOM image of the "
                                                  r"series' kind that the series reader cannot read \(truncated or "
                                                  r"corrupt\), and the series would be read without it \(35 slices\)"),
    "two DICOM series in one folder": Case(two_dicom_series, REFUSED,
                                           r"holds 2 DICOM series \('series 2', 36 file\(s\).*'series 3', 18 file"),
    "sheared grid (NRRD)": Case(sheared_grid, REFUSED, r"axes i and j meet at 60\.0 degrees: a sheared grid"),
    "slightly sheared grid (NRRD)": Case(slightly_sheared_grid, REFUSED,
                                         r"axes i and j meet at 89\.971 degrees: a sheared grid"),
    "DICOM slice of another size": Case(dicom_case(narrow=10), REFUSED,
                                        r"its slices differ in size: 2_010\.dcm is \d+x\d+ pixels, the usual \d+x\d+ "
                                        r"\(1 of 36 files differ\)"),
    ".mhd without its data file": Case(header_without_data, REFUSED,
                                       r"header .*head\.mhd names the data file .*head\.raw, which does not exist"),
    "compressed .mha cut short, without CompressedDataSize": Case(truncated_compressed_metaimage, REFUSED,
                                                                   r"cut\.mha is truncated or corrupt \(its compressed "
                                                                   r"data ends after \d+ of the \d+ bytes"),
    "truncated .hdr/.img pair": Case(truncated_pair, REFUSED, r"pair\.img is truncated or corrupt \(it holds"),
    "truncated .HDR/.IMG pair": Case(truncated_upper_case_pair, REFUSED,
                                     r"SCAN\.IMG is truncated or corrupt \(it holds"),
    "truncated .hdr/.img.gz pair": Case(truncated_gzipped_pair, REFUSED,
                                        r"pair\.img\.gz is truncated or corrupt \(it holds"),
    "gzipped .img named without .gz": Case(gzipped_data_named_img, REFUSED,
                                           r"data file .*pair\.img is gzip-compressed but named without \.gz.*rename "
                                           r"it pair\.img\.gz"),
    "FreeSurfer .mgz": Case(freesurfer_mgz, REFUSED, r"orig\.mgz is in FreeSurfer's MGH format, which is not read "
                                                     r"here: convert it to NIfTI first \(FreeSurfer: mri_convert "
                                                     r"orig\.mgz orig\.nii\.gz\) and give that file\.$"),
    "gzip file named .nii": Case(gzipped_named_nii, REFUSED, r"packed\.nii is gzip-compressed but named \.nii, .*"
                                                             r"rename it to end in \.nii\.gz"),
    "NaN and Inf voxels in a .hdr/.img pair": Case(nan_voxels_in_a_pair, 0,
                                                   r"8 brain voxels are NaN or infinite; they are left out"),
    "intensities scaled by 1e-8": Case(tiny_units, 0, r"Wrote"),
    "FIFO as image": Case(fifo_image, REFUSED, r"image .*pipe\.nii\.gz is a named pipe \(FIFO\), not a file"),
    "FIFO as model": Case(fifo_model, REFUSED, r"model bundle .*pipe\.cevae is a named pipe \(FIFO\)"),
    "device as model": Case(device_model, REFUSED, r"model bundle /dev/null is a character device"),
}


def sha256_tree(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` (hidden temporaries included) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def good(tmp_path, head, tiny_bundle) -> Inputs:
    """A valid image, mask and model copied into this test's own input folder."""
    d = tmp_path / "in"
    d.mkdir()
    (tmp_path / "out").mkdir()
    image, mask = head
    return Inputs(Path(shutil.copy(image, d)), Path(shutil.copy(mask, d)), Path(shutil.copy(tiny_bundle, d)))


def argv_for(case: Inputs, score: Path) -> List[str]:
    argv = ["detect", str(case.image), "--model", str(case.model), "--score", str(score)]
    if case.mask is not None:
        argv += ["--mask", str(case.mask)]
    return argv + case.extra


@pytest.mark.parametrize("name", list(CASES))
def test_detect_input(name, good, tmp_path, capsys, caplog):
    spec = CASES[name]
    case = spec.build(tmp_path / "in", good)
    score = case.score or tmp_path / "out" / "score.nii.gz"
    before = sha256_tree(tmp_path)
    caplog.set_level(logging.INFO)

    rc = main(argv_for(case, score))

    err = capsys.readouterr().err
    assert rc == spec.rc, err
    assert "Traceback" not in err
    if case.marker is not None:
        assert not case.marker.exists(), "the model file was unpickled"
    if spec.rc != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(spec.message, lines[0]), lines[0]
        assert sha256_tree(tmp_path) == before, "a file was created, changed or removed"
        return
    assert re.search(spec.message, caplog.text), caplog.text
    after = sha256_tree(tmp_path)
    assert {k: v for k, v in after.items() if k != "out/score.nii.gz"} == before
    check_score_map(score, case.image)


def check_score_map(score_path: Path, image_path: Path) -> None:
    """The score map is finite float32 on the input's exact grid (a file's or a DICOM series')."""
    from CeVAEAnomalyLib.io.images import read_image

    score, image = sitk.ReadImage(str(score_path)), read_image(image_path)
    assert score.GetPixelID() == sitk.sitkFloat32
    assert score.GetSize() == image.GetSize()
    for what in ("Spacing", "Origin", "Direction"):
        got, want = getattr(score, f"Get{what}")(), getattr(image, f"Get{what}")()
        if Path(image_path).is_file():
            assert got == want, what
        else:  # DICOM geometry is decimal text; the NIfTI output stores it as float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=what)
    values = sitk.GetArrayViewFromImage(score)
    assert np.isfinite(values).all() and values.max() > 0


def test_a_brain_mask_of_a_few_voxels_is_warned_of(good, tmp_path, caplog):
    """Its scores are all 0 (no slice holds enough brain): the run says why rather than reporting a clean scan."""
    inputs = mask_of("few")(tmp_path, good)
    with caplog.at_level(logging.WARNING):
        assert main(argv_for(inputs, tmp_path / "score.nii.gz")) == 0
    assert "The brain mask covers only 0.4 ml: too little of a brain" in caplog.text


def test_non_finite_voxels_score_zero(good, tmp_path, capsys):
    case = nan_voxels(tmp_path / "in", good)
    score = tmp_path / "out" / "score.nii.gz"
    assert main(argv_for(case, score)) == 0
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(score)))
    holes = non_finite_at(values.shape)
    assert (values[holes] == 0).all()
    assert (values[~holes] > 0).sum() > 1000  # the rest of the brain is scored


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_finite_voxels_survive_reading(tmp_path, suffix):
    """ITK's NIfTI reader zeroes NaN/Inf; read_image puts them back, on any grid orientation."""
    from CeVAEAnomalyLib.io.images import read_image
    from conftest import oblique_direction

    image, _ = make_head(size=(20, 24, 18), direction=oblique_direction(130.0), dtype=np.float64)
    arr = sitk.GetArrayFromImage(image)
    holes = np.zeros(arr.shape, bool)
    holes[3, 4, 5] = holes[10, 0, 7] = holes[17, 23, 19] = True
    arr[holes] = [np.nan, np.inf, -np.inf]
    write(like(arr, image), tmp_path / f"v{suffix}")
    back = sitk.GetArrayFromImage(read_image(tmp_path / f"v{suffix}"))
    np.testing.assert_array_equal(~np.isfinite(back), holes)
    np.testing.assert_array_equal(back[holes], [np.nan, np.inf, -np.inf])
    np.testing.assert_array_equal(back[~holes], arr[~holes])


def test_any_positive_label_is_brain(good, tmp_path, capsys, caplog):
    """A 0/255 mask gives exactly the scores of the 0/1 mask, without a warning."""
    baseline, relabelled = tmp_path / "out" / "a.nii.gz", tmp_path / "out" / "b.nii.gz"
    assert main(argv_for(good, baseline)) == 0
    assert main(argv_for(mask_label_255(tmp_path / "in", good), relabelled)) == 0
    assert "several values" not in caplog.text
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (baseline, relabelled))
    np.testing.assert_array_equal(a, b)


def test_existing_output_replaced_with_overwrite(good, tmp_path, capsys):
    case = output_exists(tmp_path / "in", good)
    assert main(argv_for(case, case.score) + ["--overwrite"]) == 0
    check_score_map(case.score, case.image)
    assert not [p for p in (tmp_path / "in").iterdir() if p.name.startswith(".")]


def test_payloads_really_execute_when_unpickled(tmp_path):
    """Control: the payloads used above do run code when a careless loader unpickles them."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(MarkerPayload(marker), protocol=0))
    assert marker.exists()
    marker.unlink()
    torch.save({"state_dict": MarkerPayload(marker)}, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=False)
    assert marker.exists()


def test_unexpected_error_is_one_line_unless_debug(good, tmp_path, capsys, monkeypatch):
    from CeVAEAnomalyLib.engine.detector import Detector

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch\nin the network")

    monkeypatch.setattr(Detector, "__call__", broken)
    argv = argv_for(good, tmp_path / "out" / "score.nii.gz")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("error: unexpected ValueError: shape mismatch in the network "
                           "(run again with --debug for the traceback and report it)")
    with pytest.raises(ValueError):
        main(["--debug"] + argv)


@pytest.mark.parametrize("name", ["truncated .nii.gz", "pickle as .pt"])
def test_command_line_prints_no_traceback(name, good, tmp_path):
    """The installed entry point, in its own process: one stderr line, exit code 2."""
    case = CASES[name].build(tmp_path / "in", good)
    before = sha256_tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli",
                           *argv_for(case, tmp_path / "out" / "score.nii.gz")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == REFUSED
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert re.search(CASES[name].message, proc.stderr)
    assert sha256_tree(tmp_path) == before
    if case.marker is not None:
        assert not case.marker.exists()


def test_an_oblique_fine_series_with_rounded_positions_is_a_regular_stack(tmp_path):
    """0.25 mm pixels, 0.6 mm slices, positions written to 0.1 mm: the rounding strays by more than half a pixel,
    which is still no tilt."""
    from CeVAEAnomalyLib.io.images import read_image

    image = sitk.Image([12, 12, 60], sitk.sitkInt16) + 100
    image.SetDirection(oblique_direction())
    image.SetSpacing((0.25, 0.25, 0.6))
    image.SetOrigin((0.06, 0.05, 0.05))  # where the rounding strays 0.14 mm within the plane at worst
    folder = write_dicom_series(image, tmp_path / "series", decimals=1)
    read = read_image(folder)
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=0.02)


@pytest.mark.parametrize("name, writable", [("s.nrrd", True), ("s.NRRD", True), ("s.nii.gz", True), ("s.mha", True),
                                            ("s.MHA", False), ("s.Nii", False), ("s.NII.GZ", False),
                                            ("s.mhd", False), ("s.nhdr", False)])
def test_image_output_names_are_those_itk_writes_as_one_file(tmp_path, name, writable):
    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.result import refuse_unwritable_names

    if writable:
        refuse_unwritable_names({"score": tmp_path / name})
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(tmp_path / name))  # ITK agrees: one file
        assert [p.name for p in tmp_path.iterdir()] == [name]
    else:
        with pytest.raises(CeVAEError, match="needs an image file name ending in"):
            refuse_unwritable_names({"score": tmp_path / name})


def test_the_scan_given_as_its_own_brain_mask_is_refused_in_one_line(tmp_path, capsys):
    """``detect head.nii.gz --mask head.nii.gz`` (or the same file through a link, or an identical copy) was scored
    with three warnings (several values, a 5 L "brain", the mask at the edge); a manifest row too. It is refused."""
    head = tmp_path / "head.nii.gz"
    write(make_head(seed=3)[0], head)
    (tmp_path / "link.nii.gz").symlink_to(head)
    said = "is the image itself: give the brain mask file, or none for the automatic one."
    for mask in (head, tmp_path / "link.nii.gz", Path(os.path.relpath(head))):
        assert main(["detect", str(head), "--mask", str(mask), "--score", str(tmp_path / "s.nii.gz"),
                     "--device", "cpu"]) != 0
        assert said in capsys.readouterr().err
    (tmp_path / "rows.csv").write_text(f"image,mask\n{head},{tmp_path / 'link.nii.gz'}\n")
    assert main(["batch", str(tmp_path / "rows.csv"), "--out-dir", str(tmp_path / "out"),
                 "--device", "cpu"]) != 0
    assert said in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists()
