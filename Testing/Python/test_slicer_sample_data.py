"""The module's entries in Slicer's Sample Data module: packaged files, checksums, what a click loads, the binding."""
from __future__ import annotations

import ast
import hashlib
import re
import struct
import urllib.request
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import REPO
from CeVAEAnomalyLib.data import data_path, template_dir
from CeVAEAnomalyLib.slicer.sample_data import CATEGORY, SAMPLES, sample_sources

MODULE_DIR = REPO / "CeVAEAnomaly"
# registerCustomSampleDataSource's keywords that Slicer 5.6.2, 5.8.1 and 5.10.0 all take (the file type is not one)
REGISTER_KEYWORDS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                     "thumbnailFileName", "loadFiles", "loadFileProperties", "checksums"}


def test_two_samples_a_lesioned_and_a_healthy_scan_of_the_package_under_one_category():
    assert [s.file_name for s in SAMPLES] == ["colin27_lesions_t1_2mm.nii.gz", "colin27_t1_2mm.nii.gz"]
    assert len({s.name for s in SAMPLES}) == len({s.node_name for s in SAMPLES}) == 2
    assert "lesion" in SAMPLES[0].node_name and "healthy" in SAMPLES[1].node_name
    for sample, source in zip(SAMPLES, sample_sources()):
        assert set(source) <= REGISTER_KEYWORDS and source["category"] == CATEGORY == "CeVAEAnomaly"
        assert sample.path().parent == template_dir().resolve() and sample.path().is_file()
        assert (source["sampleName"], source["fileNames"], source["nodeNames"]) == (
            sample.name, sample.file_name, sample.node_name)


def test_sample_names_are_the_extensions_own_and_short():
    """``downloadSample(name)`` takes the first sample of that name in any category (Slicer's built-in ones and other
    extensions' included), so each name carries the extension's name; the name is also the button's text."""
    for sample in SAMPLES:
        assert sample.name.startswith(f"{CATEGORY} ") and len(sample.name) <= 30


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.file_name)
def test_the_packaged_files_match_their_checksums(sample):
    assert hashlib.sha256(sample.path().read_bytes()).hexdigest() == sample.sha256
    (source,) = [s for s in sample_sources() if s["sampleName"] == sample.name]
    assert source["checksums"] == f"SHA256:{sample.sha256}"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.file_name)
def test_what_sample_data_fetches_by_the_uri_loads_as_a_scalar_volume_of_the_samples_name_and_grid(sample, tmp_path):
    """As Slicer's SampleData does with the source: urlretrieve the URI into its cache under the file name, check the
    checksum, read the file under the node name."""
    import slicer

    (source,) = [s for s in sample_sources() if s["sampleName"] == sample.name]
    cached = tmp_path / source["fileNames"]
    urllib.request.urlretrieve(source["uris"], str(cached))
    algo, digest = source["checksums"].split(":")
    assert hashlib.new(algo.lower(), cached.read_bytes()).hexdigest() == digest
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source["nodeNames"])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(cached))
    assert storage.ReadData(node)
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetName() == sample.node_name
    expected = sitk.ReadImage(str(data_path(sample.file_name)))
    assert node.GetImageData().GetDimensions() == expected.GetSize()
    assert node.GetSpacing() == pytest.approx(expected.GetSpacing())
    assert node.GetOrigin() == pytest.approx((-expected.GetOrigin()[0], -expected.GetOrigin()[1],
                                              expected.GetOrigin()[2]))  # RAS of the LPS origin


def test_the_thumbnails_are_pngs_in_resources_icons_listed_for_the_extension():
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES\s+(.*?)\)",
                          (MODULE_DIR / "CMakeLists.txt").read_text(), re.S).group(1).split()
    for sample, source in zip(SAMPLES, sample_sources()):
        path = Path(source["thumbnailFileName"])
        assert path == REPO / "Resources" / "Icons" / sample.thumbnail
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 100 <= min(struct.unpack(">II", data[16:24]))
        assert f"Resources/Icons/{sample.thumbnail}" in resources


def test_the_module_registers_the_samples_on_startup_and_goes_on_without_sample_data():
    """Slicer's extension template: the module class connects ``startupCompleted()`` to the registration; here it
    passes each of ``sample_sources()`` to ``registerCustomSampleDataSource``, after an ``import SampleData``
    that may fail."""
    tree = ast.parse((MODULE_DIR / "CeVAEAnomaly.py").read_text())
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomaly")
    calls = {ast.unparse(n) for n in ast.walk(module_class) if isinstance(n, ast.Call)}
    assert "slicer.app.connect('startupCompleted()', registerSampleData)" in calls
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "registerSampleData")
    guard = function.body[0] if isinstance(function.body[0], ast.Try) else function.body[1]
    assert isinstance(guard, ast.Try) and ast.unparse(guard.body[0]) == "import SampleData"
    assert [ast.unparse(h.type) for h in guard.handlers] == ["ImportError"]
    source = ast.unparse(function)
    assert "SampleData.SampleDataLogic.registerCustomSampleDataSource(**" in source and "sample_sources()" in source
