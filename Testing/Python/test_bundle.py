"""Model bundles: round trip, fp16, and refusal of damaged or foreign files."""
import dataclasses
import errno
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from CeVAEAnomalyLib.engine.bundle import FORMAT_VERSION, BundleHeader, load_bundle, read_header, save_bundle
from CeVAEAnomalyLib.engine.calibration import DEFAULT_FPR
from CeVAEAnomalyLib.engine.config import LossConfig, ModelConfig, PreprocessConfig
from CeVAEAnomalyLib.engine.model import CeVAE
from CeVAEAnomalyLib.errors import CeVAEError, WriteFailed
from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CeVAE(ModelConfig(channels=(4, 8, 8, 16), z_dim=8)).eval()


HEADER = BundleHeader(preprocess=PreprocessConfig(input_size=64), modality="T1")


def test_round_trip_gives_the_same_network(tmp_path, model):
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    b = load_bundle(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(b.model.encode(x)[0], model.encode(x)[0])
    assert b.header.modality == "T1" and b.header.extra["format_version"] == FORMAT_VERSION
    assert b.model_config == model.cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_a_torch_device_that_is_missing_falls_back_as_its_name_does(tmp_path, model, caplog):
    """load_bundle(path, torch.device("cuda")) on a CPU-only machine: the CPU with a warning, as "cuda" gives (it
    raised PyTorch's AssertionError "Torch not compiled with CUDA enabled")."""
    import logging

    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    with caplog.at_level(logging.WARNING):
        for device in (torch.device("cuda"), torch.device("cuda", 0), torch.device("cpu")):
            assert next(load_bundle(path, device).model.parameters()).device.type == "cpu"
    assert caplog.text.count("CUDA was requested but is not available; using the CPU") == 2


def test_half_precision_bundle_is_smaller_and_close(tmp_path, model):
    full = save_bundle(tmp_path / "f.cevae", model, HEADER)
    half = save_bundle(tmp_path / "h.cevae", model, HEADER, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(load_bundle(half).model.encode(x)[0], model.encode(x)[0], atol=1e-2)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_tampered_shapes_are_refused(tmp_path, model):
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    meta = read_header(path).to_dict()
    meta["model"]["z_dim"] = 9  # header no longer matches the tensors

    def edit(h):
        h["__metadata__"]["cevae_anomaly"] = json.dumps(meta)

    _rewrite_header(path, edit)
    with pytest.raises(CeVAEError, match="shape|architecture"):
        load_bundle(path)


def test_newer_format_version_is_refused(tmp_path, model):
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    meta = read_header(path).to_dict()
    meta["format_version"] = FORMAT_VERSION + 1
    _rewrite_header(path, lambda h: h["__metadata__"].update(cevae_anomaly=json.dumps(meta)))
    with pytest.raises(CeVAEError, match="Update CeVAEAnomaly"):
        load_bundle(path)


def test_truncated_bundle_is_refused(tmp_path, model):
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CeVAEError):
        load_bundle(path)


class _Boom:
    def __reduce__(self):
        return (open, ("/nonexistent-dir/should-never-run", "w"))


@pytest.mark.parametrize("suffix", [".pt", ".cevae", ".safetensors"])
def test_pickles_are_refused_unread(tmp_path, suffix):
    p = tmp_path / f"evil{suffix}"
    p.write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(CeVAEError, match="pickle"):
        load_bundle(p)
    z = tmp_path / f"ckpt{suffix}"
    torch.save({"w": torch.zeros(2)}, z)  # a PyTorch zip checkpoint
    with pytest.raises(CeVAEError, match="pickle"):
        load_bundle(z)


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(p))
    with pytest.raises(CeVAEError, match="not a CeVAEAnomaly model bundle"):
        load_bundle(p)


