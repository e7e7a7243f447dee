"""The CSV tables of a detection (per-slice scores, anomaly components)."""
from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # io stays torch-free: the tables only read the result's fields
    from ..engine.detector import DetectionResult


SLICE_FIELDS = ["axis", "index", "anomaly", "kl", "rec", "neg_elbo", "map_max", "flagged"]


def slice_scores_csv(result: DetectionResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SLICE_FIELDS)
    for r in result.ranked_slices():  # most anomalous first
        w.writerow([r.axis, r.index, f"{r.anomaly:.6g}", f"{r.kl:.6g}", f"{r.rec:.6g}", f"{r.neg_elbo:.6g}",
                    f"{r.map_max:.6g}", int(r.flagged)])
    return buf.getvalue()


def components_csv(result: DetectionResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["label", "voxels", "volume_ml", "max_score", "mean_score", "r", "a", "s"])
    for c in result.components:
        w.writerow([c.label, c.voxels, f"{c.volume_ml:.4f}", f"{c.max_score:.6g}", f"{c.mean_score:.6g}",
                    *(f"{v:.2f}" for v in c.centroid_ras)])
    return buf.getvalue()
