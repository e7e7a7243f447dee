"""A model file to share without the names of the scans it was made from (`cevae-anomaly share`).

A model calibrated or adapted on a site's scans recorded each scan's file name in several records of its header; a
hospital's file names often hold a patient's ID or name ("12345678_DOE_J_T1"), and there was no way to share the
model without them.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head
from CeVAEAnomalyLib import __version__
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import recalibrate
from CeVAEAnomalyLib.engine.detector import detect
from CeVAEAnomalyLib.engine.header import _written_header, read_header, weights_digest
from CeVAEAnomalyLib.engine.model_info import model_info
from CeVAEAnomalyLib.engine.sharing import share_model
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.manifest import Subject

pytestmark = pytest.mark.usefixtures("one_thread")
STEMS = ("12345678_DOE_J_T1", "87654321_ROE_R_T1")  # file stems as a hospital's export names its scans


def _named_heads(folder: Path, seeds=(21, 22)) -> List[Subject]:
    """Synthetic heads saved under :data:`STEMS`, with their brain masks."""
    subjects = []
    for stem, seed in zip(STEMS, seeds):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(image, str(folder / f"{stem}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"{stem}_mask.nii.gz"))
        subjects.append(Subject(folder / f"{stem}.nii.gz", folder / f"{stem}_mask.nii.gz"))
    return subjects


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """The bundled model calibrated on two synthetic heads named as a hospital names its scans."""
    folder = tmp_path_factory.mktemp("site")
    bundle = load_bundle(default_model_path(), "cpu")
    return recalibrate(bundle, _named_heads(folder), folder / "site.cevae", bundle.header.score_options,
                       bundle.header.postprocess)


def _tensor_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def _scan_records(header: Dict[str, Any]) -> Dict[str, str]:
    """sha256 -> name of every scan the header's records give with its sha256."""
    volumes = [*header["training"]["subjects"], *header["recalibration"]["scans"]]
    return {v["sha256"]: v["name"] for v in volumes}