def test_header_is_read_typed_and_an_absent_section_takes_its_one_default(tmp_path, model):
    """An older bundle without scoring, post-processing, loss or default rate: the typed header says what
    the model recommends, and every reader (detector, Slicer settings) gets that one answer."""
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)

    def strip(h):
        meta = json.loads(h["__metadata__"]["cevae_anomaly"])
        for key in ("score_options", "postprocess", "loss", "default_fpr"):
            del meta[key]
        h["__metadata__"]["cevae_anomaly"] = json.dumps(meta)

    _rewrite_header(path, strip)
    header = read_header(path)
    assert isinstance(header, BundleHeader) and header.model == model.cfg
    assert (header.score_options, header.postprocess, header.loss, header.default_fpr) == (
        ScoreOptions(), PostprocessOptions(), LossConfig(), DEFAULT_FPR)
    assert BundleHeader.from_dict(header.to_dict()) == header


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_model_file_that_cannot_be_read_is_one_clear_error():
    """An I/O or permission error (the panel's model field, the command line) is named, not a raw OSError."""
    with pytest.raises(CeVAEError, match=r"The model bundle /proc/self/mem cannot be read \(Input/output error\)"):
        read_header("/proc/self/mem")


def _strict_header(path: Path) -> dict:
    """The bundle's JSON header parsed as standard JSON (NaN and Infinity refused, as outside Python)."""
    from safetensors import safe_open

    from CeVAEAnomalyLib.engine.header import META_KEY

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()[META_KEY], parse_constant=refuse)


def test_headers_are_standard_json_the_shipped_one_too(tmp_path, model):
    from CeVAEAnomalyLib.data import default_model_path

    assert _strict_header(default_model_path())["training"]["val_loss"] is None  # nothing was held out
    with pytest.raises(ValueError, match=r"The header of the model bundle .*nan\.cevae is not standard JSON \(Out of "
                       "range float values are not JSON compliant"):  # a NaN is refused, not written
        save_bundle(tmp_path / "nan.cevae", model, dataclasses.replace(HEADER, training={"val_loss": float("nan")}))
    assert list(tmp_path.iterdir()) == []  # nor a temporary file
    assert _strict_header(save_bundle(tmp_path / "m.cevae", model, HEADER))["modality"] == "T1"



def test_a_header_json_cannot_hold_is_no_failed_write(tmp_path, model):
    """A value JSON cannot hold in the header (a bug: a NaN, an object) was caught with the write's errors, as a failed
    write: train and calibrate said "Could not write the model bundle ...: Out of range float values are not JSON
    compliant. ... Free some space, then run again with --resume" -- disk advice for a value the next run writes
    again. It is a programming error, raised before any file is made."""
    for value, words in ((float("inf"), "Out of range float values"), (tmp_path, "Object of type PosixPath")):
        with pytest.raises(ValueError) as caught:
            save_bundle(tmp_path / "m.cevae", model, dataclasses.replace(HEADER, training={"value": value}))
        assert not isinstance(caught.value, CeVAEError)
        assert str(caught.value).startswith(f"The header of the model bundle {tmp_path / 'm.cevae'} is not standard "
                                            f"JSON ({words}"), caught.value
        assert str(caught.value).endswith("; nothing was written.")
        assert list(tmp_path.iterdir()) == []


def test_a_failed_bundle_write_keeps_its_cause(tmp_path, model):
    """A write that failed outside safetensors' own (the temporary made, or moved into place: here onto a folder of the
    bundle's name) raised the bare OSError, naming the temporary; one inside it a CeVAEError raised ``from None``,
    its errno dropped: a caller could not tell a full disk from a refused write, and said "free some space" to both."""
    folder = tmp_path / "m.cevae"
    folder.mkdir()
    with pytest.raises(WriteFailed) as caught:
        save_bundle(folder, model, HEADER)
    assert str(caught.value) == f"Could not write the model bundle {folder}: {os.strerror(errno.EISDIR)}."
    assert isinstance(caught.value.cause, OSError) and caught.value.cause.errno == errno.EISDIR
    assert [p.name for p in tmp_path.iterdir()] == ["m.cevae"] and not any(folder.iterdir())


