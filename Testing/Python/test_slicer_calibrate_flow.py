"""The Slicer module's "Calibrate on healthy scans" as a radiologist uses it: the real worker on a real MRML scene
(slicer-core), the panel's Qt-free checks (adapt_panel), and what the module file does with them."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import add_volume, grid_transform, make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.engine.header import read_header  # noqa: E402
from CeVAEAnomalyLib.engine.calibration import calibrated_test_time_steps  # noqa: E402
from CeVAEAnomalyLib.options import THOROUGH_STEPS  # noqa: E402
from CeVAEAnomalyLib.slicer.jobs import JobState  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402


def calibrated(volume, mask, out: Path, model: Path, thorough: bool = False):
    """The finished job of the panel's Calibrate on one healthy volume."""
    job = CeVAEAnomalyLogic().startCalibration([volume], [mask], out, modelPath=model, device="cpu",
                                               thorough=thorough)
    assert job.wait(300) is JobState.DONE, job.error
    return job


def test_a_calibration_that_drops_the_models_thorough_calibration_says_so(tiny_bundle, tmp_path):
    """The bundled model is calibrated for the thorough mode too. Calibrated in the panel with Thorough unticked, the
    new model (at once the one in use) was not, and nothing said so: the command line warns, the panel's status line
    said only that the model was saved and used, and Thorough then fell back to an absolute threshold. The worker
    now warns in the panel's words, and the status line shows the run's warnings."""
    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)  # 8 model slices: the thorough mode's steps are cheaper
    volume = add_volume(scene, image, "healthy")
    mask = add_volume(scene, brain, "mask", "vtkMRMLLabelMapVolumeNode")
    both = tmp_path / "both.cevae"  # like the bundled model: calibrated for the plain and the thorough mode
    calibrated(volume, mask, both, tiny_bundle, thorough=True)
    assert THOROUGH_STEPS in calibrated_test_time_steps(read_header(both).calibration)

    plain = calibrated(volume, mask, tmp_path / "site.cevae", both)
    assert THOROUGH_STEPS not in calibrated_test_time_steps(read_header(tmp_path / "site.cevae").calibration)
    lost = [w for w in plain.warnings if "thorough mode" in w]
    assert lost == ["both.cevae is calibrated for the thorough mode too (Advanced: 'Adapt the model to this scan "
                    "first'); site.cevae is not, so with that mode ticked detection with it needs an absolute "
                    "threshold. Tick it and calibrate again to calibrate that mode too (each scan then takes about "
                    "13 to 50 s longer on 2 CPU cores)."], plain.warnings

    kept = calibrated(volume, mask, tmp_path / "site2.cevae", both, thorough=True)
    assert not [w for w in kept.warnings if "thorough mode" in w], kept.warnings


@pytest.fixture
def bundled_copy(tiny_bundle, tmp_path, monkeypatch):
    """A copy of the tiny model standing in for the bundled default model (the extension's own file)."""
    from CeVAEAnomalyLib import data

    bundled = tmp_path / "extension" / "cevae_t1_default.cevae"
    bundled.parent.mkdir()
    bundled.write_bytes(tiny_bundle.read_bytes())
    monkeypatch.setattr(data, "default_model_path", lambda: bundled)
    return bundled


def test_the_bundled_model_is_never_the_file_a_calibration_or_adaptation_replaces(tiny_bundle, bundled_copy,
                                                                                  tmp_path):
    """With another model in use, the bundled model's file was accepted as the calibrated (or adapted) model's: after
    "exists. Replace it?" the run wrote over the extension's own model, so that "Use bundled model" meant the site's
    calibration from then on (until an update of the extension silently put the original back). The panel now keeps
    Calibrate and Adapt disabled and says why, and the logic refuses it before any copy, even with overwrite."""
    import os

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.adapt_panel import adapt_choice, calibrate_problem

    site = tmp_path / "site.cevae"
    site.write_bytes(tiny_bundle.read_bytes())  # the model in use: a site's model, not the bundled one
    link = tmp_path / "bundled-link.cevae"
    os.link(bundled_copy, link)
    for out in (bundled_copy, link):
        said = ("Save the calibrated model under a new name; it cannot replace the bundled model (the extension's own "
                "file, which 'Use bundled model' uses).")
        assert calibrate_problem(1, str(out), site) == said
        assert adapt_choice(2, str(out), site, "cpu").message == said.replace("calibrated", "adapted")
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=11)[0], "healthy")
    before = bundled_copy.read_bytes()
    with pytest.raises(CeVAEError, match=r"^Save the calibrated model under a new name; it cannot replace the "
                                         r"bundled model "):
        CeVAEAnomalyLogic().startCalibration([volume], [None], bundled_copy, modelPath=site, device="cpu",
                                             overwrite=True)
    assert bundled_copy.read_bytes() == before


