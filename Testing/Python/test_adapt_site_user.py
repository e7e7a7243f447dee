"""Adapting as a site's user runs it (`cevae-anomaly adapt`, training.adapt.adapt): what is said when the output
is a file the run reads."""
from __future__ import annotations

import os
import shutil

import pytest

import CeVAEAnomalyLib.training.adapt as adapt_mod
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.checksum import sha256_of
from test_adapt import QUICK, QUICK_ARGS, site, subjects  # noqa: F401 (site: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_output_that_is_the_input_model_is_refused_as_such_not_offered_overwrite(tmp_path, tiny_bundle, site,
                                                                                      capsys):
    """--out naming the model adapted (or a link to it) was refused as "already exists ...; pass --overwrite to
    adapt again and replace it": the advice was to replace the input model (which --overwrite then refused)."""
    model = tmp_path / "base.cevae"
    shutil.copy(tiny_bundle, model)
    os.link(model, tmp_path / "linked.cevae")
    before = sha256_of(model)
    for out in (model, tmp_path / "linked.cevae"):
        with pytest.raises(CeVAEError, match="is the same file as the input") as caught:
            adapt_mod.adapt(model, subjects(site, "a", "b"), out, QUICK)
        assert "--overwrite" not in str(caught.value)
    assert main(["adapt", str(site["a"]), str(site["b"]), "--model", str(model), "--out", str(model),
                 *QUICK_ARGS]) == 2
    err = capsys.readouterr().err
    assert "same file as the input" in err and "--overwrite" not in err
    assert sha256_of(model) == before


def test_scans_of_different_acquisitions_are_warned_of_before_the_fine_tuning(tmp_path, tiny_bundle, site, caplog):
    """A 2 mm and a 5 mm scan were warned of ("Calibrate one model per acquisition") only by the calibration, once
    every fine-tuning run was done: the warning now comes before the first step, while stopping costs nothing."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.progress import Cancelled

    def resampled(path, spacing, name, interpolator):
        image = sitk.ReadImage(str(path))
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
        out = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                            image.GetDirection(), 0, image.GetPixelID())
        sitk.WriteImage(out, str(tmp_path / name))
        return tmp_path / name

    thick = Subject(resampled(site["b"], (2.0, 2.0, 5.0), "thick.nii.gz", sitk.sitkLinear),
                    resampled(site["mask"], (2.0, 2.0, 5.0), "thick_mask.nii.gz", sitk.sitkNearestNeighbor))

    def stop_at_the_first_step(fraction: float, message: str) -> None:
        if message.startswith("Fine-tuning"):
            raise Cancelled("stopped by the test")

    with caplog.at_level("WARNING"), pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, [*subjects(site, "a"), thick], tmp_path / "site.cevae", QUICK,
                        stop_at_the_first_step)
    mixed = [r.getMessage() for r in caplog.records if "different acquisitions" in r.getMessage()]
    assert len(mixed) == 1 and "thick.nii.gz has voxels up to 5 mm" in mixed[0] and "stop now" in mixed[0]
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(Cancelled):
        adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), tmp_path / "same.cevae", QUICK, stop_at_the_first_step)
    assert "different acquisitions" not in caplog.text


def test_a_site_scan_unlike_the_others_is_advised_out_of_the_adaptation_not_only_of_the_calibration(
        tmp_path, site, caplog):
    """A patient's scan with a large lesion among healthy site scans was warned of as "Check it, and calibrate without
    it": after an adaptation the model is also fine-tuned on it, so calibrating without it keeps the lesion learnt as
    healthy; the warning now says to adapt again without it."""
    import SimpleITK as sitk

    from CeVAEAnomalyLib.io.manifest import Subject

    lesions = pytest.importorskip("CeVAEAnomalyResearch.lesions")
    image = sitk.ReadImage(str(site["a"]))
    patient = lesions.insert_lesions(image, sitk.ReadImage(str(site["mask"])), 1, n=4, radius_mm=(12.0, 16.0))[0]
    sitk.WriteImage(patient, str(tmp_path / "patient.nii.gz"))
    scans = [*subjects(site, "a", "b"), Subject(tmp_path / "patient.nii.gz", site["mask"])]
    base = plain_bundled_model(tmp_path / "base.cevae", subjects(site, "a", "b"))
    with caplog.at_level("WARNING"):
        adapt_mod.adapt(base, scans, tmp_path / "site.cevae", QUICK)
    unlike = [r.getMessage() for r in caplog.records if "it is unlike them" in r.getMessage()]
    assert len(unlike) == 1 and unlike[0].startswith(str(tmp_path / "patient.nii.gz")), caplog.text
    assert unlike[0].endswith("Check it, and adapt again without it unless it is a healthy scan of this protocol: the "
                              "adapted model was fine-tuned on it too, so it may take what is unusual in it for "
                              "healthy."), unlike[0]


def plain_bundled_model(out, scans):
    """The bundled model calibrated on ``scans`` in its plain mode only, written to ``out``: a base an adaptation
    calibrates without the thorough mode's test-time fine-tuning of every scan (minutes on a CPU)."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate

    bundled = load_bundle(default_model_path(), "cpu")
    return recalibrate(bundled, scans, out, bundled.header.score_options, bundled.header.postprocess)


def test_the_command_to_detect_with_an_adapted_model_in_a_folder_with_spaces_can_be_pasted(tmp_path, tiny_bundle,
                                                                                           site, caplog):
    """adapt ended with "Detect with it: cevae-anomaly detect SCAN --model Site scans é/Modèl ü.cevae": pasted into a
    shell, the path fell apart into three words and detect refused them."""
    import shlex

    folder = tmp_path / "Site scans é"
    folder.mkdir()
    out = folder / "Modèl ü.cevae"
    with caplog.at_level("INFO"):
        adapt_mod.adapt(tiny_bundle, subjects(site, "a", "b"), out, QUICK)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Adapted model written")][-1]
    assert shlex.split(said.split("Detect with it: ")[1]) == ["cevae-anomaly", "detect", "SCAN", "--model", str(out)]
