"""The packages a detection needs in Slicer's Python (slicer/dependencies.py), the logic's check
and the self-test's skips: real interpreters where torch is hidden or reports an old version."""
from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import textwrap
from typing import Dict

import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer import dependencies  # noqa: E402
from CeVAEAnomalyLib.slicer.dependencies import REQUIREMENTS, Unmet, release, unmet  # noqa: E402

MODULE_FILE = REPO / "CeVAEAnomaly" / "CeVAEAnomaly.py"


def test_minimum_versions_are_the_packages():
    text = (REPO / "pyproject.toml").read_text()
    for name, minimum in REQUIREMENTS.items():
        assert f'"{name}>={minimum}"' in text


# numpy and SimpleITK that Slicer bundles (SuperBuild/External_python-numpy.cmake, External_SimpleITK.cmake at
# these tags; 5.6.2 as 5.6.0, 5.8.0 as 5.8.1): the module runs on them, never installing its own
SLICER_BUNDLES: Dict[str, Dict[str, str]] = {
    "5.6.0": {"numpy": "1.26.1", "SimpleITK": "2.2.1"},
    "5.8.1": {"numpy": "1.26.4", "SimpleITK": "2.3.1"},
    "5.10.0": {"numpy": "2.0.2", "SimpleITK": "2.5.2"},
}


@pytest.mark.parametrize("slicer_version", SLICER_BUNDLES)
def test_the_floors_admit_what_slicer_bundles(slicer_version):
    """pyproject.toml asked for SimpleITK >= 2.3, which Slicer 5.6's 2.2.1 does not meet: a floor the module's own
    home breaks. Each floor is at or below every supported Slicer's bundled version."""
    text = (REPO / "pyproject.toml").read_text()
    for name, bundled in SLICER_BUNDLES[slicer_version].items():
        floor = re.search(rf'"{name}>=([0-9.]+)"', text)
        assert floor is not None and release(floor.group(1)) <= release(bundled), (name, slicer_version)


def test_this_environment_meets_them():
    assert unmet() == []
    assert release(dependencies.installed_version("torch")) >= release(REQUIREMENTS["torch"])


@pytest.mark.parametrize("versions, expected", [
    ({"torch": "2.0.1", "safetensors": "0.4.5"}, ["torch>=2.1 (2.0.1 installed)"]),
    ({"torch": "2.13.0+cpu", "safetensors": None}, ["safetensors>=0.4 (not installed)"]),
    ({"torch": "2.1.0a0+git1234", "safetensors": "0.10.0"}, []),  # 0.10 is newer than 0.4
    ({"torch": "", "safetensors": "0.3.3"}, ["safetensors>=0.4 (0.3.3 installed)"]),  # no metadata: not judged
], ids=["old torch", "missing", "pre-release and two-digit minor", "unknown version"])
def test_missing_and_too_old_packages_are_named(versions, expected):
    found = unmet(version_of=versions.get)
    assert [str(u) for u in found] == expected
    assert all(isinstance(u, Unmet) and u.spec.startswith(u.name + ">=") for u in found)


def run_python(code: str, tmp_path, extra_path=None) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.path.insert(0, {str(extra_path)!r})\n" if extra_path else ""
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_process_without_torch_says_what_to_install(tmp_path):
    """A console user of logic.process() in a Python without torch gets the requirement, not an ImportError, and the
    pip command for this computer: it said `pip install "torch>=2.1"` alone, which on Linux without an NVIDIA driver
    is PyPI's CUDA build of some 3 GB (dependencies.pip_commands: PyTorch's CPU index there)."""
    out = run_python("""
        import sys
        sys.modules["torch"] = None  # not importable, as in a fresh Slicer
        import slicer
        from CeVAEAnomalyLib.errors import CeVAEError
        from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic
        scene = slicer.vtkMRMLScene()
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head")
        logic = CeVAEAnomalyLogic()
        for call in (lambda: logic.process(volume), lambda: logic.startDetection(volume),
                     lambda: logic.installDependencies()):
            try:
                call()
            except CeVAEError as exc:
                print("ERROR", exc)
    """, tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stderr
    command = dependencies.pip_commands([Unmet("torch", "2.1", None)])  # this computer's, as in the subprocess
    assert command.startswith('python -m pip install "torch>=2.1"')
    for line in lines:
        assert "torch>=2.1 (not installed)" in line and line.endswith(f"Install them with: {command}"), line


def test_an_old_torch_is_refused_with_its_version(tmp_path):
    """torch importable but older than the minimum (its installed metadata says 2.0.1)."""
    site = tmp_path / "site"
    info = site / "torch-2.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.0.1\n")
    out = run_python("""
        from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic
        from CeVAEAnomalyLib.errors import CeVAEError
        try:
            CeVAEAnomalyLogic().checkDependencies()
        except CeVAEError as exc:
            print(exc)
    """, tmp_path, extra_path=site)
    assert "torch>=2.1 (2.0.1 installed)" in out.stdout, out.stderr