def test_a_shared_copy_holds_no_scan_name_and_detects_as_the_model_does(calibrated, tmp_path, capsys):
    raw = calibrated.read_bytes()
    assert all(stem.encode() in raw for stem in STEMS)  # the calibrated copy names them
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(calibrated), "--out", str(shared)]) == 0
    data = shared.read_bytes()
    assert not [stem for stem in STEMS if stem.encode() in data or stem.split("_")[0].encode() in data]
    assert b"DOE" not in data and b"ROE" not in data

    before, after = _written_header(calibrated), _written_header(shared)
    old, new = _scan_records(before), _scan_records(after)
    assert set(new) == set(old)  # every checksum kept
    assert sorted(new.values()) == [f"scan {n}" for n in range(1, 6)]  # 3 training volumes, 2 calibration scans
    assert after["calibration_subjects"] == [new[s["sha256"]] for s in before["recalibration"]["scans"]]
    assert [s["mask_sha256"] for s in after["recalibration"]["scans"]] == \
        [s["mask_sha256"] for s in before["recalibration"]["scans"]]
    assert after["names_removed"] == {"scans": 5}
    assert after["calibration"] == before["calibration"] and after["recalibration"]["parent"] == \
        before["recalibration"]["parent"]
    assert _tensor_bytes(shared) == _tensor_bytes(calibrated) and weights_digest(shared) == weights_digest(calibrated)

    image, mask = make_head(seed=9)
    results = [detect(image, path, mask, device="cpu") for path in (calibrated, shared)]
    assert np.array_equal(sitk.GetArrayFromImage(results[0].score), sitk.GetArrayFromImage(results[1].score))
    assert np.array_equal(sitk.GetArrayFromImage(results[0].labelmap), sitk.GetArrayFromImage(results[1].labelmap))
    assert results[0].threshold == results[1].threshold

    capsys.readouterr()
    assert main(["info", str(shared)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith("; scan names removed for sharing.")
    assert ("Scan names: removed for sharing (cevae-anomaly share); its 5 scans are called scan 1 to scan 5 in every "
            "record, each scan's sha256 (and a training volume's voxel digest) kept.") in text
    assert "Calibrated on: 2 healthy scans (scan 4, scan 5)" in text
    assert model_info(shared)["names_removed"] == {"scans": 5} and model_info(calibrated)["names_removed"] is None


def test_share_never_writes_over_its_input_the_bundled_model_or_an_existing_file(calibrated, tmp_path, capsys):
    before = calibrated.read_bytes()
    bundled = default_model_path().read_bytes()
    assert main(["share", str(calibrated), "--out", str(calibrated), "--overwrite"]) == 2
    assert "is the same file as an input" in capsys.readouterr().err
    assert main(["share", str(calibrated), "--out", str(default_model_path()), "--overwrite"]) == 2
    assert "is the bundled default model" in capsys.readouterr().err
    taken = tmp_path / "taken.cevae"
    taken.write_bytes(b"someone's file")
    assert main(["share", str(calibrated), "--out", str(taken)]) == 2
    assert "exists" in capsys.readouterr().err and taken.read_bytes() == b"someone's file"
    assert calibrated.read_bytes() == before and default_model_path().read_bytes() == bundled
    assert main(["share", str(calibrated), "--out", str(taken), "--overwrite"]) == 0
    assert read_header(taken).extra["names_removed"] == {"scans": 5}
    assert [p.name for p in tmp_path.iterdir()] == ["taken.cevae"]  # no temporary or lock file left


def test_a_copy_calibrated_from_a_shared_copy_does_not_say_its_names_were_removed(calibrated, tmp_path):
    """Its new calibration scans are named: it is no shareable copy until it is shared itself."""
    shared = tmp_path / "shared.cevae"
    main(["share", str(calibrated), "--out", str(shared)])
    bundle = load_bundle(shared, "cpu")
    again = recalibrate(bundle, _named_heads(tmp_path)[:1], tmp_path / "again.cevae", bundle.header.score_options,
                        bundle.header.postprocess)
    assert model_info(again)["names_removed"] is None
    assert read_header(again).calibration_names() == [STEMS[0]]


def test_share_refuses_a_header_that_holds_a_scan_name_in_a_record_it_does_not_know(calibrated, tmp_path, capsys):
    from test_untrusted_bundles import rewrite

    edited = tmp_path / "edited.cevae"
    edited.write_bytes(calibrated.read_bytes())
    rewrite(edited, lambda h, t: h.__setitem__("notes", {"scanned": [STEMS[1]]}))
    assert main(["share", str(edited), "--out", str(tmp_path / "shared.cevae")]) == 2
    err = capsys.readouterr().err
    assert (f"error: The model's header holds the scan name '{STEMS[1]}' in 'notes.scanned[0]', a record this "
            "version cannot rename; no shareable copy was written. If a later CeVAEAnomaly made the model, share it "
            "with that one; else the file was edited: share an original copy.") in err
    assert "update CeVAEAnomaly" not in err  # its format version is this one's: updating cannot help an edited file
    assert not (tmp_path / "shared.cevae").exists()


def test_share_refuses_a_scan_name_held_as_a_key_of_a_record_it_does_not_know(calibrated, tmp_path, capsys):
    """A record's keys were never looked at: {"DOE_JOHN": ...} in a record this version does not write went into the
    shareable copy. A key is refused as a text there is: a scan's name said as such, any other unknown one unsaid."""
    from test_untrusted_bundles import rewrite

    for key, said in ((STEMS[1], f"the scan name '{STEMS[1]}' as a key in 'notes'"),
                      ("DOE_JOHN", "a key in 'training.augment', a record this version does not write")):
        edited = tmp_path / "edited.cevae"
        edited.write_bytes(calibrated.read_bytes())
        rewrite(edited, lambda h, t: h.__setitem__("notes", {key: 1}) if key == STEMS[1]
                else h["training"]["augment"].__setitem__(key, 2))
        assert main(["share", str(edited), "--out", str(tmp_path / "shared.cevae")]) == 2
        err = capsys.readouterr().err
        assert f"error: The model's header holds {said}" in err and "no shareable copy was written" in err
        assert (key == STEMS[1]) == (key in err)  # (an unknown text is not said: it may be a patient's name)
        assert not (tmp_path / "shared.cevae").exists()


def test_share_refuses_a_person_s_name_written_as_a_key_as_this_project_writes_keys(calibrated, tmp_path, capsys):
    """A key in lowercase snake_case passed as one this project writes: {"john_doe": {...}} in a record this version
    does not know went into the shareable copy. A key is now one of those this version writes, wherever it lies."""
    from test_untrusted_bundles import rewrite

    for edit, place in ((lambda h, t: h["training"].__setitem__("john_doe", {"steps": 1}), "in 'training'"),
                        (lambda h, t: h["training"]["augment"].__setitem__("john_doe", 1), "in 'training.augment'"),
                        (lambda h, t: h.__setitem__("john_doe", {"seen": 2}), "at its top level")):
        edited = tmp_path / "edited.cevae"
        edited.write_bytes(calibrated.read_bytes())
        rewrite(edited, edit)
        assert main(["share", str(edited), "--out", str(tmp_path / "shared.cevae")]) == 2
        err = capsys.readouterr().err
        assert f"error: The model's header holds a key {place}, a record" in err and "no shareable copy" in err, err
        assert "john_doe" not in err and not (tmp_path / "shared.cevae").exists()


def test_share_holds_the_model_file_in_memory_once(tmp_path):
    """The copy was built as one new bytes object beside the file's (and a slice of its tensor bytes): about 3x the
    file's size in memory at once. The tensor bytes are now written from the file's bytes as they are."""
    import tracemalloc

    model = default_model_path()
    tracemalloc.start()
    share_model(model, tmp_path / "shared.cevae")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * model.stat().st_size, peak / model.stat().st_size  # the file, and its largest tensor read back
    assert (tmp_path / "shared.cevae").read_bytes()[-1000:] == model.read_bytes()[-1000:]


def test_a_model_from_before_strict_headers_with_a_nan_validation_loss_is_shared(calibrated, tmp_path):
    """Bundles written before headers were strict JSON hold "val_loss": NaN in their training record; read_header,
    info, calibrate and adapt take them (the NaN reads as None), and so does share."""
    import math

    from test_untrusted_bundles import rewrite

    old = tmp_path / "old.cevae"
    old.write_bytes(calibrated.read_bytes())
    rewrite(old, lambda h, t: h["training"].__setitem__("val_loss", math.nan))
    shared = share_model(old, tmp_path / "shared.cevae")
    assert read_header(shared).training["val_loss"] is None
    names = _scan_records(_written_header(shared)).values()
    assert names and all(name.startswith("scan ") for name in names)
    assert _tensor_bytes(shared) == _tensor_bytes(old)


@pytest.mark.parametrize("record", [[], {"scans": -1}, {"scans": 2, "who": "x"}])
def test_a_model_whose_record_of_removed_names_is_damaged_is_refused(calibrated, tmp_path, record):
    from test_untrusted_bundles import rewrite

    edited = tmp_path / "edited.cevae"
    edited.write_bytes(calibrated.read_bytes())
    rewrite(edited, lambda h, t: h.__setitem__("names_removed", record))
    with pytest.raises(CeVAEError, match="names_removed"):
        read_header(edited)


def test_an_adapted_model_numbers_each_scan_alike_in_every_record(tiny_bundle, tmp_path):
    """An adapted model names its site scans in its training record, its adaptation's scans and folds and its
    calibration; a copy calibrated from it names its calibration scans too: the same scan, by its sha256, is the
    same number everywhere."""
    from CeVAEAnomalyLib.training.adapt import adapt
    from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

    adapted = adapt(tiny_bundle, _named_heads(tmp_path), tmp_path / "adapted.cevae",
                    AdaptOptions(steps=1, batch_size=8, checkpoint_every=1, device="cpu"))
    bundle = load_bundle(adapted, "cpu")
    site = recalibrate(bundle, _named_heads(tmp_path)[1:], tmp_path / "site.cevae", bundle.header.score_options,
                       bundle.header.postprocess)
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(site), "--out", str(shared)]) == 0
    assert not [stem for stem in STEMS if stem.encode() in shared.read_bytes()]
    header = _written_header(shared)
    by_sha = {v["sha256"]: v["name"] for v in header["adaptation"]["site_scans"]}
    assert sorted(by_sha.values()) == ["scan 1", "scan 2"] and header["names_removed"] == {"scans": 4}
    # the volumes its base model learned from (tiny's two training heads) are renamed too
    base = [v["sha256"] for v in read_header(tiny_bundle).training["subjects"]]
    renamed = {v["sha256"]: v["name"] for v in header["adaptation"]["base_volumes"]}
    assert renamed == dict(zip(base, ["scan 3", "scan 4"]))
    assert {v["sha256"]: v["name"] for v in header["training"]["subjects"]} == by_sha
    assert [by_sha[s["sha256"]] for s in header["recalibration"]["scans"]] == header["calibration_subjects"]
    assert sorted(n for fold in header["adaptation"]["folds"] for n in fold["held_out"]) == ["scan 1", "scan 2"]
    assert json.dumps(header["adaptation"]["folds"]).count("scan") == 4  # each scan held out once, trained on once
    assert read_header(shared).calibration_names() == header["calibration_subjects"]


