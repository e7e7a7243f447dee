"""Scripts/DetectVolume.py holds its outputs for the whole run, as ``detect`` does (io/lock.py): a second run on the
same outputs is refused before it reads anything, not after its detection (or, with --overwrite, by replacing the
first run's files under it)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import SimpleITK as sitk

from conftest import REPO, make_head

pytest.importorskip("slicer")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="outputs are locked with flock on POSIX only")

# holds the locks of the outputs given as arguments, as a run writing them does, until its stdin closes
HOLDER = """\
import sys
from pathlib import Path
from CeVAEAnomalyLib.io.lock import hold_outputs
with hold_outputs([Path(p) for p in sys.argv[2:]], sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "CeVAEAnomaly"))


@pytest.fixture
def head(tmp_path: Path) -> Tuple[Path, Path]:
    image, mask = make_head(seed=4)
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "head_mask.nii.gz"))
    return tmp_path / "head.nii.gz", tmp_path / "head_mask.nii.gz"


@contextmanager
def _held(command: str, *outputs: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the locks of ``outputs`` as ``command`` holds them while it writes them."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, command, *map(str, outputs)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "held\n", proc.stderr.read()
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_second_run_on_held_outputs_is_refused_before_it_reads_anything(script, head, tiny_bundle, tmp_path,
                                                                         capfd, caplog, overwrite):
    """A run whose outputs another run was writing did its whole detection and was refused only at the writes;
    with --overwrite it renamed its files over the other run's as that run wrote them."""
    out = tmp_path / "out"
    out.mkdir()
    if overwrite:  # the other run wrote one of them already
        (out / "head_record.json").write_text("the other run's record\n")
    with _held("detect", out / "head_record.json") as proc:
        with caplog.at_level(logging.INFO):
            status = script.main(["--input", str(head[0]), "--mask", str(head[1]), "--model", str(tiny_bundle),
                                  "--output-dir", str(out), "--device", "cpu", "--threshold", "0.3", *overwrite])
        err = capfd.readouterr().err
        assert status == 2  # refused, as detect refuses it
        assert err == (f"DetectVolume: error: A detect (process {proc.pid}) is writing {out / 'head_record.json'} "
                       f"(it holds {out / '.head_record.json.lock'}); wait for it to finish, or choose another "
                       "output.\n")
        assert not [r.getMessage() for r in caplog.records if "%" in r.getMessage()]  # no step of a detection
    assert sorted(p.name for p in out.iterdir()) == (["head_record.json"] if overwrite else [])
    assert not overwrite or (out / "head_record.json").read_text() == "the other run's record\n"


def test_a_run_holds_every_output_while_it_detects(script, head, tiny_bundle, tmp_path, monkeypatch):
    """While a run detects, another run writing any of its outputs is refused, naming this run as the holder."""
    out = tmp_path / "out"
    refusals: List[str] = []

    class Checking(script.Progress):
        def __call__(self, fraction: float, message: str) -> None:
            if not refusals:  # at the first step: the volume not read yet
                for name in ("head_score.nrrd", "head_segmentation.seg.nrrd", "head_record.json"):
                    other = subprocess.run([sys.executable, "-c", HOLDER, "detect", str(out / name)],
                                           stdin=subprocess.DEVNULL, capture_output=True, text=True, env=ENV)
                    refusals.append(other.stderr.strip().splitlines()[-1] if other.returncode else "not refused")
            super().__call__(fraction, message)

    monkeypatch.setattr(script, "Progress", Checking)
    assert script.main(["--input", str(head[0]), "--mask", str(head[1]), "--model", str(tiny_bundle),
                        "--output-dir", str(out), "--device", "cpu", "--threshold", "0.3"]) == 0
    assert len(refusals) == 3
    for name, refusal in zip(("head_score.nrrd", "head_segmentation.seg.nrrd", "head_record.json"), refusals):
        assert refusal.endswith(f"A DetectVolume (process {os.getpid()}) is writing {out / name} (it holds "
                                f"{out / ('.' + name + '.lock')}); wait for it to finish, or choose another "
                                "output."), refusal
    assert not any(p.name.endswith(".lock") for p in out.iterdir())
