"""Package data: the default model bundle and the brain-mask template.

They ship inside the package (wheel and Slicer extension alike) and are found with
:mod:`importlib.resources`, so a plain ``pip install`` can detect with the default model.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..errors import CeVAEError

DEFAULT_MODEL_NAME = "cevae_t1_default.cevae"


def data_path(name: str) -> Path:
    """Path of the packaged file ``name`` (it may be missing: callers check)."""
    return Path(str(files(__name__) / name))


def default_model_path() -> Path:
    """The bundled default model; a clear error if it is missing."""
    path = data_path(DEFAULT_MODEL_NAME)
    if not path.is_file():
        raise CeVAEError(f"The bundled default model {path} is missing; pass --model BUNDLE.")
    return path


def template_dir() -> Path:
    """Folder of the brain-mask template files (colin27 T1 and brain mask, 2 mm)."""
    return data_path(DEFAULT_MODEL_NAME).parent
