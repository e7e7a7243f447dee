"""Writing detection outputs all-or-nothing: every file goes to a temporary name first."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import SimpleITK as sitk

from .atomic import publish, temp_beside, write_text
from ..errors import CeVAEError
from .images import check_output_path, error_text
from ..engine.detector import DetectionResult


def slice_scores_csv(result: DetectionResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["axis", "index", "kl", "rec", "neg_elbo"])
    for r in result.slices:
        w.writerow([r.axis, r.index, f"{r.kl:.6g}", f"{r.rec:.6g}", f"{r.neg_elbo:.6g}"])
    return buf.getvalue()


def components_csv(result: DetectionResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "voxels", "volume_ml", "max_score", "mean_score", "r", "a", "s"])
    for c in result.components:
        w.writerow([c.label, c.voxels, f"{c.volume_ml:.4f}", f"{c.max_score:.6g}", f"{c.mean_score:.6g}",
                    *(f"{v:.2f}" for v in c.centroid_ras)])
    return buf.getvalue()


def _writer_for(value) -> Callable[[str], None]:
    if callable(value):
        return value
    if isinstance(value, sitk.Image):
        return lambda tmp: sitk.WriteImage(value, tmp, True)
    return lambda tmp: write_text(tmp, value)


def write_all(files: Dict[Path, object], overwrite: bool = False, inputs: Sequence[Optional[Path]] = ()) -> List[Path]:
    """Write images (sitk.Image), texts (str) or anything a callable(temp_path) writes; all or none."""
    targets = list(files)
    check_paths(targets, overwrite, inputs)
    temps: Dict[Path, str] = {}
    try:
        for target, value in files.items():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                temps[target] = temp_beside(target)
                _writer_for(value)(temps[target])
            except (RuntimeError, OSError) as exc:
                raise CeVAEError(f"Could not write {target}: {error_text(exc)}") from None
        for target, tmp in temps.items():
            try:
                publish(tmp, target)
            except OSError as exc:
                raise CeVAEError(f"Could not move the finished {target} into place: {exc}") from None
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return targets


def check_paths(targets: Iterable[Path], overwrite: bool, inputs: Sequence[Optional[Path]] = ()) -> None:
    """Refuse outputs that equal an input, repeat each other, or exist (without overwrite)."""
    seen = set()
    for t in targets:
        r = Path(t).resolve()
        if r in seen:
            raise CeVAEError(f"The output {t} is named twice.")
        seen.add(r)
        check_output_path(Path(t), overwrite, tuple(inputs))
