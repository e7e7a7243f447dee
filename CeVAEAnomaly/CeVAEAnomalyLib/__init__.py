"""CeVAEAnomaly core: unsupervised anomaly localisation in brain MRI with a context-encoding VAE.

Importing the package is cheap; torch and SimpleITK are imported by the modules that need them. The names a
script or a console session starts from are reachable from the package itself (``CeVAEAnomalyLib.detect``,
``CeVAEAnomalyLib.load_bundle``, ...), each imported from its module on first use.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, List

__version__ = "0.3.0"

_EXPORTS = {  # name -> the module that defines it
    "detect": "engine.detector",
    "Detector": "engine.detector",
    "load_bundle": "engine.bundle",
    "DetectionRequest": "options",
    "DetectionResult": "result",
    "ScoreTerms": "result",
    "write_result": "result",
    "read_image": "io.images",
    "default_model_path": "data",
    "CeVAEError": "errors",
}


def __getattr__(name: str) -> Any:
    """One of the package's main names (:data:`_EXPORTS`), imported from its module when first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    """What help() and tab completion offer: the main names (imported or not), the version, the submodules imported
    so far and the module's own dunder names; not the helpers this file imports (importlib, typing's names)."""
    submodules = {name for name, value in globals().items()
                  if isinstance(value, ModuleType) and value.__name__.startswith(f"{__name__}.")}
    dunders = {name for name in globals() if name.startswith("__") and name.endswith("__")}
    return sorted({*_EXPORTS, *submodules, *dunders})
