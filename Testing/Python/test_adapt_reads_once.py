"""One adaptation reads each site scan once for its checksum, and each prepared slice file once to check it, however
many runs (folds and the final one) train on it: every run hashed every scan again and checked every slice file
again. A scan or slice file changed on disk between two runs is still read again (the scan refused, the slices made
again)."""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List

import numpy as np
import pytest
import SimpleITK as sitk

import CeVAEAnomalyLib.io.checksum as checksum
import CeVAEAnomalyLib.training.cache as cache_mod
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions
from CeVAEAnomalyLib.training.cache import SliceCache

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = AdaptOptions(steps=2, batch_size=8, checkpoint_every=2, device="cpu")


def _settled(paths: List[Path]) -> None:
    """Wait until every file of ``paths`` was last changed :data:`~checksum.SETTLE_NS` ago (site scans written long
    before the adaptation), so that what is read of them may be kept."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    time.sleep(max(0.0, (newest + checksum.SETTLE_NS - time.time_ns()) / 1e9 + 0.05))


def _counting(monkeypatch: pytest.MonkeyPatch, counts: Counter) -> None:
    """Count each call of io.checksum.sha256_of by path, wherever a module took it from (the real one runs)."""
    real = checksum.sha256_of

    def counted(path: Path) -> str:
        counts[Path(path)] += 1
        return real(path)

    for module in list(sys.modules.values()):
        if getattr(module, "sha256_of", None) is real:
            monkeypatch.setattr(module, "sha256_of", counted)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Dict[str, Path]:
    """Colin27 at 2 mm (shipped with the package) as two uncompressed site scans (a noisy copy: another scan of the
    same file size), their brain mask, and a third scan of that size to replace one with."""
    d = tmp_path_factory.mktemp("site")
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    shutil.copyfile(data_path("colin27_brainmask_2mm.nii.gz"), d / "mask.nii.gz")
    voxels = sitk.GetArrayFromImage(t1)
    paths = {"mask": d / "mask.nii.gz"}
    for n, name in enumerate(("a", "b", "other")):
        noise = np.random.default_rng(n).normal(0, 0.03 * voxels.max(), voxels.shape) if n else 0.0
        image = sitk.GetImageFromArray((voxels + noise).astype(np.float32))
        image.CopyInformation(t1)
        paths[name] = d / f"scan_{name}.nii"
        sitk.WriteImage(image, str(paths[name]))
    return paths


@pytest.fixture
def counted(site, monkeypatch) -> Iterator[Counter]:
    """The hashes of each file during the test, the site's files settled first."""
    _settled(list(site.values()))
    counts: Counter = Counter()
    _counting(monkeypatch, counts)
    yield counts


def test_one_adaptation_hashes_each_site_scan_and_mask_once(tiny_bundle, site, tmp_path, counted):
    scans = [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]
    adapt(tiny_bundle, scans, tmp_path / "site.cevae", QUICK)
    assert (tmp_path / "site.cevae").is_file()
    assert {p: counted[p] for p in (site["a"], site["b"], site["mask"])} == {
        site["a"]: 1, site["b"]: 1, site["mask"]: 1}, counted


def test_a_scan_rewritten_between_two_runs_keeping_its_size_and_time_is_read_again_and_refused(
        tiny_bundle, site, tmp_path, counted):
    """The scan is rewritten in place (same inode) with other voxels of the same size and its modification time put
    back, as a copy keeping times does: its status-change time tells it, and it is hashed again, not trusted. The next
    run is refused as it begins: the final run trained on the new content and was refused only once it was done."""
    scan = Path(shutil.copy2(site["b"], tmp_path / "scan_b.nii"))
    _settled([scan])
    scans = [Subject(site["a"], site["mask"]), Subject(scan, site["mask"])]
    before = scan.stat()

    def rewrite_in_the_second_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 2/3") and scan.stat().st_ctime_ns == before.st_ctime_ns:
            with open(scan, "r+b") as fh:  # (in place: the same inode)
                fh.write(site["other"].read_bytes())
            os.utime(scan, ns=(before.st_atime_ns, before.st_mtime_ns))

    out = tmp_path / "site.cevae"
    said: List[str] = []

    def rewrite_and_note(fraction: float, message: str) -> None:
        said.append(message)
        rewrite_in_the_second_run(fraction, message)

    refused = (rf"^{re.escape(str(scan))} changed since the adaptation began .* The checkpoints written so far are "
               r"kept: with the scan as it was, run again with --resume, or start anew with --overwrite\.$")
    with pytest.raises(CeVAEError, match=refused):
        adapt(tiny_bundle, scans, out, QUICK, rewrite_and_note)
    assert not [m for m in said if m.startswith("Fine-tuning 3/3")]  # refused as the final run began, not at the end
    assert not Path(f"{out}.ckpt").exists() and Path(f"{out}.fold2.ckpt").is_file()
    after = scan.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert counted[scan] >= 2  # read again once changed
    assert not out.exists()