# --- the module: its widget installs through the logic; its self-test skips per test ----------


def module_class(name: str) -> ast.ClassDef:
    return next(n for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name)


def test_the_widget_checks_and_installs_through_the_logic():
    uses = {ast.unparse(n) for n in ast.walk(module_class("CeVAEAnomalyWidget")) if isinstance(n, ast.Attribute)}
    assert {"self.logic.unmetDependencies", "self.logic.installDependencies"} <= uses
    assert not any("pip_install" in u or "PyTorchUtils" in u or "find_spec" in u for u in uses)
    logic = (REPO / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "slicer" / "logic.py").read_text()
    assert "PyTorchUtils.PyTorchUtilsLogic().installTorch(" in logic and "slicer.util.pip_install(" in logic


def test_each_self_test_that_needs_torch_skips_itself():
    """slicer_add_python_unittest collects the test_* methods directly: a skip only in runTest never runs."""
    cls = module_class("CeVAEAnomalyTest")
    tests = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    needs_torch = {name for name, fn in tests.items()
                   if re.search(r"process\(|applyButton\.click", ast.unparse(fn))}
    assert needs_torch == {"test_DetectOnSyntheticHead", "test_CancelLeavesSceneUnchanged", "test_ApplyRunsAWorker"}
    for name in needs_torch:
        assert ast.unparse(tests[name].body[0]) == "self._skipWithoutDependencies()", name
    helper = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_skipWithoutDependencies")
    assert "self.skipTest" in ast.unparse(helper)
    message = ast.unparse(next(n for n in cls.body if isinstance(n, ast.FunctionDef)
                               and n.name == "_missingDependenciesMessage"))
    assert "PyTorch extension" in message and "safetensors" in message  # says what to install


# --- the worker: a Python whose torch is missing or fails to import --------------------------

WORKER_RUN = """
    import json, pathlib, sys
    from CeVAEAnomalyLib.slicer.worker import main
    folder = pathlib.Path("CeVAEAnomaly-job")
    folder.mkdir()
    request = {"task": "detect", "image": "head.nii.gz", "request": {}, "out_dir": str(folder / "out")}
    (folder / "request.json").write_text(json.dumps(request))
    print("STATUS", main([str(folder / "request.json")]))
"""


def broken_torch(tmp_path):
    """A site folder with torch 2.5.0 whose import fails as a CUDA build without its libraries does."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(
        'raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")\n')
    (site / "torch-2.5.0.dist-info").mkdir()
    (site / "torch-2.5.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.0\n")
    return site


@pytest.mark.parametrize("case", ["missing", "broken"])
def test_a_worker_whose_python_cannot_import_torch_says_so_in_one_line(tmp_path, case):
    """The worker used to fail at its first torch import: "Unexpected error: ModuleNotFoundError(...) (details in
    the log)" (or OSError) after a traceback, as if it were a bug. Now it checks first and says what is wrong."""
    hide = 'sys.modules["torch"] = None\n' if case == "missing" else ""
    out = run_python("import sys\n" + hide + textwrap.dedent(WORKER_RUN), tmp_path,
                     extra_path=broken_torch(tmp_path) if case == "broken" else None)
    assert "STATUS 2" in out.stdout, out.stdout + out.stderr
    errors = [json.loads(line)["error"] for line in out.stdout.splitlines() if line.startswith('{"error"')]
    assert len(errors) == 1 and "Unexpected" not in errors[0] and "Traceback" not in out.stderr
    if case == "missing":
        assert errors[0].startswith("CeVAE Anomaly needs these Python packages: torch>=2.1 (not installed).")
        assert sys.executable in errors[0]
    else:
        assert errors[0].startswith(f"torch is installed in {sys.executable} but cannot be imported (libcudnn.so.9")
        assert "Restart Slicer" in errors[0]


