"""Where bundled resources (default model, brain template) live."""
from __future__ import annotations

from pathlib import Path

from .errors import CeVAEError

DEFAULT_MODEL_NAME = "cevae_t1_default.cevae"


def resource_dir() -> Path:
    """``Resources/`` beside the module folder (Slicer install) or at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources", here.parent.parent / "Resources"):
        if candidate.is_dir():
            return candidate
    raise CeVAEError("The CeVAEAnomaly Resources folder was not found next to the package.")


def default_model_path() -> Path:
    """The bundled default model; a clear error if it is missing."""
    path = resource_dir() / "Models" / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise CeVAEError(f"The bundled default model {path} is missing; pass --model BUNDLE.")
    return path