def test_the_slicer_logic_writes_a_shareable_copy(calibrated, tmp_path):
    """The module's logic shares a model as the command line does (in its own words for a refused output)."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    logic = CeVAEAnomalyLogic()
    out = logic.shareModel(calibrated, tmp_path / "shared.cevae")
    assert out == tmp_path / "shared.cevae" and read_header(out).extra["names_removed"] == {"scans": 5}
    assert not [stem for stem in STEMS if stem.encode() in out.read_bytes()]
    with pytest.raises(CeVAEError, match="pass overwrite=True"):
        logic.shareModel(calibrated, out)
    with pytest.raises(CeVAEError, match="cannot replace the bundled model"):
        logic.shareModel(calibrated, default_model_path(), overwrite=True)
    with pytest.raises(CeVAEError, match="Choose the model file to share"):
        logic.shareModel(None, tmp_path / "other.cevae")


def _adapted_on(folder: Path, tiny_bundle: Path, stems: Sequence[str], persons: Sequence[str]) -> Path:
    """``tiny_bundle`` adapted (one step) on synthetic heads saved under ``stems``, of the persons ``persons``."""
    from CeVAEAnomalyLib.training.adapt import adapt
    from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

    subjects = []
    for stem, person, seed in zip(stems, persons, (31, 32)):
        image, mask = make_head(seed=seed)
        sitk.WriteImage(image, str(folder / f"{stem}.nii.gz"))
        sitk.WriteImage(mask, str(folder / f"{stem}_mask.nii.gz"))
        subjects.append(Subject(folder / f"{stem}.nii.gz", folder / f"{stem}_mask.nii.gz", person))
    return adapt(tiny_bundle, subjects, folder / "adapted.cevae",
                 AdaptOptions(steps=1, batch_size=8, checkpoint_every=1, device="cpu"))


def test_scans_named_as_the_model_s_modality_or_a_person_number_are_shared(tiny_bundle, tmp_path, capsys):
    """A scan named "T1" (a Slicer volume loaded from T1.nii.gz) or "1" (a numbered export) was taken for a name left
    in the model's modality ("T1") or in a volume's person number ("1"), and the copy was refused."""
    adapted = _adapted_on(tmp_path, tiny_bundle, ("T1", "1"), ("12345678_DOE", "87654321_ROE"))
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(adapted), "--out", str(shared)]) == 0, capsys.readouterr().err
    header = _written_header(shared)
    assert sorted(v["name"] for v in header["adaptation"]["site_scans"]) == ["scan 1", "scan 2"]
    assert header["modality"] == "T1" and [v["person"] for v in header["adaptation"]["site_scans"]] == ["1", "2"]


def test_persons_recorded_by_label_are_numbered_in_the_copy(tiny_bundle, tmp_path):
    """Models written before persons were numbered (commit 948e77b) recorded each volume's person by its label (a
    manifest's subject column, a BIDS sub- label: often a patient's ID); the copy kept it."""
    from test_untrusted_bundles import rewrite

    adapted = _adapted_on(tmp_path, tiny_bundle, ("a", "b"), ("12345678_DOE", "87654321_ROE"))
    labels = {"1": "12345678_doe", "2": "87654321_roe"}  # as those versions wrote them: the label in lower case

    def by_label(header: Dict[str, Any], table: Dict[str, Any]) -> None:
        for volume in [*header["training"]["subjects"], *header["adaptation"]["site_scans"]]:
            volume["person"] = labels[volume["person"]]

    rewrite(adapted, by_label)
    assert b"12345678_doe" in adapted.read_bytes()
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(adapted), "--out", str(shared)]) == 0
    assert not [label for label in labels.values() if label.split("_")[0].encode() in shared.read_bytes()]
    header = _written_header(shared)
    records = [*header["training"]["subjects"], *header["adaptation"]["site_scans"]]
    assert {v["name"]: v["person"] for v in records} == {"scan 1": "1", "scan 2": "2"}
    assert model_info(shared)["adaptation"]["persons"] == model_info(adapted)["adaptation"]["persons"] == 2


def test_a_full_disk_is_said_in_one_line_and_leaves_the_existing_copy(calibrated, tmp_path, capsys, monkeypatch):
    """A disk full while the copy was written ended in "unexpected OSError ... report it", naming no file."""
    shared = tmp_path / "shared.cevae"
    shared.write_bytes(b"an earlier copy")
    write = Path.write_bytes

    def full_disk(path: Path, data: bytes) -> int:
        if path.name.startswith(".shared.cevae."):  # the temporary copy
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    capsys.readouterr()
    assert main(["share", str(calibrated), "--out", str(shared), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: Could not write the shareable copy {shared} (No space left on device); "
                                       f"{calibrated} is unchanged.\n")
    assert shared.read_bytes() == b"an earlier copy" and [p.name for p in tmp_path.iterdir()] == ["shared.cevae"]


def test_folds_number_the_site_scans_when_a_calibration_scan_has_a_site_scan_s_name(tiny_bundle, tmp_path):
    """A later scan calibrated under a site scan's name (another session of one patient in a folder of the same
    name) made the folds' "scan N" of that site scan a number no scan had, and the copy counted one scan too many."""
    adapted = _adapted_on(tmp_path, tiny_bundle, ("a", "b"), ("1", "2"))
    later = tmp_path / "later"
    later.mkdir()
    image, mask = make_head(seed=33)
    sitk.WriteImage(image, str(later / "a.nii.gz"))
    sitk.WriteImage(mask, str(later / "a_mask.nii.gz"))
    bundle = load_bundle(adapted, "cpu")
    site = recalibrate(bundle, [Subject(later / "a.nii.gz", later / "a_mask.nii.gz")], tmp_path / "site.cevae",
                       bundle.header.score_options, bundle.header.postprocess)
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(site), "--out", str(shared)]) == 0
    header = _written_header(shared)
    site_scans = sorted(v["name"] for v in header["adaptation"]["site_scans"])
    assert sorted(n for fold in header["adaptation"]["folds"] for n in fold["held_out"]) == site_scans
    # (and the two volumes tiny learned from, which the adapted model records as its base model's: scan 4, scan 5)
    assert header["names_removed"] == {"scans": 5} and header["calibration_subjects"] == ["scan 3"]


