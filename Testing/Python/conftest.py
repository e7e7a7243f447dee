"""Shared fixtures: small synthetic head volumes and a tiny, quickly trained model bundle."""
from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests are tiny: threads only add overhead
REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("CEVAE_DATA_DIR", REPO.parent / "shared" / "data" / "healthy"))


@functools.lru_cache(maxsize=None)
def other_user_cannot_import(uid: int = 60001) -> str:
    """Why a process of user ``uid`` (setpriv, as root) cannot import this package here, or "": a clone in a folder
    only its owner may enter (mktemp -d makes one), as a fresh CI clone may be. Tests of several users skip then."""
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c",
                            "import CeVAEAnomalyLib"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    lines = (probe.stderr or probe.stdout).strip().splitlines()
    return "" if probe.returncode == 0 else f"user {uid} cannot import the package here: {lines[-1] if lines else ''}"


def make_head(
    size=(40, 44, 36),
    spacing=(1.2, 1.0, 1.5),
    direction=None,
    origin=(-20.0, 10.0, 5.0),
    seed: int = 0,
    dtype=np.float32,
):
    """A synthetic 'head': bright skull shell, brain ellipsoid with a darker core, plus noise.

    Returns (image, brain mask) as SimpleITK images on the same grid.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (nz, ny, nx)), indexing="ij")
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    brain = r < 0.7
    img = np.where(r < 0.9, 30.0, 0.0)
    img = np.where(brain, 100.0 - 40.0 * (r < 0.3), img)
    img += 20.0 * np.sin(6 * xx) * brain + rng.normal(0, 3, img.shape)
    img = np.clip(img, 0, None).astype(dtype)
    image = sitk.GetImageFromArray(img)
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    for im in (image, mask):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        if direction is not None:
            im.SetDirection(direction)
    return image, mask


def as_hounsfield(image):
    """A CT-like copy of a :func:`make_head` image: air at -1000 with a CT's noise (10 HU), the head's tissue at 20
    to about 60 (HU)."""
    values = sitk.GetArrayFromImage(image)
    air = np.round(np.random.default_rng(0).normal(-1000.0, 10.0, values.shape))
    ct = sitk.GetImageFromArray(np.where(values > 1, 20.0 + values * 0.3, air).astype(np.int16))
    ct.CopyInformation(image)
    return ct


def write_heads(folder: Path, seeds=(1, 2), **head) -> list:
    """Synthetic heads ``h<seed>.nii.gz`` (``head``: further :func:`make_head` arguments) with masks
    ``h<seed>_mask.nii.gz`` written in ``folder``, as a list of subjects (``Subject(image, mask)``)."""
    from CeVAEAnomalyLib.io.manifest import Subject

    subjects = []
    for seed in seeds:
        image, mask = make_head(seed=seed, **head)
        sitk.WriteImage(image, str(folder / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"h{seed}_mask.nii.gz"))
        subjects.append(Subject(folder / f"h{seed}.nii.gz", folder / f"h{seed}_mask.nii.gz"))
    return subjects


def write_cohort(folder: Path, seeds=(1, 2), **head) -> Path:
    """Synthetic heads ``h<seed>.nii.gz`` (``head``: further :func:`make_head` arguments) with masks
    ``h<seed>_mask.nii.gz`` in ``folder``, and the manifest listing them, ``train.csv`` (returned)."""
    rows = ["image,mask", *(f"{s.image.name},{s.mask.name}" for s in write_heads(folder, seeds, **head))]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def add_volume(scene, image, name="head", class_name="vtkMRMLScalarVolumeNode"):
    """A volume node of ``class_name`` in ``scene`` holding ``image`` (voxels and geometry)."""
    from CeVAEAnomalyLib.slicer import mrml

    node = scene.AddNewNodeByClass(class_name, name)
    mrml.update_volume_from_image(node, image)
    return node


def grid_transform(scene, name="warp"):
    """A non-linear (grid, zero displacement) transform node in ``scene``."""
    import slicer
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    grid = slicer.vtkOrientedGridTransform()
    displacements = vtk.vtkImageData()
    displacements.SetDimensions(3, 3, 3)
    displacements.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacements.GetPointData().GetScalars().Fill(0.0)
    grid.SetDisplacementGridData(displacements)
    node.SetAndObserveTransformToParent(grid)
    return node


def site_scene():
    """A new MRML scene with a real T1 (Colin27 at 2 mm, shipped with the package) and a noisier copy, with masks:
    (scene, [volumes], [masks])."""
    import slicer

    from CeVAEAnomalyLib.data import data_path

    scene = slicer.vtkMRMLScene()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    a = sitk.GetArrayFromImage(t1)
    noisy = sitk.GetImageFromArray(a + np.random.default_rng(1).normal(0, 0.03 * a.max(), a.shape).astype(np.float32))
    noisy.CopyInformation(t1)
    volumes = [add_volume(scene, t1, "site a"), add_volume(scene, noisy, "site b")]
    masks = [add_volume(scene, mask, f"mask {n}", "vtkMRMLLabelMapVolumeNode") for n in "ab"]
    return scene, volumes, masks


def full_disk_after_step(monkeypatch, step: int) -> None:
    """The training log's rows past step ``step`` fail as on a full disk (the trainer's csv writer raises ENOSPC), its
    earlier rows and the checkpoints are written; rows put into text in memory (a checkpoint's record of its row) are
    not written to a disk."""
    import CeVAEAnomalyLib.training.trainer as trainer

    real_writer = trainer.csv.writer

    class FullAfterStep:
        def __init__(self, f):
            self.inner, self.on_disk = real_writer(f), not isinstance(f, io.StringIO)

        def writerow(self, row):
            if self.on_disk and isinstance(row[0], int) and row[0] > step:
                raise OSError(28, "No space left on device")
            return self.inner.writerow(row)

    monkeypatch.setattr(trainer.csv, "writer", FullAfterStep)


def oblique_direction(angle_deg: float = 20.0, axis=(0.3, 0.5, 0.8)):
    """A proper rotation matrix (flattened) about ``axis``."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    return tuple(rot.ravel())


def use_pip_index(monkeypatch, url: str) -> None:
    """pip as on an offline machine whose only package index is ``url``: no configuration file (this machine's local
    mirrors), no find-links, no cache."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def refusing_index(monkeypatch):
    """pip's only index a local address that refuses every connection (a socket bound there, not listening)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        use_pip_index(monkeypatch, f"http://127.0.0.1:{taken.getsockname()[1]}/simple")
        yield


@pytest.fixture
def dropping_index(monkeypatch):
    """pip's only index a local server that takes each connection and closes it unanswered (an index or proxy that
    does not answer); yields the list of the connections it took (one item each)."""
    taken = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)

        def drop() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:  # (closed at the end of the test)
                    return
                taken.append(1)
                connection.close()

        threading.Thread(target=drop, daemon=True).start()
        use_pip_index(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}/simple")
        yield taken