# --- installing: a failing pip (offline), a partial install, a torch that fails to import after it --------------


class FakeInstaller:
    """pip and the torch installer as the logic calls them: each records its requirement, then makes the package
    installed at ``gives`` (a version, or None: unchanged) and raises ``raises`` if given."""

    def __init__(self, versions, gives=None, raises=None):
        self.versions, self.gives, self.raises, self.calls = versions, gives or {}, raises or {}, []

    def __call__(self, spec: str) -> None:
        name = spec.split(">=")[0]
        self.calls.append(spec)
        if self.gives.get(name):
            self.versions[name] = self.gives[name]
        if name in self.raises:
            raise self.raises[name]


OFFLINE = subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "torch>=2.1"])


@pytest.mark.parametrize("gives, raises, expected", [
    ({}, {"torch": OFFLINE},
     "Installing torch>=2.1 failed (pip ended with exit status 1); its messages are in the Python console (no internet "
     "connection is a common cause). Still needed: torch>=2.1 (not installed), safetensors>=0.4 (not installed)."),
    ({"torch": "2.5.1"}, {"safetensors": OFFLINE},
     "Installing safetensors>=0.4 failed (pip ended with exit status 1); its messages are in the Python console (no "
     "internet connection is a common cause). Installed: torch>=2.1. Still needed: safetensors>=0.4 (not installed)."),
    ({"torch": "2.5.1"}, {"torch": OSError("libcudnn.so.9: cannot open shared object file")},
     "torch>=2.1 was installed, but then: libcudnn.so.9: cannot open shared object file. Still needed: "
     "safetensors>=0.4 (not installed). Restart Slicer and try again."),
    ({"torch": "2.0.1", "safetensors": "0.4.5"}, {},
     "Installed: safetensors>=0.4. Still needed: torch>=2.1 (2.0.1 installed). The installation did not provide "
     "them; restart Slicer and try again (a package imported already is replaced only then)."),
    ({"torch": "2.5.1", "safetensors": "0.4.5"}, {}, None),
], ids=["offline", "partial", "import fails after install", "still too old", "installed"])
def test_an_install_that_fails_says_in_one_line_what_was_installed_and_what_is_still_needed(gives, raises, expected):
    versions = {"torch": None, "safetensors": None}
    installer = FakeInstaller(versions, gives, raises)
    if expected is None:
        dependencies.install(unmet(version_of=versions.get), installer, installer, version_of=versions.get)
    else:
        with pytest.raises(CeVAEError) as error:
            dependencies.install(unmet(version_of=versions.get), installer, installer, version_of=versions.get)
        assert str(error.value) == expected
    assert installer.calls == (["torch>=2.1"] if "torch" in raises else ["torch>=2.1", "safetensors>=0.4"])


