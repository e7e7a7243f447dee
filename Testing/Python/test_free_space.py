"""train and adapt check free disk space before they start: a disk with less room than the run's checkpoints and
model is refused at once with the figures; a slice cache folder that may be too small is warned of."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.progress import Cancelled
from CeVAEAnomalyLib.training.adapt import adapt
from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

pytestmark = pytest.mark.usefixtures("one_thread")
SCAN, MASK = data_path("colin27_t1_2mm.nii.gz"), data_path("colin27_brainmask_2mm.nii.gz")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """A factory of folders on tmpfs file systems of a given size ('20m'), unmounted afterwards; the test is skipped
    where mounting is not permitted."""
    mounted: List[Path] = []

    def make(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # (a file a failed run left open)


def site_scans(folder: Path) -> List[Subject]:
    """Colin27 at 2 mm and a mirrored copy, as the scans of two persons."""
    other = folder / "flipped.nii.gz"  # another scan of the same size
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(SCAN)), [True, False, False]), str(other))
    return [Subject(SCAN, MASK, "p1"), Subject(other, MASK, "p2")]


def test_adapt_on_a_small_disk_is_refused_before_any_scan_is_read(small_disk, tmp_path: Path) -> None:
    disk = small_disk("out", "20m")
    progress: List[str] = []
    with pytest.raises(CeVAEError) as caught:
        adapt(default_model_path(), site_scans(tmp_path), disk / "site.cevae", AdaptOptions(device="cpu"),
              progress=lambda fraction, message: progress.append(message))
    message = str(caught.value)  # 2 folds and the final run, 46 MB each, a copy of one, the 15 MB model, the logs
    assert message.startswith(f"This adaptation needs about 203 MB in {disk} (3 new checkpoint(s) of 46 MB"), message
    assert "21 MB free" in message and "\n" not in message and "--out" in message, message
    assert list(disk.iterdir()) == [] and progress == []  # nothing written, no scan prepared


def test_train_on_a_small_disk_is_refused(small_disk, tmp_path: Path, capsys) -> None:
    disk = small_disk("out", "1m")  # the small model's checkpoint is about 1.3 MB
    manifest = tmp_path / "train.csv"
    manifest.write_text(f"image,mask\n{SCAN},{MASK}\n")
    rc = main(["train", "--manifest", str(manifest), "--out", str(disk / "model.cevae"), "--channels", "8,16,16,32",
               "--z-dim", "16", "--max-steps", "2", "--device", "cpu", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "This training needs about " in err and f"MB in {disk} (1 new checkpoint(s) of" in err, err
    assert "MB free. Free some space there, or choose another --out on a disk with room." in err
    assert list(disk.iterdir()) == []


def test_a_small_cache_folder_is_warned_of(small_disk, tmp_path: Path, caplog) -> None:
    cache = small_disk("cache", "4m")  # two 2 mm scans: up to 3 x 109 model slices each, 10.7 MB
    out = tmp_path / "site.cevae"

    def stop(fraction: float, message: str) -> None:
        raise Cancelled("stopped by the test")

    with caplog.at_level(logging.WARNING), pytest.raises(Cancelled):  # (stopped as the scans are prepared)
        adapt(default_model_path(), site_scans(tmp_path), out,
              AdaptOptions(device="cpu", cache_dir=cache), progress=stop)
    warned = [r.getMessage() for r in caplog.records if "slice cache" in r.getMessage()]
    assert len(warned) == 1 and f"The slice cache in {cache} may need up to 11 MB" in warned[0], warned
    assert "4.2 MB free" in warned[0] and "--cache-dir" in warned[0]


def test_a_folder_among_the_scans_prints_no_itk_diagnostics(tmp_path: Path, capfd) -> None:
    """The free-space estimate read each scan's header with ITK, a folder too: ITK's HDF5 reader printed some 25
    lines of C diagnostics to stderr ahead of train's (and adapt's) one-line refusal of a folder with no series."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a scan\n")
    rc = main(["train", str(SCAN), str(MASK), str(folder), "--out", str(tmp_path / "model.cevae"), "--channels",
               "8,16,16,32", "--z-dim", "16", "--max-steps", "2", "--device", "cpu"])
    err = [line for line in capfd.readouterr().err.splitlines() if not line.startswith(("INFO:", "WARNING:"))]
    assert rc == 2 and err == [f"error: The image folder {folder} contains no DICOM series."], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