def test_a_file_changed_just_now_is_hashed_again_at_its_next_use(tmp_path, monkeypatch):
    """Its stamp could stay the same through a change within the same clock tick, so its checksum is not kept."""
    fresh = tmp_path / "scan.nii"
    fresh.write_bytes(b"voxels")
    counts: Counter = Counter()
    _counting(monkeypatch, counts)
    memo = checksum.FileMemo()
    assert memo.sha256(fresh) == memo.sha256(fresh) == checksum.sha256_of(fresh)
    assert counts[fresh] == 3


def _kept_cache(bundle: Path, scans: List[Subject], folder: Path) -> List[Path]:
    """A cache folder (--cache-dir) holding the scans' slices, settled (kept from an earlier run); its slice files."""
    SliceCache(folder, load_bundle(bundle, "cpu").preprocess).prepare(
        scans, {p: checksum.sha256_of(p) for s in scans for p in (s.image, s.mask)}, ("axial",))
    _settled(list(folder.iterdir()))
    return sorted(folder.glob("*.npy"))


def _counting_checks(monkeypatch: pytest.MonkeyPatch, counts: Counter) -> None:
    """Count each check of a slice file's content against its checksum (the real check runs)."""
    real = cache_mod._data_sha256

    def counted(fh: BinaryIO, offset: int) -> str:
        counts[Path(fh.name)] += 1
        return real(fh, offset)

    monkeypatch.setattr(cache_mod, "_data_sha256", counted)


def test_one_adaptation_checks_each_slice_file_of_a_kept_cache_once(tiny_bundle, site, tmp_path, monkeypatch):
    scans = [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]
    slices = _kept_cache(tiny_bundle, scans, tmp_path / "cache")
    checks: Counter = Counter()
    _counting_checks(monkeypatch, checks)
    adapt(tiny_bundle, scans, tmp_path / "site.cevae", replace(QUICK, cache_dir=tmp_path / "cache"))
    assert (tmp_path / "site.cevae").is_file()
    assert len(slices) == 2 and {p: checks[p] for p in slices} == {p: 1 for p in slices}, checks


