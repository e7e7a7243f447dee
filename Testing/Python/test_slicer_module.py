"""The Slicer module: its logic on a real MRML scene (slicer-core), and static checks of the
module file, the .ui, the CMake lists and the .s4ext that need no Slicer application."""
from __future__ import annotations

import ast
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, make_head, oblique_direction

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.slicer import mrml  # noqa: E402
from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from CeVAEAnomalyLib.progress import Cancelled  # noqa: E402

MODULE_DIR = REPO / "CeVAEAnomaly"
MODULE_FILE = MODULE_DIR / "CeVAEAnomaly.py"
UI_FILE = REPO / "Resources" / "UI" / "CeVAEAnomaly.ui"
GEOMETRIES = {"axis-aligned": None, "oblique": oblique_direction()}


def add_volume(scene, image, name, class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    mrml.update_volume_from_image(node, image)
    return node


@pytest.fixture
def scene_with_head():
    """(scene, volume node, mask labelmap node, image, mask) for a synthetic head."""
    def make(direction=None):
        scene = slicer.vtkMRMLScene()
        image, mask = make_head(direction=direction, seed=7)
        return scene, add_volume(scene, image, "head"), add_volume(scene, mask, "mask", "vtkMRMLLabelMapVolumeNode"), \
            image, mask
    return make


# --- the logic on a real scene -----------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=list(GEOMETRIES))
def test_process_makes_outputs_on_the_input_grid(scene_with_head, tiny_bundle, geometry):
    scene, volume, mask, _, mask_image = scene_with_head(GEOMETRIES[geometry])
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3,
                                         createLabelmap=True)
    nodes = result.nodes
    for node in (nodes.score, nodes.labelmap):
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        assert np.array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(volume))
    score = sitk.GetArrayFromImage(mrml.image_from_volume(nodes.score))
    labels = sitk.GetArrayFromImage(mrml.image_from_volume(nodes.labelmap))
    brain = sitk.GetArrayFromImage(mask_image) > 0
    assert np.isfinite(score).all() and not score[~brain].any()
    assert np.array_equal(labels > 0, score > 0.3) and labels.any()

    segmentation = nodes.segmentation.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["Anomaly"]
    exported = mrml.mask_image(nodes.segmentation, volume, segmentation.GetNthSegmentID(0))
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, labels > 0)

    assert nodes.components.GetNumberOfRows() == len(result.detection.components) > 0
    np.testing.assert_allclose(mrml.table_column(nodes.components, "Volume"),
                               [c.volume_ml for c in result.detection.components])
    assert nodes.slice_table.GetNumberOfRows() == len(result.detection.slices)
    top = result.detection.top_slice
    assert result.topSliceRas == pytest.approx(mrml.slice_center_ras(volume, top.axis, top.index))


