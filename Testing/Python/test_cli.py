"""The command line end to end: train a few steps on synthetic volumes, then detect."""
import csv
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_head, oblique_direction, write_cohort
from CeVAEAnomalyLib.engine.bundle import read_header
from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError


def test_train_then_detect(tmp_path):
    write_cohort(tmp_path)
    bundle = tmp_path / "model.cevae"
    assert main(["train", "--manifest", str(tmp_path / "train.csv"), "--out", str(bundle),
                 "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "8",
                 "--channels", "8,8,16,16", "--z-dim", "8", "--device", "cpu", "--seed", "3"]) == 0
    header = read_header(bundle)
    assert header.training["steps"] == 4 and len(header.calibration) == 3
    log_rows = list(csv.DictReader(open(tmp_path / "model.cevae.log.csv")))
    assert [int(r["step"]) for r in log_rows] == [2, 4]

    # an oblique, anisotropic, non-cubic volume on disk as NRRD
    image, mask = make_head(size=(36, 30, 20), spacing=(0.9, 1.1, 3.0),
                            direction=oblique_direction(30), origin=(5.0, -3.0, 12.0), seed=7)
    sitk.WriteImage(image, str(tmp_path / "test.nrrd"))
    sitk.WriteImage(mask, str(tmp_path / "test_mask.nrrd"))
    out = tmp_path / "out"
    assert main(["detect", str(tmp_path / "test.nrrd"), "--mask", str(tmp_path / "test_mask.nrrd"),
                 "--model", str(bundle), "--score", str(out / "score.nii.gz"),
                 "--labelmap", str(out / "label.nrrd"), "--slice-scores", str(out / "slices.csv"),
                 "--device", "cpu"]) == 0
    score = sitk.ReadImage(str(out / "score.nii.gz"))
    label = sitk.ReadImage(str(out / "label.nrrd"))
    ref = sitk.ReadImage(str(tmp_path / "test.nrrd"))
    for img in (score, label):
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert score.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
    s = sitk.GetArrayFromImage(score)
    brain = sitk.GetArrayFromImage(mask) > 0
    assert (s[~brain] == 0).all() and s[brain].max() > 0
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    slices = list(csv.DictReader(open(out / "slices.csv")))
    assert {"axis", "index", "kl", "rec", "neg_elbo"} <= set(slices[0])
    assert len(slices) >= 10


def test_help_imports_no_torch_simpleitk_or_numpy():
    """numpy came in once through the adapt command's defaults (training.adapt_plan imported engine.calibration at its
    top): 0.15 s of CPU, several times the 0.04-0.08 s the README and docs/PERFORMANCE.md give for --help."""
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from CeVAEAnomalyLib.cli.main import main\n"
                        "try:\n main(['--help'])\nexcept SystemExit: pass\n"
                        "print('torch' in sys.modules, 'SimpleITK' in sys.modules, 'numpy' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert "detect" in r.stdout and r.stdout.strip().endswith("False False False")


def test_every_option_of_every_command_is_explained_with_its_default():
    from CeVAEAnomalyLib.cli.main import build_parser

    parser = build_parser()
    for name, command in parser.commands.items():
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and isinstance(action.default, (int, float, str)) \
                    and not isinstance(action.default, bool) and action.default != "==SUPPRESS==" \
                    and "default" not in action.help:  # (a help that words its default itself)
                shown = f"(default: {action.default})"
                assert shown in " ".join(text.split()).replace("- ", "-"), f"{name} {action.option_strings}: {shown}"


