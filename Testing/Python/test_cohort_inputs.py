"""How train, prepare, calibrate, adapt and batch read a cohort's volumes, brain masks and persons."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib.cli.main import main

SIZE = (24, 26, 22)


def write(folder: Path, *names: str, seed: int = 1) -> None:
    """A synthetic head (names without 'mask') or its brain mask (names with it) under each of ``names``."""
    image, mask = make_head(size=SIZE, seed=seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(mask if "mask" in name.lower() else image, str(folder / name))


def read(*paths: Path) -> List[Tuple[str, Optional[str]]]:
    """The (image, mask) file names the cohort commands take from ``paths`` (files or folders)."""
    from CeVAEAnomalyLib.cli.commands import _healthy_subjects

    subjects = _healthy_subjects(argparse.Namespace(manifest=None, images=list(paths)))
    return sorted((s.image.name, s.mask.name if s.mask else None) for s in subjects)


def test_prepare_counts_volumes_not_subjects(tmp_path, caplog):
    """Its summary said "3 subject(s)" for three sessions of one person: it counts volumes."""
    for i in (1, 2, 3):
        write(tmp_path / "in", f"sub-01_ses-{i}_T1w.nii.gz", f"sub-01_ses-{i}_T1w_mask.nii.gz", seed=i)
    with caplog.at_level(logging.INFO):
        assert main(["prepare", str(tmp_path / "in"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "3 volume(s), 3 preprocessed now and 0 found ready" in caplog.text
    assert "subject" not in caplog.text


def test_fsl_names_give_one_volume_with_its_brain_mask(tmp_path, caplog):
    """FSL's bet writes NAME_brain (the skull-stripped scan) and NAME_brain_mask beside NAME: NAME_brain was a
    second person, with NAME's mask, and NAME got the automatic one; without NAME_brain the mask was ignored."""
    from CeVAEAnomalyLib.cli.batch import collect_inputs

    write(tmp_path / "fsl", "s1.nii.gz", "s1_brain.nii.gz", "s1_brain_mask.nii.gz")
    with caplog.at_level(logging.WARNING):
        assert read(tmp_path / "fsl") == [("s1.nii.gz", "s1_brain_mask.nii.gz")]
    assert "s1_brain.nii.gz in" in caplog.text and "is taken for the skull-stripped copy of s1.nii.gz" in caplog.text
    assert read(*sorted((tmp_path / "fsl").iterdir())) == [("s1.nii.gz", "s1_brain_mask.nii.gz")]
    assert [(i.name, i.mask.name) for i in collect_inputs(tmp_path / "fsl")] == [("s1", "s1_brain_mask.nii.gz")]
    write(tmp_path / "whole", "s2.nii.gz", "s2_brain_mask.nii.gz")
    assert read(tmp_path / "whole") == [("s2.nii.gz", "s2_brain_mask.nii.gz")]
    write(tmp_path / "stripped", "s3_brain.nii.gz", "s3_brain_mask.nii.gz")  # the skull-stripped scan alone
    assert read(tmp_path / "stripped") == [("s3_brain.nii.gz", "s3_brain_mask.nii.gz")]


def test_a_mask_that_two_contrast_tagged_images_may_own_is_refused_naming_both(tmp_path):
    """With NAME_t1 and NAME_t1w beside it, NAME_brainmask was ignored as having "no matching image" (and both got
    the automatic mask): which one it belongs to would be a guess, so it is asked."""
    from CeVAEAnomalyLib.cli.batch import collect_folder
    from CeVAEAnomalyLib.errors import CeVAEError

    write(tmp_path, "two_t1.nii.gz", "two_T1w.nii.gz", "two_brainmask.nii.gz")
    said = "two_brainmask.nii.gz .* may be the brain mask of two_T1w.nii.gz or of two_t1.nii.gz; name it after"
    with pytest.raises(CeVAEError, match=said):
        collect_folder(tmp_path)
    with pytest.raises(CeVAEError, match=said):
        read(*sorted(tmp_path.iterdir()))
    (tmp_path / "two_brainmask.nii.gz").rename(tmp_path / "two_t1_brainmask.nii.gz")
    assert read(tmp_path) == [("two_T1w.nii.gz", None), ("two_t1.nii.gz", "two_t1_brainmask.nii.gz")]