def test_volumes_of_different_acquisitions_are_warned_of_before_calibrate_is_pressed(tmp_path):
    """Checked healthy volumes of different acquisitions (a 1 mm and a 4 mm scan): Adapt says so before it is pressed,
    Calibrate said nothing until the run had ended, by when the pooled model was written and in use. Calibrate's
    tooltip now says it, by the rule and factor the calibration warns by, and pressing it asks first, as for the
    examined scan checked as healthy (a warning, not a refusal: Calibrate stays ready)."""
    import ast

    from CeVAEAnomalyLib.engine.calibration import ACQUISITION_FACTOR
    from CeVAEAnomalyLib.slicer.adapt_panel import calibrate_problem, calibrate_warning, examined_as_healthy

    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=s)[0], f"sub-0{s}_T1w") for s in (1, 2)]
    volumes[0].SetSpacing(1.0, 1.0, 1.0)
    volumes[1].SetSpacing(1.0, 1.0, ACQUISITION_FACTOR)  # at the factor: alike
    patient = add_volume(scene, make_head(seed=5)[0], "patient")
    patient.SetSpacing(1.0, 1.0, 1.0)
    assert calibrate_warning(patient, volumes) == ""
    volumes[1].SetSpacing(1.0, 1.0, 4.0)
    mixed = ("The site scans are of different acquisitions: 'sub-02_T1w' has voxels up to 4 mm, 'sub-01_T1w' 1 mm "
             "(more than 1.5 times apart). The calibrated model's thresholds pool them, so its threshold follows the "
             "finer scans and its rate on the coarser ones is not known. Check only one acquisition's volumes and "
             "calibrate one model per acquisition.")
    assert calibrate_warning(patient, volumes) == mixed
    assert calibrate_warning(patient, [*volumes, patient]) == " ".join(
        (examined_as_healthy(patient, [patient], "calibrate"), mixed))
    assert calibrate_problem(len(volumes), str(tmp_path / "site.cevae"), None) is None  # ready all the same

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "calibrateWarning = calibrate_warning(p.inputVolume, healthy)" in methods["_refresh"]
    assert "calibrate_warning(p.inputVolume, volumes) if task == CALIBRATE" in methods["_inputAcceptedAsHealthy"]


