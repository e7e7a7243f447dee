"""Run sequences of the Slicer module as a reader meets them: reruns on other frames, scenes imported or closed, nodes
renamed, deleted or restyled while a run is in flight (a real MRML scene from slicer-core, a real worker)."""
from __future__ import annotations

import pytest

from conftest import add_volume, make_head

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyLib.slicer import mrml, nodes  # noqa: E402
from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic  # noqa: E402
from test_slicer_worker import run_to_end, sequence_scene  # noqa: E402


def test_a_run_on_another_frame_keeps_the_first_frames_results(tiny_bundle):
    """A rerun on frame 3 of a sequence, given frame 1's nodes (as the panel shows them), wrote into them: the reader
    comparing frames lost frame 1's result without being asked. Each frame now has nodes of its own; a rerun on a
    frame updates that frame's."""
    scene, sequences, browser, proxy = sequence_scene()
    logic = CeVAEAnomalyLogic()
    first = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    kept_rows = first.nodes.components.GetNumberOfRows()
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    job = logic.startDetection(proxy, modelPath=tiny_bundle, device="cpu", threshold=1e6, outputs=first.nodes)
    run_to_end(job)
    third = logic.finishDetection(job)
    for name in ("score", "segmentation", "components", "slice_table", "slice_chart"):
        mine, theirs = getattr(third.nodes, name), getattr(first.nodes, name)
        assert mine is not theirs and theirs.GetScene() is scene, name
        assert theirs.GetAttribute(nodes.FRAME_ATTRIBUTE) == "0" and mine.GetAttribute(nodes.FRAME_ATTRIBUTE) == "2"
    assert first.nodes.score.GetName() == "cine anomaly score (frame 1)"
    assert third.nodes.score.GetName() == "cine anomaly score (frame 3)"
    assert first.nodes.components.GetNumberOfRows() == kept_rows > 0
    assert first.nodes.score.GetVolumeDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    assert nodes.stored_result(first.nodes.score).components is first.nodes.components

    browser.SetSelectedItemNumber(0)  # the views on frame 1 over frame 3's heat map: where frame 1's results are
    assert nodes.frame_note(third.nodes.score) == (
        "The views show frame 1 of 'cine browser', but the anomaly results are of frame 3: go back to frame 3 to read "
        "them; this frame's are in 'cine anomaly score (frame 1)'.")
    browser.SetSelectedItemNumber(2)
    again = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.5)  # frame 3 again: its own nodes
    assert again.nodes.score is third.nodes.score and again.nodes.components is third.nodes.components
    browser.SetSelectedItemNumber(0)
    sequences.UpdateProxyNodesFromSequences(browser)
    before = mrml.node_ids(scene)
    back = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.4, outputs=third.nodes)
    assert back.nodes.score is first.nodes.score and back.nodes.segmentation is first.nodes.segmentation
    assert mrml.node_ids(scene) == before


def test_a_job_on_a_frame_leaves_the_results_another_run_wrote_on_that_frame_meanwhile_alone(tiny_bundle):
    """A console job on frame 1 of a sequence, started while frame 3 had the input's latest results, loaded into frame
    1's nodes although another run on frame 1 had filled them meanwhile (its threshold 0.5 replaced by the job's
    0.4): the job compared runs of any frame. As on a volume of no sequence, it now gets nodes of its own, and with
    no results on its frame at its start too."""
    scene, sequences, browser, proxy = sequence_scene()
    brain = add_volume(scene, make_head()[1], "mask", "vtkMRMLLabelMapVolumeNode")
    logic = CeVAEAnomalyLogic()

    def run(threshold: float, item: int):
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)
        return logic.process(proxy, brain, modelPath=tiny_bundle, device="cpu", threshold=threshold)

    def lower_threshold(result) -> float:
        return result.nodes.score.GetVolumeDisplayNode().GetLowerThreshold()

    run(0.3, 0)
    third = run(0.6, 2)
    for item in (0, 1):  # frame 1 had results at the job's start; frame 2 had none
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)
        job = logic.startDetection(proxy, brain, modelPath=tiny_bundle, device="cpu", threshold=0.4)
        meanwhile = run(0.5, item)
        run_to_end(job)
        loaded = logic.finishDetection(job)
        assert loaded.nodes.score is not meanwhile.nodes.score, item
        assert loaded.nodes.segmentation is not meanwhile.nodes.segmentation, item
        assert lower_threshold(meanwhile) == pytest.approx(0.5) and lower_threshold(loaded) == pytest.approx(0.4)
        assert loaded.nodes.score.GetAttribute(nodes.FRAME_ATTRIBUTE) == str(item)
    assert lower_threshold(third) == pytest.approx(0.6)


def test_the_warnings_of_a_run_name_an_input_renamed_while_it_ran(tiny_bundle):
    """The worker's warnings named the nodes by their names at Apply: a reader who renamed the scan (or its mask) while
    the run went on was warned about a name no node had any more. They name the nodes as they are called when read."""
    from test_slicer_worker import two_grids

    scene, a, b, b_mask = two_grids()
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(a, b_mask, modelPath=tiny_bundle, device="cpu")
    a.SetName("patient A, 2024")
    b_mask.SetName("B brain")
    run_to_end(job)
    said = ("The brain mask 'B brain' (it lies on that of 'B') is on another grid than the input volume "
            "'patient A, 2024'; resampling it (nearest neighbour).")
    assert said in job.warnings
    a.SetName("A")  # renamed back before the results are read: the end summary says what the nodes are called then
    result = logic.finishDetection(job)
    assert said.replace("'patient A, 2024'", "'A'") in result.warnings
    assert not any("patient A" in warning for warning in result.warnings)


