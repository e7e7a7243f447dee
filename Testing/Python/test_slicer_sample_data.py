"""The module's entries in Slicer's Sample Data module: packaged files, checksums, what a click loads, the binding."""
from __future__ import annotations

import ast
import hashlib
import re
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from test_lesion_sample import make_lesion_sample_script
from CeVAEAnomalyLib.data import data_path, template_dir
from CeVAEAnomalyLib.slicer.sample_data import CATEGORY, SAMPLES, sample_sources

MODULE_DIR = REPO / "CeVAEAnomaly"
# registerCustomSampleDataSource's keywords that Slicer 5.6.2, 5.8.1 and 5.10.0 all take (the file type is not one)
REGISTER_KEYWORDS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                     "thumbnailFileName", "loadFiles", "loadFileProperties", "checksums"}


def test_three_samples_a_lesioned_scan_its_truth_and_a_healthy_scan_of_the_package_under_one_category():
    assert [s.file_name for s in SAMPLES] == ["colin27_lesions_t1_2mm.nii.gz", "colin27_lesions_truth_2mm.nii.gz",
                                              "colin27_t1_2mm.nii.gz"]
    assert len({s.name for s in SAMPLES}) == len({s.node_name for s in SAMPLES}) == 3
    assert "lesion" in SAMPLES[0].node_name and "truth" in SAMPLES[1].node_name and "healthy" in SAMPLES[2].node_name
    assert [s.labelmap for s in SAMPLES] == [False, True, False]
    for sample, source in zip(SAMPLES, sample_sources()):
        assert set(source) <= REGISTER_KEYWORDS and source["category"] == CATEGORY == "CeVAEAnomaly"
        assert sample.path().parent == template_dir().resolve() and sample.path().is_file()
        assert (source["sampleName"], source["fileNames"], source["nodeNames"]) == (
            sample.name, sample.file_name, sample.node_name)
        # one source's loadFileProperties apply to all its files (Slicer 5.6.2, 5.8.1, 5.10.0), so the labelmap is
        # a sample of its own
        assert source.get("loadFileProperties", {}) == ({"labelmap": True} if sample.labelmap else {})


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


def _load_as_sample_data(source, tmp_path):
    """As Slicer's SampleData does with the source: urlretrieve the URI into its cache under the file name, check the
    checksum, and load it with the volume reader (qSlicerVolumesReader: vtkSlicerVolumesLogic.AddArchetypeVolume,
    option bit 1 from the property "labelmap") under the node name."""
    import slicer

    cached = tmp_path / source["fileNames"]
    urllib.request.urlretrieve(source["uris"], str(cached))
    algo, digest = source["checksums"].split(":")
    assert hashlib.new(algo.lower(), cached.read_bytes()).hexdigest() == digest
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    options = 1 if source.get("loadFileProperties", {}).get("labelmap") else 0
    return logic.AddArchetypeVolume(str(cached), source["nodeNames"], options)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.file_name)
def test_what_sample_data_fetches_by_the_uri_loads_as_a_volume_of_the_samples_kind_name_and_grid(sample, tmp_path):
    (source,) = [s for s in sample_sources() if s["sampleName"] == sample.name]
    node = _load_as_sample_data(source, tmp_path)
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.IsA("vtkMRMLLabelMapVolumeNode") == sample.labelmap
    assert node.GetName() == sample.node_name
    expected = sitk.ReadImage(str(data_path(sample.file_name)))
    assert node.GetImageData().GetDimensions() == expected.GetSize()
    assert node.GetSpacing() == pytest.approx(expected.GetSpacing())
    assert node.GetOrigin() == pytest.approx((-expected.GetOrigin()[0], -expected.GetOrigin()[1],
                                              expected.GetOrigin()[2]))  # RAS of the LPS origin


def test_the_truth_sample_loads_as_a_labelmap_of_the_scripts_truth_on_the_lesioned_scans_grid(tmp_path):
    import vtk
    from slicer.util import arrayFromVolume

    script = make_lesion_sample_script()
    t1 = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")))
    _, truth, _ = script.make_lesion_sample(t1, sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz"))))
    scan, label = (_load_as_sample_data(s, tmp_path) for s in sample_sources()[:2])
    assert label.IsA("vtkMRMLLabelMapVolumeNode") and not scan.IsA("vtkMRMLLabelMapVolumeNode")
    matrices = [vtk.vtkMatrix4x4() for _ in range(2)]
    scan.GetIJKToRASMatrix(matrices[0])
    label.GetIJKToRASMatrix(matrices[1])
    assert [[m.GetElement(i, j) for i in range(4) for j in range(4)] for m in matrices[1:]] == [
        [matrices[0].GetElement(i, j) for i in range(4) for j in range(4)]]
    assert label.GetImageData().GetDimensions() == scan.GetImageData().GetDimensions()
    voxels = arrayFromVolume(label)
    assert voxels.dtype == np.uint8 and np.array_equal(voxels, sitk.GetArrayViewFromImage(truth))
    assert set(np.unique(voxels)) == {0, 1}


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