def test_a_calibration_goes_on_through_a_scene_close_and_writes_its_model(tiny_bundle, tmp_path):
    """What lets the panel keep a calibration running when the scene closes (WidgetState.scene_closing): the job holds
    copies of the healthy scans, written before it exists, and nothing of the scene; the scene closed (every node
    removed) at once after the start, it still ends with its model."""
    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)
    volume = add_volume(scene, image, "sub-01_T1w")
    mask = add_volume(scene, brain, "sub-01 mask", "vtkMRMLLabelMapVolumeNode")
    out = tmp_path / "site.cevae"
    job = CeVAEAnomalyLogic(scene).startCalibration([volume], [mask], out, modelPath=tiny_bundle, device="cpu")
    scene.Clear(0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0
    assert job.wait(300) is JobState.DONE, job.error
    assert job.done["model"] == str(out) and job.done["subjects"] == 1
    assert read_header(out).calibration  # a model, calibrated
    assert not job.folder.exists()  # its copies went with its end


def test_the_panels_calibration_warns_of_a_volume_loaded_from_a_training_scan(tiny_bundle, tmp_path):
    """The command line warns of calibration scans the model was trained on; the panel's calibration never did, and the
    worker's copy of a volume (NRRD) is never the training file itself. A volume loaded from one of the model's
    training scans is now told by its content, and the warning names it by its node's name."""
    scene = slicer.vtkMRMLScene()
    trained = read_header(tiny_bundle).training["subjects"][0]["name"]  # e.g. "h1": tiny_bundle.parent/h1.nii.gz
    loaded = [sitk_read(tiny_bundle.parent / f"{trained}{suffix}.nii.gz") for suffix in ("", "_mask")]
    new_image, new_brain = make_head(seed=12)
    volumes = [add_volume(scene, loaded[0], "loaded T1"), add_volume(scene, new_image, "new T1")]
    masks = [add_volume(scene, brain, f"mask {n}", "vtkMRMLLabelMapVolumeNode")
             for n, brain in enumerate((loaded[1], new_brain))]
    job = CeVAEAnomalyLogic().startCalibration(volumes, masks, tmp_path / "site.cevae", modelPath=tiny_bundle,
                                               device="cpu")
    assert job.wait(300) is JobState.DONE, job.error
    said = [w for w in job.warnings if "training volumes" in w]
    assert said == ["'loaded T1' is among the model's training volumes: scans a model learned from score lower than "
                    "new ones, so a calibration on them flags more of a new scan. Calibrate on healthy scans it did "
                    "not see."], job.warnings


def copies_kept_in(copied: Path):
    """A launcher that starts the worker as the panel does and first copies its folder to ``copied``: the worker's
    request and its copies of the scans, as they are when it starts (``copied``/mask names the first scan's mask
    copy)."""
    import json
    import shutil

    from CeVAEAnomalyLib.slicer.jobs import launch_process

    def launch(args):
        request = json.loads(Path(args[-1]).read_text(encoding="utf-8"))
        shutil.copytree(Path(args[-1]).parent, copied)
        copied.joinpath("mask").write_text(Path(request["subjects"][0]["mask"]).name, encoding="utf-8")
        return launch_process(args)
    return launch


def test_a_calibration_uses_a_mask_made_before_its_scan_was_registered_where_it_lies_as_detection_does(
        tiny_bundle, tmp_path):
    """A healthy scan registered (under a linear transform) after its brain mask was made: detection uses such a mask
    where it lies in world space, resampled onto the scan's grid, with a warning naming both transforms; the panel's
    Calibrate and Adapt refused it ("harden the transforms"). The worker now gets the mask as detection uses it (the
    copy is the mask moved onto the scan's grid), the job's warnings (the panel's status line) say so in detection's
    words, and neither node is changed; a non-linear transform between them is refused before anything runs."""

    import numpy as np
    import SimpleITK as sitk
    import vtk

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.mrml import image_from_volume
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)  # identity direction, 1.2 mm columns
    volume = add_volume(scene, image, "sub-01_T1w")
    mask = add_volume(scene, brain, "sub-01_T1w mask", "vtkMRMLLabelMapVolumeNode")
    reg = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 3 * 1.2)  # 3 columns to the right (R: LPS x decreases)
    reg.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(reg.GetID())
    copied = tmp_path / "copied"

    masks = pair_masks([volume], [mask])
    job = CeVAEAnomalyLogic().startCalibration([volume], masks, tmp_path / "site.cevae", modelPath=tiny_bundle,
                                               device="cpu", launch=copies_kept_in(copied))
    assert job.wait(300) is JobState.DONE, job.error
    said = ("The brain mask 'sub-01_T1w mask' (under no transform) and the volume 'sub-01_T1w' (under 'reg') are under "
            "different transforms: the labelmap is used where it lies in world space, resampled onto the volume's "
            "grid (nearest neighbour). If it was made on this scan before the scan was registered, put it under the "
            "volume's transform.")
    assert said in job.warnings, job.warnings
    used = sitk.GetArrayFromImage(sitk.ReadImage(str(copied / copied.joinpath("mask").read_text(encoding="utf-8"))))
    expected = np.zeros_like(sitk.GetArrayFromImage(brain))
    expected[:, :, 3:] = sitk.GetArrayFromImage(brain)[:, :, :-3]  # column i of the scan lies on the mask's i - 3
    assert np.array_equal(used, expected)
    assert volume.GetTransformNodeID() == reg.GetID() and mask.GetTransformNodeID() is None
    assert np.array_equal(sitk.GetArrayFromImage(image_from_volume(mask)), sitk.GetArrayFromImage(brain))

    warp = grid_transform(scene)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(CeVAEError, match=r"^The brain mask 'sub-01_T1w mask' \(under no transform\) and the volume "
                                         r"'sub-01_T1w' \(under 'warp'\) are under different transforms, and a "
                                         r"non-linear one lies between them"):
        CeVAEAnomalyLogic().startAdaptation([volume, add_volume(scene, image, "sub-02_T1w")],
                                            pair_masks([volume], [mask]) + [None], tmp_path / "adapted.cevae",
                                            modelPath=tiny_bundle, device="cpu")
    assert not (tmp_path / "adapted.cevae").exists()


