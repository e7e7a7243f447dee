"""Where the Slicer module's GUI resources (icon, .ui) live."""
from __future__ import annotations

from pathlib import Path

from ..errors import CeVAEError


def resource_dir() -> Path:
    """``Resources/`` beside the module file (installed extension) or at the repository root."""
    module_dir = Path(__file__).resolve().parents[2]
    for candidate in (module_dir / "Resources", module_dir.parent / "Resources"):
        if candidate.is_dir():
            return candidate
    raise CeVAEError("The CeVAEAnomaly Resources folder was not found next to the module.")