def test_a_slice_file_damaged_in_place_between_two_runs_is_checked_again_and_made_again(
        tiny_bundle, site, tmp_path, caplog):
    """Other bytes of the same size written into each slice file after the second run trained, its modification
    time put back: the final run checks them again (their status-change time tells them) and makes them again."""
    scans = [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]
    slices = _kept_cache(tiny_bundle, scans, tmp_path / "cache")
    good = {p: p.read_bytes() for p in slices}

    def damage_after_the_second_run(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 2/3") and "step 2 " in message:
            for path in slices:
                before = path.stat()
                with open(path, "r+b") as fh:  # (in place: the same inode and size)
                    fh.seek(before.st_size - 64)
                    fh.write(bytes(255 - b for b in good[path][-64:]))
                os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    with caplog.at_level(logging.WARNING):
        adapt(tiny_bundle, scans, tmp_path / "site.cevae", replace(QUICK, cache_dir=tmp_path / "cache"),
              damage_after_the_second_run)
    said = [r.getMessage() for r in caplog.records if "does not match its checksum" in r.getMessage()]
    assert sorted(said) == [f"The cache entry {p} does not match its checksum (damaged or replaced); it is made "
                            "again." for p in slices], said
    assert {p: p.read_bytes() for p in slices} == good


def test_one_adaptation_hashes_its_base_model_once(tiny_bundle, site, tmp_path, counted):
    """Each run hashed the base model for its checkpoints' record, and loading it hashed it twice more: 6 reads of the
    file for 2 scans, more with more folds."""
    base = Path(shutil.copy2(tiny_bundle, tmp_path / "base.cevae"))
    _settled([base])
    scans = [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]
    adapt(base, scans, tmp_path / "site.cevae", QUICK)
    assert counted[base] == 1, counted


def test_a_base_model_replaced_during_an_adaptation_is_not_recorded_for_the_weights_of_the_old_one(
        tiny_bundle, site, tmp_path, counted):
    """The runs start from the weights loaded at the start, but each run hashed the base file again for its
    checkpoints: a base replaced during the first run was recorded as the model the later runs started from."""
    import torch

    from CeVAEAnomalyLib.progress import Cancelled

    base = Path(shutil.copy2(tiny_bundle, tmp_path / "base.cevae"))
    original = checksum.sha256_of(base)
    scans = [Subject(site["a"], site["mask"]), Subject(site["b"], site["mask"])]

    def replace_base_then_stop(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 1/3") and base.read_bytes()[-1:] != b" ":
            base.write_bytes(base.read_bytes() + b" ")  # another file under the same name
        if message.startswith("Fine-tuning 3/3") and "step 2 " in message:
            raise Cancelled("stopped by the test")

    out = tmp_path / "site.cevae"
    with pytest.raises(Cancelled):
        adapt(base, scans, out, QUICK, replace_base_then_stop)
    for checkpoint in (Path(f"{out}.fold2.ckpt"), Path(f"{out}.ckpt")):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert state["run"]["options"]["init_from"] == {"sha256": original}, checkpoint


def test_a_changed_scan_is_refused_in_the_words_that_fit_the_run(tmp_path):
    """The refusal told a user who never gave --resume to start anew "instead of --resume", and spoke of kept
    checkpoints where none was written yet."""
    from CeVAEAnomalyLib.errors import COMMAND_LINE_ADAPT
    from CeVAEAnomalyLib.slicer.worker import PANEL_WORDING
    from CeVAEAnomalyLib.training.adapt import _what_to_do_then

    out = tmp_path / "site.cevae"
    configs = {run: QUICK.run_config(out, run) for run in ("fold1", "final")}
    assert _what_to_do_then(configs, False, COMMAND_LINE_ADAPT) == (
        "No checkpoint was written yet: run again once the scan is as it should be.")
    configs["fold1"].checkpoint_path.write_bytes(b"")
    kept = "The checkpoints written so far are kept: with the scan as it was, run again with --resume, or start anew "
    assert _what_to_do_then(configs, False, COMMAND_LINE_ADAPT) == kept + "with --overwrite."
    assert _what_to_do_then(configs, True, COMMAND_LINE_ADAPT) == kept + "with --overwrite instead of --resume."
    assert "answer No (start anew)" in _what_to_do_then(configs, False, PANEL_WORDING)


class _RewriteWhenResumed(logging.Handler):
    """Rewrites ``scan`` in place (other voxels, the same size, its modification time put back) once the run whose
    checkpoint is ``checkpoint`` says it resumed: after every run of the resume was built and checked."""

    def __init__(self, checkpoint: Path, scan: Path, other: Path) -> None:
        super().__init__(logging.INFO)
        self.said, self.scan, self.other, self.done = f"Resumed from {checkpoint} ", scan, other, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done and record.getMessage().startswith(self.said):
            before = self.scan.stat()
            with open(self.scan, "r+b") as fh:
                fh.write(self.other.read_bytes())
            os.utime(self.scan, ns=(before.st_atime_ns, before.st_mtime_ns))
            self.done = True


def test_a_scan_rewritten_during_a_resumed_run_refuses_the_next_resumed_run_on_it(tiny_bundle, site, tmp_path, caplog):
    """Every run of a resume with checkpoints is built (its scans hashed) before the first one trains, so the check at
    each run's start compared the checksums of the scans as they were then: a scan rewritten during the first run let
    the later resumed runs train on the slices of its old content, refused only once all had trained."""
    import torch

    from CeVAEAnomalyLib.progress import Cancelled

    copies = [Path(shutil.copy2(site[name], tmp_path / f"scan_{name}.nii")) for name in ("a", "b")]
    _settled(copies)
    scans = [Subject(copy, site["mask"]) for copy in copies]
    out = tmp_path / "site.cevae"

    def stop_after_the_final_checkpoint(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning 3/3") and "step 2 " in message:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        adapt(tiny_bundle, scans, out, QUICK, stop_after_the_final_checkpoint)
    # the scan fold 1 trains on, which fold 2 holds out (the folds follow the scans' content, not the order listed)
    trained = torch.load(Path(f"{out}.fold1.ckpt"), map_location="cpu", weights_only=True)["run"]["train"]
    assert len(trained) == 1, trained
    scan = Path(trained[0]["image"])
    assert scan in copies, scan
    rewrite = _RewriteWhenResumed(Path(f"{out}.fold1.ckpt"), scan, site["other"])
    logging.getLogger("CeVAEAnomalyLib").addHandler(rewrite)
    refused = (rf"^{re.escape(str(scan))} changed since the adaptation began .* The checkpoints written so far are "
               r"kept: with the scan as it was, run again with --resume, or start anew with --overwrite instead of "
               r"--resume\.$")
    try:
        with caplog.at_level(logging.INFO), pytest.raises(CeVAEError, match=refused):
            adapt(tiny_bundle, scans, out, replace(QUICK, resume=True))
    finally:
        logging.getLogger("CeVAEAnomalyLib").removeHandler(rewrite)
    assert rewrite.done
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resumed from")]
    # fold 2 holds the scan out; the final run trains on it: refused as it began, not after it and the calibration
    assert resumed == [f"Resumed from {out}.{fold}.ckpt at step 2." for fold in ("fold1", "fold2")], resumed
    assert not [r for r in caplog.records if r.getMessage().startswith("Calibrated")]
    assert not out.exists()
