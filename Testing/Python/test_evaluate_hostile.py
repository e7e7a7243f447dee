"""``evaluate`` with a researcher's own cases: healthy cases, several label values, repeated names, empty lists."""
from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyResearch.evaluate import evaluate_case, evaluate_files

SHAPE = (12, 12, 12)  # (z, y, x)


def write(array: np.ndarray, path: Path) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture
def cohort(tmp_path: Path) -> dict:
    """Maps as detect writes them (0 outside the brain): one with a lesion, one healthy; their brain mask and truth."""
    rng = np.random.default_rng(1)
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:10, 2:10] = True
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[4:7, 4:7, 4:7] = 1
    lesion_map = np.where(brain, rng.random(SHAPE), 0).astype(np.float32) + 0.3 * lesion
    healthy_map = np.where(brain, rng.random(SHAPE), 0).astype(np.float32)
    return {"lesion": write(lesion_map, tmp_path / "lesion.nii.gz"),
            "healthy": write(healthy_map, tmp_path / "healthy.nii.gz"),
            "gt": write(lesion, tmp_path / "gt.nii.gz"),
            "mask": write(brain.astype(np.uint8), tmp_path / "mask.nii.gz")}


def test_a_healthy_case_without_its_mask_is_said_to_lift_the_pooled_auroc(
        cohort: dict, caplog: pytest.LogCaptureFixture) -> None:
    """A healthy case evaluated without a mask pools its zero background (outside the brain) as healthy voxels ranked
    below every lesion: the pooled AUROC rose from 0.76 to 0.89 with nothing said (a lesion case is warned of)."""
    lesion = {"score": cohort["lesion"], "gt": cohort["gt"], "mask": cohort["mask"]}
    _, masked = evaluate_files([lesion, {"score": cohort["healthy"], "mask": cohort["mask"]}])
    assert "without a mask" not in caplog.text
    with caplog.at_level(logging.WARNING):
        _, unmasked = evaluate_files([lesion, {"score": cohort["healthy"], "name": "control"}])
    assert unmasked["auroc"] - masked["auroc"] > 0.1
    assert "control: evaluated without a mask" in caplog.text and "the pooled AUROC comes out higher" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # healthy cases alone: no pooled AUROC to lift
        evaluate_files([{"score": cohort["healthy"]}])
    assert "without a mask" not in caplog.text


def test_cases_are_named_apart_and_a_name_given_twice_is_refused(cohort: dict, tmp_path: Path) -> None:
    """Score maps of one file name in subjects' folders (sub-01/score.nii.gz, sub-02/score.nii.gz) were both named
    score.nii.gz in the metrics table, and two rows given one name were accepted: rows that cannot be told apart."""
    first = write(sitk.GetArrayFromImage(sitk.ReadImage(cohort["lesion"])), tmp_path / "sub-01" / "score.nii.gz")
    second = write(sitk.GetArrayFromImage(sitk.ReadImage(cohort["healthy"])), tmp_path / "sub-02" / "score.nii.gz")
    cases, _ = evaluate_files([{"score": first, "gt": cohort["gt"], "mask": cohort["mask"]},
                               {"score": second, "mask": cohort["mask"]}, {"score": cohort["healthy"]}])
    assert [c.name for c in cases] == ["sub-01/score.nii.gz", "sub-02/score.nii.gz", "healthy.nii.gz"]
    with pytest.raises(CeVAEError, match=r"^Two cases are named 'a' \(score maps .*sub-01.* and .*sub-02.*\)"):
        evaluate_files([{"score": first, "name": "a"}, {"score": second, "name": "a"}])
    with pytest.raises(CeVAEError, match="named 'pooled', the name of the metrics table's last row"):
        evaluate_files([{"score": first, "name": "pooled"}])


def test_a_name_given_twice_in_two_unicode_forms_is_refused(cohort: dict) -> None:
    """'café' typed with its accent as one character and as 'e' and a combining mark (a name copied from a macOS file
    name) gave two rows of the metrics table that read the same, while a name given twice is refused."""
    cases = [{"score": cohort["lesion"], "gt": cohort["gt"], "mask": cohort["mask"], "name": "caf\u00e9"},
             {"score": cohort["healthy"], "mask": cohort["mask"], "name": "cafe\u0301"}]
    with pytest.raises(CeVAEError, match=r"^Two cases are named 'cafe\u0301' \(score maps .*lesion.* and .*healthy"
                                         r".*, one name in two Unicode forms .*\): their rows of the metrics table"):
        evaluate_files(cases)


