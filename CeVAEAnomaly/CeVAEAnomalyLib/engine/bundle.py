"""Model bundles: one safetensors file holding weights and a JSON header.

Loading never unpickles anything: safetensors stores raw tensors, and files that look like
pickles or PyTorch zip checkpoints are refused before any parsing.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..io.atomic import atomic_path
from ..io.images import special_file_kind
from .bundle_checks import check_model_section, check_sections, check_tensor_shapes
from .config import ModelConfig, PreprocessConfig
from ..errors import CeVAEError
from .model import CeVAE

FORMAT = "cevae-anomaly-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".cevae"
_META_KEY = "cevae_anomaly"


@dataclass
class Bundle:
    """A loaded model with its header (architecture, preprocessing, calibration, card)."""

    model: CeVAE
    header: Dict[str, Any]
    path: Path

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.header["preprocess"])

    @property
    def calibration(self) -> Dict[str, Any]:
        return self.header.get("calibration") or {}


def save_bundle(path: Union[str, Path], model: CeVAE, header: Dict[str, Any], half: bool = False) -> Path:
    """Write the bundle atomically; ``half`` stores fp16 weights (half the size)."""
    from safetensors.torch import save_file

    target = Path(path)
    full = dict(header, format=FORMAT, format_version=FORMAT_VERSION, model=model.cfg.to_dict(),
                weights_dtype="float16" if half else "float32")
    tensors = {k: (v.half() if half else v.float()).contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(target) as tmp:
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(full, sort_keys=True)})
        except Exception as exc:  # safetensors raises its own error type for I/O failures (disk full)
            raise CeVAEError(f"Could not write the model bundle {target}: {exc}") from None
    return target


def read_header(path: Union[str, Path]) -> Dict[str, Any]:
    """The bundle's JSON header, validated, without loading the weights."""
    from safetensors import safe_open

    p = _check_file(Path(path))
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CeVAEError(f"{p} is not a CeVAEAnomaly model bundle (not a valid safetensors file: {exc}).") from None
    if _META_KEY not in meta:
        raise CeVAEError(f"{p} is a safetensors file but not a CeVAEAnomaly model bundle (no model header).")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CeVAEError(f"The header of {p} is not valid JSON ({exc}).") from None
    if header.get("format") != FORMAT:
        raise CeVAEError(f"{p} is not a CeVAEAnomaly model bundle (format {header.get('format')!r}).")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CeVAEError(f"{p} has an invalid bundle format version {version!r}; the file is damaged or was edited.")
    if version > FORMAT_VERSION:
        raise CeVAEError(
            f"{p} has bundle format version {version}; this CeVAEAnomaly reads up to version "
            f"{FORMAT_VERSION}. Update CeVAEAnomaly to use it."
        )
    for key in ("model", "preprocess"):
        if not isinstance(header.get(key), dict):
            raise CeVAEError(f"The header of {p} lacks its '{key}' section.")
    try:
        check_sections(header, check_model_section(header))
    except CeVAEError as exc:
        raise CeVAEError(f"The header of {p} is invalid: {exc}. The model file is damaged or was edited; "
                         "use an original copy.") from None
    return header


def load_bundle(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Bundle:
    """Load and check a bundle: format, version, architecture and every tensor's shape."""
    from safetensors.torch import load_file

    from safetensors import safe_open

    p = Path(path)
    header = read_header(p)
    cfg = check_model_section(header)
    with safe_open(str(p), framework="pt") as fh:
        declared = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    try:
        check_tensor_shapes(declared, cfg)  # before anything is built or loaded
    except CeVAEError as exc:
        raise CeVAEError(f"{p}: {exc}.") from None
    model = CeVAE(cfg)
    tensors = load_file(str(p))
    for key in tensors:
        if not torch.isfinite(tensors[key]).all():
            raise CeVAEError(f"{p}: tensor {key} holds NaN or infinite values; the model is damaged.")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval().to(device)
    return Bundle(model, header, p)


def _check_file(p: Path) -> Path:
    if p.is_dir():
        raise CeVAEError(f"The model bundle {p} is a folder; give the path of a {BUNDLE_SUFFIX} file.")
    if not p.exists():
        raise CeVAEError(f"The model bundle {p} does not exist.")
    kind = special_file_kind(p)
    if kind is not None:
        raise CeVAEError(f"The model bundle {p} is {kind}, not a file; give the path of a {BUNDLE_SUFFIX} file.")
    with open(p, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; a length whose
    # lowest byte is 0x80 must not be taken for the start of a pickle
    safetensors = len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < p.stat().st_size
    if not safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise CeVAEError(
            f"{p} is a Python pickle / PyTorch checkpoint, not a CeVAEAnomaly bundle. It is refused "
            "unread because loading such files can execute arbitrary code."
        )
    if len(head) < 8:
        raise CeVAEError(f"{p} is too short to be a model bundle.")
    return p