def test_logic_and_command_line_share_one_detection(scene_with_head, tiny_bundle, tmp_path):
    """The node path gives the same scores as the core called on the image file."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.detector import default_score_options, detect

    scene, volume, mask, image, mask_image = scene_with_head()
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu")
    sitk.WriteImage(image, str(tmp_path / "head.nrrd"))
    bundle = load_bundle(tiny_bundle)
    direct = detect(sitk.ReadImage(str(tmp_path / "head.nrrd")), bundle, mask_image,
                    default_score_options(bundle).replace(score_type="combi"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(result.nodes.score)),
                               sitk.GetArrayFromImage(direct.score), rtol=1e-5, atol=1e-6)
    assert result.detection.threshold == pytest.approx(direct.threshold)


def test_second_run_updates_the_same_nodes(scene_with_head, tiny_bundle):
    scene, volume, mask, _, _ = scene_with_head()
    logic = CeVAEAnomalyLogic(scene)
    first = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu")
    ids = mrml.node_ids(scene)
    second = logic.process(volume, mask, modelPath=tiny_bundle, device="cpu", scoreType="rec", threshold=0.2)
    assert mrml.node_ids(scene) == ids
    assert second.nodes.score is first.nodes.score
    assert logic.loadModel(tiny_bundle, "cpu") is logic.loadModel(tiny_bundle, "cpu")  # cached


def test_mask_can_be_a_segment(scene_with_head, tiny_bundle):
    scene, volume, mask, _, _ = scene_with_head()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, segmentation)
    by_labelmap = CeVAEAnomalyLogic().process(volume, mask, modelPath=tiny_bundle, device="cpu")
    score_by_labelmap = sitk.GetArrayFromImage(mrml.image_from_volume(by_labelmap.nodes.score))
    by_segment = CeVAEAnomalyLogic().process(volume, segmentation, modelPath=tiny_bundle, device="cpu",
                                             maskSegmentId=segmentation.GetSegmentation().GetNthSegmentID(0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(mrml.image_from_volume(by_segment.nodes.score)),
                               score_by_labelmap, rtol=1e-5, atol=1e-6)


def empty_mask(scene, volume, mask):
    node = add_volume(scene, sitk.Image(mrml.image_from_volume(mask).GetSize(), sitk.sitkUInt8), "empty",
                      "vtkMRMLLabelMapVolumeNode")
    node.CopyOrientation(mask)
    return dict(maskNode=node)


FAILURES = {
    "empty mask": (empty_mask, "brain mask is empty"),
    "missing model": (lambda scene, volume, mask: dict(maskNode=mask, modelPath="/nonexistent/model.cevae"),
                      "does not exist"),
    "output is input": (lambda scene, volume, mask: dict(maskNode=mask, outputs=mrml.OutputNodes(score=volume)),
                        "also an input"),
    "unknown score type": (lambda scene, volume, mask: dict(maskNode=mask, scoreType="best"), "Unknown score type"),
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_a_failing_run_leaves_the_scene_unchanged(scene_with_head, tiny_bundle, case):
    scene, volume, mask, _, _ = scene_with_head()
    make_arguments, message = FAILURES[case]
    arguments = dict(dict(modelPath=tiny_bundle, device="cpu"), **make_arguments(scene, volume, mask))
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=message):
        CeVAEAnomalyLogic().process(volume, **arguments)
    assert mrml.node_ids(scene) == before


@pytest.mark.parametrize("at", [0.0, 0.5, 0.95], ids=["start", "network", "before node creation"])
def test_a_cancelled_run_leaves_the_scene_unchanged(scene_with_head, tiny_bundle, at):
    scene, volume, mask, _, _ = scene_with_head()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")  # mask export uses scratch nodes
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, segmentation)
    before = mrml.node_ids(scene)
    seen = []

    def cancel(fraction, message):
        seen.append(fraction)
        if fraction >= at:
            raise Cancelled("Cancelled by the user.")

    with pytest.raises(Cancelled):
        CeVAEAnomalyLogic().process(volume, segmentation, modelPath=tiny_bundle, device="cpu", progress=cancel)
    assert seen[-1] >= at and mrml.node_ids(scene) == before


def test_logic_needs_a_scene():
    volume = slicer.vtkMRMLScalarVolumeNode()
    with pytest.raises(CeVAEError, match="not in an MRML scene"):
        CeVAEAnomalyLogic().process(volume)
    with pytest.raises(CeVAEError, match="scalar input volume"):
        CeVAEAnomalyLogic().process(None)


def test_importing_logic_and_module_dependencies_does_not_import_torch():
    """Slicer imports every module at start-up: the module file's library imports must stay light."""
    tree = ast.parse(MODULE_FILE.read_text())
    lib_modules = sorted({node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                          and node.module and node.module.startswith("CeVAEAnomalyLib")})
    assert "CeVAEAnomalyLib.slicer.logic" in lib_modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in lib_modules) + \
        "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --- static checks of the module that only Slicer can run -------------------------------------


def ui_object_names():
    import xml.etree.ElementTree as ET

    names = [w.get("name") for w in ET.parse(UI_FILE).iter("widget")]
    assert len(names) == len(set(names))  # childWidgetVariables needs unique object names
    return set(names)


def test_every_ui_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert len(used) > 10  # the pattern finds the uses
    assert used - ui_object_names() == set()


