"""The same healthy scans listed in any order, or renamed, train the same model for one seed: shell globs, folder
listings and manifests list files in other orders on Linux, macOS and Windows."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

import pytest
import SimpleITK as sitk
import torch
from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header
from CeVAEAnomalyLib.engine.config import ModelConfig
from CeVAEAnomalyLib.training.config import TrainConfig
from CeVAEAnomalyLib.training.data import Subject
from CeVAEAnomalyLib.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGE_DATA = Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "data"


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> List[Subject]:
    """Three healthy heads at 4 mm with their brain masks, from the package's own 2 mm Colin27 (a fresh clone has no
    shared data): as it is, mirrored left-right, and with another intensity curve (three files of other contents)."""
    d = tmp_path_factory.mktemp("heads")
    t1 = sitk.ReadImage(str(PACKAGE_DATA / "colin27_t1_2mm.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(PACKAGE_DATA / "colin27_brainmask_2mm.nii.gz"))
    variants = {"plain": (t1, mask), "mirrored": (sitk.Flip(t1, (True, False, False)), sitk.Flip(mask, (True, False,
                                                                                                          False))),
                "curved": (sitk.Pow(t1 / 100.0 + 1.0, 0.8), mask)}
    subjects = []
    for name, (image, brain) in variants.items():
        size = [int(round(n * s / 4.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
        for kind, volume, interpolator in (("t1", image, sitk.sitkLinear), ("brainmask", brain,
                                                                             sitk.sitkNearestNeighbor)):
            sitk.WriteImage(sitk.Resample(volume, size, sitk.Transform(), interpolator, volume.GetOrigin(), (4.0,) * 3,
                                          volume.GetDirection()), str(d / f"{name}_{kind}.nii.gz"))
        subjects.append(Subject(d / f"{name}_t1.nii.gz", d / f"{name}_brainmask.nii.gz"))
    return subjects


def renamed(subjects: List[Subject], folder: Path) -> List[Subject]:
    """Copies of ``subjects`` in ``folder`` under other names, whose alphabetical order is not the originals'."""
    folder.mkdir()
    out = []
    for n, s in enumerate(subjects):
        image, mask = folder / f"scan{len(subjects) - n}.nii.gz", folder / f"scan{len(subjects) - n}_mask.nii.gz"
        shutil.copyfile(s.image, image)
        shutil.copyfile(s.mask, mask)
        out.append(Subject(image, mask))
    return out


def test_the_same_scans_in_another_order_or_renamed_train_the_same_model(heads, tmp_path):
    """Listed in another order, one seed gave another split (colin27 or robex held out) and other weights."""
    def trained(subjects: List[Subject], name: str) -> Path:
        cfg = TrainConfig(out=tmp_path / f"{name}.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                          batch_size=8, max_steps=4, checkpoint_every=4, device="cpu", val_fraction=0.34, seed=0)
        return Trainer(cfg, subjects).run()

    bundles = [trained(heads, "listed"), trained(heads[::-1], "reversed"),
               trained(renamed([heads[1], heads[2], heads[0]], tmp_path / "copies"), "renamed")]
    weights = [load_bundle(b, "cpu").model.state_dict() for b in bundles]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    records = [read_header(b).training for b in bundles]  # the order used, by content
    for role in ("subjects", "validation_subjects"):
        assert len({tuple(s["sha256"] for s in r[role]) for r in records}) == 1
    assert [s["sha256"] for s in records[0]["subjects"]] == sorted(s["sha256"] for s in records[0]["subjects"])