@pytest.mark.parametrize("where", ["section", "scan record"])
def test_a_model_written_by_a_later_version_is_not_shared(calibrated, tmp_path, capsys, where):
    """A later CeVAEAnomaly may record scans where this version does not look (a new section, a new key of a scan's
    record): such a model was copied with those names or paths in it, and said to have had its names removed."""
    from test_untrusted_bundles import rewrite

    def later_records(header: Dict[str, Any], table: Dict[str, Any]) -> None:
        header["written_by"] = "9.0.0"
        if where == "section":
            header["site_log"] = {"scans": ["55555555_POE_P_T1"]}
        else:
            header["recalibration"]["scans"][0]["source"] = "/data/55555555_POE_P/T1.nii.gz"

    later = tmp_path / "later.cevae"
    later.write_bytes(calibrated.read_bytes())
    rewrite(later, later_records)
    read_header(later)  # this version reads it (and detects with it)
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(later), "--out", str(shared)]) == 2
    assert capsys.readouterr().err == (
        f"error: {later} was written by CeVAEAnomaly 9.0.0, newer than this one ({__version__}): its header may record "
        "scans where this version does not look, so no shareable copy was written. Share it with CeVAEAnomaly 9.0.0 "
        "or later.\n")
    assert not shared.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["later.cevae"]


