"""Model bundles: one safetensors file holding weights and a JSON header.

Loading never unpickles anything: safetensors stores raw tensors, and files that look like
pickles or PyTorch zip checkpoints are refused before any parsing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .. import __version__
from ..io.atomic import atomic_path
from ..io.checksum import FileMemo, sha256_by
from .bundle_checks import check_tensor_shapes
from .config import ModelConfig, PreprocessConfig
from .devices import resolve_device
from ..errors import CeVAEError, WriteFailed, one_line
from .header import (BUNDLE_SUFFIX, CHANGED_WEIGHTS, EDITED, FORMAT, FORMAT_VERSION, META_KEY, WEIGHTS_DIGEST_KEY,
                     WRITER_KEY, BundleHeader, add_tensor, damaged_or_edited, later_writer, read_header)
from .model import CeVAE

__all__ = ["BUNDLE_SUFFIX", "FORMAT", "FORMAT_VERSION", "Bundle", "BundleHeader", "load_bundle", "read_header",
           "save_bundle"]


@dataclass
class Bundle:
    """A loaded model with its header (architecture, preprocessing, calibration, card)."""

    model: CeVAE
    header: BundleHeader
    path: Path
    sha256: Optional[str] = None  # of the file as load_bundle read it (a detection's record names it)

    @property
    def model_config(self) -> ModelConfig:
        """The network's architecture (the header's)."""
        return self.model.cfg

    @property
    def preprocess(self) -> PreprocessConfig:
        """How a volume is made into the model's slices (the header's)."""
        return self.header.preprocess

    def __repr__(self) -> str:  # at the console: one line, not every layer and the calibration's tables
        device = next(self.model.parameters()).device
        sha = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"<Bundle {self.header.name!r} ({self.header.modality}) from {self.path}{sha}, on {device}>"


def save_bundle(path: Union[str, Path], model: CeVAE, header: BundleHeader, half: bool = False) -> Path:
    """Write the bundle atomically; ``half`` stores fp16 weights (half the size)."""
    from safetensors.torch import save_file

    target = Path(path)
    typed = replace(header, model=model.cfg, weights_dtype="float16" if half else "float32")
    full = dict(typed.to_dict(), format=FORMAT, format_version=FORMAT_VERSION, **{WRITER_KEY: _writer(header)})
    tensors = {k: (v.half() if half else v.float()).contiguous().cpu() for k, v in model.state_dict().items()}
    full[WEIGHTS_DIGEST_KEY] = _weights_digest(tensors)
    metadata = {META_KEY: _header_json(full, target)}
    try:
        with atomic_path(target, durable=True) as tmp:
            try:
                save_file(tensors, tmp, metadata=metadata)
            except Exception as exc:  # safetensors raises its own error type for I/O failures (disk full)
                raise _write_failed(target, _system_error(exc)) from None
    except OSError as exc:  # the temporary could not be made, or not moved into place
        raise _write_failed(target, exc) from None
    return target


def _writer(header: BundleHeader) -> str:
    """The version to record as the file's writer: this one, or the later version a header read from a later
    version's file records (its sections this version does not know are copied, and may name scans: `share` must go
    on refusing the file, engine/sharing.py)."""
    return later_writer({WRITER_KEY: header.extra.get(WRITER_KEY)}) or __version__


def _header_json(header: Mapping[str, object], target: Path) -> str:
    """``header`` as standard JSON. A value JSON cannot hold (NaN, infinity, an object) is a programming error, raised
    as one before any file is made: not a failed write, which a caller answers with what to do about the disk."""
    try:
        return json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The header of the model bundle {target} is not standard JSON ({exc}); nothing was "
                         "written.") from None


def _system_error(exc: Exception) -> Exception:
    """The error a failed bundle write failed with: for an I/O error in safetensors' words, which wrap the system's
    in their own and name its temporary file ("Error while serializing: I/O error: ... (os error 28) at path ..."),
    the system's as an OSError with its errno; else ``exc``."""
    system = re.search(r"\(os error (\d+)\)", str(exc))
    if system is None:
        return exc
    number = int(system.group(1))
    return OSError(number, os.strerror(number))