def test_the_logic_says_in_one_line_that_pip_failed(monkeypatch):
    """installDependencies let pip's CalledProcessError through: the panel showed "Anomaly detection failed." with
    pip's command line, its status line still read "Installing ...". Now a CeVAEError says what failed and why
    (the widget puts it on the status line too)."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    def offline(spec):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", spec])

    monkeypatch.setattr(dependencies, "REQUIREMENTS", {"cevae-no-such-package": "1.0"})
    monkeypatch.setattr(slicer, "app", object(), raising=False)  # as inside the application
    monkeypatch.setattr(slicer.util, "pip_install", offline, raising=False)
    with pytest.raises(CeVAEError, match=r"^Installing cevae-no-such-package>=1.0 failed \(pip ended with exit status "
                                         r"1\);.* Still needed: cevae-no-such-package>=1.0 \(not installed\)\.$"):
        CeVAEAnomalyLogic().installDependencies()
    widget = ast.unparse(next(n for n in module_class("CeVAEAnomalyWidget").body
                              if isinstance(n, ast.FunctionDef) and n.name == "_ensureDependencies"))
    assert "except Exception as exc:\n        self.ui.statusLabel.text = one_line(exc)\n        raise" in widget


def test_a_folder_left_by_a_half_done_uninstall_counts_as_not_installed(tmp_path, monkeypatch):
    """An interrupted upgrade or uninstall (Slicer closed while pip ran) can leave ``torch/lib/...`` without
    ``__init__.py``: it imports as an empty namespace package. It counted as installed (version unknown), so no
    install was offered and the run failed later; now it is missing, and the install is offered."""
    (tmp_path / "cevae_leftover" / "lib").mkdir(parents=True)
    (tmp_path / "cevae_leftover" / "lib" / "leftover.dll").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert dependencies.installed_version("cevae_leftover") is None
    assert [str(u) for u in unmet({"cevae_leftover": "1.0"})] == ["cevae_leftover>=1.0 (not installed)"]


# --- which torch build: PyPI's Linux wheel is the CUDA build of several GB, useless without an NVIDIA driver -----


CPU_ARGS = "torch>=2.1 --index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("platform, driver, pip_args, build", [
    ("linux", False, CPU_ARGS, "from PyTorch's CPU index: the CPU-only build, about 200 MB (no NVIDIA driver"),
    ("linux", True, "torch>=2.1", "from PyPI: the CUDA build, roughly 3 GB"),
    ("darwin", False, "torch>=2.1", "from PyPI: the build for macOS (CPU and Apple GPU), about 80 MB"),
    ("win32", True, "torch>=2.1", "from PyPI: the CPU-only build, about 200 MB"),
], ids=["linux without driver", "linux with driver", "macos", "windows"])
def test_without_the_pytorch_extension_pip_gets_the_build_this_computer_can_use(platform, driver, pip_args, build):
    plan = dependencies.torch_install("torch>=2.1", extension=False, platform=platform, nvidia_driver=driver)
    assert plan.pip_args == pip_args and build in plan.build


@pytest.mark.parametrize("platform, driver, build", [
    ("linux", True, "the CUDA build, roughly 3 GB with its NVIDIA libraries, matched to its NVIDIA driver"),
    ("win32", False, "the CPU-only build, about 200 MB"), ("darwin", True, "macOS (CPU and Apple GPU), about 80 MB")])
def test_the_pytorch_extension_installs_where_it_is_there(platform, driver, build):
    plan = dependencies.torch_install("torch>=2.1", extension=True, platform=platform, nvidia_driver=driver)
    assert plan.pip_args is None and plan.build.startswith("through the PyTorch extension") and build in plan.build


def test_an_nvidia_driver_is_seen_by_its_nvidia_smi_or_its_proc_entry(tmp_path):
    nowhere = tmp_path / "driver" / "nvidia"
    assert not dependencies.nvidia_driver_visible(which=lambda name: None, proc_driver=nowhere)
    assert dependencies.nvidia_driver_visible(which=lambda name: f"/usr/bin/{name}", proc_driver=nowhere)
    nowhere.mkdir(parents=True)
    assert dependencies.nvidia_driver_visible(which=lambda name: None, proc_driver=nowhere)


@pytest.mark.parametrize("platform, driver, torch_command", [
    ("linux", False, f'python -m pip install "torch>=2.1" --index-url {dependencies.TORCH_CPU_INDEX}'),
    ("linux", True, 'python -m pip install "torch>=2.1"'),
    ("darwin", False, 'python -m pip install "torch>=2.1"'),
], ids=["linux without driver", "linux with driver", "macos"])
def test_the_pip_commands_outside_slicer_get_the_build_the_computer_can_use(platform, driver, torch_command):
    items = unmet(version_of={"torch": None, "safetensors": "0.3"}.get)
    said = dependencies.pip_commands(items, lambda spec: dependencies.torch_install(spec, False, platform, driver))
    assert said == f'{torch_command} && python -m pip install "safetensors>=0.4"'


def test_the_confirmation_says_which_build_and_how_large():
    items = unmet(version_of={"torch": None, "safetensors": None}.get)
    text = dependencies.install_description(
        items, lambda spec: dependencies.torch_install(spec, extension=False, platform="linux", nvidia_driver=False))
    assert text == ("This installs torch>=2.1 from PyTorch's CPU index: the CPU-only build, about 200 MB (no NVIDIA "
                    "driver found); safetensors>=0.4 from PyPI. It may take several minutes.")
    widget = ast.unparse(next(n for n in module_class("CeVAEAnomalyWidget").body
                              if isinstance(n, ast.FunctionDef) and n.name == "_ensureDependencies"))
    assert "self.logic.describeInstall(unmet)" in widget and "self._confirm(message" in widget


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU index is Linux's choice")
def test_the_logic_installs_the_cpu_build_where_no_nvidia_driver_is_seen(monkeypatch):
    """The fallback ran pip_install("torch>=2.1"): on Linux PyPI's CUDA build, some 3 GB, even without a GPU."""
    from CeVAEAnomalyLib.slicer.logic import _installTorch

    calls = []
    monkeypatch.setattr(dependencies, "nvidia_driver_visible", lambda: False)
    monkeypatch.setattr(slicer.util, "pip_install", calls.append, raising=False)
    assert dependencies.installed_version("PyTorchUtils") is None  # the extension is not here: pip installs
    _installTorch("torch>=2.1")
    assert calls == [CPU_ARGS]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU index is Linux's choice")
