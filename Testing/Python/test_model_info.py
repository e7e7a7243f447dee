"""What a model bundle is (`cevae-anomaly info`), and how many healthy scans its threshold was calibrated on, said by
detection: with the bundled model, a copy calibrated on two real healthy scans at 3 mm, a model adapted on them, and
damaged files."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict

import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, add_volume
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.detector import software_versions
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.io.checksum import sha256_of
from CeVAEAnomalyLib.options import ThresholdPolicy

pytestmark = pytest.mark.usefixtures("one_thread")
SITE = ("colin27", "mni152")  # calibrated on; robex: the scan detected


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Dict[str, Path]:
    """The healthy sample scans at 3 mm (slab-averaged, as a thick acquisition) with their brain masks:
    ``NAME.nii.gz`` and ``NAME_mask.nii.gz``, the two site scans in the folder ``site``."""
    if not (SHARED_DATA / "robex_t1.nii.gz").exists():
        pytest.skip("needs the healthy sample volumes")
    research = pytest.importorskip("CeVAEAnomalyResearch.acquisition")
    root = tmp_path_factory.mktemp("scans")
    (root / "site").mkdir()
    out = {"site": root / "site"}
    for name in (*SITE, "robex"):
        folder = root / "site" if name in SITE else root
        image = research.downsample_isotropic(sitk.ReadImage(str(SHARED_DATA / f"{name}_t1.nii.gz"),
                                                             sitk.sitkFloat32), 3.0)
        mask = sitk.ReadImage(str(SHARED_DATA / f"{name}_brainmask.nii.gz"))
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"{name}_mask.nii.gz"))
        out[name] = folder / f"{name}.nii.gz"
    return out


@pytest.fixture(scope="module")
def calibrated(scans, tmp_path_factory) -> Path:
    """The bundled model calibrated (`cevae-anomaly calibrate`) on the two 3 mm site scans."""
    out = tmp_path_factory.mktemp("calibrated") / "site.cevae"
    assert main(["calibrate", str(scans["site"]), "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_detection_says_how_many_healthy_scans_its_threshold_was_calibrated_on(scans, calibrated, tmp_path, caplog):
    """detect said "calibrated on healthy volumes given to calibrate" (an adapted model: "on site scans"), not on how
    many: 2 scans or 200 read alike in its log, its record and the Slicer summary."""
    robex = scans["robex"]
    record = tmp_path / "record.json"
    with caplog.at_level(logging.INFO):
        assert main(["detect", str(robex), "--mask", str(robex.with_name("robex_mask.nii.gz")), "--model",
                     str(calibrated), "--score", str(tmp_path / "score.nii.gz"), "--record", str(record),
                     "--device", "cpu"]) == 0
    said = "calibrated on healthy volumes given to calibrate (2 scans), healthy false-positive rate 0.00021774"
    assert said in caplog.text
    written = json.loads(record.read_text())
    assert written["threshold_source"].startswith(said)
    bundled = {"name": "cevae_t1_default", "file": default_model_path().name, "sha256": sha256_of(default_model_path())}
    assert (written["model"]["name"], written["model"]["recalibrated_from"]) == ("site", bundled)

    slicer = pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, sitk.ReadImage(str(robex)), "robex")
    mask = add_volume(scene, sitk.ReadImage(str(robex.with_name("robex_mask.nii.gz"))), "mask",
                      "vtkMRMLLabelMapVolumeNode")
    result = CeVAEAnomalyLogic().process(volume, mask, modelPath=calibrated, device="cpu")
    assert said in result.summary and result.detection.record.model.recalibrated_from == bundled

    bundled = read_header(default_model_path())  # calibrated before tables counted their scans: its list of them
    source = bundled.threshold(bundled.score_options, bundled.postprocess, ThresholdPolicy())[1]
    assert source.startswith("calibrated on held-out scores (3 scans), healthy false-positive rate")


# --- cevae-anomaly info ---------------------------------------------------------------------------------------------


def info(capsys, *argv: str) -> str:
    """What `cevae-anomaly info ARGV` prints (it must succeed)."""
    assert main(["info", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_info_says_what_the_bundled_model_was_trained_and_calibrated_on_without_torch(capsys):
    """No command said what a model bundle is: what it was trained on, on how many healthy scans of which voxel
    sizes its threshold is calibrated, its thresholds, its sha256."""
    bundled = default_model_path()
    header = read_header(bundled)
    text = info(capsys)
    lines = text.splitlines()
    assert lines[0] == ("cevae_t1_default (T1), the bundled default model: trained on 3 healthy volumes; threshold "
                        "calibrated on 3 healthy scans of 1 to 1.5 mm voxels.")
    assert f"sha256: {sha256_of(bundled)}" in lines and f"File: {bundled}" in lines
    assert "Trained on: 3 healthy volumes (colin27_t1, mni152_t1, robex_t1), none held out for validation; 5083 " \
           "steps of batch 64, seed 0, slices axial, coronal, sagittal." in lines
    assert "Adapted: no (not fine-tuned to a site)." in lines
    assert "Calibrated on: 3 healthy scans (colin27_t1, mni152_t1, robex_t1), 4197265 brain voxels; held-out " \
           "scores: each subject scored by the model trained without it." in lines
    assert "largest voxel side 1 to 1.5 mm (detection warns of scans over 2.25 mm)" in text
    assert f"0.00021774 (default): {header.default_threshold():.4g};" in text
    assert "--test-time-steps 100: " in text and "--orientations axial: " in text
    assert info(capsys, str(bundled)) == text

    facts = json.loads(info(capsys, "--json"))
    calibration = facts["calibration"]
    assert (facts["sha256"], facts["bundled"], calibration["scans"]) == (sha256_of(bundled),
                                                                        {"file": True, "weights": True}, 3)
    assert facts["recalibration"] is None and "Recalibrated" not in text  # not a calibrated copy
    default = [t for t in calibration["thresholds"] if t["default"]]
    assert default == [{"fpr": header.default_fpr, "default": True, "threshold": header.default_threshold(),
                        "measured": True}]
    assert len(calibration["other_scorings"]) == len(header.calibration) - 1

    code = ("import sys; from CeVAEAnomalyLib.cli.main import main; rc = main(['info', '--json']); "
            "print(rc, sorted(m for m in ('torch', 'safetensors', 'SimpleITK') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr


def test_info_says_on_how_many_scans_of_which_voxels_a_calibrated_copy_is_calibrated(capsys, calibrated):
    header = read_header(calibrated)
    text = info(capsys, str(calibrated))
    assert text.splitlines()[0] == ("site (T1), recalibrated from cevae_t1_default, with the bundled default model's "
                                    "weights: trained on 3 healthy volumes; threshold calibrated on 2 healthy scans of "
                                    "3 mm voxels.")
    assert "Calibrated on: 2 healthy scans (colin27, mni152)" in text
    assert "; healthy volumes given to calibrate." in text
    assert "largest voxel side 3 mm (detection warns of scans over 4.5 mm)" in text
    assert "Adapted: no" in text
    unmeasured = header.threshold(header.score_options, header.postprocess, ThresholdPolicy(fpr=1e-5))[0]
    assert f"1e-05: {unmeasured:.4g} (not measured: too few voxels)" in text  # 1.4 of its 141983 voxels
    facts = json.loads(info(capsys, str(calibrated), "--json"))
    assert facts["calibration"]["largest_voxel_mm"] == [3.0, 3.0] and facts["calibration"]["scans"] == 2
    assert facts["bundled"] == {"file": False, "weights": True} and facts["adaptation"] is None
    for row in facts["calibration"]["thresholds"]:
        assert row["threshold"] == header.threshold(header.score_options, header.postprocess,
                                                    ThresholdPolicy(fpr=row["fpr"]))[0]


def test_info_says_which_version_wrote_a_calibrated_copy_beside_the_one_that_trained_it(capsys, calibrated,
                                                                                       tmp_path):
    """A calibrated copy keeps the versions its model was trained with; info said those alone, as if the copy were
    made with them. It also says the version that wrote the file, where the file records one."""
    from CeVAEAnomalyLib import __version__
    from test_untrusted_bundles import rewrite

    made = read_header(default_model_path()).extra["versions"]
    unrecorded = tmp_path / "unrecorded.cevae"
    unrecorded.write_bytes(default_model_path().read_bytes())
    rewrite(unrecorded, lambda h, t: h.pop("written_by", None))
    assert "Format: cevae-anomaly-bundle version 1, made with" in info(capsys, str(unrecorded))
    assert "written by" not in info(capsys, str(unrecorded))  # (no writer recorded: none said)
    text = info(capsys, str(calibrated))
    assert (f"made with cevae-anomaly {made['cevae_anomaly']} and torch {made['torch']}, written by cevae-anomaly "
            f"{__version__};") in text
    assert json.loads(info(capsys, str(calibrated), "--json"))["written_by"] == __version__


def test_a_calibrated_copy_records_its_parent_when_on_which_scans_and_how_and_info_says_it(capsys, scans, calibrated,
                                                                                            tmp_path):
    """A calibrated copy kept its parent's name and recorded neither its parent nor when, on which scans (by sha256) or
    with which options it was calibrated: info called it "cevae_t1_default ... with the bundled default model's
    weights". It is named after its file now and records them (the batch size and the versions of the libraries
    that scored the scans too); a copy of a copy records both its parent and the model the chain started from."""
    bundled = default_model_path()
    header = read_header(calibrated)
    record = header.extra["recalibration"]
    parent = {"name": "cevae_t1_default", "file": bundled.name, "sha256": sha256_of(bundled)}
    assert header.name == "site" and record["parent"] == record["original"] == parent
    site = scans["site"]
    assert record["scans"] == [{"name": n, "sha256": sha256_of(site / f"{n}.nii.gz"),
                                "mask_sha256": sha256_of(site / f"{n}_mask.nii.gz")} for n in SITE]
    when = datetime.strptime(record["calibrated_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert timedelta(0) <= datetime.now(timezone.utc) - when < timedelta(hours=1)
    assert record["options"] == {"score_options": header.score_options.to_dict(),
                                 "postprocess": header.postprocess.to_dict(), "default_fpr": header.default_fpr,
                                 "amp": False, "batch_size": 64}  # (sampled scores draw batch by batch)
    assert record["software"] == software_versions()  # the libraries that scored the scans, not the training's
    lines = info(capsys, str(calibrated)).splitlines()
    assert (f"Recalibrated from: cevae_t1_default ({bundled.name}, sha256 {sha256_of(bundled)}) on "
            f"{record['calibrated_utc']}, on 2 healthy scans (colin27, mni152; their sha256 and their masks' in "
            "--json): default rate 0.00021774.") in lines
    assert json.loads(info(capsys, str(calibrated), "--json"))["recalibration"] == record
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    assert ModelSettings.read(calibrated).details[0] == lines[0]  # the Slicer panel's model details line

    again = tmp_path / "again.cevae"
    assert main(["calibrate", str(site / "colin27.nii.gz"), "--model", str(calibrated), "--out", str(again),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    record = read_header(again).extra["recalibration"]
    assert record["parent"] == {"name": "site", "file": "site.cevae", "sha256": sha256_of(calibrated)}
    assert record["original"] == parent and [s["name"] for s in record["scans"]] == ["colin27"]
    lines = info(capsys, str(again)).splitlines()
    assert lines[0].startswith("again (T1), recalibrated from site (originally cevae_t1_default), with the bundled "
                               "default model's weights: trained on 3 healthy volumes; threshold calibrated on 1 "
                               "healthy scan of 3 mm voxels.")
    assert f"Originally: cevae_t1_default ({bundled.name}, sha256 {sha256_of(bundled)}), the first model of the " \
           "chain of recalibrations." in lines


def test_info_says_from_which_model_and_on_which_site_scans_a_model_was_adapted(capsys, scans, tiny_bundle,
                                                                                tmp_path):
    site = tmp_path / "site.cevae"
    assert main(["adapt", str(scans["site"]), "--model", str(tiny_bundle), "--out", str(site), "--steps", "2",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    text = info(capsys, str(site))
    assert text.splitlines()[0] == ("site (T1): adapted from tiny on 2 site scans (tiny had learned from 2 healthy "
                                    "volumes); threshold calibrated on 2 healthy scans of 3 mm voxels.")
    named = [v["name"] for v in read_header(site).extra["adaptation"]["site_scans"]]  # in adapt's order (by content)
    assert sorted(named) == ["colin27", "mni152"]
    named = ", ".join(named)
    assert (f"Adapted from: tiny (tiny.cevae, sha256 {sha256_of(tiny_bundle)}), fine-tuned on 2 site scans ({named}): "
            "2 steps per run, learning rate 0.0001, 2 calibration folds.") in text
    learned = [v["name"] for v in read_header(tiny_bundle).training["subjects"]]  # (its validation volume: not)
    assert (f"Trained on: 2 site scans ({named}), fine-tuned from tiny, which had learned from 2 healthy "
            f"volumes ({', '.join(learned)}).") in text.splitlines()
    base = [{"name": v["name"], "sha256": v["sha256"], "person": None}
            for v in read_header(tiny_bundle).training["subjects"]]
    assert json.loads(info(capsys, str(site), "--json"))["adaptation"]["base_volumes"] == base
    stamp = read_header(site).training["trained_utc"]
    assert f"Date adapted: {stamp} (UTC)." in text.splitlines() and "Date trained" not in text
    assert json.loads(info(capsys, str(site), "--json"))["training"]["trained_utc"] == stamp
    assert f"Calibrated on: 2 healthy scans ({named}), " in text and "; site scans, each scored by the fold " \
                                                                      "model" in text


def test_calibrating_an_adapted_model_on_its_base_models_training_volumes_warns(tmp_path, tiny_bundle, scans,
                                                                                 caplog):
    """An adapted model recorded only its site scans as its training volumes: calibrated on a volume its base model
    had learned from (which it learned from too), it said nothing. It records them, and calibrate warns."""
    site = tmp_path / "site.cevae"
    assert main(["adapt", str(scans["site"]), "--model", str(tiny_bundle), "--out", str(site), "--steps", "2",
                 "--batch-size", "8", "--device", "cpu"]) == 0
    seen = tiny_bundle.parent / f"{read_header(tiny_bundle).training['subjects'][0]['name']}.nii.gz"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["calibrate", str(seen), str(seen.with_name(seen.name.replace(".nii", "_mask.nii"))),
                     "--model", str(site), "--out", str(tmp_path / "again.cevae"), "--device", "cpu"]) == 0
    assert f"{seen} is among the model's training volumes" in caplog.text


def test_an_adapted_copy_of_the_bundled_model_knows_the_bundled_models_training_scans(tmp_path):
    """An adapted model's header holds what its base model learned from (adaptation.base_volumes): the bundled model's
    sample scans are told as its training scans; one adapted before it was recorded says so, and knows none."""
    import shutil

    from test_untrusted_bundles import rewrite

    if not (SHARED_DATA / "robex_t1.nii.gz").exists():
        pytest.skip("needs the healthy sample volumes")
    bundled = read_header(default_model_path()).training["subjects"]
    site = [{"name": "site 1", "sha256": "1" * 64}]
    path = Path(shutil.copy(default_model_path(), tmp_path / "adapted.cevae"))
    parent = {"name": "cevae_t1_default", "file": default_model_path().name, "sha256": "ab" * 32}
    rewrite(path, lambda h, t: (h["training"].__setitem__("subjects", site),
                                h.__setitem__("adaptation", {"parent": parent, "site_scans": site,
                                                             "base_volumes": bundled})))
    samples = [SHARED_DATA / f"{n}_t1.nii.gz" for n in ("colin27", "mni152", "robex")]
    assert read_header(path).trained_scans(samples, {p: sha256_of(p) for p in samples}) == samples
    rewrite(path, lambda h, t: h["adaptation"].pop("base_volumes"))
    assert read_header(path).trained_scans(samples, {p: sha256_of(p) for p in samples}) == []


def test_a_trained_model_records_when_it_was_written_and_info_says_it(capsys, tiny_bundle):
    """A model file could not say when it was trained: its training record now holds the time (UTC, ISO 8601 to the
    second) its model was written, which info says; the bundled model, written before, says it is not recorded."""
    stamp = read_header(tiny_bundle).training["trained_utc"]
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert timedelta(0) <= datetime.now(timezone.utc) - when < timedelta(days=1)
    assert f"Date trained: {stamp} (UTC)." in info(capsys, str(tiny_bundle)).splitlines()
    assert json.loads(info(capsys, str(tiny_bundle), "--json"))["training"]["trained_utc"] == stamp
    assert "Date trained: not recorded." in info(capsys).splitlines()
    assert json.loads(info(capsys, "--json"))["training"]["trained_utc"] is None


@pytest.mark.parametrize("damage, said", [
    ("truncated", " bytes (an interrupted copy or download?); copy it again."),
    ("weights", "its weights are not those its header records (a checksum differs); the model file is damaged"),
    ("scan", "is not a CeVAEAnomaly model bundle (not a valid safetensors file: "),
    ("folder", "is a folder; give the path of a .cevae file."),
])
def test_info_refuses_a_damaged_file_or_one_that_is_no_model_in_one_line(capsys, tmp_path, damage, said):
    path = tmp_path / "model.cevae"
    if damage == "truncated":
        path.write_bytes(default_model_path().read_bytes()[:-1000])
    elif damage == "weights":
        path.write_bytes(damaged_weights(default_model_path()))
    elif damage == "scan":
        path = default_model_path().parent / "colin27_t1_2mm.nii.gz"  # the bundled sample scan
    else:
        path.mkdir()
    for argv in (["info", str(path)], ["info", str(path), "--json"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and said in captured.err and len(captured.err.splitlines()) == 1


def damaged_weights(model: Path) -> bytes:
    """The bytes of ``model`` with a byte of its last tensor flipped: its header is intact."""
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    return bytes(data)


def test_the_slicer_panel_says_what_the_chosen_model_is_in_the_words_of_info(capsys, tmp_path):
    """The panel named the chosen file only; its details line now says what `info` says first, its tooltip the
    rest, and a model whose weights are damaged is said so before Apply."""
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    text = info(capsys, str(default_model_path()))
    assert ModelSettings.read(default_model_path()).details == (text.splitlines()[0], text.rstrip("\n"))
    damaged = tmp_path / "damaged.cevae"
    damaged.write_bytes(damaged_weights(default_model_path()))
    headline, details = ModelSettings.read(damaged).details  # (its header reads: the panel offers it)
    assert "its weights are not those its header records" in headline and details == ""


@pytest.mark.parametrize("edit, said", [
    (lambda h: h.__setitem__("training", {}), "Trained on: not recorded."),
    (lambda h: h["training"].pop("orientations"), "steps of batch 64, seed 0, slices axial."),
    (lambda h: [h["training"].pop(k) for k in ("steps", "seed")], "held out for validation; slices axial, coronal, "
                                                                   "sagittal."),
], ids=["empty", "no orientations", "no steps or seed"])
def test_info_says_a_training_record_that_lacks_parts_read_header_allows(capsys, tmp_path, edit, said):
    """A header whose training record lacks its orientations (read as axial) or is empty passes read_header, but info
    (and the Slicer panel's details line) failed on it with an unexpected TypeError; what it lacks is left unsaid."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    path = tmp_path / "model.cevae"
    shutil.copy(default_model_path(), path)
    rewrite(path, lambda h, t: edit(h))
    text = info(capsys, str(path))
    assert any(line.endswith(said) for line in text.splitlines()), text
    assert "None" not in text
    assert ModelSettings.read(path).details == (text.splitlines()[0], text.rstrip("\n"))


def test_the_headline_of_a_calibrated_copy_that_is_the_bundled_file_has_one_comma():
    """A calibrated copy shipped as the bundled default model (its file's sha256 that of the bundled one) was said
    "recalibrated from NAME,, the bundled default model"."""
    from CeVAEAnomalyLib.engine.model_info import model_headline, model_info

    facts = model_info(default_model_path())
    parent = {"name": "base", "file": "base.cevae", "sha256": "ab" * 32}
    facts["recalibration"] = {"parent": parent, "original": parent}
    assert model_headline(facts).startswith("cevae_t1_default (T1), recalibrated from base, the bundled default "
                                            "model: trained on 3 healthy volumes;")
    facts["bundled"] = {"file": False, "weights": True}
    assert model_headline(facts).startswith("cevae_t1_default (T1), recalibrated from base, with the bundled default "
                                            "model's weights: ")


def test_info_describes_a_training_volume_as_sample_data_only_when_its_content_is_the_samples(capsys, tmp_path):
    """info described any training volume named colin27_t1 as "Colin27 (ch2) ... 1 mm; Debian package mricron-data"
    by its name alone, so a user's own scan (or a 3 mm copy of the sample) under that name got the sample's source; the
    description now also needs the sample file's sha256."""
    import shutil

    from test_untrusted_bundles import rewrite

    bundled = info(capsys).splitlines()
    assert any(line.startswith("  colin27_t1: Colin27 (ch2)") for line in bundled)
    path = tmp_path / "model.cevae"
    shutil.copy(default_model_path(), path)
    rewrite(path, lambda h, t: h["training"]["subjects"][0].__setitem__("sha256", "ab" * 32))
    lines = info(capsys, str(path)).splitlines()
    assert not any(line.startswith("  colin27_t1:") for line in lines)
    assert [line for line in lines if line.startswith("  ")] == [b for b in bundled if b.startswith("  ")][1:]


def test_a_training_record_says_of_how_many_persons_its_volumes_are(capsys, tmp_path):
    """A model trained on a cohort said how many volumes but not of how many persons, though the split knew them (a
    manifest's subject column, a BIDS name's sub-<label>): two sessions of one person read as two people. Each
    volume's record now holds its person (None: unknown), and info counts them as the split does."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.training.packaging import person_numbers, subject_records

    images = [tmp_path / "sub-01_ses-1_T1w.nii.gz", tmp_path / "sub-01_ses-2_T1w.nii.gz", tmp_path / "scanA.nii.gz",
              tmp_path / "other.nii.gz"]
    subjects = [Subject(images[0]), Subject(images[1]), Subject(images[2], person="Sub-02"), Subject(images[3])]
    records = subject_records(subjects, {image: f"{n:064x}" for n, image in enumerate(images)})
    assert [r["person"] for r in records] == ["1", "1", "2", None]  # numbered: no label (maybe a patient's ID) kept
    held_out = subject_records(subjects[2:3], {images[2]: "0" * 64}, persons=person_numbers(subjects))
    assert [r["person"] for r in held_out] == ["2"]  # one numbering for the training and held-out lists of a run

    path = tmp_path / "model.cevae"
    shutil.copy(default_model_path(), path)
    persons = ("a", "a", None)
    rewrite(path, lambda h, t: [v.__setitem__("person", p) for v, p in zip(h["training"]["subjects"], persons)])
    text = info(capsys, str(path))
    assert text.startswith("cevae_t1_default (T1) with the bundled default model's weights: trained on 3 healthy "
                           "volumes of 2 persons; threshold calibrated on")
    assert "Trained on: 3 healthy volumes of 2 persons (colin27_t1, mni152_t1, robex_t1), none held out" in text
    facts = json.loads(info(capsys, str(path), "--json"))["training"]
    assert (facts["persons"], facts["held_out_persons"]) == (2, None)
    assert [v["person"] for v in facts["volumes"]] == ["a", "a", None]
    assert json.loads(info(capsys, "--json"))["training"]["persons"] is None  # recorded before persons were

    rewrite(path, lambda h, t: h["training"]["subjects"][0].__setitem__("person", 5))
    assert main(["info", str(path)]) == 2
    assert "training.subjects" in capsys.readouterr().err


def test_a_copy_calibrated_before_copies_recorded_their_parent_is_not_taken_for_its_parent(capsys, tmp_path):
    """A copy that calibrate (or the Slicer module) wrote before the header's 'recalibration' section existed kept
    its parent's name and no record of it: info said "cevae_t1_default (T1) with the bundled default model's
    weights", as if it were the bundled model with the bundled calibration. Its calibration's source tells it."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.engine.calibration import CALIBRATE_SOURCE, SLICER_CALIBRATE_SOURCE
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    for source in (CALIBRATE_SOURCE, SLICER_CALIBRATE_SOURCE):
        path = tmp_path / "old_copy.cevae"
        shutil.copy(default_model_path(), path)
        rewrite(path, lambda h, t: [entry.__setitem__("source", source) for entry in h["calibration"].values()])
        text = info(capsys, str(path))
        lines = text.splitlines()
        assert lines[0].startswith("cevae_t1_default (T1), recalibrated (no record of its parent), with the bundled "
                                   "default model's weights: trained on 3 healthy volumes; threshold calibrated on")
        assert "Recalibrated from: not recorded (calibrated by a version that did not record the model a copy was " \
               "made from; the copy kept that model's name)." in lines
        facts = json.loads(info(capsys, str(path), "--json"))
        assert (facts["recalibrated"], facts["recalibration"]) == (True, None)
        assert ModelSettings.read(path).details[0] == lines[0]
    bundled = json.loads(info(capsys, "--json"))
    assert bundled["recalibrated"] is False and "recalibrated" not in info(capsys).splitlines()[0]


def test_the_calibration_of_an_adapted_model_names_its_site_scans(capsys, tmp_path):
    """An adapted model is calibrated on its site scans (each scored by the fold model that did not see it), but info's
    Calibrated on line named no scans: only its Adapted from line did; one adapted before calibration tables counted
    their scans read "healthy scans (how many is not recorded)", and detection's threshold source gave no count. A
    copy's own list still comes first."""
    import shutil

    from test_untrusted_bundles import rewrite

    def adapted(h, t):
        h.pop("calibration_subjects")
        h["adaptation"] = {"parent": {"name": "base", "file": "base.cevae", "sha256": "ab" * 32},
                           "site_scans": [{"name": f"site {n}", "sha256": f"{n:064x}"} for n in (1, 2, 3)]}

    path = tmp_path / "adapted.cevae"
    shutil.copy(default_model_path(), path)
    rewrite(path, adapted)
    lines = info(capsys, str(path)).splitlines()
    assert any(line.startswith("Calibrated on: 3 healthy scans (site 1, site 2, site 3), ") for line in lines), lines
    assert ("Trained on: 3 site scans (site 1, site 2, site 3), fine-tuned from base, whose training volumes it does "
            "not record (adapted by an earlier version).") in lines  # (adapted before they were recorded)
    assert json.loads(info(capsys, str(path), "--json"))["calibration"]["scan_names"] == ["site 1", "site 2", "site 3"]
    header = read_header(path)
    assert header.threshold(header.score_options, header.postprocess, ThresholdPolicy())[1].startswith(
        "calibrated on held-out scores (3 scans), ")
    rewrite(path, lambda h, t: h.__setitem__("calibration_subjects", ["a", "b", "c"]))  # then calibrated on a, b, c
    assert any(line.startswith("Calibrated on: 3 healthy scans (a, b, c), ") for line in info(capsys, str(path))
               .splitlines())


def test_the_panel_headline_of_an_adapted_model_says_what_its_base_model_had_learned_from(tmp_path):
    """The Slicer panel's line on an adapted model said "adapted from base on 1 site scan" only: that it also rests on
    what its base model learned from (info's "fine-tuned from base, which had learned from 3 healthy volumes") was
    left to the tooltip. The headline says how many; one adapted before that was recorded says nothing of it."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    bundled = read_header(default_model_path()).training["subjects"]
    site = [{"name": "site 1", "sha256": "1" * 64}]
    parent = {"name": "base", "file": "base.cevae", "sha256": "ab" * 32}
    path = Path(shutil.copy(default_model_path(), tmp_path / "adapted.cevae"))
    rewrite(path, lambda h, t: h.__setitem__("adaptation", {"parent": parent, "site_scans": site,
                                                            "base_volumes": bundled}))
    headline = ModelSettings.read(path).details[0]
    assert f"adapted from base on 1 site scan (base had learned from {len(bundled)} healthy volumes);" in headline
    rewrite(path, lambda h, t: h["adaptation"].pop("base_volumes"))
    assert "adapted from base on 1 site scan;" in ModelSettings.read(path).details[0]


@pytest.mark.parametrize("versions", [["0.1.0"], "0.1.0", 5])
def test_info_says_a_model_whose_versions_record_is_no_object_without_it(capsys, tmp_path, versions):
    """read_header leaves the ``versions`` record (which versions trained the model) unchecked, but info failed on
    one that is not a JSON object with an unexpected AttributeError, and the Slicer panel's details line with it."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    path = tmp_path / "model.cevae"
    shutil.copy(default_model_path(), path)
    rewrite(path, lambda h, t: h.__setitem__("versions", versions))
    text = info(capsys, str(path))
    assert "\nFormat: cevae-anomaly-bundle version 1, written by cevae-anomaly " in text and "made with" not in text
    assert json.loads(info(capsys, str(path), "--json"))["made_with"] is None
    assert ModelSettings.read(path).details == (text.splitlines()[0], text.rstrip("\n"))



def test_info_shows_control_characters_of_a_received_models_header_as_escapes(capsys, tmp_path):
    """A header's texts (the model's name, its scans' names) reached the terminal as they were: a name holding a line
    end forged a line of info's text, and escape sequences, a carriage return or a right-to-left override rewrote or
    hid what was printed. They are shown as escapes; --json (escaped by JSON) keeps them."""
    import shutil

    from test_untrusted_bundles import rewrite
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    forged = "site\nCalibrated on: 500 healthy scans\x1b[2K\r\u202e"
    path = tmp_path / "model.cevae"
    shutil.copy(default_model_path(), path)
    rewrite(path, lambda h, t: [h.__setitem__("name", forged), h.__setitem__("calibration_subjects", ["a\x00b"])])
    text = info(capsys, str(path))
    lines = text.splitlines()
    assert lines[0].startswith("site\\nCalibrated on: 500 healthy scans\\x1b[2K\\r\\u202e (T1) with the bundled")
    assert not [line for line in lines if line.startswith("Calibrated on: 500")]
    assert "(a\\x00b)" in text
    assert not [c for c in text if c != "\n" and not c.isprintable()]
    assert json.loads(info(capsys, str(path), "--json"))["name"] == forged
    headline, details = ModelSettings.read(path).details
    assert headline == lines[0] and details == text.rstrip("\n")


def test_info_says_a_model_whose_weights_are_not_finite_is_refused_by_detection(capsys, tmp_path):
    """A model file whose weights hold NaN (its checksum written anew, as an edit or a diverged training writes it) was
    described by info as any other, while detect and calibrate refuse it: info and the panel's headline now say so."""
    import torch
    from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle
    from CeVAEAnomalyLib.slicer.settings import ModelSettings

    bundle = load_bundle(default_model_path(), "cpu")
    with torch.no_grad():
        bundle.model.state_dict()["decoder.8.bias"].view(-1)[0] = float("nan")
    path = save_bundle(tmp_path / "nan.cevae", bundle.model, bundle.header)
    text = info(capsys, str(path))
    said = ("Weights: tensor decoder.8.bias holds NaN or infinite values: detect and calibrate refuse this model file "
            "(damaged or edited); use an original copy.")
    assert said in text.splitlines() and "weights hold NaN or infinite values" in text.splitlines()[0]
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"]["not_finite"] == ["decoder.8.bias"]
    assert "weights hold NaN or infinite values" in ModelSettings.read(path).details[0]
    assert "NaN" not in info(capsys, str(default_model_path()))


def test_the_bundled_model_is_calibrated_for_the_published_map_and_info_asks_for_it_with_paper(capsys):
    """The published map (the paper's pixel score alone: --paper --no-normalise --asymmetry-mm 0 --orientations axial)
    had no calibration in the bundled model (an absolute --threshold was needed); it has one now, on held-out scores,
    and info names it by the flags a user types (--paper, not the one option of it that differs, --grad-norm)."""
    from CeVAEAnomalyLib.cli.main import main
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.header import read_header
    from CeVAEAnomalyLib.options import DetectionRequest

    header = read_header(default_model_path())
    published = DetectionRequest.of(paper=True, normalise=False, asymmetry_mm=0.0, orientations="axial")
    threshold, source = header.threshold_of(published)  # (a request without a calibration is refused here)
    assert 0 < threshold < header.threshold_of(DetectionRequest())[0] / 4  # the published map's own units
    assert "held-out scores" in source, source
    assert main(["info"]) == 0
    also = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Also calibrated ("))
    assert f"--paper --orientations axial --asymmetry-mm 0 --no-normalise: {threshold:.4g}" in also, also
    assert "--grad-norm" not in also


def test_a_trained_model_records_the_versions_of_the_libraries_that_made_it(tiny_bundle):
    """The slices a model is trained on are resampled and filtered by SimpleITK, and NumPy; a trained model recorded
    the versions of cevae-anomaly, Python and torch only. It records SimpleITK's and NumPy's too."""
    from CeVAEAnomalyLib import __version__
    from CeVAEAnomalyLib.engine.detector import software_versions

    assert read_header(tiny_bundle).extra["versions"] == {"cevae_anomaly": __version__, **software_versions()}


def test_info_says_on_how_many_ranks_and_with_which_effective_batch_a_model_was_trained(capsys, tmp_path):
    """A model trained under torchrun records its ranks (and, resumed on other ranks, the parts of its run); info said
    neither, and its "steps of batch N" did not say that N was the ranks' batch together."""
    import shutil

    from test_untrusted_bundles import rewrite

    assert not [line for line in info(capsys).splitlines() if line.startswith("Ranks:")]  # (1 process: nothing)
    path = Path(shutil.copy(default_model_path(), tmp_path / "ranks.cevae"))
    rewrite(path, lambda h, t: h["training"].update(ranks=2, batch_size=128))
    said = info(capsys, str(path)).splitlines()
    assert "Ranks: 2 (torchrun), an effective batch of 128 (64 slices per rank)." in said
    assert json.loads(info(capsys, str(path), "--json"))["training"]["ranks"] == 2
    parts = [{"from_step": 0, "lr": 0.0002, "ranks": 1, "batch_size": 64, "device": "cpu"},
             {"from_step": 2000, "lr": 0.0002, "ranks": 2, "batch_size": 64, "device": "cpu"}]
    rewrite(path, lambda h, t: h["training"].update(parts=parts))
    assert ("Ranks: 1 for steps 1-2000, 2 for steps 2001-5083 (torchrun), at the end an effective batch of 128 (64 "
            "slices per rank).") in info(capsys, str(path)).splitlines()
    assert json.loads(info(capsys, str(path), "--json"))["training"]["parts"] == parts