def test_a_calibration_resamples_a_mask_made_on_another_grid_onto_its_scan_as_detection_does(tiny_bundle, tmp_path):
    """A site's masks made at 2 mm for its scans: detection resamples such a mask onto the scan's grid (nearest
    neighbour, with a warning); the panel's Calibrate and Adapt refused it. The worker now gets a copy of the mask,
    which it resamples onto its scan's grid as the command line's calibrate does (the mask node is not changed), the
    job's warnings say so naming both nodes, and a mask that does not overlap its scan in world space is refused
    before anything runs."""

    import numpy as np
    import SimpleITK as sitk

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.mrml import image_from_volume
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)
    coarse = brain[::2, ::2, :]  # a mask made at twice the scan's voxel size
    volume = add_volume(scene, image, "sub-01_T1w")
    mask = add_volume(scene, coarse, "sub-01_T1w mask 2mm", "vtkMRMLLabelMapVolumeNode")
    copied = tmp_path / "copied"

    job = CeVAEAnomalyLogic().startCalibration([volume], pair_masks([volume], [mask]), tmp_path / "site.cevae",
                                               modelPath=tiny_bundle, device="cpu", launch=copies_kept_in(copied))
    assert job.wait(300) is JobState.DONE, job.error
    said = ("The brain mask 'sub-01_T1w mask 2mm' is on another grid than the healthy volume 'sub-01_T1w'; "
            "resampling it (nearest neighbour).")  # the worker's, as the command line's calibrate resamples it
    assert said in job.warnings, job.warnings
    used = sitk.ReadImage(str(copied / copied.joinpath("mask").read_text(encoding="utf-8")))
    assert used.GetSize() == coarse.GetSize() and np.allclose(used.GetSpacing(), coarse.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(used), sitk.GetArrayFromImage(coarse))
    assert np.array_equal(sitk.GetArrayFromImage(image_from_volume(mask)), sitk.GetArrayFromImage(coarse))
    assert mask.GetSpacing() == (2.4, 2.0, 1.5)

    far = add_volume(scene, image, "sub-02_T1w")
    elsewhere = coarse[:, :, :]
    elsewhere.SetOrigin((500.0, 500.0, 500.0))  # another scan's mask, off this one in world space
    off = add_volume(scene, elsewhere, "sub-02_T1w mask", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match=r"^The brain mask 'sub-02_T1w mask' does not overlap the healthy volume "
                                         r"'sub-02_T1w' where they lie in world space"):
        CeVAEAnomalyLogic().startAdaptation([volume, far], pair_masks([volume, far], [mask, off]),
                                            tmp_path / "adapted.cevae", modelPath=tiny_bundle, device="cpu")
    assert not (tmp_path / "adapted.cevae").exists()


def test_a_mask_off_a_healthy_volume_of_a_shared_name_is_refused_naming_the_volume_as_the_panel_does(tiny_bundle,
                                                                                                      tmp_path):
    """Two healthy volumes of one name ('healthy', a scene added twice): the refusal of a mask that does not overlap
    its volume named the node's own name, 'healthy', which both are; the job and the model tell them apart as
    'healthy (1)' and 'healthy (2)' (nodes.distinct_node_names). It now names the volume so, and nothing is written."""
    from CeVAEAnomalyLib.errors import CeVAEError

    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)
    volumes = [add_volume(scene, image, "healthy") for _ in range(2)]
    elsewhere = brain[::2, ::2, :]
    elsewhere.SetOrigin((500.0, 500.0, 500.0))  # on another grid, off the scan in world space
    off = add_volume(scene, elsewhere, "brain", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CeVAEError, match=r"^The brain mask 'brain' does not overlap the healthy volume 'healthy \(2\)' "
                                         r"where they lie in world space"):
        CeVAEAnomalyLogic().startCalibration(volumes, [None, off], tmp_path / "site.cevae", modelPath=tiny_bundle,
                                             device="cpu")
    assert not (tmp_path / "site.cevae").exists()