def parameter_fields():
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyParameterNode")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_ui_parameter_bindings_match_the_parameter_node():
    import xml.etree.ElementTree as ET

    bound = {}
    for widget in ET.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    fields = parameter_fields()
    assert set(bound) <= fields
    assert fields - set(bound) == {"modelPath"}  # bound by hand: ctkPathLineEdit takes only pathlib types
    assert bound["inputVolume"] == "qMRMLNodeComboBox" and bound["overlayOpacity"] == "ctkSliderWidget"


def module_classes():
    return {n.name: n for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef)}


def test_module_file_has_what_slicer_loads():
    """Slicer instantiates the class named after the file and finds the widget and the self-test by
    name; its module list shows what the module class sets on its parent. torch is imported lazily."""
    classes = module_classes()
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert bases["CeVAEAnomaly"] == ["ScriptedLoadableModule"]
    assert bases["CeVAEAnomalyWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["CeVAEAnomalyTest"] == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in classes["CeVAEAnomalyParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    assert module_description_fields().keys() >= {"title", "categories", "contributors", "helpText", "acknowledgementText"}
    top_level_imports = {a.name.split(".")[0] for n in ast.parse(MODULE_FILE.read_text()).body
                         if isinstance(n, ast.Import) for a in n.names}
    top_level_imports |= {n.module.split(".")[0] for n in ast.parse(MODULE_FILE.read_text()).body
                          if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in top_level_imports


def module_description_fields():
    """{field: value node} of the ``self.parent.<field> = ...`` assignments of the module class."""
    return {t.attr: n.value for n in ast.walk(module_classes()["CeVAEAnomaly"]) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self.parent"}


def cmake_list(text: str, name: str):
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, name
    return [item.replace("${MODULE_NAME}", "CeVAEAnomaly") for item in match.group(1).split()]


def test_cmake_lists_every_module_script():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    scripts = [MODULE_FILE, *(MODULE_DIR / "CeVAEAnomalyLib").rglob("*.py")]
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in scripts}
    assert listed == on_disk
    assert cmake_list(text, "MODULE_SCRIPTS") == [p.relative_to(MODULE_DIR).as_posix()
                                                  for p in sorted((MODULE_DIR / "Scripts").glob("*.py"))]


def test_cmake_resources_match_the_files_on_disk():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    explicit = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert {"Resources/UI/CeVAEAnomaly.ui", "Resources/Icons/CeVAEAnomaly.png"} <= set(explicit)
    assert all((REPO / item).is_file() for item in explicit)
    data = cmake_list(text, "MODULE_PYTHON_LIBRARY_DATA")
    packaged = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "CeVAEAnomalyLib" / "data").iterdir()
                if p.is_file() and p.suffix != ".py"}
    assert set(data) == packaged and "CeVAEAnomalyLib/data/cevae_t1_default.cevae" in data


def test_icon_is_a_128_pixel_png():
    data = (REPO / "Resources" / "Icons" / "CeVAEAnomaly.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def s4ext_fields():
    fields = {}
    for line in (REPO / "CeVAEAnomaly.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_s4ext_has_every_field_and_agrees_with_cmake():
    fields = s4ext_fields()
    required = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "description", "screenshoturls", "enabled", "status")
    assert [k for k in required if not fields.get(k)] == []
    cmake = (REPO / "CMakeLists.txt").read_text()
    for key, var in (("category", "EXTENSION_CATEGORY"), ("depends", "EXTENSION_DEPENDS"),
                     ("homepage", "EXTENSION_HOMEPAGE"), ("recommends", "EXTENSION_RECOMMENDS")):
        value = re.search(rf'set\({var} "([^"]*)"\)', cmake).group(1)
        assert fields[key] == value.replace("${CEVAE_REPOSITORY_URL}", re.search(
            r'set\(CEVAE_REPOSITORY_URL "([^"]*)"\)', cmake).group(1)), key
    categories = module_description_fields()["categories"]
    assert fields["category"] in {n.value for n in ast.walk(categories) if isinstance(n, ast.Constant)}
    assert re.findall(r"add_subdirectory\((\w+)\)", cmake) == ["CeVAEAnomaly"]
    assert (MODULE_DIR / "CMakeLists.txt").is_file()
