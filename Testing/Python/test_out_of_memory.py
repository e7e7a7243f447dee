"""A command that runs out of memory says so in one line (exit 1), also where PyTorch's allocator is the one that
fails (it raises a RuntimeError, not Python's MemoryError)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

# the process's address space is capped a little above what the command line takes once imported
CHILD = r"""
import resource, sys
import torch
from CeVAEAnomalyLib.cli import commands  # (the modules a detection imports, so that the cap leaves them room)
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine import detector
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(main(sys.argv[1:]))
"""


# DetectVolume.py (Scripts/) run as Slicer runs it, capped as CHILD is once slicer-core and the logic are imported
SCRIPT_CHILD = r"""
import resource, runpy, sys
import torch, slicer
from CeVAEAnomalyLib.engine import detector
from CeVAEAnomalyLib.slicer import logic
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def wide_model(tmp_path: Path) -> Path:
    """A model within the cost limits (0.1 MB, 2.1 million values per slice at 128 px)."""
    import torch
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.bundle import read_header, save_bundle
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.engine.model import CeVAE

    header = read_header(default_model_path())
    header = replace(header, preprocess=replace(header.preprocess, input_size=128))
    model = tmp_path / "wide.cevae"
    torch.manual_seed(0)
    save_bundle(model, CeVAE(ModelConfig(input_size=128, channels=(256, 1), z_dim=1)), header)
    return model


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="caps the address space as Linux counts it")
def test_a_detection_that_runs_out_of_memory_says_so_in_one_line(tmp_path):
    """A model within the cost limits with every axial slice of the 2 mm sample in one batch, in a process capped
    at 1 GB more than it starts with: the CPU allocator's failure was reported as an unexpected internal error to
    report ("unexpected RuntimeError: ... DefaultCPUAllocator: can't allocate memory")."""
    from CeVAEAnomalyLib.data import default_model_path

    data = default_model_path().parent
    model = wide_model(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, "detect", str(data / "colin27_t1_2mm.nii.gz"), "--mask",
                           str(data / "colin27_brainmask_2mm.nii.gz"), "--model", str(model), "--score",
                           str(tmp_path / "score.nii.gz"), "--device", "cpu", "--orientations", "axial",
                           "--threshold", "1", "--batch-size", "4096"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert proc.returncode == 1 and lines == [
        "error: out of memory; close other programs, give a smaller --batch-size or use a machine with more "
        "memory."], proc.stderr
    assert not (tmp_path / "score.nii.gz").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="caps the address space as Linux counts it")
def test_detect_volume_that_runs_out_of_memory_says_so_in_one_line(tmp_path):
    """Scripts/DetectVolume.py, the same detection and cap: it printed the allocator's whole traceback and
    "DetectVolume: unexpected error (RuntimeError): ... can't allocate memory"; now the command line's line."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.data import default_model_path
    from conftest import REPO

    data = default_model_path().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    script = REPO / "CeVAEAnomaly" / "Scripts" / "DetectVolume.py"
    proc = subprocess.run([sys.executable, "-c", SCRIPT_CHILD, str(script), "--input",
                           str(data / "colin27_t1_2mm.nii.gz"), "--mask", str(data / "colin27_brainmask_2mm.nii.gz"),
                           "--model", str(wide_model(tmp_path)), "--output-dir", str(tmp_path / "out"), "--device",
                           "cpu", "--threshold", "1", "--batch-size", "4096"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
    assert proc.returncode == 1 and lines == [
        "DetectVolume: error: out of memory; close other programs, give a smaller --batch-size or use a machine "
        "with more memory."], proc.stderr
    assert not list((tmp_path / "out").glob("colin27*"))  # no result


def test_itk_and_onednn_allocation_failures_are_out_of_memory():
    """A detection of a 256³ head capped at 340 to 420 MB more than the command line takes once imported ended in
    "unexpected RuntimeError: Failed to allocate memory for image. ... report it" (ITK's buffer of a resample or
    filter) or "unexpected RuntimeError: could not create a primitive ... report it" (oneDNN, whose CPU convolutions
    allocate their own work space): both are said as out of memory now (the command line, batch, the Slicer panel)."""
    import SimpleITK as sitk
    from CeVAEAnomalyLib.errors import out_of_memory

    with pytest.raises(RuntimeError) as itk:
        sitk.Image([2**16, 2**16, 2**14], sitk.sitkFloat32)  # 256 TiB
    assert out_of_memory(itk.value), str(itk.value)
    assert out_of_memory(RuntimeError("could not create a primitive"))  # (oneDNN's whole message)
    assert not out_of_memory(RuntimeError("could not create a primitive descriptor for a matmul primitive"))
    assert not out_of_memory(RuntimeError("Failed to read image"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="caps the address space as Linux counts it")
def test_a_batch_whose_volume_runs_out_of_memory_exits_as_detect_does(tmp_path):
    """detect out of memory exits 1, as the exit statuses say (1: out of memory or unexpected; 2: refused input, a
    rerun of which cannot help), but batch with a volume out of memory exited 2, as if its input were refused: a
    script that reruns with more memory on status 1 gave up on it. batch now exits 1 where a volume ran out of memory
    (its row says so) and 2 where every failed volume was refused."""
    import shutil
    import torch
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.bundle import read_header, save_bundle
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.engine.model import CeVAE

    data, cohort = default_model_path().parent, tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(data / "colin27_t1_2mm.nii.gz", cohort / "a.nii.gz")
    shutil.copy(data / "colin27_brainmask_2mm.nii.gz", cohort / "a_mask.nii.gz")
    (cohort / "b.nii.gz").write_text("not an image")
    header = read_header(default_model_path())
    header = replace(header, preprocess=replace(header.preprocess, input_size=128))
    model = tmp_path / "wide.cevae"
    torch.manual_seed(0)
    save_bundle(model, CeVAE(ModelConfig(input_size=128, channels=(256, 1), z_dim=1)), header)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", CHILD, "batch", str(cohort), "--out-dir", str(tmp_path / "out"), "--model",
               str(model), "--device", "cpu", "--orientations", "axial", "--threshold", "1", "--batch-size", "4096"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert "a: error (out of memory; give a smaller --batch-size" in proc.stderr and "b: error (" in proc.stderr
    assert proc.returncode == 1 and "All 2 volumes failed" in proc.stderr, proc.stderr
    (cohort / "a.nii.gz").unlink()  # the refused volume's failure alone
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "The volume failed" in proc.stderr, proc.stderr


def test_the_cpu_allocators_words_on_windows_are_out_of_memory():
    """torch's CPU allocator fails in other words on Windows (_aligned_malloc) than on Linux and macOS
    (posix_memalign's "can't allocate memory"): "DefaultCPUAllocator: not enough memory: you tried to allocate N
    bytes." There a training step on the CPU that could not allocate ended the run instead of halving the batch, and
    the command line said "unexpected RuntimeError ... report it" (exit 1 as a bug) instead of out of memory."""
    from CeVAEAnomalyLib.errors import out_of_memory

    windows = RuntimeError(r"[enforce fail at ..\c10\core\impl\alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough "
                           "memory: you tried to allocate 26214400 bytes.")
    assert out_of_memory(windows)
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't "
                                      "allocate memory: you tried to allocate 2 bytes. Error code 12"))
    assert not out_of_memory(RuntimeError("not enough values to unpack"))
