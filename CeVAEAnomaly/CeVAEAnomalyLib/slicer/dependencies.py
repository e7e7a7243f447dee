"""The Python packages a detection needs in Slicer's Python, checked without importing them.

Slicer ships numpy, SimpleITK and VTK; torch and safetensors may be missing or too old. The
minimum versions are those of ``pyproject.toml``, whose numpy and SimpleITK floors are at or below what
Slicer 5.6 bundles (numpy 1.26.1, SimpleITK 2.2.1; 5.8: 1.26.4, 2.3.1; 5.10: 2.0.2, 2.5.2): not checked here.
Installing is the logic's job (:meth:`~CeVAEAnomalyLib.slicer.logic.CeVAEAnomalyLogic.installDependencies`), in the
Slicer application.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CeVAEError, one_line

REQUIREMENTS: Dict[str, str] = {"torch": "2.1", "safetensors": "0.4"}  # package: minimum version
NOT_INSTALLED = None
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's index of its CPU-only builds


@dataclass(frozen=True)
class Unmet:
    """A required package that is missing (``installed`` None) or older than ``minimum``."""

    name: str
    minimum: str
    installed: Optional[str]

    @property
    def spec(self) -> str:
        """The pip requirement that meets it."""
        return f"{self.name}>={self.minimum}"

    def __str__(self) -> str:
        found = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.spec} ({found})"


def installed_version(name: str) -> Optional[str]:
    """The version of an importable package ("" if its metadata is missing); None if it is not importable or only a
    folder without ``__init__.py`` is left of it (an interrupted upgrade or uninstall: it imports as a namespace
    package)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return NOT_INSTALLED
    if spec is None or spec.origin is None:
        return NOT_INSTALLED
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def release(version: str) -> Tuple[int, ...]:
    """The numeric release part of a version ("2.13.0+cpu" -> (2, 13, 0); "2.1.0a0" -> (2, 1, 0))."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def unmet(requirements: Optional[Dict[str, str]] = None,
          version_of: Callable[[str], Optional[str]] = installed_version) -> List[Unmet]:
    """The requirements that are not met. A package whose version cannot be read counts as met."""
    found = []
    for name, minimum in (REQUIREMENTS if requirements is None else requirements).items():
        version = version_of(name)
        if version is NOT_INSTALLED or (release(version) and release(version) < release(minimum)):
            found.append(Unmet(name, minimum, version))
    return found


def unmet_message(items: List[Unmet]) -> str:
    """One sentence naming what is missing or too old."""
    return "CeVAE Anomaly needs these Python packages: " + ", ".join(str(item) for item in items) + "."


@dataclass(frozen=True)
class TorchInstall:
    """How torch gets installed: through the PyTorch extension (``pip_args`` None) or with
    ``slicer.util.pip_install(pip_args)``; ``build`` says which build and roughly how large, for the confirmation."""

    pip_args: Optional[str]
    build: str


def nvidia_driver_visible(which: Callable[[str], Optional[str]] = shutil.which,
                          proc_driver: Path = Path("/proc/driver/nvidia")) -> bool:
    """Whether an NVIDIA driver can be seen: its ``nvidia-smi`` on the PATH, or (Linux) its /proc entry."""
    return which("nvidia-smi") is not None or proc_driver.exists()


def torch_install(spec: str, extension: bool, platform: str, nvidia_driver: bool) -> TorchInstall:
    """How to install ``spec`` (``torch>=...``) on ``platform`` (``sys.platform``): through the PyTorch extension
    where it is there (it matches the build to the driver); else PyPI's wheel, except on Linux without an NVIDIA
    driver, where PyPI's wheel is the CUDA build of several GB that no GPU can use: PyTorch's CPU index instead."""
    mac, linux = platform == "darwin", platform.startswith("linux")
    cpu = "the build for macOS (CPU and Apple GPU), about 80 MB" if mac else "the CPU-only build, about 200 MB"
    cuda = "the CUDA build, roughly 3 GB with its NVIDIA libraries"
    if extension:
        return TorchInstall(None, "through the PyTorch extension, which picks the build for this computer: "
                            + (f"{cuda}, matched to its NVIDIA driver" if nvidia_driver and not mac else cpu))
    if linux and not nvidia_driver:
        return TorchInstall(f"{spec} --index-url {TORCH_CPU_INDEX}",
                            f"from PyTorch's CPU index: {cpu} (no NVIDIA driver found)")
    if linux:
        return TorchInstall(spec, f"from PyPI: {cuda} (the PyTorch extension would match it to the driver)")
    if mac:
        return TorchInstall(spec, f"from PyPI: {cpu}")
    return TorchInstall(spec, f"from PyPI: {cpu} (for an NVIDIA GPU, install the PyTorch extension first: it "
                              "installs the CUDA build)")


def planned_torch_install(spec: str) -> TorchInstall:
    """:func:`torch_install` for this computer (the PyTorch extension is looked for without importing it)."""
    try:
        extension = importlib.util.find_spec("PyTorchUtils") is not None
    except (ImportError, ValueError):
        extension = False
    return torch_install(spec, extension, sys.platform, nvidia_driver_visible())


def pip_torch_install(spec: str) -> TorchInstall:
    """:func:`torch_install` with pip on this computer: outside Slicer, where the PyTorch extension cannot install."""
    return torch_install(spec, False, sys.platform, nvidia_driver_visible())


def pip_commands(items: Sequence[Unmet], plan: Callable[[str], TorchInstall] = pip_torch_install) -> str:
    """The shell commands that install ``items`` with pip, one per package, joined by ``&&``: torch as ``plan`` says
    (PyTorch's CPU index on Linux without an NVIDIA driver, where PyPI's wheel is the CUDA build of several GB), the
    others from PyPI; requirements in double quotes (``>=`` is a redirection to a shell)."""
    each = [(plan(item.spec).pip_args or item.spec) if item.name == "torch" else item.spec for item in items]
    return " && ".join("python -m pip install " + " ".join(map(_shell_word, args.split())) for args in each)


def _shell_word(word: str) -> str:
    """``word`` as a shell (POSIX or Windows) takes it: in double quotes where it holds ``<``, ``>``, ``|`` or ``&``."""
    return f'"{word}"' if any(c in word for c in "<>|&") else word


def install_description(items: Sequence[Unmet],
                        plan: Callable[[str], TorchInstall] = planned_torch_install) -> str:
    """What installing ``items`` does, for the confirmation: which torch build (``plan``) and roughly how large."""
    if not items:
        return f"Nothing to install: {' and '.join(REQUIREMENTS)} are installed and recent enough."
    said = [f"{item.spec} {plan(item.spec).build}" if item.name == "torch" else f"{item.spec} from PyPI"
            for item in items]
    return "This installs " + "; ".join(said) + ". It may take several minutes."


def refuse_loaded_upgrades(items: Sequence[Unmet], modules: Optional[Dict[str, object]] = None) -> None:
    """Raise a one-line CeVAEError if one of ``items`` is installed (too old) and imported in this process already
    (``modules``: ``sys.modules``): pip would replace the files of a library in use (on Windows it fails half-way
    on the locked ones, leaving a broken install), and the old one would stay loaded until a restart anyway."""
    modules = sys.modules if modules is None else modules
    loaded = [item for item in items if item.installed is not NOT_INSTALLED and modules.get(item.name) is not None]
    if loaded:
        names = " and ".join(f"{item.name} {item.installed}" for item in loaded)
        is_, it = ("is", "it") if len(loaded) == 1 else ("are", "them")
        raise CeVAEError(f"{names} {is_} in use in this Slicer session already (imported by a module or the Python "
                         f"console), so pip cannot replace {it} safely now: restart Slicer, then install before "
                         f"anything else imports {it} (Apply in this module, or "
                         "CeVAEAnomalyLogic().installDependencies() in the Python console).")


def refuse_replaced_while_loaded(requirements: Optional[Dict[str, str]] = None,
                                 modules: Optional[Dict[str, object]] = None,
                                 version_of: Callable[[str], Optional[str]] = installed_version) -> None:
    """Raise a one-line CeVAEError if a required package imported in this process (``modules``: ``sys.modules``) is
    not the version installed now (its ``__version__`` against its metadata, :func:`unmet`'s only source): upgraded
    by hand since it was imported, its loaded code would run with the new files that it imports later."""
    modules = sys.modules if modules is None else modules
    replaced = []
    for name in REQUIREMENTS if requirements is None else requirements:
        loaded, installed = getattr(modules.get(name), "__version__", None), version_of(name)
        if isinstance(loaded, str) and installed and not _same_build(loaded, installed):
            replaced.append(f"{name} {loaded} is loaded in this Slicer session but {installed} is installed now")
    if replaced:
        raise CeVAEError(f"{'; '.join(replaced)} (replaced since it was imported), so a detection here would mix "
                         "both: restart Slicer, then detect again.")


def _same_build(a: str, b: str) -> bool:
    """Whether two version strings name one release and build ("2.1.0+cpu" is not "2.1.0+cu121"), however spelt."""
    return release(a) == release(b) and a.partition("+")[2].lower() == b.partition("+")[2].lower()


def install(items: Sequence[Unmet], pip_install: Callable[[str], object], install_torch: Callable[[str], object],
            version_of: Callable[[str], Optional[str]] = installed_version) -> None:
    """Install ``items`` in turn (torch with ``install_torch``, the others with ``pip_install``; each takes a pip
    requirement), stopping at the first that fails, then check them again. A one-line CeVAEError if an install
    failed (offline, a file in use, ...) or something is still unmet; it names what was installed and what is
    still needed."""
    failed: Optional[Tuple[Unmet, BaseException]] = None
    for item in items:
        try:
            (install_torch if item.name == "torch" else pip_install)(item.spec)
        except Exception as exc:
            failed = (item, exc)
            break
    importlib.invalidate_caches()
    still = unmet({item.name: item.minimum for item in items}, version_of)
    if failed is None and not still:
        return
    installed = [item.spec for item in items if item.name not in {u.name for u in still}]
    said = [f"Installed: {', '.join(installed)}."] if installed else []
    said += [f"Still needed: {', '.join(str(u) for u in still)}."] if still else []
    if failed is None:
        raise CeVAEError(" ".join(said + ["The installation did not provide them; restart Slicer and try again "
                                          "(a package imported already is replaced only then)."]))
    item, exc = failed
    why = (f"pip ended with exit status {exc.returncode}" if isinstance(exc, subprocess.CalledProcessError)
           else one_line(exc))
    if item.spec in installed:  # installed, then its import (or a check after it) failed
        raise CeVAEError(" ".join([f"{item.spec} was installed, but then: {why}.", *said[1:],
                                   "Restart Slicer and try again."]))
    raise CeVAEError(" ".join([f"Installing {item.spec} failed ({why}); its messages are in the Python console "
                               "(no internet connection is a common cause).", *said]))


def require() -> None:
    """Raise a one-line CeVAEError if a required package is missing, too old, or installed but failing to import
    (a CUDA build without its libraries, files half replaced by an install); imports them. For the process that
    runs the task: the Slicer process checks without importing (:func:`unmet`)."""
    missing = unmet()
    if missing:
        raise CeVAEError(f"{unmet_message(missing)} The Python that runs the task ({sys.executable}) lacks them: "
                         "install them (in Slicer, Apply offers it), then start again.")
    for name in REQUIREMENTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, OSError (a shared library missing), anything its import raises
            raise CeVAEError(f"{name} is installed in {sys.executable} but cannot be imported ({one_line(exc)}). "
                             f"Restart Slicer; if that does not help, reinstall {name}"
                             f"{' (PyTorch Utils module)' if name == 'torch' else ''}.") from None
