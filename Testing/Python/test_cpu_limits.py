"""The cores a process may use under the limits of containers and schedulers: a cgroup CPU quota (docker --cpus,
Kubernetes' CPU limits), which the affinity mask does not show, and the user's OMP_NUM_THREADS."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional
from CeVAEAnomalyLib.system import usable_cores


def _tree(tmp_path: Path, membership: str, files: dict) -> tuple:
    """A cgroup file system under ``tmp_path``: /proc/self/cgroup's ``membership`` and the ``files`` (path: text)."""
    tmp_path.mkdir(exist_ok=True)
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(membership)
    return root, tmp_path / "self_cgroup"


def _cores(tmp_path: Path, membership: str, files: dict) -> int:
    root, self_cgroup = _tree(tmp_path, membership, files)
    return usable_cores(cgroup_root=root, self_cgroup=self_cgroup)


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_a_cgroup_v2_quota_of_one_cpu_is_one_core(tmp_path):
    """docker --cpus=1 (cpu.max "100000 100000") on a machine of many cores: torch and the batch's workers took one
    thread per core of the host, throttled to one core's time."""
    assert _cores(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"}) == 1


def test_a_v2_quota_is_taken_from_the_process_cgroup_and_its_parents(tmp_path):
    files = {"cpu.max": "max 100000\n", "user.slice/cpu.max": "150000 100000\n",
             "user.slice/job.scope/cpu.max": "max 100000\n"}
    assert _cores(tmp_path, "0::/user.slice/job.scope\n", files) == 1  # 1.5 CPUs: one whole core
    assert _cores(tmp_path / "none", "0::/user.slice/job.scope\n", {"cpu.max": "max 100000\n"}) == _affinity()


def test_a_cgroup_v1_quota(tmp_path):
    """cgroup v1 (cpu.cfs_quota_us / cpu.cfs_period_us; -1: none). In a container the membership names the host's
    path (/docker/ID), which the container's mount has not: its root is the container's cgroup."""
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert _cores(tmp_path, membership, files) == 1
    files["cpu,cpuacct/cpu.cfs_quota_us"] = "-1\n"
    assert _cores(tmp_path, membership, files) == _affinity()


def test_no_quota_or_unreadable_files_leave_the_affinity(tmp_path):
    assert usable_cores(cgroup_root=tmp_path / "none", self_cgroup=tmp_path / "none") == _affinity()
    assert _cores(tmp_path / "garbage", "0::/\n", {"cpu.max": "garbage\n"}) == _affinity()
    assert _cores(tmp_path / "zero", "0::/\n", {"cpu.max": "0 100000\n"}) == _affinity()


def test_the_users_omp_num_threads_wins_in_the_batch_workers():
    """batch set each worker's torch and ITK threads to cores/K whatever OMP_NUM_THREADS said: a Slurm job that
    asked for OMP_NUM_THREADS=1 per worker (or shares its node) got every core of its allocation in each worker."""
    from CeVAEAnomalyLib.system import threads_per_process

    assert threads_per_process(1, {"OMP_NUM_THREADS": "1"}) == 1
    assert threads_per_process(4, {"OMP_NUM_THREADS": "3"}) == 3
    cores = usable_cores()
    assert threads_per_process(1, {}) == cores and threads_per_process(cores + 1, {}) == 1
    assert threads_per_process(1, {"OMP_NUM_THREADS": "4,2"}) == 4  # nested levels: the outer one
    assert threads_per_process(1, {"OMP_NUM_THREADS": "none"}) == cores  # what OpenMP ignores too


def _threads_after_fit(cores: int, omp: Optional[str]) -> str:
    """torch's and ITK's threads in a fresh process after the command line fitted them to ``cores``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    code = ("import torch, SimpleITK as sitk\nfrom CeVAEAnomalyLib.cli.main import fit_threads\n"
            f"fit_threads({cores})\n"
            "print(torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_commands_run_torch_and_itk_on_the_cores_this_process_may_use():
    """detect, train, calibrate, adapt, demo and batch (one worker: in its own process) left torch's and ITK's
    defaults, one thread per core of the CPU set: under docker --cpus=1 on a 64-core host, 64 threads throttled to
    one CPU's time. The user's OMP_NUM_THREADS still decides torch's threads."""
    assert _threads_after_fit(1, None) == "1 1"
    assert _threads_after_fit(1, "2").split()[0] == "2"


def _worker_threads(model: Path, out: Path, threads: int, **env: str) -> str:
    """torch's and ITK's threads in a fresh process after batch's pool initializer set it up for ``threads``."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    code = ("import logging, multiprocessing, torch, SimpleITK as sitk\n"
            "from pathlib import Path\n"
            "from CeVAEAnomalyLib.cli.batch import DetectSettings, _init_worker\n"
            "from CeVAEAnomalyLib.options import DetectionRequest\n"
            f"settings = DetectSettings(model=Path({str(model)!r}), request=DetectionRequest.of(device='cpu'), "
            f"out_dir=Path({str(out)!r}))\n"
            f"_init_worker(settings, {threads}, logging.WARNING, multiprocessing.get_context('spawn').Event())\n"
            "print(torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())")
    done = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_users_itk_threads_win_in_the_batch_workers(tiny_bundle, tmp_path: Path) -> None:
    """batch --workers K set each worker's ITK threads to its share (cores/K, or OMP_NUM_THREADS) even where the user
    had set ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, which the command itself (and batch with one worker) leaves to win."""
    assert _worker_threads(tiny_bundle, tmp_path, 2) == "2 2"
    assert _worker_threads(tiny_bundle, tmp_path, 2, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1") == "2 1"
