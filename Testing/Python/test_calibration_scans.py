"""What a site calibration tells about its own healthy scans.

Measured with the bundled model at its default rate: one 2 mm scan with 8.7 ml of inserted lesions among four healthy
ones raised the pooled threshold from 5.1 to 29 and flagged 32 times the rate at the threshold the others give (healthy
scans of other heads: at most 3.9 times against two heads pooled); calibrate said nothing of it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA
from CeVAEAnomalyLib.data import data_path, default_model_path
from CeVAEAnomalyLib.engine.bundle import load_bundle
from CeVAEAnomalyLib.engine.calibrate import recalibrate
from CeVAEAnomalyLib.engine.calibration import (UNLIKE_FACTOR, calibrate, find_calibration, leave_one_out,
                                                threshold_for_fpr)
from CeVAEAnomalyLib.engine.header import read_header
from CeVAEAnomalyLib.io.manifest import Subject
from CeVAEAnomalyLib.options import ThresholdPolicy

research = pytest.importorskip("CeVAEAnomalyResearch.acquisition")
from CeVAEAnomalyResearch.lesions import insert_lesions  # noqa: E402


def test_leave_one_out_is_the_threshold_a_calibration_on_the_others_gives() -> None:
    rng = np.random.default_rng(0)
    scores = [rng.gamma(2.0, size=n).astype(np.float32) for n in (1000, 5000, 300)]
    for fpr in (1e-6, 0.00021774, 0.001, 0.3, 0.5):
        record = leave_one_out(scores, fpr)
        others = [calibrate([s for j, s in enumerate(scores) if j != i], "") for i in range(len(scores))]
        assert record["threshold"] == pytest.approx([threshold_for_fpr(e, fpr) for e in others], rel=1e-9)
        assert record["rate"] == [np.mean(s >= t) for s, t in zip(scores, record["threshold"])]
    entry = calibrate(scores, "", fpr=0.001)
    assert entry["scan_voxels"] == [1000, 5000, 300] and entry["leave_one_out"]["fpr"] == 0.001
    assert "leave_one_out" not in calibrate(scores[:1], "", fpr=0.001)  # nothing to leave one out of
    assert "leave_one_out" not in calibrate(scores[:2], "", fpr=0.001, persons=["p", "p"])  # nor of one person
    record = leave_one_out(scores, 0.001, persons=["p", "q", "p"])  # a person's scans are left out together
    alone = {"p": calibrate(scores[1:2], ""), "q": calibrate(scores[::2], "")}
    assert record["threshold"] == pytest.approx([threshold_for_fpr(alone[p], 0.001) for p in "pqp"], rel=1e-9)


UNKNOWN_PERSONS = ("No manifest 'subject' column or BIDS file name (sub-<label>_...) says who was scanned, so each of "
                   "the {n} volumes is taken for a different person; where some are scans of one person (sessions), "
                   "name it in a 'subject' column so that they are held out together.")


def _scans(folder: Path) -> Dict[str, Subject]:
    """The bundled 2 mm Colin27, a noisy and a bias-field copy (healthy), and a copy with inserted lesions."""
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask_path = data_path("colin27_brainmask_2mm.nii.gz")
    mask = sitk.ReadImage(str(mask_path))
    scans = {"plain": image, "noisy": research.rician_noise(image, mask, 0.03, 0),
             "biased": research.bias_field(image, 0.2, 0),
             "lesion": insert_lesions(image, mask, 1, n=4, radius_mm=(12.0, 16.0))[0]}
    subjects = {}
    for name, scan in scans.items():
        sitk.WriteImage(scan, str(folder / f"{name}.nii.gz"))
        subjects[name] = Subject(folder / f"{name}.nii.gz", mask_path)
    return subjects


def test_calibrate_names_a_scan_unlike_the_others_and_records_each_scans_figures(tmp_path: Path, caplog,
                                                                                  one_thread) -> None:
    subjects = _scans(tmp_path)
    bundle = load_bundle(default_model_path(), "cpu")
    header = bundle.header
    with caplog.at_level(logging.INFO):
        path = recalibrate(bundle, list(subjects.values()), tmp_path / "site.cevae", header.score_options,
                           header.postprocess)
    assert UNKNOWN_PERSONS.format(n=4) in caplog.text  # as adapt says it: no subject column, no BIDS names
    unlike = [r.getMessage() for r in caplog.records if "it is unlike them" in r.getMessage()]
    assert len(unlike) == 1 and unlike[0].startswith(str(subjects["lesion"].image)), unlike
    assert f"default false-positive rate {header.default_fpr:g}" in unlike[0]
    new = read_header(path)
    entry = find_calibration(new.calibration, new.score_options, new.postprocess)
    assert len(entry["scan_voxels"]) == 4 and sum(entry["scan_voxels"]) == entry["n_voxels"]
    record = entry["leave_one_out"]
    assert record["fpr"] == new.default_fpr and len(record["rate"]) == len(record["threshold"]) == 4
    lesion = list(subjects).index("lesion")
    assert record["rate"][lesion] > UNLIKE_FACTOR * new.default_fpr
    assert record["threshold"][lesion] < new.default_threshold() / 1.5  # the lesion scan lifts it for every scan
    assert max(r for i, r in enumerate(record["rate"]) if i != lesion) < new.default_fpr

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        recalibrate(bundle, [s for name, s in subjects.items() if name != "lesion"], tmp_path / "healthy.cevae",
                    header.score_options, header.postprocess)
    assert not [r for r in caplog.records if "unlike" in r.getMessage() or "single healthy scan" in r.getMessage()]


def test_two_scans_of_one_person_are_left_out_together(tmp_path: Path, caplog, one_thread) -> None:
    """Two sessions of one person with a lesion, among healthy scans of others: left out one scan at a time, each
    lesion scan met its twin in the others' pool, which raised that threshold, and neither was warned about. The log's
    spread of the threshold says that a person's scans were left out together (it said "each healthy volume")."""
    subjects = _scans(tmp_path)
    noisy, mask = (sitk.ReadImage(str(p)) for p in (subjects["noisy"].image, subjects["noisy"].mask))
    sitk.WriteImage(insert_lesions(noisy, mask, 1, n=4, radius_mm=(12.0, 16.0))[0], str(tmp_path / "again.nii.gz"))
    twins = [Subject(subjects["lesion"].image, subjects["lesion"].mask, person="sub-07"),
             Subject(tmp_path / "again.nii.gz", subjects["noisy"].mask, person="07")]  # (a BIDS label, either way)
    healthy = [subjects[name] for name in ("plain", "noisy", "biased")]
    bundle = load_bundle(default_model_path(), "cpu")
    with caplog.at_level(logging.INFO):
        path = recalibrate(bundle, healthy + twins, tmp_path / "site.cevae", bundle.header.score_options,
                           bundle.header.postprocess)
    assert "Left out in turn, the healthy volumes of each of the 4 persons (a person's scans together) move the " \
           f"threshold at the default rate {bundle.header.default_fpr:g} between " in caplog.text, caplog.text
    unlike = [r.getMessage() for r in caplog.records if "it is unlike them" in r.getMessage()]
    assert [m.split(":")[0] for m in unlike] == [str(s.image) for s in twins], unlike
    assert "the 3 healthy scans of other persons give" in unlike[0]
    assert "No manifest 'subject' column" not in caplog.text  # two scans say their person
    new = read_header(path)
    record = find_calibration(new.calibration, new.score_options, new.postprocess)["leave_one_out"]
    assert record["threshold"][3] == record["threshold"][4] < new.default_threshold() / 1.5  # both left out
    assert max(record["rate"][:3]) < new.default_fpr