def saved_scene(folder, name: str = "B") -> str:
    """A scene file holding one scan and the module's parameter node (a singleton) with that scan as its input."""
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, make_head(seed=8)[0], name)
    storage = volume.CreateDefaultStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(folder / f"{name}.nrrd"))
    assert storage.WriteData(volume)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    panel_parameters(scene, volume)
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "other.mrml"))
    assert scene.Commit()
    return str(folder / "other.mrml")


def panel_parameters(scene, scan) -> "slicer.vtkMRMLScriptedModuleNode":
    """The module's parameter node in ``scene``, its input volume ``scan``."""
    parameters = slicer.vtkMRMLScriptedModuleNode()
    parameters.SetSingletonTag("CeVAEAnomaly")
    scene.AddNode(parameters)
    parameters.SetNodeReferenceID("inputVolume", scan.GetID())
    return parameters


def test_results_of_a_run_during_which_a_scene_was_imported_stay_on_its_scan_and_say_so(tiny_bundle, tmp_path):
    """A scene imported while a run goes on (File > Add Data) brings its own parameter node: the panel's input becomes
    the imported scan, with clashing node IDs renamed. The run's results land on the scan that was run; the panel,
    whose fields then followed the other scan, said only the summary (no scan named) and turned the views to the run's
    scan. It now leaves the fields and the views to the imported scan and says whose results were loaded, where."""
    import ast
    from pathlib import Path

    scene = slicer.vtkMRMLScene()
    image, brain = make_head(seed=7)
    scan, mask = add_volume(scene, image, "A"), add_volume(scene, brain, "A mask", "vtkMRMLLabelMapVolumeNode")
    parameters = panel_parameters(scene, scan)
    logic = CeVAEAnomalyLogic()
    first = logic.process(scan, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    job = logic.startDetection(scan, mask, modelPath=tiny_bundle, device="cpu", threshold=0.5, outputs=first.nodes)
    scene.SetURL(saved_scene(tmp_path))
    assert scene.Import()
    imported = parameters.GetNodeReference("inputVolume")
    assert imported.GetName() == "B" and imported.GetID() != scan.GetID()
    run_to_end(job)
    result = logic.finishDetection(job)
    assert result.volume is scan and result.nodes.score is first.nodes.score
    assert nodes.source_volume(result.nodes.components) is scan and not nodes.has_outputs(imported)
    assert nodes.result_elsewhere(scan, scan, result.nodes.score) == ""
    assert nodes.result_elsewhere(imported, scan, result.nodes.score) == (
        "These are the results of 'A' ('A anomaly score'); the panel shows 'B' now (its input changed during the "
        "run): choose 'A' as the input volume to see them.")
    imported.SetName("A")  # the same scan's scene added again
    assert "the panel shows another volume named 'A' now" in nodes.result_elsewhere(imported, scan, result.nodes.score)

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    show = next(ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_showResult")
    check = show.index("result_elsewhere(p.inputVolume, result.volume, result.nodes.score)")
    assert check < show.index("p.scoreVolume = result.nodes.score") and check < show.index("self._display(")


def test_results_of_a_run_whose_input_was_changed_from_the_console_do_not_say_a_scene_was_added(tiny_bundle):
    """The panel's input set to another scan during a run, as the Python console can (no scene added): the status
    line said "(a scene was added during the run)", which had not happened. It says what is known: the input
    changed during the run."""
    scene = slicer.vtkMRMLScene()
    image, brain = make_head(seed=7)
    scan, mask = add_volume(scene, image, "A"), add_volume(scene, brain, "A mask", "vtkMRMLLabelMapVolumeNode")
    other = add_volume(scene, make_head(seed=8)[0], "B")
    parameters = panel_parameters(scene, scan)
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(scan, mask, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    parameters.SetNodeReferenceID("inputVolume", other.GetID())  # getParameterNode().inputVolume = B
    run_to_end(job)
    result = logic.finishDetection(job)
    assert result.volume is scan
    assert nodes.result_elsewhere(parameters.GetNodeReference("inputVolume"), scan, result.nodes.score) == (
        "These are the results of 'A' ('A anomaly score'); the panel shows 'B' now (its input changed during the "
        "run): choose 'A' as the input volume to see them.")


def test_a_rerun_keeps_the_look_the_reader_gave_its_outputs(tiny_bundle):
    """After the first run a reader gave the labelmap and the heat map colour tables of their own and showed the
    "Anomaly" segment filled, half-transparent, in red; a rerun (another threshold) put back the module's colour
    tables and an outlined cyan segment each time. A rerun now updates the data and the window (which follows its
    threshold) and keeps the look; a new output still gets the module's."""
    scene = slicer.vtkMRMLScene()
    image, brain = make_head(seed=7)
    scan, mask = add_volume(scene, image, "A"), add_volume(scene, brain, "A mask", "vtkMRMLLabelMapVolumeNode")
    logic = CeVAEAnomalyLogic()
    first = logic.process(scan, mask, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    labels, heat = (scene.AddNewNodeByClass("vtkMRMLColorTableNode", name) for name in ("my labels", "my heat"))
    first.nodes.labelmap.GetDisplayNode().SetAndObserveColorNodeID(labels.GetID())
    first.nodes.score.GetVolumeDisplayNode().SetAndObserveColorNodeID(heat.GetID())
    display, segment_id = first.nodes.segmentation.GetDisplayNode(), nodes.anomaly_segment_id(first.nodes.segmentation)
    display.SetSegmentVisibility2DFill(segment_id, True)
    display.SetSegmentOpacity2DFill(segment_id, 0.25)
    first.nodes.segmentation.GetSegmentation().GetSegment(segment_id).SetColor(1.0, 0.0, 0.0)

    again = logic.process(scan, mask, modelPath=tiny_bundle, device="cpu", threshold=0.5, outputs=first.nodes)
    assert again.nodes.labelmap is first.nodes.labelmap and again.nodes.score is first.nodes.score
    assert again.nodes.labelmap.GetDisplayNode().GetColorNodeID() == labels.GetID()
    assert again.nodes.score.GetVolumeDisplayNode().GetColorNodeID() == heat.GetID()
    assert again.nodes.score.GetVolumeDisplayNode().GetLowerThreshold() == pytest.approx(0.5)
    segmentation = again.nodes.segmentation
    new_id = nodes.anomaly_segment_id(segmentation)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert segmentation.GetSegmentation().GetSegment(new_id).GetColor() == (1.0, 0.0, 0.0)
    assert segmentation.GetDisplayNode().GetSegmentVisibility2DFill(new_id)
    assert segmentation.GetDisplayNode().GetSegmentOpacity2DFill(new_id) == pytest.approx(0.25)

    other = add_volume(scene, make_head(seed=8)[0], "B")  # another scan's new outputs: the module's look
    fresh = logic.process(other, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    assert fresh.nodes.labelmap.GetDisplayNode().GetColorNodeID() == mrml.label_color_node_id(scene)
    assert fresh.nodes.score.GetVolumeDisplayNode().GetColorNodeID() == mrml.score_color_node_id(scene)
    fresh_id = nodes.anomaly_segment_id(fresh.nodes.segmentation)
    assert fresh.nodes.segmentation.GetSegmentation().GetSegment(fresh_id).GetColor() == mrml.SEGMENT_COLOR
    assert not fresh.nodes.segmentation.GetDisplayNode().GetSegmentVisibility2DFill(fresh_id)


def test_a_scan_deleted_during_its_run_is_said_on_the_status_line_not_as_a_failure(tiny_bundle):
    """A reader who deleted the scan while its run went on got an "Anomaly detection failed." dialog, although nothing
    failed: the results had no scan to go to. finishDetection now raises InputRemovedError (still a CeVAEError for
    scripts), which the panel shows on its status line in place of the failure dialog; the scene is left as it was."""
    import ast
    from pathlib import Path

    from CeVAEAnomalyLib.errors import CeVAEError
    from CeVAEAnomalyLib.slicer.logic import InputRemovedError

    scene = slicer.vtkMRMLScene()
    scan = add_volume(scene, make_head(seed=7)[0], "A")
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(scan, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    scene.RemoveNode(scan)
    before = mrml.node_ids(scene)
    run_to_end(job)
    with pytest.raises(InputRemovedError) as removed:
        logic.finishDetection(job)
    assert isinstance(removed.value, CeVAEError) and not job.folder.exists() and mrml.node_ids(scene) == before
    assert str(removed.value) == "'A' was removed during the run; its results were discarded."

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    poll = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_onPoll")
    dialog = next(n for n in ast.walk(poll) if isinstance(n, ast.With) and "tryWithErrorDisplay" in ast.unparse(n))
    handler = next(h for n in ast.walk(dialog) if isinstance(n, ast.Try) for h in n.handlers
                   if h.type is not None and ast.unparse(h.type) == "InputRemovedError")
    assert "finishDetection" in ast.unparse(next(n for n in ast.walk(dialog) if isinstance(n, ast.Try)
                                                 and handler in n.handlers).body[0])
    assert ast.unparse(handler.body) == "self.ui.statusLabel.text = one_line(exc)"


def test_the_panel_and_the_heat_map_follow_the_frame_shown_where_it_has_results_of_its_own():
    """With frames 1 and 3 of a sequence scored (each has nodes of its own), moving the browser back to frame 1 changed
    only the status line: the panel's score volume, segmentation, labelmap and table stayed frame 3's, and so did the
    heat map, now over frame 1's voxels. They now switch to frame 1's results (the overlay too where the views showed
    frame 3's), and the fields never mix in another frame's node; a frame without results keeps the note."""
    import ast
    from pathlib import Path

    from test_mrml import fake_detection

    scene, sequences, browser, proxy = sequence_scene()

    def run_here(**options):
        image = mrml.image_from_volume(proxy)
        return mrml.publish(scene, proxy, fake_detection(image, sitk_brain(image)),
                            frame=nodes.sequence_frame(proxy), **options)

    def show(item: int) -> None:
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)

    first = run_here(create_labelmap=True)
    show(2)
    third = run_here()
    assert third.score is not first.score and third.labelmap is None
    views = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    views.SetBackgroundVolumeID(proxy.GetID())
    views.SetForegroundVolumeID(third.score.GetID())
    assert nodes.shown_frame_results(third.score) is None  # the views show the frame scored

    show(0)
    back = nodes.shown_frame_results(third.score)
    assert back.fields == {"scoreVolume": first.score, "anomalySegmentation": first.segmentation,
                           "anomalyLabelmap": first.labelmap, "componentTable": first.components}
    assert back.overlay
    assert back.message == ("The views show frame 1 of 3 (time = 0 s) of 'cine browser': the panel shows its results, "
                            f"'cine anomaly score (frame 1)' ({first.components.GetNumberOfRows()} component(s)).")
    show(2)
    views.SetForegroundVolumeID(None)  # the reader took the heat map off: it stays off
    assert not nodes.shown_frame_results(first.score).overlay
    assert nodes.shown_frame_results(first.score).fields["anomalyLabelmap"] is None  # frame 3's run made none
    assert nodes.outputs_for_input(scene, proxy, {"scoreVolume": third.score})["anomalyLabelmap"] is None
    show(1)  # a frame without results: the fields stay, the note says so
    assert nodes.shown_frame_results(third.score) is None
    assert nodes.frame_note(third.score).endswith("or run the detection again on this frame.")

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    moved = next(ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_onFrameChanged")
    assert "own = shown_frame_results(p.scoreVolume)" in moved
    assert "setattr(p, field, node)" in moved and "self.logic.showResults(" in moved and "own.overlay" in moved
    assert "self.ui.statusLabel.text = ' '.join((text for text in (said, own.message) if text))" in moved


def sitk_brain(image):
    """A brain mask of ``image``: its voxels above 0."""
    import SimpleITK as sitk

    return sitk.Cast(image > 0, sitk.sitkUInt8)


def test_each_frames_summary_and_warnings_come_back_with_its_results(tiny_bundle):
    """With frames 1 and 3 of a sequence scored, moving to frame 1 put "the panel shows its results" on the status line
    in place of frame 3's summary and warnings, and moving back to frame 3 did not bring them back: a reader lost the
    warning of the run whose results they read. A run's score volume now records its summary and warnings
    (nodes.run_message, kept by a scene save), and the status line for a frame's results says that frame's own."""
    import ast
    from pathlib import Path

    scene, sequences, browser, proxy = sequence_scene()
    other_grid = add_volume(scene, make_head(seed=8, origin=(-17.0, 12.0, 8.0))[1], "B mask",
                            "vtkMRMLLabelMapVolumeNode")
    logic = CeVAEAnomalyLogic()
    first = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    job = logic.startDetection(proxy, other_grid, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    run_to_end(job)
    third = logic.finishDetection(job)
    warning = "Warning: The brain mask 'B mask' is on another grid than the input volume 'cine'"
    assert warning in third.message and warning not in first.message
    assert nodes.run_message(first.nodes.score) == first.message
    assert nodes.run_message(third.nodes.score) == third.message

    browser.SetSelectedItemNumber(0)  # frame 1: its results, its summary, not frame 3's warning
    there = nodes.shown_frame_results(third.nodes.score)
    assert there.fields["scoreVolume"] is first.nodes.score
    assert there.message.endswith(first.message) and warning not in there.message
    browser.SetSelectedItemNumber(2)  # back to frame 3: its warning comes back with its results
    back = nodes.shown_frame_results(first.nodes.score)
    assert back.fields["scoreVolume"] is third.nodes.score
    assert back.message == ("The views show frame 3 of 3 (time = 4 s) of 'cine browser': the panel shows its results, "
                            f"'cine anomaly score (frame 3)'. {third.message}")

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    moved = next(ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_onFrameChanged")
    assert "(said, note or run_message(p.scoreVolume))" in moved
    assert "_resultMessage" not in ast.unparse(widget)
def saved_sequence_scene(scene, folder):
    """``scene`` saved as a data bundle in ``folder`` and loaded again (Sequences logic set, as in the application):
    the new scene, its browser and its proxy volume."""
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    assert application.SaveSceneToSlicerDataBundleDirectory(str(folder))
    reloaded = slicer.vtkMRMLScene()
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(reloaded)
    reloaded.SetURL(str(next(folder.glob("*.mrml"))))
    assert reloaded.Import()
    browser = reloaded.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
    sequences.UpdateProxyNodesFromSequences(browser)
    return reloaded, browser, browser.GetProxyNode(browser.GetMasterSequenceNode())


def test_the_frame_shown_is_followed_also_for_results_loaded_with_a_scene_or_an_input(tmp_path):
    """The panel observed the sequence browser only from a run's end: after a saved scene with frame results was
    opened again, or an input with frame results was picked, moving the browser neither said that the heat map lay
    over another frame nor switched to that frame's results, until a new run. The panel now follows the browser of
    whatever score volume its fields hold (nodes.FrameWatch, from _updateGui), and lets go of it when the scene
    closes."""
    import ast
    from pathlib import Path

    from test_mrml import fake_detection

    scene, sequences, browser, proxy = sequence_scene()
    for item in (0, 2):  # frames 1 and 3 scored
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)
        image = mrml.image_from_volume(proxy)
        out = mrml.publish(scene, proxy, fake_detection(image, sitk_brain(image)), frame=nodes.sequence_frame(proxy))
        nodes.record_run_message(out.score, f"Frame {item + 1}'s summary.", [f"frame {item + 1}'s warning"])
    plain = add_volume(scene, make_head(seed=1)[0], "plain")
    mrml.publish(scene, plain, fake_detection(mrml.image_from_volume(plain), sitk_brain(mrml.image_from_volume(plain))))
    reloaded, browser, proxy = saved_sequence_scene(scene, tmp_path)
    plain = next(reloaded.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in
                 range(reloaded.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
                 if reloaded.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName() == "plain")

    moves = []
    watch = nodes.FrameWatch(lambda: moves.append(browser.GetSelectedItemNumber()))
    shown = nodes.outputs_for_input(reloaded, proxy, {})["scoreVolume"]  # the fields the panel shows for the input
    assert shown.GetName() == "cine anomaly score (frame 3)"
    assert watch.follow(shown) and not watch.follow(shown)  # a new browser to say anew of; then the same one
    browser.SetSelectedItemNumber(0)
    assert moves == [0] and nodes.shown_frame_results(shown).fields["scoreVolume"].GetName() == (
        "cine anomaly score (frame 1)")
    assert nodes.shown_frame_results(shown).message.endswith(  # as the run recorded it, kept by the save
        "'cine anomaly score (frame 1)'. Frame 1's summary. Warning: frame 1's warning")
    assert watch.follow(nodes.outputs_for_input(reloaded, plain, {})["scoreVolume"])  # another input: no sequence's
    browser.SetSelectedItemNumber(1)
    assert moves == [0]
    assert not watch.follow(None)  # (none followed already)

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "self._frames = FrameWatch(self._onFrameChanged)" in methods["__init__"]
    update = methods["_updateGui"]  # every change of the parameter node: a run's end, a scene loaded, an input picked
    assert update.index("if self._followInput():") < update.index("if self._followResultsBrowser():")
    assert "self._frames.follow(None)" in update  # no parameter node: a closed scene
    follow = methods["_followResultsBrowser"]
    assert "self._frames.follow(self._parameterNode.scoreVolume)" in follow and "self._onFrameChanged()" in follow
    for name in ("onSceneStartClose", "cleanup"):
        assert "self._frames.follow(None)" in methods[name], name
    show = methods["_showResult"]
    assert show.index("self._frames.follow(result.nodes.score)") < show.index("p.scoreVolume = result.nodes.score")


def test_a_run_loads_its_results_while_the_browser_shows_another_frame(tiny_bundle):
    """A reader who moved the sequence browser to another frame while a detection of frame 3 ran, and stayed there, got
    "The voxels of the input volume 'cine' changed while the detection ran ... Run the detection again." at its end:
    the run was lost for browsing. The voxels it read are those of the frame it scored, which the sequence keeps: they
    are checked there, so the results load (into frame 3's nodes, the browser left where the reader put it), and an
    edit of frame 3 itself is still refused."""
    scene, sequences, browser, proxy = sequence_scene()

    def show(item: int) -> None:
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)

    logic = CeVAEAnomalyLogic()
    show(2)
    job = logic.startDetection(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    show(0)  # the reader looks at frame 1 while it runs
    run_to_end(job)
    third = logic.finishDetection(job)
    assert third.nodes.score.GetName() == "cine anomaly score (frame 3)"
    assert third.nodes.score.GetAttribute(nodes.FRAME_ATTRIBUTE) == "2" and browser.GetSelectedItemNumber() == 0
    assert "Scored frame 3 of 3 (time = 4 s) of 'cine browser'." in third.summary

    show(2)
    before = mrml.node_ids(scene)
    job = logic.startDetection(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    show(0)
    frame3 = browser.GetSequenceNode(proxy).GetDataNodeAtValue("4")
    slicer.util.arrayFromVolume(frame3)[0] += 1.0  # frame 3 itself edited meanwhile
    slicer.util.arrayFromVolumeModified(frame3)
    run_to_end(job)
    with pytest.raises(CeVAEError, match="The voxels of the input volume 'cine' changed while the detection ran"):
        logic.finishDetection(job)
    assert mrml.node_ids(scene) == before


def test_a_detection_keeps_the_panel_on_its_outputs_while_it_runs_and_leaves_the_views_where_the_reader_went():
    """While a rerun of frame 3 went on, moving the browser to frame 1 switched the panel's output fields (and the heat
    map) to frame 1's results, as if the run wrote into them, and said nothing of it; at the run's end the fields went
    to the run's nodes and the views were sent back to frame 3 with a jump, whatever the reader was looking at.
    Now a detection holds the panel's watch of the browser (nodes.FrameWatch.hold): the fields stay the nodes it writes,
    and a move is kept for its end (release). Its results then fill the fields; where the reader moved to another
    frame, the views stay there (no jump back: nodes.off_scored_frame) and the status line says the run's summary,
    which frame the views show and where its results are (nodes.run_end_message); a detection that loaded nothing
    follows the browser at once."""
    import ast
    from pathlib import Path

    from test_mrml import fake_detection

    from CeVAEAnomalyLib.slicer.widget_state import with_warnings

    scene, sequences, browser, proxy = sequence_scene()

    def run_here():
        image = mrml.image_from_volume(proxy)
        return mrml.publish(scene, proxy, fake_detection(image, sitk_brain(image)), frame=nodes.sequence_frame(proxy))

    def show(item: int) -> None:
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)

    first = run_here()
    show(2)
    third = run_here()
    moves = []
    watch = nodes.FrameWatch(lambda: moves.append(browser.GetSelectedItemNumber()))
    assert watch.follow(third.score)
    watch.hold()  # a detection of frame 3 starts
    show(0)
    show(1)
    assert moves == [] and watch.release()  # kept for its end
    show(2)
    assert moves == [2]  # followed again
    watch.hold()
    show(0)
    show(2)
    assert not watch.release() and moves == [2]  # back where it started: nothing to say anew

    summary, warnings = "2 component(s), 1.00 ml flagged. Scored frame 3 of 3 (time = 4 s) of 'cine browser'.", ["w"]
    assert not nodes.off_scored_frame(third.score)
    assert nodes.run_end_message(third.score, summary, warnings) == with_warnings(summary, warnings)
    show(0)  # the reader stayed on frame 1, which has results of its own
    assert nodes.off_scored_frame(third.score) and not nodes.off_scored_frame(first.score)
    assert nodes.run_end_message(third.score, summary, warnings) == (
        f"{summary} The views show frame 1 of 'cine browser', but the anomaly results are of frame 3: go back to frame "
        "3 to read them; this frame's are in 'cine anomaly score (frame 1)'. Warning: w")
    assert not nodes.off_scored_frame(add_volume(scene, make_head(seed=1)[0], "plain"))  # no sequence's

    tree = ast.parse((Path(__file__).resolve().parents[2] / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    start = methods["_start"]
    assert start.index("self.state.started(task)") < start.index("self._frames.hold()")
    show_result = methods["_showResult"]
    assert show_result.index("self._frames.release()") < show_result.index("self._frames.follow(result.nodes.score)")
    assert "run_end_message(result.nodes.score, result.summary, result.warnings)" in show_result
    assert "off_scored_frame(scoreVolume)" in methods["_display"]  # also on return to the panel
    assert "self._followHeldFrame()" in methods["_onPoll"].split("finally:")[-1]
    assert "self._followHeldFrame()" in methods["_onTaskButton"]
    assert "self._frames.release()" in methods["_interrupt"]
    assert "self._frames.release()" in methods["_followHeldFrame"] and "self._onFrameChanged(" in methods[
        "_followHeldFrame"]


def loaded_alone(folder, node):
    """``node`` saved as Slicer's Save names its file (the node's name), then that file loaded alone into a new scene,
    as Add Data loads it: named after the file, without the attributes the module set on the node. (scene, node)"""
    path = folder / f"{node.GetName()}.nrrd"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    scene = slicer.vtkMRMLScene()
    loaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name[: -len(".nrrd")])
    reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    return scene, loaded


def test_a_score_map_saved_alone_and_loaded_again_is_not_scored_as_a_scan(tiny_bundle, tmp_path):
    """A score volume saved from the panel ("head anomaly score.nrrd") and loaded alone into a new scene has none of
    the module's attributes: it was scored as a head, and calibrated on as a healthy one. Its name says what it is
    (io.naming.PANEL_RESULT, as batch leaves such files out): it is refused in one line naming it."""
    from test_mrml import fake_detection

    scene = slicer.vtkMRMLScene()
    image, mask = make_head(seed=7)
    run = CeVAEAnomalyLogic().publish(add_volume(scene, image, "head"), fake_detection(image, mask))
    other, loaded = loaded_alone(tmp_path, run.nodes.score)
    assert loaded.GetName() == "head anomaly score" and loaded.GetImageData() is not None
    assert not nodes.is_module_output(loaded)
    said = (r"^'head anomaly score' is named as a result of this module for 'head' \(NAME anomaly score, saved from "
            r"its panel and loaded again\), not a scan; it cannot be {}\. If it is a scan, rename it\.$")
    before = mrml.node_ids(other)
    with pytest.raises(CeVAEError, match=said.format("an input")):
        CeVAEAnomalyLogic().process(loaded, modelPath=tiny_bundle, device="cpu")
    with pytest.raises(CeVAEError, match=said.format("a healthy scan or its mask")):
        CeVAEAnomalyLogic().startCalibration([loaded], [None], tmp_path / "site.cevae", modelPath=tiny_bundle)
    assert mrml.node_ids(other) == before


def test_a_score_map_loaded_alone_is_not_the_default_input(tmp_path):
    """A score volume saved from the panel and loaded alone into a new scene before a scan was the panel's default
    input (first_input_volume went by the module's attributes, which it lost): Apply then refused it. A scan present
    is the default; with none, no volume is; the score map stays selectable (a scan could be so named)."""
    from test_mrml import fake_detection

    image, mask = make_head(seed=7)
    first = slicer.vtkMRMLScene()
    run = CeVAEAnomalyLogic().publish(add_volume(first, image, "head"), fake_detection(image, mask))
    scene, loaded = loaded_alone(tmp_path, run.nodes.score)
    assert nodes.first_input_volume(scene) is None
    scan = add_volume(scene, image, "head")
    assert nodes.first_input_volume(scene) is scan
    assert loaded.GetID() not in nodes.module_volume_ids(scene)


def test_results_the_command_line_wrote_beside_their_scan_are_not_scans(tiny_bundle, tmp_path):
    """A score map and labelmap of `cevae-anomaly detect`/`batch` ("head_score.nrrd", "head_labelmap.nii.gz") loaded
    into Slicer with their scan "head" were taken for scans: the score map was even the default input, and Apply
    scored it as a head. As batch leaves such files out beside their scan, a volume so named with its scan in the
    scene is now refused in one line, and not the default input. Alone, its name is not enough (a scan could be so
    named), and its voxels cannot tell a score map from a skull-stripped scan."""
    import SimpleITK as sitk
    from CeVAEAnomalyLib.io.naming import output_paths
    from test_mrml import fake_detection

    image, mask = make_head(seed=7)
    detection = fake_detection(image, mask, threshold=0.5)
    paths = output_paths(tmp_path, "head", ("score", "labelmap"), ".nrrd")
    scene = slicer.vtkMRMLScene()
    loaded = {}
    for role, written in (("score", detection.score), ("labelmap", detection.labelmap)):
        sitk.WriteImage(written, str(paths[role]))
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", paths[role].name[: -len(".nrrd")])  # as Add Data
        reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        reader.SetFileName(str(paths[role]))
        assert reader.ReadData(node)
        loaded[role] = node
    assert [n.GetName() for n in loaded.values()] == ["head_score", "head_labelmap"]
    assert nodes.first_input_volume(scene) is loaded["score"]
    scan = add_volume(scene, image, "head")
    assert nodes.first_input_volume(scene) is scan
    said = (r"^'head_{}' is named as a result of this module for 'head' \(NAME_{}, as the command line names its "
            r"files, and 'head' is in this scene\), not a scan; it cannot be {}\. If it is a scan, rename it\.$")
    before = mrml.node_ids(scene)
    for role, node in loaded.items():
        with pytest.raises(CeVAEError, match=said.format(role, role, "an input")):
            CeVAEAnomalyLogic().process(node, modelPath=tiny_bundle, device="cpu")
    with pytest.raises(CeVAEError, match=said.format("score", "score", "a healthy scan or its mask")):
        CeVAEAnomalyLogic().startCalibration([loaded["score"]], [None], tmp_path / "site.cevae", modelPath=tiny_bundle)
    assert mrml.node_ids(scene) == before


def test_a_result_file_loaded_twice_is_still_told_as_a_result(tmp_path):
    """Slicer names a node loaded from a file whose name is taken "NAME_1" (vtkMRMLScene::GenerateUniqueName, which
    the volumes and segmentations readers call): "head_score.nrrd" loaded twice beside its scan gave "head_score_1",
    taken for a scan (the panel's default input, and Apply scored it as a head). It is told as "head_score" is; the
    panel's names ("head anomaly score_1") already were."""
    import SimpleITK as sitk
    from CeVAEAnomalyLib.io.naming import output_paths
    from test_mrml import fake_detection

    image, mask = make_head(seed=7)
    detection = fake_detection(image, mask, threshold=0.5)
    paths = output_paths(tmp_path, "head", ("score",), ".nrrd")
    sitk.WriteImage(detection.score, str(paths["score"]))
    scene = slicer.vtkMRMLScene()
    loaded = []
    for _ in range(2):  # as vtkSlicerVolumesLogic::AddArchetypeVolume names and reads it
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GetUniqueNameByString("head_score"))
        reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        reader.SetFileName(str(paths["score"]))
        assert reader.ReadData(node)
        loaded.append(node)
    assert [n.GetName() for n in loaded] == ["head_score", "head_score_1"]
    scan = add_volume(scene, image, "head")
    assert nodes.first_input_volume(scene) is scan
    assert nodes.named_as_result(loaded[1])[:2] == ("head", "_score_1")
    panel = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("head anomaly score"))
             for _ in range(2)]
    assert [n.GetName() for n in panel] == ["head anomaly score", "head anomaly score_1"]
    assert all(nodes.named_as_result(n) is not None for n in panel)
    before = mrml.node_ids(scene)
    with pytest.raises(CeVAEError, match=r"^'head_score_1' is named as a result of this module for 'head' "):
        CeVAEAnomalyLogic().process(loaded[1], modelPath=tmp_path / "unused.cevae", device="cpu")
    assert mrml.node_ids(scene) == before


def test_a_result_saved_under_a_numbered_name_and_loaded_twice_is_still_told_as_a_result(tmp_path):
    """A second run to a new score volume names it "head anomaly score_1" (GenerateUniqueName); Slicer's Save writes it
    as "head anomaly score_1.nrrd", and loading that file twice names the second node "head anomaly score_1_1" (the
    "_N" goes after whatever name is taken, so they stack): it was taken for a scan, the panel's default input."""
    scene = slicer.vtkMRMLScene()
    names = ["head anomaly score_1", "head anomaly segmentation_1.seg", "head_score_1"]
    add_volume(scene, make_head(seed=7)[0], "head")
    loaded = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GetUniqueNameByString(name))
              for name in names for _ in range(2)]
    assert [n.GetName() for n in loaded[1::2]] == [f"{name}_1" for name in names]
    assert [nodes.named_as_result(n)[0] for n in loaded] == ["head"] * len(loaded)
    scene.RemoveNode(scene.GetFirstNodeByName("head"))
    assert nodes.first_input_volume(scene) is loaded[4]  # (without "head", "head_score_1" may be a scan)


def test_a_users_brain_mask_named_as_a_command_line_labelmap_is_used(tmp_path):
    """A brain mask labelmap of the user's named "head_labelmap" beside its scan "head" was refused as 'named as a
    result of this module' (the command line's file name rule, meant for scans), though it carries none of the
    module's marks: a mask is told by what the module writes on it (its attributes, the anomaly segment), not by its
    name. The scan so named is still refused."""
    import SimpleITK as sitk

    image, mask = make_head(seed=7)
    scene = slicer.vtkMRMLScene()
    scan = add_volume(scene, image, "head")
    users = add_volume(scene, sitk.Cast(mask, sitk.sitkUInt8), "head_labelmap", "vtkMRMLLabelMapVolumeNode")
    assert not nodes.is_module_output(users)
    missing = tmp_path / "unused.cevae"
    with pytest.raises(CeVAEError) as refused:  # the next check: the model file, not the mask
        CeVAEAnomalyLogic().process(scan, users, modelPath=missing, device="cpu")
    assert "named as a result" not in str(refused.value) and "unused.cevae" in str(refused.value)
    named = add_volume(scene, image, "head_score")
    with pytest.raises(CeVAEError, match=r"^'head_score' is named as a result of this module for 'head' "):
        CeVAEAnomalyLogic().process(named, modelPath=missing, device="cpu")


def test_a_labelmap_deleted_during_a_run_that_makes_none_is_not_said_to_be_made_again(tiny_bundle):
    """The panel updates an earlier run's labelmap but asks for none (createLabelmap=False): a reader who deleted that
    labelmap while the next run went on was told "a new node is made", and no labelmap came. The warning now says
    that none is made; a run that asks for a labelmap still makes a new one and says so."""
    scene = slicer.vtkMRMLScene()
    scan = add_volume(scene, make_head(seed=7)[0], "A")
    logic = CeVAEAnomalyLogic()
    first = logic.process(scan, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    for create in (True, False):
        labelmap = nodes.find_output(scene, "vtkMRMLLabelMapVolumeNode", nodes.LABELMAP_ROLE, scan)
        chosen = mrml.OutputNodes(score=first.nodes.score, segmentation=first.nodes.segmentation, labelmap=labelmap,
                                  components=first.nodes.components)
        job = logic.startDetection(scan, modelPath=tiny_bundle, device="cpu", threshold=0.3, outputs=chosen,
                                   createLabelmap=create)
        scene.RemoveNode(labelmap)
        run_to_end(job)
        result = logic.finishDetection(job)
        said = [w for w in result.warnings if "'A anomaly labelmap' was deleted" in w]
        if create:
            assert result.nodes.labelmap is not None and result.nodes.labelmap.GetScene() is scene
            assert said == ["The output 'A anomaly labelmap' was deleted from the scene during the run; a new node is "
                            "made."]
        else:
            assert result.nodes.labelmap is None
            assert nodes.find_output(scene, "vtkMRMLLabelMapVolumeNode", nodes.LABELMAP_ROLE, scan) is None
            assert said == ["The output 'A anomaly labelmap' was deleted from the scene during the run; no labelmap is "
                            "made (none was asked for)."]


def test_results_stay_with_the_frame_they_scored_when_frames_are_added_to_or_removed_from_the_sequence(tiny_bundle):
    """A run recorded the frame it scored by its item number alone: once a frame was put into the sequence before it
    (or one before it removed), another frame had that number, so the heat map was said to lie on the frame it did not
    score, a rerun on that other frame wrote into the first run's nodes, and the frame scored was said to be one the
    sequence no longer had. A run's frame is now found by its index value, wherever it is in the sequence."""
    scene, sequences, browser, proxy = sequence_scene()
    sequence = browser.GetMasterSequenceNode()
    logic = CeVAEAnomalyLogic()

    def show(item: int) -> None:
        browser.SetSelectedItemNumber(item)
        sequences.UpdateProxyNodesFromSequences(browser)

    show(2)
    late = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)  # time = 4 s
    added = slicer.vtkMRMLScalarVolumeNode()
    mrml.update_volume_from_image(added, make_head(seed=30)[0])
    sequence.SetDataNodeAtValue(added, "1")  # between the first two frames: time = 4 s is the fourth frame now
    show(3)
    assert not nodes.off_scored_frame(late.nodes.score) and nodes.frame_note(late.nodes.score) == ""
    show(2)  # time = 2 s: the third frame, as time = 4 s was when it was scored
    assert nodes.frame_note(late.nodes.score).startswith(
        "The views show frame 3 of 'cine browser', but the anomaly results are of frame 4: go back to frame 4")
    other = logic.process(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.5)
    assert other.nodes.score is not late.nodes.score and other.nodes.components is not late.nodes.components
    assert late.nodes.score.GetVolumeDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    assert nodes.show_scored_frame(late.nodes.score) and browser.GetSelectedItemNumber() == 3

    sequence.RemoveDataNodeAtValue("4")  # the frame scored is gone
    show(2)
    assert nodes.frame_note(late.nodes.score) == (
        "The views show frame 3 of 'cine browser', but the anomaly results are of a frame removed from the sequence "
        f"since (time = 4 s); this frame's are in '{other.nodes.score.GetName()}'.")
    assert not nodes.show_scored_frame(late.nodes.score) and browser.GetSelectedItemNumber() == 2


def test_a_job_loads_onto_its_frame_when_a_frame_is_put_into_the_sequence_before_it_meanwhile(tiny_bundle):
    """A job on the third frame of a sequence found the voxels it read by that item number: once a frame was put into
    the sequence before it while the job ran, the third frame was another one and the results were refused as of
    voxels that had changed. The frame read is found by its index value: the results load, recorded on it."""
    scene, sequences, browser, proxy = sequence_scene()
    browser.SetSelectedItemNumber(2)
    sequences.UpdateProxyNodesFromSequences(browser)
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3)
    added = slicer.vtkMRMLScalarVolumeNode()
    mrml.update_volume_from_image(added, make_head(seed=30)[0])
    browser.GetMasterSequenceNode().SetDataNodeAtValue(added, "1")
    sequences.UpdateProxyNodesFromSequences(browser)  # the third frame is time = 2 s now
    run_to_end(job)
    result = logic.finishDetection(job)
    assert nodes.off_scored_frame(result.nodes.score)
    browser.SetSelectedItemNumber(3)  # time = 4 s, the frame read
    assert not nodes.off_scored_frame(result.nodes.score)


def test_a_job_loads_onto_the_frame_it_read_when_the_browser_moved_to_a_frame_on_another_grid(tiny_bundle):
    """A sequence of scans on grids of their own (follow-ups put into one browser): a job on the first frame, during
    which the reader moved the browser to the second, was refused at its end as 'The score map does not match the grid
    of the input volume' and its results were lost, where frames on one grid load. Its outputs now take the grid of the
    frame it read, and the status line says which frame the views show."""
    scene = slicer.vtkMRMLScene()
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "follow-up")
    for item, size in enumerate(((40, 44, 36), (44, 40, 38))):
        frame = slicer.vtkMRMLScalarVolumeNode()
        mrml.update_volume_from_image(frame, make_head(seed=20 + item, size=size, origin=(-20.0 + item, 10.0, 5.0))[0])
        sequence.SetDataNodeAtValue(frame, str(item))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "follow-up browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    sequences.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    first = nodes.ijk_to_ras(proxy)
    logic = CeVAEAnomalyLogic()
    job = logic.startDetection(proxy, modelPath=tiny_bundle, device="cpu", threshold=0.3, createLabelmap=True)
    browser.SetSelectedItemNumber(1)
    sequences.UpdateProxyNodesFromSequences(browser)
    run_to_end(job)
    result = logic.finishDetection(job)
    for volume in (result.nodes.score, result.nodes.labelmap):
        assert volume.GetImageData().GetDimensions() == (40, 44, 36)
        assert nodes.ijk_to_ras(volume) == pytest.approx(first)
    assert result.nodes.components.GetNumberOfRows() == len(result.detection.components)
    assert nodes.frame_note(result.nodes.score).startswith(
        "The views show frame 2 of 'follow-up browser', but the anomaly results are of frame 1")
    assert nodes.show_scored_frame(result.nodes.score) and browser.GetSelectedItemNumber() == 0
    assert result.nodes.score.GetTransformNodeID() is None
    segmentation = result.nodes.segmentation
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == proxy.GetID()