def test_a_pytorch_extension_that_fails_to_import_falls_back_to_pip(tmp_path, monkeypatch):
    """A PyTorch extension that is found but does not import (a half-installed or broken extension) raised its
    ImportError out of the install; torch then comes with pip as without the extension."""
    from CeVAEAnomalyLib.slicer.logic import _installTorch

    (tmp_path / "PyTorchUtils.py").write_text("raise ImportError('cannot import name PyTorchUtilsLogic')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    monkeypatch.setattr(dependencies, "nvidia_driver_visible", lambda: False)
    monkeypatch.setattr(slicer.util, "pip_install", calls.append, raising=False)
    _installTorch("torch>=2.1")
    assert calls == [CPU_ARGS]


# --- upgrading a package that this process has imported already ----------------------------------------------


def old_imported_package(tmp_path, monkeypatch) -> str:
    """A real package ``cevae_oldpkg`` 1.0 on the path, imported, and required at 2.0."""
    (tmp_path / "cevae_oldpkg").mkdir()
    (tmp_path / "cevae_oldpkg" / "__init__.py").write_text("")
    (tmp_path / "cevae_oldpkg-1.0.dist-info").mkdir()
    (tmp_path / "cevae_oldpkg-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cevae_oldpkg\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cevae_oldpkg", raising=False)
    __import__("cevae_oldpkg")
    monkeypatch.setattr(dependencies, "REQUIREMENTS", {"cevae_oldpkg": "2.0"})
    return "cevae_oldpkg"


def test_an_imported_package_is_not_upgraded_under_the_running_slicer(tmp_path, monkeypatch):
    """pip ran over a torch that Slicer had imported (another module, the console): on Windows it fails on the
    locked files half-way and leaves a broken torch; elsewhere the old one stays loaded and the run mixes both.
    Now the confirmation is not even shown, and installDependencies installs nothing: restart Slicer first."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    old_imported_package(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(slicer, "app", object(), raising=False)  # as inside the application
    monkeypatch.setattr(slicer.util, "pip_install", calls.append, raising=False)
    said = (r"^cevae_oldpkg 1\.0 is in use in this Slicer session already \(imported by a module or the Python "
            r"console\), so pip cannot replace it safely now: restart Slicer, then install before anything else "
            r"imports it")
    unmet_now = CeVAEAnomalyLogic.unmetDependencies()
    assert [str(u) for u in unmet_now] == ["cevae_oldpkg>=2.0 (1.0 installed)"]
    with pytest.raises(CeVAEError, match=said):
        CeVAEAnomalyLogic.describeInstall(unmet_now)
    with pytest.raises(CeVAEError, match=said):
        CeVAEAnomalyLogic().installDependencies()
    assert calls == []


def test_a_package_not_imported_yet_is_upgraded_and_a_missing_one_installed():
    items = [Unmet("torch", "2.1", "2.0.1"), Unmet("safetensors", "0.4", None)]
    dependencies.refuse_loaded_upgrades(items, modules={"torch": None, "safetensors": None})  # None: import blocked
    with pytest.raises(CeVAEError, match=r"^torch 2\.0\.1 is in use"):
        dependencies.refuse_loaded_upgrades(items, modules={"torch": sys, "safetensors": sys})


def test_a_package_upgraded_by_hand_while_loaded_stops_an_in_process_detection(tmp_path, monkeypatch):
    """unmet() reads the installed metadata only: a package upgraded by hand (pip in the Python console) after this
    process imported it passed the check, and logic.process() ran its loaded code with the new files it imports
    later. The loaded module's __version__ is now compared with the metadata, and a difference says restart Slicer."""
    from conftest import add_volume, make_head

    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    def installed(version: str) -> None:
        (tmp_path / "cevae_newpkg" / "__init__.py").write_text(f"__version__ = {version!r}\n")
        for old in tmp_path.glob("cevae_newpkg-*.dist-info"):
            (old / "METADATA").unlink()
            old.rmdir()
        (tmp_path / f"cevae_newpkg-{version}.dist-info").mkdir()
        (tmp_path / f"cevae_newpkg-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: cevae_newpkg\nVersion: {version}\n")
        importlib.invalidate_caches()

    (tmp_path / "cevae_newpkg").mkdir()
    installed("1.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cevae_newpkg", raising=False)
    __import__("cevae_newpkg")
    requirements = {"cevae_newpkg": "1.5", **REQUIREMENTS}
    dependencies.refuse_replaced_while_loaded(requirements)  # loaded as installed (torch too): nothing to say
    installed("2.0")  # as `pip install -U` does: new files and metadata, the old module still loaded
    monkeypatch.setattr(dependencies, "REQUIREMENTS", requirements)
    assert unmet() == []
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head()[0])
    with pytest.raises(CeVAEError, match=r"^cevae_newpkg 1\.0 is loaded in this Slicer session but 2\.0 is installed "
                                         r"now \(replaced since it was imported\), so a detection here would mix "
                                         r"both: restart Slicer, then detect again\.$"):
        CeVAEAnomalyLogic(scene=scene).process(volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # nothing made


def test_a_loaded_package_is_compared_by_release_and_build():
    torch_like = type(sys)("torch")
    torch_like.__version__ = "2.1.0+cu121"
    for installed, same in (("2.1.0+cu121", True), ("2.1.0+CU121", True), ("2.1.0+cpu", False), ("2.3.0+cu121", False)):
        versions = {"torch": installed}.get
        if same:
            dependencies.refuse_replaced_while_loaded({"torch": "2.1"}, {"torch": torch_like}, versions)
        else:
            with pytest.raises(CeVAEError, match=rf"^torch 2\.1\.0\+cu121 is loaded .* but {re.escape(installed)} "):
                dependencies.refuse_replaced_while_loaded({"torch": "2.1"}, {"torch": torch_like}, versions)
    dependencies.refuse_replaced_while_loaded({"torch": "2.1"}, {"torch": None}, {"torch": "2.3.0"}.get)  # blocked


def test_describing_the_install_where_nothing_is_unmet_says_there_is_nothing_to_install():
    """describeInstall(unmetDependencies()) in the console of a Slicer with torch and safetensors installed said
    "This installs . It may take several minutes.", where installDependencies installs nothing."""
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    unmet_now = CeVAEAnomalyLogic.unmetDependencies()
    assert unmet_now == []  # this environment meets them (test_this_environment_meets_them)
    assert CeVAEAnomalyLogic.describeInstall(unmet_now) == (
        "Nothing to install: torch and safetensors are installed and recent enough.")
