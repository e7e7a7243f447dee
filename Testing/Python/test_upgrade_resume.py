"""Resuming a run whose checkpoint an earlier version of CeVAEAnomaly wrote (a site that upgraded mid-run)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.training.cache import SLICING_VERSION
from CeVAEAnomalyLib.training.checkpoint import write_checkpoint
from conftest import write_cohort

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--channels", "8,16", "--z-dim", "8", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu",
         "--val-fraction", "0", "--seed", "0"]
# what versions before the run's slicing was recorded wrote (9bbcbbb, 2026-12-06, slicing version 4): no "replaces",
# "log_first_row" or "log_row" fields, and no "slicing" among the run's options
LATER_FIELDS = ("replaces", "log_first_row", "log_row")


@pytest.fixture()
def trained(tmp_path) -> Path:
    """A finished two-step run of two small synthetic heads, its checkpoint kept beside the model."""
    write_cohort(tmp_path, (1, 2), size=(32, 36, 28))
    assert main(argv(tmp_path, 2)) == 0
    return tmp_path


def argv(folder: Path, steps: int, *extra: str) -> List[str]:
    return ["train", "--manifest", str(folder / "train.csv"), "--out", str(folder / "m.cevae"), "--max-steps",
            str(steps), *SMALL, *extra]


def rewrite(path: Path, drop=(), slicing=None) -> bytes:
    """The checkpoint at ``path`` written anew (with its digest) without the fields ``drop``, its run's slicing
    version set to ``slicing`` (None: not recorded); its new bytes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in drop:
        state.pop(key, None)
    state.pop("sha256")
    options = state["run"]["options"]
    options.pop("slicing", None)
    if slicing is not None:
        options["slicing"] = slicing
    write_checkpoint(state, path)
    return path.read_bytes()


@pytest.mark.parametrize("drop, slicing, said", [
    (LATER_FIELDS, None, "does not record how its slices were prepared"),
    ((), SLICING_VERSION - 1, f"slicing version {SLICING_VERSION - 1}; this version's is {SLICING_VERSION}"),
])
def test_a_checkpoint_of_slices_prepared_otherwise_is_refused_not_mixed(trained, drop, slicing, said, capsys):
    ckpt, model = trained / "m.cevae.ckpt", trained / "m.cevae"
    before, bundle = rewrite(ckpt, drop, slicing), model.read_bytes()
    capsys.readouterr()
    assert main(argv(trained, 4, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume refused" in err and said in err and "start anew with --overwrite instead of --resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ckpt.read_bytes() == before and model.read_bytes() == bundle  # nothing a user keeps is touched


def test_a_checkpoint_of_this_slicing_resumes(trained, capsys):
    """Checkpoints of the versions since slicing version 5 that did not record it (they write "replaces") resume, as
    do those that record it."""
    ckpt = trained / "m.cevae.ckpt"
    for slicing in (None, SLICING_VERSION):
        rewrite(ckpt, (), slicing)
        capsys.readouterr()
        assert main(argv(trained, 4, "--resume")) == 0, capsys.readouterr().err
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 4
        assert main(argv(trained, 2, "--overwrite")) == 0