def test_every_refusal_and_warning_of_a_healthy_volume_of_a_shared_name_names_it_as_the_panel_does(tmp_path):
    """Two healthy volumes of one name ('healthy', a scene added twice), told apart by the job and the model as
    'healthy (1)' and 'healthy (2)' (nodes.distinct_node_names): the refusals and warnings of reading the second one and
    its mask (no image data, a header the model refuses, a mask under another transform: its warning, the refusal of
    a non-linear transform between them, of a mask that lies off it; the panel's refusal of two masks for it) named it
    'healthy', which both are. They now name it 'healthy (2)', and nothing is written; detection's messages name the
    node as before."""
    import subprocess
    import sys

    import vtk

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.nodes import pair_masks

    def quiet(args):  # a worker that does nothing: only what the start says is tested
        return subprocess.Popen([sys.executable, "-c", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def refused(volumes, masks) -> str:
        with pytest.raises(CeVAEError) as refusal:
            CeVAEAnomalyLogic().startCalibration(volumes, masks, tmp_path / "site.cevae", device="cpu", launch=quiet)
        assert not (tmp_path / "site.cevae").exists()
        return str(refusal.value)

    scene = slicer.vtkMRMLScene()
    image, brain = make_head(size=(40, 44, 12), seed=11)  # identity direction, 1.2 mm columns
    first, second = (add_volume(scene, image, "healthy") for _ in range(2))
    mask = add_volume(scene, brain, "brain", "vtkMRMLLabelMapVolumeNode")

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "healthy")
    assert refused([first, empty], [None, None]).startswith("The healthy volume 'healthy (2)' holds no image data")
    tiny = add_volume(scene, make_head(size=(40, 44, 12), spacing=(0.005,) * 3, seed=11)[0], "healthy")
    assert refused([first, tiny], [None, None]).startswith("The volume 'healthy (2)' has voxels of 0.005 x 0.005 x "
                                                           "0.005 mm")

    reg = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reg")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 3 * 1.2)  # 3 columns to the right
    reg.SetMatrixTransformToParent(shift)
    second.SetAndObserveTransformNodeID(reg.GetID())
    job = CeVAEAnomalyLogic().startCalibration([first, second], [None, mask], tmp_path / "site.cevae", device="cpu",
                                               launch=quiet)
    job.wait(60)
    assert job.warnings[0].startswith("The brain mask 'brain' (under no transform) and the volume 'healthy (2)' (under "
                                      "'reg') are under different transforms"), job.warnings
    shift.SetElement(0, 3, 500.0)  # far off the mask
    reg.SetMatrixTransformToParent(shift)
    assert refused([first, second], [None, mask]).startswith(
        "The brain mask 'brain' (under no transform) does not overlap the volume 'healthy (2)' (under 'reg') where "
        "they lie in world space")
    second.SetAndObserveTransformNodeID(grid_transform(scene).GetID())
    assert refused([first, second], [None, mask]).startswith(
        "The brain mask 'brain' (under no transform) and the volume 'healthy (2)' (under 'warp') are under different "
        "transforms, and a non-linear one lies between them")

    other, other_brain = make_head(size=(36, 40, 30), seed=3)
    twin = add_volume(scene, other, "healthy")  # another scan of the name
    masks = [add_volume(scene, other_brain, f"brain {n}", "vtkMRMLLabelMapVolumeNode") for n in "ab"]
    with pytest.raises(CeVAEError, match=r"^The healthy volume 'healthy \(2\)' has two brain masks chosen"):
        pair_masks([first, twin], masks)  # (the panel's pairing: both on the second's grid)

    with pytest.raises(CeVAEError, match=r"^The brain mask 'brain' \(under no transform\) and the volume 'healthy' "
                                         r"\(under 'warp'\)"):  # detection: one volume, named as its node
        CeVAEAnomalyLogic().process(second, mask)


def sitk_read(path: Path):
    """The image at ``path``, as Slicer's volume loading reads it (SimpleITK)."""
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def test_the_console_api_expands_a_tilde_in_every_path_as_the_panel_does(tiny_bundle, tmp_path, monkeypatch):
    """The panel reads "~/site.cevae" as the file in the home folder (gui_binding.typed_path); the console's logic took
    it as a folder named "~" in Slicer's working folder: loadModel and shareModel said it did not exist, and a
    calibration or adaptation would have written its model there. Every path argument of the logic expands it now."""
    from CeVAEAnomalyLib.errors import CeVAEError

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site.cevae"
    site.write_bytes(tiny_bundle.read_bytes())
    logic = CeVAEAnomalyLogic()
    assert logic.loadModel("~/site.cevae", "cpu") is logic.loadModel(site, "cpu")
    assert logic.shareModel(Path("~/site.cevae"), "~/copy.cevae") == tmp_path / "copy.cevae"
    assert read_header(tmp_path / "copy.cevae").extra["names_removed"]["scans"] >= 1
    scene = slicer.vtkMRMLScene()
    volumes = [add_volume(scene, make_head(seed=s)[0], f"sub-0{s}_T1w") for s in (1, 2)]
    with pytest.raises(CeVAEError, match="cannot replace the model it starts from"):
        logic.startCalibration(volumes[:1], [None], "~/site.cevae", modelPath=site, device="cpu")
    with pytest.raises(CeVAEError, match="cannot replace the model it starts from"):
        logic.startAdaptation(volumes, [None, None], "~/site.cevae", modelPath="~/site.cevae", device="cpu")
    job = calibrated(volumes[0], None, "~/calibrated.cevae", "~/site.cevae")
    assert Path(job.done["model"]) == tmp_path / "calibrated.cevae" and (tmp_path / "calibrated.cevae").is_file()
    assert not (tmp_path / "~").exists()
