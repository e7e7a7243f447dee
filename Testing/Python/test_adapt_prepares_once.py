"""adapt prepares each site scan once, in every orientation its base model was trained on, before its fold runs: it
prepared the axial slices first (for the contrast check), and then each fold run read the scan again, masked it again
and sliced its other orientations."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.cache import SliceCache
from CeVAEAnomalyLib.training.data import subject_slices

from conftest import write_heads

pytestmark = pytest.mark.usefixtures("one_thread")
ORIENTATIONS = ("axial", "coronal", "sagittal")
PREPARED = re.compile(r"Slice cache .*: (\d+) volume\(s\) preprocessed now, (\d+) found ready\.")


@pytest.fixture(scope="module")
def three_way_bundle(tmp_path_factory) -> Path:
    """A small model trained on axial, coronal and sagittal slices of synthetic heads, calibrated."""
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.training.trainer import TrainConfig, Trainer

    d = tmp_path_factory.mktemp("three_way")
    cfg = TrainConfig(out=d / "three_way.cevae", model=ModelConfig(channels=(8, 16, 16, 32), z_dim=16),
                      batch_size=16, max_steps=4, checkpoint_every=4, device="cpu", val_fraction=0.34,
                      orientations=ORIENTATIONS)
    return Trainer(cfg, write_heads(d, seeds=(1, 2, 3))).run()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> List[Subject]:
    """Two site scans without brain masks: colin27 at 2 mm (shipped with the package) and a noisy copy."""
    d = tmp_path_factory.mktemp("site")
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(t1)
    noisy = array + np.random.default_rng(0).normal(0, 0.03 * array.max(), array.shape).astype(np.float32)
    scans = []
    for name, voxels in (("a", array), ("b", noisy)):
        image = sitk.GetImageFromArray(voxels)
        image.CopyInformation(t1)
        sitk.WriteImage(image, str(d / f"scan_{name}.nii.gz"))
        scans.append(Subject(d / f"scan_{name}.nii.gz", None))
    return scans


def test_each_site_scan_is_prepared_once_in_every_orientation_and_as_if_one_at_a_time(three_way_bundle, site,
                                                                                      tmp_path, caplog):
    """Also: each masking of a mask-less scan said "No brain mask for ...: computing one automatically.", for its
    slices (as scan_a.nii.gz) and again for its scores (as scan_a): the log says it once per scan, by its path."""
    cache = tmp_path / "cache"
    options = AdaptOptions(steps=2, batch_size=4, checkpoint_every=2, folds=2, device="cpu", cache_dir=cache)
    with caplog.at_level(logging.INFO):
        adapt(three_way_bundle, site, tmp_path / "site.cevae", options)
    prepared = [tuple(map(int, m.groups())) for r in caplog.records for m in [PREPARED.match(r.getMessage())] if m]
    assert sum(now for now, _ in prepared) == len(site), prepared  # each scan read and masked once for its slices
    assert all(now == 0 for now, _ in prepared[1:]), prepared  # the fold runs and the final run find them ready
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("No brain mask for ")]
    # (in the order adapt takes the scans, by their content: not necessarily as listed)
    assert sorted(said) == sorted(f"No brain mask for {s.image}: computing one automatically." for s in site), said
    assert len(list(cache.glob("*.npy"))) == len(site) * len(ORIENTATIONS)
    slicer = SliceCache(cache, load_bundle(three_way_bundle, "cpu").preprocess)
    checksums = {s.image: sha256_of(s.image) for s in site}
    for subject in site:
        for orientation in ORIENTATIONS:  # the slices as a scan prepared in that orientation alone gives them
            entry = slicer.lookup(slicer.key(subject, checksums, orientation))
            alone = subject_slices(subject, slicer.pre, (orientation,))[0]
            assert entry is not None and np.array_equal(np.load(entry.path), alone), (subject.image, orientation)