def test_a_truth_of_several_label_values_is_said_to_count_every_one_as_lesion(
        cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A truth labelled 1, 2 and 4 (lesion parts) was read as one lesion, every voxel above 0, with nothing said."""
    parts = sitk.GetArrayFromImage(sitk.ReadImage(cohort["gt"]))
    parts[4], parts[6] = 2 * parts[4], 4 * parts[6]
    case = {"score": cohort["lesion"], "mask": cohort["mask"]}
    with caplog.at_level(logging.INFO):
        binary, _ = evaluate_files([dict(case, gt=cohort["gt"], name="binary")])
        labelled, _ = evaluate_files([dict(case, gt=write(parts, tmp_path / "parts.nii.gz"), name="parts")])
    assert labelled[0].auroc == binary[0].auroc and labelled[0].n_positive == binary[0].n_positive == 27
    assert ("parts: the ground truth holds the label values 1, 2, 4; every voxel above 0 counts as lesion"
            in caplog.text)
    assert "binary: the ground truth holds" not in caplog.text


def test_a_truth_of_fractional_values_is_warned_of_with_its_counts_and_how_to_threshold_it(
        cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A probability map (or a lesion mask resampled linearly) as the truth counts every voxel above 0 as lesion, as
    documented: on a real case 2,337 voxels for 402 at 0.5 or more, the AUROC 0.717 for 0.998, said only at INFO
    among label values. It is warned of, naming the file and both counts, and how to threshold it."""
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(cohort["gt"])).astype(np.float32)
    halo = np.zeros_like(lesion)
    halo[3:8, 3:8, 3:8] = 0.2  # a 5^3 halo of 0.2 around the 3^3 core of 1
    probability = write(np.maximum(lesion, halo), tmp_path / "probability.nii.gz")
    with caplog.at_level(logging.WARNING):
        cases, _ = evaluate_files([{"score": cohort["lesion"], "mask": cohort["mask"], "gt": probability,
                                    "name": "p"}])
    assert cases[0].n_positive == 125  # the documented rule stays: every voxel above 0
    assert (f"p: the ground truth {probability} holds fractional values (a probability map, or a lesion mask "
            "resampled linearly): all 125 evaluated voxels above 0 count as lesion, 27 of them at 0.5 or more. To "
            "count only those, threshold it first (in SimpleITK: truth >= 0.5), or resample a lesion mask with "
            "nearest-neighbour interpolation.") in caplog.text
    assert len([r for r in caplog.records if "fractional" in r.getMessage()]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a binary truth and one of label values are not warned of
        evaluate_files([{"score": cohort["lesion"], "mask": cohort["mask"], "gt": cohort["gt"]}])
    assert "fractional" not in caplog.text


def test_a_cases_list_without_cases_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A cases CSV of a header alone failed with "No cases to pool metrics over.", which names neither the list nor
    what it lacks."""
    from CeVAEAnomalyLib.cli.main import main

    (tmp_path / "cases.csv").write_text("score,gt,mask\n\n")
    assert main(["evaluate", "--cases", str(tmp_path / "cases.csv"), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert f"The cases CSV {tmp_path / 'cases.csv'} lists no cases (no row with a score file)." in err
    assert not (tmp_path / "m.csv").exists()


def test_a_missing_case_file_is_named_by_its_line_before_any_case_is_read(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Paths in a cases CSV lead from its folder, which neither --help nor the error said: a list in lists/ naming
    lesion.nii.gz beside the current folder failed with "The score map lists/lesion.nii.gz does not exist.", with no
    line, and only once every earlier case had been read."""
    from CeVAEAnomalyLib.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cases.csv").write_text(f"score,gt,mask\n{cohort['lesion']},{cohort['gt']},{cohort['mask']}\n"
                                                  "healthy.nii.gz,,mask.nii.gz\n")
    with caplog.at_level(logging.INFO):  # (a case's log line reaches caplog, not capsys, under pytest)
        assert main(["evaluate", "--cases", "lists/cases.csv"]) == 2
    err = capsys.readouterr().err
    assert ("lists/cases.csv, line 3: the score map lists/healthy.nii.gz does not exist. Relative paths in the list "
            "are read from its folder, lists." in err)
    assert "Evaluated" not in caplog.text


