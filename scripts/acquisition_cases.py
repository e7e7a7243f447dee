"""The cases of an acquisition benchmark cache (``benchmark_acquisition_maps.py``), listed without torch: the
ensemble script needs only this, and importing the maps script for it cost seconds of torch start-up."""
from __future__ import annotations

from pathlib import Path
from typing import List


def case_files(folder: Path) -> List[Path]:
    """The complete cached cases (``SUBJECT--VARIANT--CASE.npz``) in ``folder``; a write in progress is hidden until
    it is renamed into place."""
    return sorted(q for q in folder.glob("*--*--*.npz") if not q.name.startswith("."))