def test_a_bundle_with_the_old_nan_validation_loss_reads_as_none_and_its_copies_save(tmp_path, model):
    """Bundles written before headers were strict JSON hold "val_loss": NaN; calibrate and adapt copy headers."""
    from safetensors.torch import save_file

    from CeVAEAnomalyLib.engine.header import META_KEY

    path = save_bundle(tmp_path / "m.cevae", model, dataclasses.replace(HEADER, training={"val_loss": None}))
    meta = json.loads(json.dumps(_strict_header(path)).replace('"val_loss": null', '"val_loss": NaN'))
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "old.cevae"), metadata={META_KEY: json.dumps(meta)})
    old = load_bundle(tmp_path / "old.cevae")
    assert old.header.training == {"val_loss": None}
    assert _strict_header(save_bundle(tmp_path / "copy.cevae", old.model, old.header))["training"]["val_loss"] is None


def _tensor_table(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8: 8 + n]), 8 + n


@pytest.mark.parametrize("half", [False, True])
def test_one_flipped_bit_in_the_weights_is_refused(tmp_path, model, half):
    """A bit flipped in a weight (still finite) gave a model that scored nothing; the header's checksum of the
    weights refuses it."""
    path = save_bundle(tmp_path / "m.cevae", model, HEADER, half=half)
    load_bundle(path)
    table, start = _tensor_table(path)
    raw = bytearray(path.read_bytes())
    raw[start + table["encoder.0.weight"]["data_offsets"][0] + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CeVAEError, match="damaged or was edited"):
        load_bundle(path)
    read_header(path)  # the header alone is still readable (the panel shows the model's settings)


def test_the_shipped_model_records_the_checksum_of_its_weights():
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.header import WEIGHTS_DIGEST_KEY

    path = default_model_path()
    assert len(read_header(path).extra[WEIGHTS_DIGEST_KEY]) == 64
    load_bundle(path)  # which checks the weights against it


def test_a_bundle_without_a_weights_checksum_still_loads(tmp_path, model):
    """Bundles written before the checksum was recorded load as before."""
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    meta = read_header(path).to_dict()
    meta.pop("weights_sha256")
    _rewrite_header(path, lambda h: h["__metadata__"].update(cevae_anomaly=json.dumps(meta)))
    assert load_bundle(path).model_config == model.cfg


def test_tensors_sharing_bytes_are_refused_as_invalid_safetensors(tmp_path, model):
    path = save_bundle(tmp_path / "m.cevae", model, HEADER)
    table, _ = _tensor_table(path)
    names = [k for k in table if k != "__metadata__" and table[k]["shape"] == table["decoder.0.bias"]["shape"]]
    other = next(k for k in names if k != "decoder.0.bias")
    _rewrite_header(path, lambda h: h[other].update(data_offsets=h["decoder.0.bias"]["data_offsets"]))
    with pytest.raises(CeVAEError, match="not a valid safetensors file: tensor .* (overlaps|gap)"):
        read_header(path)


def test_a_model_file_replaced_while_it_is_read_is_refused_not_mixed(tmp_path, model, monkeypatch):
    """The file is read several times (header, tensor table, weights) and its SHA-256 once: a model recalibrated in
    place meanwhile (another run's calibrate --overwrite: same weights, another header) loaded with the old header and
    the new file's SHA-256, which a detection's record then named."""
    import CeVAEAnomalyLib.engine.bundle as bundle_mod
    from CeVAEAnomalyLib.io.checksum import sha256_of

    path, other = tmp_path / "m.cevae", tmp_path / "recalibrated.cevae"
    save_bundle(path, model, BundleHeader(PreprocessConfig(), name="m"))
    save_bundle(other, model, BundleHeader(PreprocessConfig(), name="m", modality="other"))
    first = sha256_of(path)
    real = bundle_mod.read_header

    def read_then_replace(p):
        header = real(p)
        if other.exists():
            other.replace(path)  # atomically, as every writer of this project does
        return header

    monkeypatch.setattr(bundle_mod, "read_header", read_then_replace)
    with pytest.raises(CeVAEError, match=f"The model file {path} was replaced while it was being read"):
        load_bundle(path)
    assert sha256_of(path) != first
    assert load_bundle(path).sha256 == sha256_of(path)  # read again, whole: its own checksum
