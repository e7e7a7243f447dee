"""A checkpoint whose fields were edited and whose checksum was written anew (as a sender of a run's files could) is
refused with one line when a run resumes from it, before anything is trained: never a KeyError, a TypeError or a
tensor's 'Boolean value ... is ambiguous' from comparing its run record, nor an error at the first training step.

Each case edits the real checkpoint of a 4-step run and resumes it with ``train --resume``.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.training.checkpoint import DIGEST_KEY, state_digest
from test_checkpoint_integrity import EVERY, errors, train
from test_training_faults import manifest  # noqa: F401 (the two small heads, a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
Edit = Callable[[Dict[str, Any]], None]


def drop(*keys: Any) -> Edit:
    def apply(state: Dict[str, Any]) -> None:
        parent = state
        for k in keys[:-1]:
            parent = parent[k]
        del parent[keys[-1]]
    return apply


def put(value: Any, *keys: Any) -> Edit:
    def apply(state: Dict[str, Any]) -> None:
        parent = state
        for k in keys[:-1]:
            parent = parent[k]
        parent[keys[-1]] = value
    return apply


def retype(change: Callable[[torch.Tensor], torch.Tensor], *keys: Any) -> Edit:
    """Replace the tensor at ``keys`` (an int among them: the weight of that rank in the model) by ``change`` of it."""
    def apply(state: Dict[str, Any]) -> None:
        parent = state
        for k in keys[:-1]:
            parent = parent[k]
        key = list(parent)[keys[-1]] if parent is state["model"] else keys[-1]
        parent[key] = change(parent[key])
    return apply


CASES: Dict[str, Tuple[Edit, str]] = {
    "run record without options": (drop("run", "options"), r"its run record has no options"),
    "run record as a tensor": (put(torch.zeros(1), "run"), r"its field 'run' holds other than plain data"),
    "run record as a list": (put([1], "run"), r"its run record has no options"),
    "a volume without its mask checksum": (drop("run", "train", 0, "mask_sha256"),
                                           r"its run record's train volumes are not a list of paths and checksums"),
    "a volume's path as a list": (put([1], "run", "train", 0, "image"), r"train volumes are not a list of paths"),
    "no validation list": (drop("run", "validation"), r"its run record's validation volumes are not a list"),
    "an option as a tensor": (put(torch.zeros(2, 3), "run", "options", "seed"),
                              r"its field 'run' holds other than plain data"),
    "version as a tensor": (put(torch.zeros(3), "version"), r"its field 'version' holds other than plain data"),
    # the training parts (the bundle's record of learning rates): an empty list failed with IndexError, a NaN rate
    # trained the whole run and then could not write the bundle ('free some space'), at every resume
    "no parts": (put([], "parts"), r"its field 'parts' is not a list of training parts"),
    "a part's learning rate NaN": (put([{"from_step": 0, "lr": math.nan, "ranks": 1}], "parts"),
                                   r"its field 'parts' is not a list of training parts"),
    # the optimiser's state: torch loads it as it is and failed at the first step
    "a moment estimate missing": (drop("opt", "state", 0, "exp_avg_sq"),
                                  r"optimiser state does not fit this run: the state of parameter 0 is not"),
    "a moment estimate of another shape": (put(torch.zeros(3), "opt", "state", 1, "exp_avg"),
                                           r"the 'exp_avg' of parameter 1 has another type or shape"),
    "a parameter's state as a number": (put(5, "opt", "state", 2), r"the state of parameter 2 is not"),
    "no learning rate": (drop("opt", "param_groups", 0, "lr"), r"optimiser state does not fit this run"),
    "betas as text": (put("x", "opt", "param_groups", 0, "betas"), r"its setting 'betas' is not a tuple"),
    # weights of another dtype, shape or layout: load_state_dict cast them silently (booleans became 0/1, integers
    # were truncated, complex numbers lost their imaginary part) and the run trained on
    "float64 weights": (retype(lambda t: t.double(), "model", 0),
                        r"its weights do not fit this run: '[\w.]+' is float64 of shape \(\d+(, \d+)*\), "
                        r"this model's is float32 of shape"),
    "int32 weights": (retype(lambda t: (t * 100).int(), "model", 1), r"'[\w.]+' is int32 of shape"),
    "boolean weights": (retype(lambda t: t > 0, "model", 2), r"'[\w.]+' is bool of shape"),
    "complex weights": (retype(lambda t: t.to(torch.complex64), "model", 3), r"'[\w.]+' is complex64 of shape"),
    "weights of another shape": (retype(lambda t: t.reshape(-1), "model", 0),
                                 r"its weights do not fit this run: '[\w.]+' is float32 of shape \(\d+,\), "
                                 r"this model's is float32 of shape \(\d+, \d+"),
    "a weight missing": (drop("model", "encoder.0.weight"),
                         r"its weights do not fit this run: 'encoder.0.weight' is missing"),
    "a weight added": (put(torch.zeros(2), "model", "extra.weight"),
                       r"its weights do not fit this run: 'extra.weight' is not a weight of this model"),
    "a float64 moment estimate": (retype(lambda t: t.double(), "opt", "state", 1, "exp_avg"),
                                  r"the 'exp_avg' of parameter 1 has another type or shape than its parameter's "
                                  r"\(float64 of shape \(\d+,\), not float32 of shape \(\d+,\)\)"),
    "a complex moment estimate": (retype(lambda t: t.to(torch.complex64), "opt", "state", 0, "exp_avg_sq"),
                                  r"the 'exp_avg_sq' of parameter 0 has another type or shape"),
}


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "model.cevae"
    assert train(manifest, out, EVERY) == 0
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_an_edited_checkpoint_is_refused_in_one_line(name, manifest, trained, tmp_path, capsys):  # noqa: F811
    edit, message = CASES[name]
    out = tmp_path / "model.cevae"
    for suffix in ("", ".ckpt", ".log.csv"):
        shutil.copy(f"{trained}{suffix}", f"{out}{suffix}")
    ckpt = Path(f"{out}.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(state)
    state[DIGEST_KEY] = state_digest(state)  # written anew, as by whoever edited it
    torch.save(state, ckpt)
    edited, log = ckpt.read_bytes(), Path(f"{out}.log.csv").read_bytes()
    capsys.readouterr()
    assert train(manifest, out, 2 * EVERY, "--resume") == 2
    lines = errors(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: The checkpoint {ckpt} is damaged"), lines
    assert re.search(message, lines[0]), lines[0]
    assert ckpt.read_bytes() == edited and read_header(out).training["steps"] == EVERY  # nothing trained or written
    assert Path(f"{out}.log.csv").read_bytes() == log


@pytest.mark.parametrize("mode", ["--amp", "--half"])
def test_a_checkpoint_of_a_mixed_precision_or_half_bundle_run_resumes(manifest, tmp_path, mode):  # noqa: F811
    """The weights are checked to be the model's own dtype: those of --amp (bfloat16 autocast on the CPU) and --half
    (a float16 bundle) are float32 in the checkpoint, and resume."""
    out = tmp_path / "model.cevae"
    assert train(manifest, out, EVERY, mode) == 0
    state = torch.load(f"{out}.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert train(manifest, out, 2 * EVERY, mode, "--resume") == 0
    assert read_header(out).training["steps"] == 2 * EVERY


@pytest.mark.parametrize("refusal", [
    "Weights only load failed. ... Unpickler error: Unsupported global: GLOBAL os.system",  # torch 2.4 and later
    "Weights only load failed. ... WeightsUnpickler error: Unsupported class os.system",  # torch 2.1-2.3
])
def test_a_checkpoint_holding_objects_is_named_so_whatever_torch_s_words(tmp_path, monkeypatch, refusal):
    """torch 2.1-2.3 (which the package accepts) say "Unsupported class X" where later releases say "Unsupported
    global": a checkpoint pickling an object was said as 'cannot be read as a checkpoint: UnpicklingError' there."""
    import pickle

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.training.checkpoint import read_checkpoint

    path = tmp_path / "m.cevae.ckpt"
    path.write_bytes(b"a checkpoint torch refuses")

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError(refusal)

    monkeypatch.setattr(torch, "load", refuse)  # (the words of each torch release; the file is not read here)
    with pytest.raises(CeVAEError, match="it holds objects other than tensors and plain data, which are never "
                                         "unpickled"):
        read_checkpoint(path, {})
