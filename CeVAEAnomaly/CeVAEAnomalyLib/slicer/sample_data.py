"""The module's sample scans in Slicer's Sample Data module (category CeVAEAnomaly), without Qt.

Each sample is a file of the installed package (``CeVAEAnomalyLib/data``), offered by a ``file://`` URI: Slicer's
Sample Data module (5.6, 5.8 and 5.10 alike) copies it into its cache with ``urllib.request.urlretrieve``, checks
the SHA256 checksum, loads it with the reader of its extension under the given node name and drops the node's storage
node, so that saving the scene never writes into the package folder. No network is used, and
``SampleData.downloadSample(name)`` loads it as a click does. That call takes the first sample of the name in any
category, so each name starts with the extension's name. The file type is left out: 5.6 takes ``loadFileType``,
5.8 and later ``loadFileTypes``; both default to the volume reader for ``.nii.gz``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data import data_path
from ..errors import CeVAEError
from .resources import resource_dir

CATEGORY = "CeVAEAnomaly"


@dataclass(frozen=True)
class Sample:
    """One entry of the Sample Data module: its button text, packaged file, node name, checksum and thumbnail."""

    name: str
    file_name: str
    node_name: str
    sha256: str
    thumbnail: str  # a PNG in Resources/Icons

    def path(self) -> Path:
        """The packaged file."""
        return data_path(self.file_name).resolve()

    def source(self, icons: Optional[Path]) -> Dict[str, Any]:
        """The keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` (no thumbnail without
        ``icons``)."""
        return {"category": CATEGORY, "sampleName": self.name, "uris": self.path().as_uri(),
                "fileNames": self.file_name, "nodeNames": self.node_name, "checksums": f"SHA256:{self.sha256}",
                "thumbnailFileName": str(icons / self.thumbnail) if icons else None}


SAMPLES = (
    Sample("CeVAEAnomaly lesions", "colin27_lesions_t1_2mm.nii.gz", "Colin27 T1 2mm synthetic lesions",
           "7aad9d670713e497eede9d8fe9aacec8e0db092b55db11db98642090b3d7335f", "CeVAEAnomalyLesionsSample.png"),
    Sample("CeVAEAnomaly healthy", "colin27_t1_2mm.nii.gz", "Colin27 T1 2mm healthy",
           "fa5852c341e629f7410fe7ed736382eb4e2127b208fb9835bd6f35d24e1236b1", "CeVAEAnomalyHealthySample.png"),
)


def sample_sources() -> List[Dict[str, Any]]:
    """The arguments of one ``registerCustomSampleDataSource`` call per sample; without the Resources folder the
    samples are offered without thumbnails."""
    try:
        icons: Optional[Path] = resource_dir() / "Icons"
    except CeVAEError:
        icons = None
    return [sample.source(icons) for sample in SAMPLES]
