"""The JSON header of a model bundle, read without torch or safetensors.

A bundle is a safetensors file: an 8-byte little-endian header length, a JSON header (tensor
table plus ``__metadata__``) and the raw tensor bytes. The model's own header is the JSON string
stored under ``__metadata__["cevae_anomaly"]``. Reading it needs only the standard library, so
the Slicer module can show a model's settings before PyTorch is installed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

from ..errors import CeVAEError
from ..io.targets import special_file_kind
from .bundle_checks import check_model_section, check_sections

FORMAT = "cevae-anomaly-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".cevae"
META_KEY = "cevae_anomaly"
_MAX_TABLE_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the header size


def read_header(path: Union[str, Path]) -> Dict[str, Any]:
    """The bundle's JSON header, validated, without loading the weights."""
    p = _check_file(Path(path))
    meta = _safetensors_metadata(p)
    if META_KEY not in meta:
        raise CeVAEError(f"{p} is a safetensors file but not a CeVAEAnomaly model bundle (no model header).")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise CeVAEError(f"The header of {p} is not valid JSON ({exc}).") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CeVAEError(f"{p} is not a CeVAEAnomaly model bundle (format {found!r}).")
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


def _safetensors_metadata(p: Path) -> Dict[str, str]:
    """``__metadata__`` of a safetensors file whose tensor table exactly covers the file."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        problem = None
        if not 2 <= length <= min(_MAX_TABLE_BYTES, size - 8):
            problem = f"header length {length} does not fit the file of {size} bytes"
        else:
            try:
                table = json.loads(fh.read(length).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                table, problem = None, f"unreadable header: {exc}"
    if problem is None:
        problem = _table_problem(table, size - 8 - length)
    if problem is not None:
        raise CeVAEError(f"{p} is not a CeVAEAnomaly model bundle (not a valid safetensors file: {problem}).")
    meta = table.get("__metadata__") or {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def _table_problem(table: Any, data_bytes: int) -> Union[str, None]:
    """Why a tensor table is not valid safetensors for ``data_bytes`` of data, or None."""
    if not isinstance(table, dict) or not isinstance(table.get("__metadata__", {}), dict):
        return "the header is not a tensor table"
    end = 0
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data offsets"
        end = max(end, offsets[1])
    if end != data_bytes:
        return f"the tensors need {end} bytes of data but the file holds {data_bytes} (truncated or padded)"
    return None


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
    safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size
    if not safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise CeVAEError(
            f"{p} is a Python pickle / PyTorch checkpoint, not a CeVAEAnomaly bundle. It is refused "
            "unread because loading such files can execute arbitrary code."
        )
    if len(head) < 8:
        raise CeVAEError(f"{p} is too short to be a model bundle.")
    return p