def test_a_later_versions_model_calibrated_here_is_still_not_shared(calibrated, tmp_path, capsys):
    """Calibrating a later version's model here copied its unknown sections (which may name scans) and recorded this
    version as its writer, so `share` then copied those sections as if this version knew every name in them."""
    from test_untrusted_bundles import rewrite

    def later_records(header: Dict[str, Any], table: Dict[str, Any]) -> None:
        header["written_by"] = "9.0.0"
        header["site_log"] = {"scans": ["55555555_POE_P_T1"]}

    later = tmp_path / "later.cevae"
    later.write_bytes(calibrated.read_bytes())
    rewrite(later, later_records)
    heads = tmp_path / "heads"
    heads.mkdir()
    bundle = load_bundle(later, "cpu")
    site = recalibrate(bundle, _named_heads(heads), tmp_path / "site.cevae", bundle.header.score_options,
                       bundle.header.postprocess)  # calibrating it works, as detecting with it does
    assert _written_header(site)["written_by"] == "9.0.0"
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(site), "--out", str(shared)]) == 2
    assert f"{site} was written by CeVAEAnomaly 9.0.0, newer than this one" in capsys.readouterr().err
    assert not shared.exists()


def test_a_shared_copy_is_not_shared_again(calibrated, tmp_path, capsys):
    """Sharing a shareable copy wrote the same copy again under a second name (site_shared_shared.cevae) and said
    it had renamed its scans: the copy is already the file to give."""
    shared = tmp_path / "site_shared.cevae"
    assert main(["share", str(calibrated), "--out", str(shared)]) == 0
    capsys.readouterr()
    again = tmp_path / "site_shared_shared.cevae"
    assert main(["share", str(shared), "--out", str(again)]) == 2
    assert capsys.readouterr().err == (
        f"error: {shared} is already a shareable copy (its scans are called scan 1, scan 2, ...): give it as it is; "
        "no copy was written.\n")
    assert not again.exists()