@pytest.fixture(autouse=True)
def fresh_registrations():
    """No brain-template registration kept from an earlier test: each test's automatic masks register (and report,
    and can be stopped) as in a new process."""
    from CeVAEAnomalyLib.engine.brainmask import forget_registrations

    forget_registrations()


@pytest.fixture
def one_thread():
    """One torch CPU thread, as in the subprocesses: far faster for tiny models on a shared machine,
    and the same arithmetic in and out of process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """(image path, mask path) of a synthetic head written as NIfTI."""
    d = tmp_path_factory.mktemp("head")
    image, mask = make_head()
    sitk.WriteImage(image, str(d / "head.nii.gz"))
    sitk.WriteImage(mask, str(d / "head_mask.nii.gz"))
    return d / "head.nii.gz", d / "head_mask.nii.gz"


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A folder holding one synthetic head, h.nii.gz, and its brain mask, h_mask.nii.gz (a batch's input)."""
    d = tmp_path_factory.mktemp("scan")
    image, mask = make_head(seed=4)
    sitk.WriteImage(image, str(d / "h.nii.gz"))
    sitk.WriteImage(mask, str(d / "h_mask.nii.gz"))
    return d


@pytest.fixture(scope="module")
def script():
    """CeVAEAnomaly/Scripts/DetectVolume.py loaded as a module: its ``main(argv)`` is what ``python DetectVolume.py
    ARGS`` runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("DetectVolume", REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A small ceVAE (input 64, narrow) trained for a few steps on two synthetic heads, calibrated."""
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.training.data import Subject
    from CeVAEAnomalyLib.training.trainer import TrainConfig, Trainer

    d = tmp_path_factory.mktemp("bundle")
    subjects = []
    for seed in (1, 2, 3):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(image, str(d / f"h{seed}.nii.gz"))
        sitk.WriteImage(mask, str(d / f"h{seed}_mask.nii.gz"))
        subjects.append(Subject(d / f"h{seed}.nii.gz", d / f"h{seed}_mask.nii.gz"))
    cfg = TrainConfig(out=d / "tiny.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      batch_size=16, max_steps=6, checkpoint_every=3, device="cpu", val_fraction=0.34)
    return Trainer(cfg, subjects).run()


@pytest.fixture
def scan_slices(tiny_bundle):
    """The tiny model, the model slices and brain of a synthetic head it never saw (another seed), and the head."""
    import torch
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.preprocess import finite_brain, mask_array, prepare

    bundle = load_bundle(tiny_bundle, "cpu")
    image, mask = make_head(seed=7)
    brain = finite_brain(sitk.GetArrayViewFromImage(image), mask_array(mask, image))
    stack = prepare(image, brain, bundle.preprocess)
    return bundle, torch.from_numpy(stack.slices), torch.from_numpy(stack.brain), image, mask


# A script preamble (python -c) that makes matplotlib unimportable, as in an installation without the research extra.
WITHOUT_MATPLOTLIB = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError("No module named 'matplotlib'", name=name)
sys.meta_path.insert(0, Blocked())
"""
# ... then the command line's main on the script's arguments
CLI_WITHOUT_MATPLOTLIB = WITHOUT_MATPLOTLIB + """from CeVAEAnomalyLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