def _write_failed(target: Path, cause: Exception) -> WriteFailed:
    """The error of a bundle write that failed with ``cause``, which it keeps: the system's words for an OSError
    (not the temporary's name), else the error's text."""
    words = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).rstrip(".")
    return WriteFailed(f"Could not write the model bundle {target}: {words}.", cause)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16"}  # the weight types a bundle holds


def _weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a bundle's weights: each tensor's name, safetensors type, shape and raw little-endian bytes, in
    name order. save_bundle records it in the header; a bundle that holds other bytes is damaged or was edited."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        add_tensor(digest, name, _SAFETENSORS_DTYPES[tensor.dtype], tensor.shape, _le_bytes(tensor))
    return digest.hexdigest()


def _le_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's raw bytes, little-endian as safetensors stores them."""
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def load_bundle(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                memo: Optional[FileMemo] = None) -> Bundle:
    """Load and check a bundle: format, version, architecture, every tensor's shape and the weights' checksum.

    ``device``: a torch device or a name as everywhere else (auto, cpu, cuda[:N], mps); an unavailable accelerator
    falls back to the CPU with a warning, either way. The file is read more than once (header, tensor table,
    weights), so its SHA-256 is taken before and after: a file replaced meanwhile (another run's ``calibrate
    --overwrite``) is refused as such, not loaded as a mix of two files nor called damaged. ``memo``: one that may
    have hashed the file already (a file unchanged since is not read again for its SHA-256)."""
    before = _sha256_if_file(path, memo)
    try:
        bundle = _load_bundle(path, device)
    except CeVAEError:
        if before is not None and _sha256_if_file(path, memo) != before:
            raise _replaced(path) from None
        raise
    if _sha256_if_file(path, memo) != before:
        raise _replaced(path)
    return replace(bundle, sha256=before)  # the file loaded, as a detection's record names it


def _sha256_if_file(path: object, memo: Optional[FileMemo] = None) -> Optional[str]:
    """The SHA-256 of the file at ``path`` (by ``memo`` if given), or None where there is no readable file
    (read_header says why)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        if not Path(path).is_file():
            return None
        return sha256_by(Path(path), memo)
    except OSError:
        return None


def _replaced(path: Union[str, Path]) -> CeVAEError:
    return CeVAEError(f"The model file {path} was replaced while it was being read (by another run writing it?); "
                      "load it again once that run has finished.")


_POSITION = re.compile(r"at line \d+ column \d+")


def _unquoted(exc: Exception) -> str:
    """safetensors' reason for refusing a bundle, up to the first thing it quotes, and the place in the header it
    names: its parser quotes the values it refuses ('invalid type: string "..."'), which may be the model header
    and its scans' names."""
    text = one_line(exc)
    reason = re.split(r"[\"`(]", text, maxsplit=1)[0].rstrip(" .,:") or "its parser refused the header"
    place = _POSITION.search(text)
    return f"{reason} {place.group(0)}" if place is not None and place.group(0) not in reason else reason


def _load_bundle(path: Union[str, Path], device: Union[str, torch.device]) -> Bundle:
    """:func:`load_bundle`'s reading and checks (its ``sha256`` left None)."""
    from safetensors.torch import load_file

    from safetensors import SafetensorError, safe_open

    header = read_header(path)
    p = Path(path)
    cfg = header.model
    try:  # safetensors' own parser is stricter than read_header's (e.g. a key written twice in the tensor table)
        with safe_open(str(p), framework="pt") as fh:
            declared = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
        check_tensor_shapes(declared, cfg)  # before anything is built or loaded
        tensors = load_file(str(p))  # (the file's weights are read once: checked, then loaded)
    except SafetensorError as exc:
        raise damaged_or_edited(p, _unquoted(exc)) from None  # (read_header read its model header)
    except CeVAEError as exc:
        raise CeVAEError(f"{p}: {exc}; {EDITED}.") from None
    model = CeVAE(cfg)
    recorded = header.extra.get(WEIGHTS_DIGEST_KEY)  # None: written before bundles recorded it
    if recorded is not None and recorded != _weights_digest(tensors):
        raise CeVAEError(f"{p}: {CHANGED_WEIGHTS}")
    for key in tensors:
        if not torch.isfinite(tensors[key]).all():
            raise CeVAEError(f"{p}: tensor {key} holds NaN or infinite values; {EDITED}.")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval().to(resolve_device(str(device)))  # a torch.device as its name: a missing GPU falls back alike
    return Bundle(model, header, p)