@pytest.mark.parametrize("where, edit", [
    ("a key at its top level", lambda h: h.__setitem__("notes", {"path": "/data/55555555_POE_P/t1.nii.gz"})),
    ("a key in 'recalibration.scans[0]'", lambda h: h["recalibration"]["scans"][0].__setitem__(
        "source", "/data/55555555_POE_P/t1.nii.gz")),
    ("a key in 'training.subjects[1]'", lambda h: h["training"]["subjects"][1].__setitem__(
        "path", "/data/55555555_POE_P/t1.nii.gz")),
    ("a text in 'training.seed'", lambda h: h["training"].__setitem__("seed", "/data/55555555_POE_P/t1.nii.gz")),
])
def test_share_refuses_a_text_it_does_not_know_that_is_no_scan_name(calibrated, tmp_path, capsys, where, edit):
    """A record this version does not write (a tool's or a person's edit) holding a scan's path rather than its name
    was copied as it was, and the copy said its scans' names were removed: only the scans' old names were looked
    for. Every text outside the places known to hold none must now be a name share gave or a checksum, and every
    key one this version writes (the first refused is said)."""
    from test_untrusted_bundles import rewrite

    edited = tmp_path / "edited.cevae"
    edited.write_bytes(calibrated.read_bytes())
    rewrite(edited, lambda h, t: edit(h))
    out = tmp_path / "shared.cevae"
    assert main(["share", str(edited), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: The model's header holds {where}, a record this version does not write and "
                   "cannot tell to hold no scan's name or path; no shareable copy was written. If a later CeVAEAnomaly "
                   "made the model, share it with that one; else the file was edited: share an original copy.\n")
    assert "POE" not in err and not out.exists()


def test_a_later_versions_model_adapted_here_keeps_none_of_what_this_version_does_not_know(tiny_bundle, tmp_path,
                                                                                         capsys):
    """adapt writes its model's header anew (this version's records only; of the base model's training volumes their
    name and checksums), so an adapted later version's model holds none of that version's records and is shared."""
    from test_untrusted_bundles import rewrite

    def later_records(header: Dict[str, Any], table: Dict[str, Any]) -> None:
        header["written_by"] = "9.0.0"
        header["site_log"] = {"scans": ["55555555_POE_P_T1"]}
        header["training"]["subjects"][0]["source"] = "/data/55555555_POE_P/T1.nii.gz"

    later = tmp_path / "later.cevae"
    later.write_bytes(tiny_bundle.read_bytes())
    rewrite(later, later_records)
    adapted = _adapted_on(tmp_path, later, ("a", "b"), ("1", "2"))
    assert b"POE" not in adapted.read_bytes() and "site_log" not in _written_header(adapted)
    shared = tmp_path / "shared.cevae"
    assert main(["share", str(adapted), "--out", str(shared)]) == 0, capsys.readouterr().err
    assert b"POE" not in shared.read_bytes()