def test_a_rate_that_rests_on_a_few_healthy_voxels_is_said_to_be_unmeasured(tmp_path: Path, caplog,
                                                                             one_thread) -> None:
    from CeVAEAnomalyLib.engine.detector import detect

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    with caplog.at_level(logging.WARNING):  # the bundled model's 4.2 M voxels: 4 above 1e-6, 42 above 1e-5
        unmeasured = detect(image, default_model_path(), mask, fpr=1e-6, device="cpu")
    assert "rests on 4.2 of the 4197265 healthy brain voxels calibrated on, fewer than 10" \
        in unmeasured.threshold_source
    assert any("false-positive rate is not measured" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        measured = detect(image, default_model_path(), mask, fpr=1e-5, device="cpu")
    assert "rests on" not in measured.threshold_source and "not measured" not in caplog.text

    subjects = _scans(tmp_path)  # one 2 mm scan: 224 k voxels, 2.2 above 1e-5
    bundle = load_bundle(default_model_path(), "cpu")
    with caplog.at_level(logging.WARNING):
        path = recalibrate(bundle, [subjects["plain"]], tmp_path / "one.cevae", bundle.header.score_options,
                           bundle.header.postprocess, default_fpr=1e-5)
    assert f"Calibrating on a single healthy scan ({subjects['plain'].image}): no other scan can show" in caplog.text
    assert "The model's default rate is too low for 1 healthy volume(s): the threshold at a false-positive rate of " \
           "1e-05 rests on 2.2 of the 223842 healthy brain voxels" in caplog.text
    new = read_header(path)
    assert "rests on 2.2" in new.threshold(new.score_options, new.postprocess, ThresholdPolicy())[1]


def test_calibrating_on_scans_of_one_person_is_warned_of_as_a_single_scan_is(tmp_path: Path, caplog,
                                                                              one_thread) -> None:
    """Two sessions of one person (a manifest's subject column) were calibrated on without a word: no scan of
    another person checks them, as none checks a single scan."""
    subjects = _scans(tmp_path)
    sessions = [replace(subjects[name], person="sub-07") for name in ("plain", "noisy")]
    bundle = load_bundle(default_model_path(), "cpu")
    with caplog.at_level(logging.WARNING):
        path = recalibrate(bundle, sessions, tmp_path / "site.cevae", bundle.header.score_options,
                           bundle.header.postprocess)
    assert (f"Calibrating on healthy scans of a single person ({sessions[0].image}, {sessions[1].image}: "
            "person sub-07): no scan of another person can show") in caplog.text, caplog.text
    new = read_header(path)
    assert "leave_one_out" not in find_calibration(new.calibration, new.score_options, new.postprocess)


def _heads_at_3mm(folder: Path) -> Dict[str, Subject]:
    """The healthy sample heads (colin27, mni152, robex) smoothed and resampled to 3 mm voxels, with their masks."""
    subjects = {}
    for name in ("colin27", "mni152", "robex"):
        for role, suffix, interpolator in (("image", "t1", sitk.sitkLinear), ("mask", "brainmask",
                                                                              sitk.sitkNearestNeighbor)):
            im = sitk.ReadImage(str(SHARED_DATA / f"{name}_{suffix}.nii.gz"))
            if role == "image":
                im = sitk.SmoothingRecursiveGaussian(sitk.Cast(im, sitk.sitkFloat32), 1.0)
            size = [round(n * s / 3.0) for n, s in zip(im.GetSize(), im.GetSpacing())]
            sitk.WriteImage(sitk.Resample(im, size, sitk.Transform(), interpolator, im.GetOrigin(), (3.0,) * 3,
                                          im.GetDirection()), str(folder / f"{name}_{role}.nii.gz"))
        subjects[name] = Subject(folder / f"{name}_image.nii.gz", folder / f"{name}_mask.nii.gz")
    return subjects


@pytest.mark.skipif(not (SHARED_DATA / "robex_t1.nii.gz").exists(), reason="needs the healthy sample volumes")
def test_a_healthy_scan_is_not_called_unlike_the_others_for_a_few_voxels_at_an_unmeasured_rate(
        tmp_path: Path, caplog, one_thread) -> None:
    """At a rate whose threshold rests on a few voxels, the others' threshold is about their highest score: a
    healthy scan with one or two voxels above it flagged "times that rate" and was called unlike the others."""
    subjects = _heads_at_3mm(tmp_path)
    bundle = load_bundle(default_model_path(), "cpu")
    with caplog.at_level(logging.WARNING):
        path = recalibrate(bundle, list(subjects.values()), tmp_path / "site.cevae", bundle.header.score_options,
                           bundle.header.postprocess, default_fpr=1e-6)
    assert "so that rate is not measured" in caplog.text  # said once, for the calibration
    assert "unlike" not in caplog.text, caplog.text
    new = read_header(path)
    record = find_calibration(new.calibration, new.score_options, new.postprocess)
    flagged = [r * n for r, n in zip(record["leave_one_out"]["rate"], record["scan_voxels"])]
    assert max(record["leave_one_out"]["rate"]) > UNLIKE_FACTOR * 1e-6 and 0 < max(flagged) < 10  # a few voxels

    image, mask = (sitk.ReadImage(str(p)) for p in (subjects["mni152"].image, subjects["mni152"].mask))
    sitk.WriteImage(insert_lesions(image, mask, 1, n=4, radius_mm=(12.0, 16.0))[0], str(tmp_path / "lesion.nii.gz"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a lesion's many voxels are still told
        recalibrate(bundle, [*subjects.values(), Subject(tmp_path / "lesion.nii.gz", subjects["mni152"].mask)],
                    tmp_path / "lesion.cevae", bundle.header.score_options, bundle.header.postprocess,
                    default_fpr=1e-6)
    unlike = [r.getMessage() for r in caplog.records if "it is unlike them" in r.getMessage()]
    assert [m.split(":")[0] for m in unlike] == [str(tmp_path / "lesion.nii.gz")], unlike


def test_calibrate_warns_of_scans_of_different_acquisitions_pooled(tmp_path: Path, caplog, one_thread) -> None:
    subjects = _scans(tmp_path)
    image, mask = (sitk.ReadImage(str(p)) for p in (subjects["plain"].image, subjects["plain"].mask))
    size = [image.GetSize()[0], image.GetSize()[1], round(image.GetSize()[2] * 2 / 6.5)]
    for name, im in (("thick", image), ("thick_mask", mask)):  # 2 x 2 x 6.5 mm slices of the same head
        sitk.WriteImage(sitk.Resample(im, size, sitk.Transform(), sitk.sitkNearestNeighbor, im.GetOrigin(),
                                      (2.0, 2.0, 6.5), im.GetDirection()), str(tmp_path / f"{name}.nii.gz"))
    thick = Subject(tmp_path / "thick.nii.gz", tmp_path / "thick_mask.nii.gz")
    bundle = load_bundle(default_model_path(), "cpu")
    with caplog.at_level(logging.WARNING):
        path = recalibrate(bundle, [subjects["plain"], subjects["noisy"], thick], tmp_path / "mixed.cevae",
                           bundle.header.score_options, bundle.header.postprocess)
    mixed = [r.getMessage() for r in caplog.records if "different acquisitions" in r.getMessage()]
    assert len(mixed) == 1 and mixed[0].startswith(f"The healthy volumes are of different acquisitions: {thick.image} "
                                                   f"has voxels up to 6.5 mm, {subjects['plain'].image} 2 mm"), mixed
    assert "detection no longer warns about scans with voxels up to 9.75 mm" in mixed[0]
    new = read_header(path)
    assert find_calibration(new.calibration, new.score_options, new.postprocess)["largest_voxel_mm"] == [2.0, 6.5]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        recalibrate(bundle, [subjects["plain"], subjects["noisy"]], tmp_path / "same.cevae",
                    bundle.header.score_options, bundle.header.postprocess)
    assert "different acquisitions" not in caplog.text


def test_leave_one_out_of_many_scans_sorts_their_pool_once(monkeypatch) -> None:
    """Each volume's leave-one-out threshold sorted the pooled top values of all the others again: with a 200 k
    voxel score each, 25 volumes took 0.13 s, 50 took 0.74 s, 100 took 2.6 s (the square of the volumes; a site
    calibrating on hundreds of 1 mm scans waited minutes after scoring them). The pool is now sorted once, and each
    threshold is still the one a calibration on the others gives."""
    rng = np.random.default_rng(1)
    scores = [rng.gamma(2.0, size=int(n)).astype(np.float32) for n in rng.integers(200, 2000, 40)]
    persons = [f"p{i // 2}" for i in range(len(scores) - 1)] + ["alone"]  # two scans each, and one of a person alone
    sorted_values = []
    for name in ("sort", "argsort", "quantile"):
        real = getattr(np, name)
        monkeypatch.setattr(np, name, lambda a, *args, _real=real, **kw: (sorted_values.append(np.size(a)),
                                                                           _real(a, *args, **kw))[1])
    record = leave_one_out(scores, 0.01, persons)
    pooled = sum(sorted_values)
    monkeypatch.undo()
    keep = int(np.ceil(0.01 * sum(s.size for s in scores))) + 2
    assert pooled <= 2 * sum(min(keep, s.size) for s in scores)  # the pool (and its owners), not once per person
    for i, threshold in enumerate(record["threshold"]):
        others = [s for s, p in zip(scores, persons) if p != persons[i]]
        assert threshold == pytest.approx(threshold_for_fpr(calibrate(others, ""), 0.01), rel=1e-9)