def test_an_unknown_option_points_to_its_commands_help(capsys):
    assert main(["detect", "scan.nii.gz", "--score", "s.nii.gz", "--foo"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unrecognized arguments: --foo (see cevae-anomaly detect --help)\n"


def test_debug_is_taken_before_or_after_the_command(capsys):
    """The advice of an error ("run again with --debug") works wherever the user adds it."""
    missing = ["detect", "missing.nii.gz", "--score", "s.nii.gz"]
    assert main(missing) == 2
    assert capsys.readouterr().err == "error: The image missing.nii.gz does not exist.\n"
    for argv in (["--debug", *missing], [*missing, "--debug"]):
        with pytest.raises(CeVAEError, match="missing.nii.gz does not exist"):  # raised: the traceback is shown
            main(argv)


def test_batch_refuses_an_impossible_worker_count_before_any_file_is_read(tmp_path, capsys):
    """As every impossible option value: the inputs (here missing) are not looked at first."""
    assert main(["batch", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers must be 1 or more, got 0.\n"


@pytest.mark.parametrize("command", ["detect", "batch", "calibrate", "adapt"])
def test_a_folder_given_as_the_model_is_said_so(tmp_path, monkeypatch, capsys, command):
    """Not taken for an input folder that the outputs must stay out of ("is inside the input folder .")."""
    monkeypatch.chdir(tmp_path)
    image, _ = make_head(size=(24, 24, 20))
    Path("in").mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "in/a.nii.gz"):
        sitk.WriteImage(image, name)
    argv = {"detect": ["detect", "a.nii.gz", "--score", "s.nii.gz"],
            "batch": ["batch", "in", "--out-dir", "out"],
            "calibrate": ["calibrate", "a.nii.gz", "b.nii.gz", "--out", "c.cevae"],
            "adapt": ["adapt", "a.nii.gz", "b.nii.gz", "--out", "c.cevae"]}[command]
    assert main([*argv, "--model", "."]) == 2
    assert capsys.readouterr().err == "error: The model bundle . is a folder; give the path of a .cevae file.\n"


def test_tables_named_tsv_are_tab_separated(tmp_path, head, tiny_bundle):
    """--slice-scores x.tsv and --components x.TSV get tabs (they got commas under a name that says tabs); a .csv
    name keeps commas, and both hold the same rows."""
    image, mask = head
    common = ["detect", str(image), "--mask", str(mask), "--model", str(tiny_bundle), "--device", "cpu",
              "--threshold", "0"]
    for ext in ("csv", "tsv", "TSV"):
        assert main([*common, "--score", str(tmp_path / f"score_{ext}.nii.gz"), "--slice-scores",
                     str(tmp_path / f"slices.{ext}"), "--components", str(tmp_path / f"components.{ext}")]) == 0
    for table in ("slices", "components"):
        rows = list(csv.reader(open(tmp_path / f"{table}.csv")))
        assert len(rows) > 1 and len(rows[0]) > 2
        for ext in ("tsv", "TSV"):
            text = (tmp_path / f"{table}.{ext}").read_text()
            assert "," not in text.splitlines()[0]
            assert list(csv.reader(text.splitlines(), delimiter="\t")) == rows


def test_detect_records_how_its_outputs_were_made(tmp_path, head, tiny_bundle, capsys, caplog):
    """--record writes, with the other outputs, the model file and its sha256, the threshold and its source, the
    options, the input files and their sha256 and the run's warnings; as every output it is refused before any work
    where it is an input, has an image name or exists (without --overwrite)."""
    import hashlib
    import json
    import logging
    import os

    from CeVAEAnomalyLib import __version__

    image, mask = head
    record = tmp_path / "record.json"
    common = ["detect", str(image), "--mask", str(mask), "--model", str(tiny_bundle), "--device", "cpu",
              "--score", str(tmp_path / "score.nii.gz"), "--threshold", "0.5", "--rim-mm", "2"]
    refused = {str(mask): "is the same file as an input", str(tmp_path / "record.nii.gz"): "is written as JSON text"}
    for path, message in refused.items():
        assert main([*common, "--record", path]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "score.nii.gz").exists()
    with caplog.at_level(logging.INFO):
        assert main([*common, "--record", str(record), "--labelmap", str(tmp_path / "labelmap.nii.gz")]) == 0
    assert f"Wrote {tmp_path / 'score.nii.gz'}, {tmp_path / 'labelmap.nii.gz'}, {record}." in caplog.text
    written = json.loads(record.read_text())
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert (written["model"]["sha256"], written["model"]["path"]) == (digest(tiny_bundle), os.path.abspath(tiny_bundle))
    assert written["inputs"] == {"image": {"path": os.path.abspath(image), "sha256": digest(image)},
                                 "mask": {"path": os.path.abspath(mask), "sha256": digest(mask)}}
    assert (written["threshold"], written["threshold_source"], written["model"]["calibrated_on"]) == (
        0.5, "absolute", None)
    assert written["postprocess"]["rim_mm"] == 2.0 and written["score_options"] == read_header(
        tiny_bundle).score_options.to_dict()
    assert (written["tool"], written["version"], written["device"]) == ("cevae-anomaly", __version__, "cpu")
    # the run's one warning: the synthetic head is not left-right symmetric (sin 6x), so no side is said
    assert [w.split(":")[0] for w in written["warnings"]] == ["The lesion table gives no side (left, right, both) for "
                                                              "the components"], written["warnings"]
    assert written["warnings"][0] in caplog.text
    before = record.read_bytes()
    again = [*common[:-6], "--score", str(tmp_path / "again.nii.gz"), "--record", str(record), "--threshold", "inf"]
    assert main(again) == 2 and record.read_bytes() == before and not (tmp_path / "again.nii.gz").exists()
    said = capsys.readouterr().err.strip()
    assert said == f"error: The output {record} already exists; pass --overwrite to replace it."
    assert main([*again, "--overwrite"]) == 0
    assert json.loads(record.read_text())["threshold"] == "inf"  # standard JSON


def test_an_existing_output_names_overwrite_as_each_caller_gives_it_also_from_another_process(tmp_path):
    """The library's refusal names the flag and the argument; a command's line names its flag only. Raised in a
    worker process, the refusal arrives as it was raised."""
    import pickle

    from CeVAEAnomalyLib.cli.main import command_line_wording
    from CeVAEAnomalyLib.io.targets import check_paths

    out = tmp_path / "score.nii.gz"
    out.write_text("the user's own file")
    with pytest.raises(CeVAEError) as refused:
        check_paths([out], overwrite=False)
    for exc in (refused.value, pickle.loads(pickle.dumps(refused.value))):
        exists = f"The output {out} already exists; pass --overwrite"
        assert str(exc) == f"{exists} (overwrite=True in Python) to replace it."
        assert command_line_wording(exc, "detect") == f"{exists} to replace it."


@pytest.mark.parametrize("argv", [
    ["calibrate", "{scan}", "--out", "models/"],
    ["train", "{scan}", "--out", "models/"],
    ["adapt", "{scan}", "{scan}", "--out", "models/"],
    ["detect", "{scan}", "--score", "score.nii.gz", "--record", "models/"],
    ["evaluate", "--score", "{scan}", "--gt", "{scan}", "--out", "models/"],
], ids=["calibrate", "train", "adapt", "detect", "evaluate"])
def test_an_output_file_named_with_a_trailing_slash_is_refused_not_written_as_a_file(argv, tmp_path, monkeypatch,
                                                                                    capsys):
    """'calibrate --out models/' (a folder meant, not yet made) wrote the model to a file named 'models', as did
    train, adapt, detect --record and evaluate --out: pathlib drops the slash. It is refused in one line now."""
    monkeypatch.chdir(tmp_path)
    image, _ = make_head(seed=1)
    sitk.WriteImage(image, "h.nii.gz")
    assert main([a.format(scan="h.nii.gz") for a in argv]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1].startswith("error: argument ") and "models/ names a folder (it ends in a slash); give a file " \
                                                      "name, such as models/NAME" in said[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.nii.gz"]


def test_a_three_slice_volume_with_a_mask_is_refused_for_what_needs_the_slices(tmp_path, tiny_bundle, capsys):
    """A 3-slice scan given with its brain mask was refused saying "the brain mask and the filters need them", though
    no brain mask was to be made: the reason names only the filters, which need them with a mask or without."""
    image, mask = make_head(seed=4)
    sitk.WriteImage(image[:, :, 10:13], str(tmp_path / "slab.nii.gz"))
    sitk.WriteImage(mask[:, :, 10:13], str(tmp_path / "slab_mask.nii.gz"))
    assert main(["detect", str(tmp_path / "slab.nii.gz"), "--mask", str(tmp_path / "slab_mask.nii.gz"), "--model",
                 str(tiny_bundle), "--device", "cpu", "--score", str(tmp_path / "score.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert "only 3 voxels along one axis" in error and "the filters need them" in error
    assert "brain mask" not in error
