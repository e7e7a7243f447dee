"""The result module: a detection's types, tables and hand-over folder, without torch."""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.result import (
    Component,
    DetectionRecord,
    DetectionResult,
    ModelRecord,
    SliceScoreRow,
    components_csv,
    load_result,
    result_files,
    save_result,
    slice_scores_csv,
)


def small_result() -> DetectionResult:
    score = sitk.GetImageFromArray(np.linspace(0, 2, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    score.SetSpacing((1.0, 1.5, 2.0))
    score.SetOrigin((-3.0, 4.0, 5.0))
    labelmap = sitk.Cast(score > 1.5, sitk.sitkUInt8)
    brain = sitk.Cast(score >= 0, sitk.sitkUInt8)
    rows = [SliceScoreRow(2, k, 0.1 * k, 1.0, 2.0 + k, anomaly=k / 3, map_max=0.5 * k, flagged=k == 3)
            for k in range(4)]
    comps = [Component(1, 20, 0.06, 2.0, 1.75, (1.0, -2.0, 3.5), (2.0, 2.5, 5.0))]
    return DetectionResult(score, labelmap, brain, 1.5, "absolute", rows, comps, small_record())


def small_record() -> DetectionRecord:
    from CeVAEAnomalyLib.options import PostprocessOptions, ScoreOptions

    model = ModelRecord("site", "T1", "/models/site.cevae", "ab" * 32, "site scans: each scored by a fold model",
                        {"name": "base", "file": "base.cevae", "sha256": "cd" * 32})
    return DetectionRecord("cevae-anomaly", "0.1.0", model, 1.5, "absolute", ScoreOptions().to_dict(),
                           PostprocessOptions(rim_mm=2.0).to_dict(), "cpu", False, 64, "given", {"torch": "2.0"},
                           ("scan: The brain mask covers only 5.0 ml", "another"), "2025-01-02T03:04:05Z")


def test_saved_result_reads_back_equal(tmp_path):
    result = small_result()
    save_result(result, tmp_path)
    back = load_result(tmp_path)
    for name in ("score", "labelmap", "brain_mask"):
        a, b = getattr(result, name), getattr(back, name)
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert (back.threshold, back.threshold_source) == (1.5, "absolute")
    assert back.slices == result.slices and back.components == result.components
    assert back.top_slice.index == 3 and back.components[0].centroid_ras == (-1.0, 2.0, 3.5)
    assert back.record == result.record  # the Slicer module names the model and options on the result nodes


def test_a_result_without_a_record_reads_back_without_one(tmp_path):
    import dataclasses

    save_result(dataclasses.replace(small_result(), record=None), tmp_path)
    assert load_result(tmp_path).record is None


def test_a_result_with_non_finite_numbers_is_standard_json_and_reads_back(tmp_path):
    """A threshold of inf (nothing labelled) and a NaN slice score: no Infinity or NaN tokens in the file, which
    parsers other than Python's refuse; read back as the numbers they were."""
    import dataclasses
    import json
    import math

    result = small_result()
    result = dataclasses.replace(result, threshold=math.inf, slices=[dataclasses.replace(result.slices[0], kl=math.nan),
                                                                     *result.slices[1:]],
                                 record=dataclasses.replace(result.record, threshold=math.inf))
    save_result(result, tmp_path)

    def refuse(token):
        raise ValueError(f"non-standard token {token}")

    json.loads((tmp_path / "detection.json").read_text(), parse_constant=refuse)
    back = load_result(tmp_path)
    assert back.threshold == math.inf and math.isnan(back.slices[0].kl) and back.slices[1:] == result.slices[1:]
    assert back.record.threshold == math.inf


def test_tables_list_the_most_anomalous_slice_first(tmp_path):
    result = small_result()
    table = slice_scores_csv(result)
    rows = table.splitlines()
    assert rows[0] == "axis,index,anomaly,kl,rec,neg_elbo,map_max,flagged" and rows[1].startswith("2,3,1,")
    header, first = components_csv(result).splitlines()[:2]
    assert header == "component,voxels,volume_ml,summed_score,max_score,mean_score,r,a,s,peak_r,peak_a,peak_s,side"
    assert first == "1,20,0.0600,35,2,1.75,-1.00,2.00,3.50,-2.00,-2.50,5.00,"  # summed score: mean 1.75 x 20 voxels
    # (its side not known: made without a plane)
    files = result_files(result, {"slices": tmp_path / "s.csv", "components": None, "score": tmp_path / "a.nrrd"})
    assert set(files) == {tmp_path / "s.csv", tmp_path / "a.nrrd"} and files[tmp_path / "s.csv"] == table


def test_reading_a_workers_result_leaves_torch_unloaded(tmp_path):
    """The Slicer GUI process reads a worker's result: that must not import torch (about 1.4 s)."""
    save_result(small_result(), tmp_path)
    code = ("import sys; from CeVAEAnomalyLib.result import load_result; "
            f"r = load_result(__import__('pathlib').Path({str(tmp_path)!r})); "
            "print(len(r.components), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1", "False"]


def test_hand_over_images_are_checked_from_their_headers(tmp_path, monkeypatch):
    """The worker's images are raw NRRD, checked complete by their size against the header (no voxel read);
    a file cut short is refused; a compressed NRRD is decompressed to the end of its stream, without ITK's reader."""
    from CeVAEAnomalyLib.io.verify import incomplete_reason

    save_result(small_result(), tmp_path)
    score = tmp_path / "score.nrrd"
    assert b"encoding: raw" in score.read_bytes()[:400]
    reads = []
    real_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    assert incomplete_reason(score, score) is None and reads == []
    short = tmp_path / "short.nrrd"
    short.write_bytes(score.read_bytes()[:-4])
    assert "bytes its header announces" in incomplete_reason(short, short) and reads == []
    packed = tmp_path / "packed.nrrd"
    sitk.WriteImage(small_result().score, str(packed), True)
    assert incomplete_reason(packed, packed) is None and reads == []


def test_the_workers_protocol_lines_are_standard_json(capsys):
    """The worker's "done" line of a detection with a threshold of inf: one JSON object per line, as documented,
    with no Infinity token."""
    import json
    import math

    from CeVAEAnomalyLib.slicer.worker import _emit

    def refuse(token):
        raise ValueError(f"non-standard token {token}")

    _emit({"done": {"components": 0, "threshold": math.inf}})
    line = capsys.readouterr().out
    assert json.loads(line, parse_constant=refuse) == {"done": {"components": 0, "threshold": "inf"}}


def test_a_damaged_hand_over_is_refused_in_one_line(tmp_path):
    """detection.json of another version, a field of the wrong type or missing, images off the score map's grid:
    refused by load_result, before the scene (or a summary line) uses them."""
    import json

    import pytest

    from CeVAEAnomalyLib.errors import CeVAEError

    def component(**change):
        return lambda s: s["components"][0].update(change)

    def slice_row(drop):
        return lambda s: s["slices"][0].pop(drop)

    edits = {
        "format_version 99": (lambda s: s.update(format_version=99), "format version 99"),
        "no format version": (lambda s: s.pop("format_version"), "format version None"),
        "threshold null": (lambda s: s.update(threshold=None), "threshold None"),
        "threshold as text": (lambda s: s.update(threshold="4.2"), "threshold '4.2'"),
        "volume as text": (component(volume_ml="big"), "component 1: volume_ml 'big' is not of its type"),
        "a fraction of a voxel": (component(voxels=5.5), "component 1: voxels 5.5"),
        "two-number centroid": (component(centroid_lps=[1.0, 2.0]), "component 1: centroid_lps"),
        "flagged as text": (lambda s: s["slices"][0].update(flagged="no"), "slice row 1: flagged 'no'"),
        "a slice field missing": (slice_row("map_max"), "slice row 1 does not hold the fields"),
        "components not a list": (lambda s: s.update(components={}), "'components' is not a list"),
        "no record": (lambda s: s.pop("record"), "it holds no 'record'"),
        "a record field missing": (lambda s: s["record"].pop("device"), "the record does not hold the fields"),
        "record threshold as text": (lambda s: s["record"].update(threshold="1.5"), "record's threshold '1.5'"),
        "model sha256 a number": (lambda s: s["record"]["model"].update(sha256=5), "record's model sha256 5"),
        "model name null": (lambda s: s["record"]["model"].update(name=None), "record's model name None"),
        "recalibrated from a name": (lambda s: s["record"]["model"].update(recalibrated_from="base"),
                                     "record's model recalibrated_from 'base' is not a model's name, file and sha256"),
        "warnings as text": (lambda s: s["record"].update(warnings="none"), "record's warnings are not a list"),
        "amp as text": (lambda s: s["record"].update(amp="no"), "record's amp 'no'"),
        "mask neither": (lambda s: s["record"].update(mask="partly"), "record's mask 'partly' is not"),
        "versions as text": (lambda s: s["record"].update(software="torch 2"), "record's software 'torch 2'"),
        "no slices per pass": (lambda s: s["record"].update(batch_size=0), "record's batch_size 0 is not"),
        "an unknown option": (lambda s: s["record"]["score_options"].update(speed=1),
                              "record's score_options does not"),
        "an option out of range": (lambda s: s["record"]["postprocess"].update(rim_mm=-1.0), "rim_mm (--rim-mm) must"),
        "an input without sha256": (lambda s: s["record"].update(inputs={"image": {"path": "a"}}),
                                    "record's inputs are not files"),
    }
    for name, (edit, message) in edits.items():
        folder = tmp_path / name.replace(" ", "_")
        save_result(small_result(), folder)
        summary = json.loads((folder / "detection.json").read_text())
        edit(summary)
        (folder / "detection.json").write_text(json.dumps(summary))
        with pytest.raises(CeVAEError, match="could not be read") as err:
            load_result(folder)
        assert message in str(err.value) and "\n" not in str(err.value), (name, err.value)

    def moved(labelmap):
        labelmap.SetOrigin((40.0, 0.0, 0.0))
        return labelmap

    for name, image, message in (
            ("moved", moved, "the labelmap is not on the score map's grid"),
            ("float", lambda lm: sitk.Cast(lm, sitk.sitkFloat32), "the labelmap holds 32-bit float, not labels")):
        folder = tmp_path / name
        save_result(small_result(), folder)
        labelmap = sitk.ReadImage(str(folder / "labelmap.nrrd"))
        sitk.WriteImage(image(labelmap), str(folder / "labelmap.nrrd"))
        with pytest.raises(CeVAEError, match=message):
            load_result(folder)


def test_a_result_folder_may_be_given_as_text(tmp_path):
    """save_result(result, "out") raised TypeError ('str' / 'str'), and load_result("out") was refused as a folder that
    "could not be read (unsupported operand type(s) for /)": a folder as a researcher types it."""
    import pytest

    from CeVAEAnomalyLib.errors import CeVAEError

    save_result(small_result(), str(tmp_path / "out"))
    assert load_result(str(tmp_path / "out")).components == small_result().components
    with pytest.raises(CeVAEError, match=r"The result folder must be a path \(a str or pathlib.Path\), got int"):
        load_result(3)


def test_a_result_shows_as_one_line_at_the_console():
    """The dataclass repr listed every slice row, component and image proxy: about 18,000 characters for a 2 mm scan,
    which is what typing ``result`` at a console printed."""
    assert repr(small_result()) == ("<DetectionResult on 6x5x4 voxels: 1 component(s), 0.06 ml flagged, 4 slice "
                                    "row(s); threshold 1.5 (absolute)>")


def test_saving_over_files_in_the_folder_is_refused_unless_asked(tmp_path):
    """save_result wrote over score.nrrd (and the other result names) in any folder it was given: a scan of that
    name, or an earlier result, was replaced without a word. Existing files are now kept unless overwrite=True."""
    import dataclasses

    scan = tmp_path / "score.nrrd"
    scan.write_bytes(b"the user's own file")
    with pytest.raises(CeVAEError, match=r"holds score\.nrrd already; pass overwrite=True to replace"):
        save_result(small_result(), tmp_path)
    assert scan.read_bytes() == b"the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == ["score.nrrd"]
    save_result(dataclasses.replace(small_result(), threshold=2.5), tmp_path, overwrite=True)
    assert load_result(tmp_path).threshold == 2.5


def test_a_flagged_volume_under_0_005_ml_is_not_shown_as_0_00_ml():
    """With --min-volume below 5 mm³ a 3-voxel component of 1 mm voxels (0.003 ml) was summed up as "1 component(s),
    0.00 ml flagged" (detect's log, the result's repr, Slicer's status line) while its table row said 0.0030."""
    import dataclasses

    from CeVAEAnomalyLib.result import flagged_text

    tiny = small_result()
    tiny.components = [dataclasses.replace(tiny.components[0], voxels=3, volume_ml=0.003)]
    assert "1 component(s), 0.003 ml flagged" in repr(tiny)
    assert [flagged_text(ml) for ml in (0.0, 0.003, 0.0004, 0.00003, 0.06, 1.556, 12.0)] == [
        "0.00", "0.003", "0.0004", "0.00003", "0.06", "1.56", "12.00"]  # (never 3e-05: one voxel of 0.3 mm)


def test_a_result_saved_before_the_record_held_batch_size_mask_and_software_reads_back(tmp_path):
    """A detection.json of an earlier version (its record without batch_size, mask and software, e.g. a Slicer
    worker's hand-over folder or a result saved with save_result) still reads: those fields read as not recorded
    (None, None, {}), the rest as written."""
    import dataclasses
    import json

    result = small_result()
    save_result(result, tmp_path)
    summary = json.loads((tmp_path / "detection.json").read_text())
    for key in ("batch_size", "mask", "software", "image_voxels_sha256", "mask_voxels_sha256"):
        del summary["record"][key]
    summary["format_version"] = 2  # as the previous version wrote it
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    back = load_result(tmp_path).record
    assert (back.batch_size, back.mask, back.software) == (None, None, {})
    assert back == dataclasses.replace(result.record, batch_size=None, mask=None, software={})


def test_a_result_saved_before_the_record_held_the_voxel_digests_reads_back_and_a_new_one_says_its_version(tmp_path):
    """The record gained image_voxels_sha256 and mask_voxels_sha256 (the digests of the images scored, also where
    they were given in memory): a result folder is format 4 (or later) now, which a version that reads 3 refuses by
    its version, not as damaged; a format-3 folder (a Slicer worker's hand-over, save_result) still reads, those as
    None."""
    import dataclasses
    import json

    result = small_result()
    result.record = dataclasses.replace(result.record, image_voxels_sha256="a" * 64, mask_voxels_sha256=None)
    save_result(result, tmp_path)
    summary = json.loads((tmp_path / "detection.json").read_text())
    assert summary["format_version"] >= 4 and summary["record"]["image_voxels_sha256"] == "a" * 64
    assert load_result(tmp_path).record == result.record
    for key in ("image_voxels_sha256", "mask_voxels_sha256"):
        del summary["record"][key]
    summary["format_version"] = 3  # as the previous version wrote it
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    back = load_result(tmp_path).record
    assert back == dataclasses.replace(result.record, image_voxels_sha256=None)
    summary["record"]["image_voxels_sha256"] = "not a digest"
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    with pytest.raises(CeVAEError, match=r"image_voxels_sha256 'not a digest' is not a SHA-256 digest"):
        load_result(tmp_path)


def test_a_result_saved_before_results_held_a_record_reads_back_without_one(tmp_path):
    """A result folder of format 1 (save_result from 2026-12-05 to 2026-12-06, e.g. 9bbcbbb: no record, components
    without peak_lps) reads as written, without a record, as it did then; it used to be refused as 'could not be read
    (format version 1, not 4)', saying nothing of what to do."""
    import dataclasses
    import json

    result = small_result()
    save_result(result, tmp_path)
    summary = json.loads((tmp_path / "detection.json").read_text())
    del summary["record"]
    for component in summary["components"]:
        del component["peak_lps"]
    summary["format_version"] = 1  # as 9bbcbbb wrote it
    (tmp_path / "detection.json").write_text(json.dumps(summary))
    back = load_result(tmp_path)
    assert back.record is None and (back.threshold, back.threshold_source) == (1.5, "absolute")
    assert back.slices == result.slices
    assert back.components == [dataclasses.replace(c, peak_lps=None) for c in result.components]
    for name in ("score", "labelmap", "brain_mask"):
        assert np.array_equal(sitk.GetArrayFromImage(getattr(back, name)),
                              sitk.GetArrayFromImage(getattr(result, name)))