def test_a_folder_per_person_with_a_bare_mask_name_gives_its_image_that_mask(tmp_path):
    """A folder per person holding t1.nii.gz and mask.nii.gz: the mask was read as a second image (and failed as
    one, or trained as a scan); a bare mask name is the brain mask of the one image beside it."""
    from CeVAEAnomalyLib.cli.batch import collect_inputs
    from CeVAEAnomalyLib.errors import CeVAEError

    write(tmp_path, "p1/t1.nii.gz", "p1/mask.nii.gz", "p2/T1w.nrrd", "p2/Brain_Mask.nrrd", "p3/t1.nii.gz",
          "p3/brainmask.nii.gz")
    expected = [("T1w.nrrd", "Brain_Mask.nrrd"), ("t1.nii.gz", "brainmask.nii.gz"), ("t1.nii.gz", "mask.nii.gz")]
    assert read(tmp_path / "p1", tmp_path / "p2", tmp_path / "p3") == expected
    assert read(*sorted(tmp_path.glob("p*/*"))) == expected
    assert [(i.image.name, i.mask.name) for i in collect_inputs(tmp_path / "p1")] == [("t1.nii.gz", "mask.nii.gz")]
    write(tmp_path, "p1/t2.nii.gz")  # two images: whose mask it is would be a guess
    with pytest.raises(CeVAEError, match="mask.nii.gz in .*p1 may be the brain mask of t1.nii.gz or of t2.nii.gz"):
        read(tmp_path / "p1")


def test_a_person_is_the_same_with_or_without_bids_sub_prefix_and_in_any_case(tmp_path):
    """A manifest's subject "sub-01", a BIDS file name's "01" and a subject "Sub-01" were three persons: train held
    one person's sessions out on both sides of its split."""
    from CeVAEAnomalyLib.io.manifest import Subject, read_manifest
    from CeVAEAnomalyLib.training.data import person_groups

    write(tmp_path, "a.nii.gz", "sub-01_ses-2_T1w.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz")
    (tmp_path / "m.csv").write_text("image,subject\na.nii.gz,sub-01\nsub-01_ses-2_T1w.nii.gz,\nb.nii.gz,Sub-01\n"
                                    "c.nii.gz,02\nd.nii.gz,sub-2\n")
    subjects = read_manifest(tmp_path / "m.csv")
    assert person_groups(subjects) == [[0, 1, 2], [3], [4]]  # 02 and 2 stay two labels
    assert Subject(Path("sub-AB_T1w.nii.gz")).group == Subject(Path("x.nii.gz"), person="ab").group
    assert Subject(Path("sub-cortical.nii.gz")).group == ("image", "sub-cortical.nii.gz")  # not a BIDS name


def test_the_naming_rule_said_for_a_mask_without_an_image_and_in_the_help_names_every_kind_of_mask(tmp_path, caplog):
    """The warning of a mask without its image, and the --help of the cohort commands and of batch, gave the rule as it
    was before FSL's NAME_brain_mask, NAME_brain and bare mask names were read: a user followed a rule that left out
    what the commands take."""
    import re

    from CeVAEAnomalyLib.cli.main import build_parser

    write(tmp_path, "s1.nii.gz", "s2_brain_mask.nii.gz")
    with caplog.at_level(logging.WARNING):
        assert read(tmp_path) == [("s1.nii.gz", None)]
    said = next(r.getMessage() for r in caplog.records if "has no matching image" in r.getMessage())
    commands = build_parser()._subparsers._group_actions[0].choices
    helps = [re.sub(r"\s+", " ", commands[c].format_help())
             for c in ("train", "prepare", "calibrate", "adapt", "batch")]
    for text in (said, *helps):
        assert all(name in text for name in ("NAME_mask", "NAME_brainmask", "NAME_brain_mask", "NAME_t1", "NAME_brain.",
                                             "bare mask.*")), text
    info = re.sub(r"\s+", " ", commands["info"].format_help())
    assert "whether it is a calibrated copy of another model" in info  # as README says info tells


