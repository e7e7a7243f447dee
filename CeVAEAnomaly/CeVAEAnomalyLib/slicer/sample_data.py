"""The module's sample scans in Slicer's Sample Data module (category CeVAEAnomaly), without Qt.

Each sample is a file of the installed package (``CeVAEAnomalyLib/data``), offered by a ``file://`` URI: Slicer's
Sample Data module (5.6, 5.8 and 5.10 alike) copies it into its cache with ``urllib.request.urlretrieve``, checks
the SHA256 checksum, loads it with the reader of its extension under the given node name and drops the node's storage
node, so that saving the scene never writes into the package folder. No network is used, and
``SampleData.downloadSample(name)`` loads it as a click does. That call takes the first sample of the name in any
category, so each name starts with the extension's name. The file type is left out: 5.6 takes ``loadFileType``,
5.8 and later ``loadFileTypes``; both default to the volume reader for ``.nii.gz``.

The lesions' ground truth is a sample of its own, loaded as a labelmap by ``loadFileProperties={"labelmap": True}``
(the volume reader's option in all three versions). One source's ``loadFileProperties`` apply to each of its files
(5.6.2, 5.8.1 and 5.10.0 alike; there is no per-file property), so the truth cannot share the lesioned scan's
source without making the scan a labelmap too; a per-file type (a segmentation) would need ``loadFileType`` in 5.6
and loads no labelmap; a ``customDownloader`` runs on a click only, not in ``downloadSample(name)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data import SHA256, data_path
from ..errors import CeVAEError
from .resources import resource_dir

CATEGORY = "CeVAEAnomaly"


@dataclass(frozen=True)
class Sample:
    """One entry of the Sample Data module: its button text, packaged file, node name, thumbnail and whether it
    loads as a labelmap; its checksum is the file's in ``data.SHA256``."""

    name: str
    file_name: str
    node_name: str
    thumbnail: str  # a PNG in Resources/Icons
    labelmap: bool = False

    @property
    def sha256(self) -> str:
        """The packaged file's recorded SHA-256 (``data.SHA256``)."""
        return SHA256[self.file_name]

    def path(self) -> Path:
        """The packaged file."""
        return data_path(self.file_name).resolve()

    def source(self, icons: Optional[Path]) -> Dict[str, Any]:
        """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` (no thumbnail without
        ``icons``)."""
        source = {"category": CATEGORY, "sampleName": self.name, "uris": self.path().as_uri(),
                  "fileNames": self.file_name, "nodeNames": self.node_name, "checksums": f"SHA256:{self.sha256}",
                  "thumbnailFileName": str(icons / self.thumbnail) if icons else None}
        if self.labelmap:
            source["loadFileProperties"] = {"labelmap": True}
        return source


SAMPLES = (
    Sample("CeVAEAnomaly lesions", "colin27_lesions_t1_2mm.nii.gz", "Colin27 T1 2mm synthetic lesions",
           "CeVAEAnomalyLesionsSample.png"),
    Sample("CeVAEAnomaly lesion truth", "colin27_lesions_truth_2mm.nii.gz", "Colin27 T1 2mm synthetic lesions truth",
           "CeVAEAnomalyLesionTruthSample.png", labelmap=True),
    Sample("CeVAEAnomaly healthy", "colin27_t1_2mm.nii.gz", "Colin27 T1 2mm healthy",
           "CeVAEAnomalyHealthySample.png"),
)


def sample_sources() -> List[Dict[str, Any]]:
    """The arguments of one ``registerCustomSampleDataSource`` call per sample; without the Resources folder the
    samples are offered without thumbnails."""
    try:
        icons: Optional[Path] = resource_dir() / "Icons"
    except CeVAEError:
        icons = None
    return [sample.source(icons) for sample in SAMPLES]