def cases_list(tmp_path: Path, cohort: dict, last: str) -> Path:
    """A cases CSV of two good cases and a last one (``last``: its cells after the name)."""
    path = tmp_path / "cases.csv"
    path.write_text(f"name,score,gt,mask\none,{cohort['lesion']},{cohort['gt']},{cohort['mask']}\n"
                    f"two,{cohort['healthy']},,{cohort['mask']}\nthree,{last}\n")
    return path


def test_an_unreadable_case_file_is_refused_naming_its_case_and_line_before_any_case_is_scored(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A file that exists but is not an image (corrupt, another file's copy) was found only when its case was
    reached: the run then failed with nothing written, every case before it lost (1-2 s each at 1 mm), in a message
    that named the file but not the case nor its line."""
    from CeVAEAnomalyLib.cli.main import main

    broken = tmp_path / "broken_gt.nii.gz"
    broken.write_bytes(b"not an image, a note saved under the truth's name\n" * 20)
    cases = cases_list(tmp_path, cohort, f"{cohort['lesion']},{broken},{cohort['mask']}")
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--cases", str(cases), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert f"{cases}, line 4: case three (score map {cohort['lesion']}, ground truth {broken}" in err
    assert f"The ground truth file {broken} could not be read as an image" in err
    assert "Evaluated" not in caplog.text and not (tmp_path / "m.csv").exists()


def test_a_case_file_on_another_grid_is_refused_from_its_header_before_any_case_is_scored(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A mask of another grid (another subject's, or the scan's before resampling) was found when its case was
    scored, after every earlier case; the headers say it first."""
    from CeVAEAnomalyLib.cli.main import main

    mask = sitk.ReadImage(cohort["mask"])
    mask.SetOrigin((0.0, 0.0, 5.0))
    sitk.WriteImage(mask, str(tmp_path / "moved_mask.nii.gz"))
    cases = cases_list(tmp_path, cohort, f"{cohort['lesion']},{cohort['gt']},{tmp_path / 'moved_mask.nii.gz'}")
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--cases", str(cases)]) == 2
    err = capsys.readouterr().err
    assert (f"{cases}, line 4: case three (score map {cohort['lesion']}, ground truth {cohort['gt']}, mask "
            f"{tmp_path / 'moved_mask.nii.gz'}): The mask is not on the score map's voxel grid: origin (0, 0, 0) vs "
            "(0, 0, 5).") in err
    assert "Evaluated" not in caplog.text


def test_a_case_file_that_fails_only_when_read_is_refused_naming_its_case_and_line(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A compressed file cut short reads its header; reading its voxels fails, and that error named the file
    alone, not the case nor the line of the list."""
    from CeVAEAnomalyLib.cli.main import main

    image = sitk.GetImageFromArray(np.random.default_rng(2).random((60, 60, 60)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "full.nii"))
    cut = tmp_path / "cut_score.nii.gz"
    cut.write_bytes(gzip.compress((tmp_path / "full.nii").read_bytes())[:20000])
    cases = cases_list(tmp_path, cohort, f"{cut},,")
    assert main(["evaluate", "--cases", str(cases)]) == 2
    err = capsys.readouterr().err
    assert f"{cases}, line 4: case three (score map {cut}): The score map file {cut} is truncated or corrupt" in err


@pytest.mark.parametrize("role", ["mask", "labelmap"])
def test_an_image_or_score_map_as_the_mask_or_labelmap_is_refused(cohort: dict, tmp_path: Path, role: str) -> None:
    """The scan given as the brain mask made every voxel brain (> 0): the AUROC read 0.93 for 0.75 over the brain,
    with nothing said (detect refuses such a mask); a score map as the labelmap flagged the whole brain."""
    rng = np.random.default_rng(4)
    scan = write((rng.random(SHAPE) * 1000 + 1).astype(np.float32), tmp_path / "t1.nii.gz")
    dense_map = write(rng.random(SHAPE).astype(np.float32), tmp_path / "map.nii.gz")  # scored everywhere
    case = {"score": cohort["lesion"], "gt": cohort["gt"], "mask": cohort["mask"], "name": "c1"}
    for wrong in (scan, dense_map):
        with pytest.raises(CeVAEError, match=f"^Case c1 .*: The {'mask' if role == 'mask' else 'label map'} of c1 "
                                             "holds more than 1000 different values and no plateau: it looks like"):
            evaluate_files([dict(case, **{role: wrong})])
    evaluate_files([case, dict(case, labelmap=cohort["gt"], name="c2")])  # masks and labelmaps are read


def test_a_truth_without_lesion_voxels_is_a_healthy_case_as_no_truth_is(cohort: dict, tmp_path: Path) -> None:
    """A healthy case written with an all-zero truth gets the figures of one without a truth (no Dice at the labelmap,
    no slice AUROC: they would mix 0 or 1 into a mean over lesion cases), and says so."""
    empty = write(np.zeros(SHAPE, np.uint8), tmp_path / "empty_gt.nii.gz")
    flags = np.zeros(SHAPE, np.uint8)
    flags[3, 3, 3] = 1
    labelmap = write(flags, tmp_path / "labelmap.nii.gz")
    rows = [{"score": cohort["healthy"], "gt": gt, "mask": cohort["mask"], "labelmap": labelmap, "name": name}
            for gt, name in ((empty, "zero truth"), ("", "no truth"))]
    (zero,), (none,) = (evaluate_files([row])[0] for row in rows)
    assert (zero.dice_at_threshold, zero.slice_auroc) == (none.dice_at_threshold, none.slice_auroc) == (None, None)
    assert zero.flagged_ml == none.flagged_ml > 0 and zero.n_positive == 0


def test_a_case_listed_again_with_an_all_zero_truth_for_none_is_pooled_once(
        cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One healthy map listed with no truth and again with an all-zero one (or a lesion case with its truth copied to
    another file of the same lesion voxels) is one case: it was pooled twice (the pooled AUROC 0.7685 against the
    0.7642 of the case once), for only files of the same content in every role were taken as a repeat."""
    lesion = {"score": cohort["lesion"], "gt": cohort["gt"], "mask": cohort["mask"], "name": "lesion"}
    healthy = {"score": cohort["healthy"], "mask": cohort["mask"], "name": "healthy"}
    empty = write(np.zeros(SHAPE, np.uint8), tmp_path / "empty_gt.nii.gz")
    same_lesions = write(sitk.GetArrayFromImage(sitk.ReadImage(cohort["gt"])).astype(np.float32), tmp_path / "gt.nrrd")
    once_cases, once = evaluate_files([lesion, healthy])
    with caplog.at_level(logging.WARNING):
        cases, pooled = evaluate_files([lesion, healthy, dict(healthy, gt=empty, name="healthy again"),
                                        dict(lesion, gt=same_lesions, name="lesion again")])
    assert pooled == once and [c.name for c in cases] == [c.name for c in once_cases] == ["lesion", "healthy"]
    assert "healthy again repeats the case of healthy: the same score map, mask and labelmap, and no lesion voxel" \
        in caplog.text and "lesion again repeats the case of lesion: the same score map, mask and labelmap, and the " \
        "same lesion voxels; it is evaluated once" in caplog.text
    labelled = write(sitk.GetArrayFromImage(sitk.ReadImage(cohort["mask"])), tmp_path / "labelmap.nii.gz")
    assert len(evaluate_files([healthy, dict(healthy, labelmap=labelled, name="with its labelmap")])[0]) == 2


def test_a_healthy_case_of_an_all_zero_truth_without_its_mask_is_warned_of_the_pooled_auroc(
        cohort: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An all-zero truth makes a healthy case, as no truth does: without its mask it lifts the pooled AUROC as much,
    but it was warned that its own pixel and slice AUROC came out higher (it has neither) and not of the pooled one."""
    lesion = {"score": cohort["lesion"], "gt": cohort["gt"], "mask": cohort["mask"]}
    empty = write(np.zeros(SHAPE, np.uint8), tmp_path / "empty_gt.nii.gz")
    with caplog.at_level(logging.WARNING):
        _, none = evaluate_files([lesion, {"score": cohort["healthy"], "name": "control"}])
        said = caplog.text
        caplog.clear()
        _, zero = evaluate_files([lesion, {"score": cohort["healthy"], "gt": empty, "name": "control"}])
    assert zero["auroc"] == none["auroc"]
    assert "control: evaluated without a mask" in caplog.text and "the pooled AUROC comes out higher" in caplog.text
    assert "pixel and slice AUROC" not in caplog.text and caplog.text.count("without a mask") == said.count(
        "without a mask") == 1


def test_one_score_map_against_two_truths_is_refused_naming_what_differs_and_evaluated_once_named(
        cohort: dict, tmp_path: Path) -> None:
    """The same map against two raters' truths makes two cases of one default name: the refusal named the one score
    map twice ("score maps X and X"), not what tells the cases apart."""
    other = sitk.GetArrayFromImage(sitk.ReadImage(cohort["gt"]))
    other[4] = 0
    second = write(other, tmp_path / "rater2.nii.gz")
    rows = [{"score": cohort["lesion"], "gt": gt, "mask": cohort["mask"]} for gt in (cohort["gt"], second)]
    with pytest.raises(CeVAEError, match=r"^Two cases are named 'lesion\.nii\.gz' \(both of the score map "
                                         rf"{re.escape(cohort['lesion'])}, with another ground truth\): their rows"):
        evaluate_files(rows)
    cases, _ = evaluate_files([dict(row, name=name) for row, name in zip(rows, ("rater 1", "rater 2"))])
    assert [(c.name, c.n_positive) for c in cases] == [("rater 1", 27), ("rater 2", 18)]


def test_a_missing_case_file_given_by_an_absolute_path_is_not_said_to_be_read_from_the_lists_folder(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only relative paths lead from the list's folder: an absolute one that does not exist was told "Relative paths
    in the list are read from its folder", a reason that was not its."""
    from CeVAEAnomalyLib.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lists").mkdir()
    gone = tmp_path / "elsewhere" / "healthy.nii.gz"
    (tmp_path / "lists" / "cases.csv").write_text(f"score,mask\n{gone},{cohort['mask']}\n")
    assert main(["evaluate", "--cases", "lists/cases.csv"]) == 2
    err = capsys.readouterr().err
    assert f"lists/cases.csv, line 2: the score map {gone} does not exist." in err and "Relative paths" not in err


def test_a_tab_separated_cases_list_is_read_as_its_metrics_table_is_written(
        cohort: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """evaluate writes its metrics tab-separated under a .tsv name, but refused a cases list so named and written so
    ("Its columns are separated by tabs; separate them with commas"); a .tsv list of commas is told to be renamed."""
    from CeVAEAnomalyLib.cli.main import main

    (tmp_path / "cases.tsv").write_text(f"score\tgt\tmask\n{cohort['lesion']}\t{cohort['gt']}\t{cohort['mask']}\n")
    (tmp_path / "cases.csv").write_text(f"score,gt,mask\n{cohort['lesion']},{cohort['gt']},{cohort['mask']}\n")
    for name in ("cases.tsv", "cases.csv"):
        assert main(["evaluate", "--cases", str(tmp_path / name), "--out", str(tmp_path / f"{name}.metrics.tsv")]) == 0
    assert (tmp_path / "cases.tsv.metrics.tsv").read_text() == (tmp_path / "cases.csv.metrics.tsv").read_text()
    (tmp_path / "commas.tsv").write_text((tmp_path / "cases.csv").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--cases", str(tmp_path / "commas.tsv")]) == 2
    err = capsys.readouterr().err
    assert "Its columns are separated by commas; separate them with tabs, or name the file .csv." in err


def test_infinite_scores_are_refused_as_their_best_threshold_could_not_be_given_to_detect(
        cohort: dict, tmp_path: Path) -> None:
    """A map scoring its lesion inf got best_threshold 'inf' in the metrics table, written for reuse as detect
    --threshold, where inf is an empty labelmap (and -inf is refused)."""
    truth = sitk.GetArrayFromImage(sitk.ReadImage(cohort["gt"])) > 0
    for value in (np.inf, -np.inf):
        scores = sitk.GetArrayFromImage(sitk.ReadImage(cohort["lesion"]))
        scores[truth] = value
        case = {"score": write(scores, tmp_path / "inf.nii.gz"), "gt": cohort["gt"], "mask": cohort["mask"]}
        with pytest.raises(CeVAEError, match=r"^Case inf\.nii\.gz \(.*\): The score map of inf\.nii\.gz contains "
                                             r"infinite values inside the evaluated voxels .*--threshold takes for an "
                                             r"empty labelmap; replace them with finite values first\.$"):
            evaluate_files([case])
    scores = sitk.GetArrayFromImage(sitk.ReadImage(cohort["lesion"]))
    scores[~sitk.GetArrayFromImage(sitk.ReadImage(cohort["mask"])).astype(bool)] = np.inf  # outside the mask: unread
    assert evaluate_files([dict(case, score=write(scores, tmp_path / "outside.nii.gz"))])[1]["n_positive"] == 27


def test_a_mask_that_detect_takes_as_on_the_scans_grid_is_taken_and_a_refusal_shows_the_difference(
        cohort: dict, tmp_path: Path) -> None:
    """A brain mask whose origin lies 0.0004 mm off the scan's (headers that round their numbers) is on the scan's
    grid for detect, which used it as it is, but evaluate refused the same mask with the score map detect wrote:
    "origin (90, 125, -71) vs (90, 125, -71)", two texts alike."""
    from CeVAEAnomalyLib.io.images import same_grid

    def placed(path: str, origin: tuple) -> sitk.Image:
        image = sitk.ReadImage(path)
        image.SetOrigin(origin)
        return image

    score, truth = placed(cohort["lesion"], (90.0, 125.0, -71.0)), placed(cohort["gt"], (90.0, 125.0, -71.0))
    rounded = placed(cohort["mask"], (90.0, 125.0004, -71.0))
    assert same_grid(rounded, score)  # detect takes it as the scan's mask, not resampled
    assert evaluate_case(score, truth, rounded).n_positive == 27
    shifted = placed(cohort["mask"], (90.0, 125.01, -71.0))
    with pytest.raises(CeVAEError, match="not on the score map's voxel grid") as refused:
        evaluate_case(score, truth, shifted)
    first, second = re.search(r"origin (\(.*\)) vs (\(.*\))\.", str(refused.value)).groups()
    assert first == "(90, 125, -71)" and second != first


def test_a_segmentation_saved_in_layers_as_the_truth_is_told_to_be_exported_to_one_labelmap(
        cohort: dict, tmp_path: Path) -> None:
    """Slicer saves a segmentation whose segments overlap (a lesion and its oedema) in layers, one per voxel component
    of its .seg.nrrd: given as the truth it was refused as "a colour or vector image; a single-channel MRI volume is
    needed", which says neither what the file is nor what to give."""
    lesion = sitk.ReadImage(cohort["gt"])
    layers = sitk.Compose(lesion, sitk.BinaryDilate(lesion, [1, 1, 1]))
    for key, value in (("Segment0_Layer", "0"), ("Segment1_Layer", "1")):
        layers.SetMetaData(key, value)
    sitk.WriteImage(layers, str(tmp_path / "truth.seg.nrrd"), True)
    case = {"score": cohort["lesion"], "gt": str(tmp_path / "truth.seg.nrrd"), "mask": cohort["mask"]}
    with pytest.raises(CeVAEError, match=r"^Case lesion\.nii\.gz \(.*\): The ground truth \S*/truth\.seg\.nrrd is a "
                                         r"segmentation saved in 2 layers \(segments that overlap\); export its "
                                         r"segments to one labelmap first"):
        evaluate_files([case])


def test_a_brain_mask_shared_by_many_cases_is_hashed_once(tmp_path):
    """Every case's files were hashed to find repeated cases, a mask shared by a cohort once per case (a 1 mm mask
    read 100 times for 100 cases); each file is hashed once now. Counted by the opens of sha256_of (audit events)."""
    import sys

    rng = np.random.default_rng(0)
    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((24, 24, 24), np.uint8)), str(mask))
    rows = []
    for i in range(4):
        score = tmp_path / f"score{i}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(rng.random((24, 24, 24)).astype(np.float32)), str(score))
        rows.append({"score": str(score), "mask": str(mask), "name": f"c{i}"})
    opened = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and str(args[0]) == str(mask) and _inside("sha256_of"):
            opened.append(args[0])

    sys.addaudithook(hook)  # (a hook stays for the process: it counts this file only)
    evaluate_files(rows)
    assert len(opened) == 1, opened


def _inside(function: str) -> bool:
    """Whether a frame of the calling stack runs ``function``."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False