def test_a_copy_calibrated_on_a_folder_per_person_names_each_scan_by_its_folder(tiny_bundle, tmp_path, capsys):
    """calibrate on cohort/*/ (the layout the README recommends, each person's scan t1.nii.gz) recorded its scans as
    "t1, t1", which told a user nothing; as train and adapt name their volumes, a repeated stem is led by its folder."""
    import json

    from CeVAEAnomalyLib.engine.header import read_header

    write(tmp_path / "cohort", "sub-01/t1.nii.gz", "sub-01/mask.nii.gz")
    write(tmp_path / "cohort", "sub-02/t1.nii.gz", "sub-02/mask.nii.gz", seed=2)
    out = tmp_path / "site.cevae"
    assert main(["calibrate", str(tmp_path / "cohort" / "sub-01"), str(tmp_path / "cohort" / "sub-02"), "--model",
                 str(tiny_bundle), "--out", str(out), "--device", "cpu"]) == 0
    header = read_header(out)
    assert header.extra["calibration_subjects"] == ["sub-01/t1", "sub-02/t1"]
    assert [s["name"] for s in header.extra["recalibration"]["scans"]] == ["sub-01/t1", "sub-02/t1"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "on 2 healthy scans (sub-01/t1, sub-02/t1;" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["scan_names"] == ["sub-01/t1", "sub-02/t1"]


def test_a_cohort_folder_says_which_of_its_subfolders_hold_scans_it_does_not_read(tmp_path, caplog):
    """A site folder of image files with a DICOM series folder or a person's folder inside: the scans in the
    subfolders were left out of training without a word (a cohort of 3 scans trained on 1)."""
    from test_dicom_series import write_series

    write(tmp_path / "site", "s1.nii.gz", "s1_mask.nii.gz", "p2/t1.nii.gz", "p2/mask.nii.gz")
    write_series(sitk.Cast(make_head(size=SIZE)[0], sitk.sitkInt16), tmp_path / "site" / "SE0003")
    (tmp_path / "site" / "notes").mkdir()
    (tmp_path / "site" / "notes" / "readme.txt").write_text("no scans here")
    with caplog.at_level(logging.WARNING):
        assert read(tmp_path / "site") == [("s1.nii.gz", "s1_mask.nii.gz")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{tmp_path / 'site'}: its subfolder(s) SE0003, p2 hold scans that are not read (subfolders "
                        "are not searched); to use them for training too, give those folders as well (a DICOM series "
                        "folder is one scan) or list every scan in a --manifest CSV."]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a folder without subfolders of scans: nothing to say
        assert read(tmp_path / "site" / "p2") == [("t1.nii.gz", "mask.nii.gz")]
    assert not caplog.records


def test_a_volume_that_cannot_be_sliced_is_named_by_its_path_in_a_cohort_of_one_file_name(tmp_path, capsys):
    """In a BIDS-like cohort every person's scan is T1w.nii.gz; a 2D one was refused as "The image T1w.nii.gz is
    2D", which did not say whose."""
    write(tmp_path, "sub-01/anat/T1w.nii.gz")
    image, _ = make_head(size=SIZE)
    (tmp_path / "sub-02" / "anat").mkdir(parents=True)
    sitk.WriteImage(image[:, :, SIZE[2] // 2], str(tmp_path / "sub-02" / "anat" / "T1w.nii.gz"))
    (tmp_path / "m.csv").write_text("image,mask\nsub-01/anat/T1w.nii.gz,\nsub-02/anat/T1w.nii.gz,\n")
    for argv in (["prepare", "--cache-dir", str(tmp_path / "cache")],
                 ["train", "--out", str(tmp_path / "m.cevae"), "--max-steps", "1", "--device", "cpu"]):
        assert main([*argv, "--manifest", str(tmp_path / "m.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        flat = tmp_path / "sub-02" / "anat" / "T1w.nii.gz"
        assert err == f"error: The image {flat} is 2D; a 3D volume is needed.", err


def test_a_file_given_twice_is_said_to_be_used_once(tmp_path, caplog):
    """``adapt a.nii.gz a.nii.gz`` said "got 1 scan(s)" without a word of the repeat (calibrate and train read
    their files alike): the repeated path is named, as a copy of a scan is ("repeats the image")."""
    write(tmp_path, "a.nii.gz", "a_mask.nii.gz")
    a, mask = tmp_path / "a.nii.gz", tmp_path / "a_mask.nii.gz"
    with caplog.at_level(logging.WARNING):
        assert main(["adapt", str(a), str(a), "--out", str(tmp_path / "site.cevae")]) != 0
    assert f"{a} is given twice; it is used once." in caplog.text
    caplog.clear()
    again = tmp_path / "sub" / ".." / "a.nii.gz"  # another spelling of it, and its mask twice
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        assert read(a, again, mask, mask) == [("a.nii.gz", "a_mask.nii.gz")]
    assert f"{again} is the image {a} given again; it is used once." in caplog.text
    assert f"The brain mask {mask} is given twice; it is used once." in caplog.text


def test_a_label_image_among_the_healthy_scans_is_refused_before_training(tmp_path, capsys):
    """A brain mask or a segmentation listed as a healthy scan was sliced and cached by prepare (exit 0) and trained on
    by train without a word (refused only when held-out scans were scored after the whole run, leaving checkpoints);
    detect refuses such an image. Every command that slices healthy scans now refuses it, naming its path, before
    any model is trained or written."""
    write(tmp_path, "sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", seed=2)
    _, mask = make_head(size=SIZE, seed=3)
    sitk.WriteImage(mask, str(tmp_path / "sub-03_T1w.nii.gz"))  # a brain mask saved under a scan's name
    inner = sitk.BinaryErode(sitk.Cast(mask > 0, sitk.sitkUInt8), [2, 2, 2])
    segmentation = sitk.Cast(mask > 0, sitk.sitkUInt8) + inner + sitk.BinaryErode(inner, [2, 2, 2])  # classes 0-3
    sitk.WriteImage(segmentation, str(tmp_path / "sub-04_T1w.nii.gz"))
    for bad in ("sub-03_T1w.nii.gz", "sub-04_T1w.nii.gz"):
        listed = [str(tmp_path / n) for n in ("sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", bad)]
        for argv in (["prepare", *listed, "--cache-dir", str(tmp_path / "cache")],
                     ["train", *listed, "--out", str(tmp_path / "m.cevae"), "--max-steps", "1", "--device", "cpu"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"error: {tmp_path / bad}: The image holds only the "), err
            assert "not an MRI scan" in err
        assert not list(tmp_path.glob("m.cevae*"))  # no model, checkpoint or log
