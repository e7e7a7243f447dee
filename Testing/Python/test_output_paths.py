"""Hostile output paths: devices, FIFOs and links to them are never replaced; names too long are refused
before any work, and names that fit are written (their hidden temporary name fits too)."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Dict, List

import pytest

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.atomic import atomic_path, write_all
from CeVAEAnomalyLib.training.config import TrainConfig

from conftest import write_cohort
from test_reliability import detect_argv, inputs, one_error_line, tree  # noqa: F401 (inputs: a fixture)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.nii.gz"
    os.mkfifo(path)
    return path


@pytest.fixture
def null_link(tmp_path) -> Path:
    """A link to the character device /dev/null, named like an output."""
    link = tmp_path / "null.nii.gz"
    link.symlink_to(os.devnull)
    return link


def is_fifo(path: Path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_detect_never_replaces_a_fifo_even_with_overwrite(inputs, fifo, capsys):
    assert main(detect_argv(*inputs, fifo, "--overwrite")) == 2
    one_error_line(capsys.readouterr().err, r"pipe\.nii\.gz is a named pipe \(FIFO\), not a regular file")
    assert is_fifo(fifo)


def test_detect_never_writes_through_a_link_to_a_device(inputs, null_link, tmp_path, capsys):
    labelmap = tmp_path / "labels.nii.gz"
    assert main(detect_argv(*inputs, tmp_path / "score.nii.gz", "--labelmap", str(null_link), "--overwrite")) == 2
    one_error_line(capsys.readouterr().err, r"null\.nii\.gz is a character device, not a regular file")
    assert null_link.is_symlink() and os.readlink(null_link) == os.devnull
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert not labelmap.exists() and not (tmp_path / "score.nii.gz").exists()


def test_a_fifo_that_appears_during_the_write_is_not_replaced(tmp_path):
    """The check is made again at the rename (checkpoints and cache entries go through atomic_path)."""
    target = tmp_path / "model.ckpt"
    with pytest.raises(CeVAEError, match="named pipe"):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"x")
            os.mkfifo(target)
    assert is_fifo(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_train_refuses_a_device_as_checkpoint_before_training(tmp_path):
    out = tmp_path / "model.cevae"
    (tmp_path / "model.cevae.ckpt").symlink_to(os.devnull)
    with pytest.raises(CeVAEError, match=r"model\.cevae\.ckpt is a character device"):
        TrainConfig(out=out).check_outputs([], overwrite=True)


def test_a_name_that_fits_is_written_although_its_temporary_name_is_longer(inputs, tmp_path):
    score = tmp_path / ("s" * 238 + ".nii.gz")  # 245 bytes: the limit is 255
    assert main(detect_argv(*inputs, score)) == 0
    assert score.is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_all_fits_every_temporary_name_of_multibyte_names(tmp_path):
    target = tmp_path / ("é" * 120 + ".csv")  # 244 bytes of two-byte characters
    write_all({target: "a,b\n"})
    assert target.read_text() == "a,b\n"


@pytest.mark.parametrize("flag", ["--score", "--slice-scores"])
def test_a_name_too_long_is_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch, flag):
    from CeVAEAnomalyLib.io import images

    monkeypatch.setattr(images, "read_image", lambda *a, **k: pytest.fail("the image was read"))
    long = tmp_path / ("s" * 293 + ".nii.gz")  # 300 bytes
    argv = detect_argv(*inputs, tmp_path / "score.nii.gz")
    argv[argv.index("--score")] = flag
    argv[argv.index(flag) + 1] = str(long)
    if flag != "--score":
        argv += ["--score", str(tmp_path / "score.nii.gz")]
    before = tree(tmp_path)
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, r"is 300 bytes long; file names may hold at most 255 bytes")
    assert tree(tmp_path) == before


def test_a_folder_name_too_long_is_refused_in_one_line(inputs, tmp_path, capsys):
    """An output folder whose own name is too long made detect end in "unexpected OSError: [Errno 36] File name too
    long" (Path.is_dir raises for it, in the check of the names' lengths), and a Slicer calibration's lock raise it."""
    from CeVAEAnomalyLib.io.lock import hold_output

    folder = tmp_path / ("f" * 300)
    before = tree(tmp_path)
    assert main(detect_argv(*inputs, folder / "score.nii.gz")) == 2
    one_error_line(capsys.readouterr().err, r"^error: The output name f{40}\.\.\. is 300 bytes long; file names may "
                                            r"hold at most 255 bytes\. Choose a shorter name\.$")
    with pytest.raises(CeVAEError) as raised:
        with hold_output(folder / "c.cevae", "calibration"):
            pass
    assert str(raised.value) == (f"Cannot write into {folder} ({os.strerror(errno.ENAMETOOLONG)}). Give {folder} and "
                                 "its files shorter names, or choose another folder.")
    assert tree(tmp_path) == before


def deep_folder(root: Path, path_bytes: int) -> Path:
    """A folder under ``root`` whose path is ``path_bytes`` bytes long (names of at most 200 bytes)."""
    folder = root
    while len(os.fsencode(str(folder))) < path_bytes:
        folder = folder / ("d" * min(200, path_bytes - len(os.fsencode(str(folder))) - 1))
    folder.mkdir(parents=True)
    return folder


def test_a_path_whose_temporary_would_be_too_long_is_refused_before_any_work(inputs, tmp_path, capsys,
                                                                             monkeypatch):
    """A short name in a folder near the 4096-byte path limit: the output fits, but the hidden temporary it is
    written under first (about 30 bytes longer) would not, and the write failed after the detection."""
    from CeVAEAnomalyLib.io import images

    monkeypatch.setattr(images, "read_image", lambda *a, **k: pytest.fail("the image was read"))
    score = deep_folder(tmp_path / "out", 4080) / "score.nii.gz"  # 4093 bytes: the path itself fits
    before = tree(tmp_path)
    assert main(detect_argv(*inputs, score)) == 2
    one_error_line(capsys.readouterr().err, r"is 4093 bytes long; the hidden temporary file it is first written "
                                            r"as needs \d+ more, and paths may hold at most 4095 bytes")
    assert tree(tmp_path) == before


def test_outputs_differing_only_in_letter_case_are_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    """On macOS and Windows Result.nii.gz and result.nii.gz are one file: the labelmap replaced the score map."""
    from CeVAEAnomalyLib.io import images

    monkeypatch.setattr(images, "read_image", lambda *a, **k: pytest.fail("the image was read"))
    labelmap = tmp_path / "out" / "result.nii.gz"
    assert main(detect_argv(*inputs, tmp_path / "Out" / "Result.nii.gz", "--labelmap", str(labelmap))) == 2
    one_error_line(capsys.readouterr().err, r"Out/Result\.nii\.gz and .*out/result\.nii\.gz differ only in letter "
                   r"case, which makes them one file on macOS and Windows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_train_refuses_an_out_whose_log_name_is_too_long(tmp_path):
    out = tmp_path / ("m" * 245 + ".cevae")  # 251 bytes fit, but OUT.ckpt (256 bytes) does not
    with pytest.raises(CeVAEError, match=r"is 256 bytes long"):
        TrainConfig(out=out).check_outputs([], overwrite=False)


def test_batch_refuses_a_fifo_among_its_outputs_before_any_work(inputs, tmp_path, capsys):
    image, mask, model = inputs
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "head_labelmap.nii.gz")
    assert main(["batch", str(image.parent), "--out-dir", str(out), "--model", str(model), "--device", "cpu",
                 "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, r"head_labelmap\.nii\.gz is a named pipe \(FIFO\), not a regular file")
    assert [p.name for p in out.iterdir()] == ["head_labelmap.nii.gz"] and is_fifo(out / "head_labelmap.nii.gz")


def test_a_stop_during_the_renames_comes_after_the_last(tmp_path, monkeypatch):
    """Ctrl-C between two renames of one write would leave new and old outputs mixed: it is held until the last."""
    import signal

    import CeVAEAnomalyLib.io.atomic as atomic

    targets = [tmp_path / "s.csv", tmp_path / "l.csv", tmp_path / "t.csv"]
    for t in targets:
        t.write_text("old\n")
    real = os.replace
    renamed = []

    def replace_then_stop(src, dst):
        real(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C after the first rename

    monkeypatch.setattr(atomic.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_all({t: "new\n" for t in targets}, overwrite=True)
    assert [t.read_text() for t in targets] == ["new\n"] * 3  # all new, and the stop still came
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "s.csv", "t.csv"]


def test_a_rename_that_fails_part_way_names_the_outputs_of_each_run(tmp_path):
    """A folder made where an output was, while the others were written: its rename failed after two others had
    replaced earlier outputs, and the error said only "Could not move the finished ... into place" with the hidden
    temporary's name; the user could not tell that the folder now mixes two runs, nor what to do."""
    summary, components, slices, record = (tmp_path / n for n in ("summary.csv", "components.csv", "slices.csv",
                                                                   "record.json"))
    for t in (summary, components, slices):
        t.write_text("old\n")

    def write_while_a_folder_appears(tmp: str) -> None:
        Path(tmp).write_text("new\n")
        slices.unlink()
        slices.mkdir()  # (someone else's folder, kept as it is)
        (slices / "keep.txt").write_text("theirs\n")

    files = {summary: "new\n", components: write_while_a_folder_appears, slices: "new\n", record: "{}\n"}
    with pytest.raises(CeVAEError) as raised:
        write_all(files, overwrite=True)
    assert str(raised.value) == (
        f"Could not move the finished {slices} into place: {os.strerror(errno.EISDIR)}. Only some outputs were "
        f"replaced: {summary} and {components} are this run's; {slices} still holds what was there before; {record} "
        f"was not written. Make sure {tmp_path} can be written (EISDIR), then run again.")
    assert tree(tmp_path) == tree_of({"summary.csv": "new\n", "components.csv": "new\n",
                                      "slices.csv/keep.txt": "theirs\n"})


@pytest.mark.parametrize("failing, said", [
    (1, "Nothing was replaced."),
    (2, "Only some outputs were replaced: {a} is this run's; {b} still holds what was there before; {c} was not "
        "written."),
])
def test_a_rename_that_the_disk_refuses_says_what_each_output_holds(tmp_path, monkeypatch, failing, said):
    """The disk fills up (a rename that needs a new folder block) or is remounted read-only during the renames."""
    import CeVAEAnomalyLib.io.atomic as atomic

    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("old\n")
    b.write_text("old\n")
    real, renames = os.replace, []

    def replace_until_the_disk_is_full(src, dst):
        renames.append(dst)
        if len(renames) == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_until_the_disk_is_full)
    with pytest.raises(CeVAEError) as raised:
        write_all({a: "new\n", b: "new\n", c: "new\n"}, overwrite=True)
    failed = [a, b][failing - 1]
    assert str(raised.value) == (
        f"Could not move the finished {failed} into place: {os.strerror(errno.ENOSPC)}. {said.format(a=a, b=b, c=c)} "
        f"Free some space on the disk holding {tmp_path}, then run again.")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["a.csv", "b.csv"]  # no temporary left


def tree_of(files: Dict[str, str]) -> Dict[str, str]:
    """What :func:`tree` gives for files of these texts."""
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())}


def test_a_temporary_made_just_before_a_stop_is_removed(tmp_path, monkeypatch):
    import CeVAEAnomalyLib.io.atomic as atomic

    real_open = os.open

    def open_then_stop(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        os.close(fd)
        raise KeyboardInterrupt  # the stop arrives once the temporary file exists

    monkeypatch.setattr(atomic.os, "open", open_then_stop)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_all({tmp_path / "s.csv": "new\n"})
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(tmp_path / "t.csv"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_names_that_are_one_only_under_full_case_folding_are_two_outputs(tmp_path):
    """straße.nii.gz and strasse.nii.gz are two files on macOS and Windows too (their file systems map letter case,
    not ß to ss), yet they were refused as "differ only in letter case"."""
    from CeVAEAnomalyLib.io.targets import check_paths

    check_paths([tmp_path / "straße.nii.gz", tmp_path / "strasse.nii.gz"], overwrite=False)
    with pytest.raises(CeVAEError, match="differ only in letter case"):
        check_paths([tmp_path / "STRASSE.nii.gz", tmp_path / "strasse.nii.gz"], overwrite=False)


def test_names_in_two_unicode_forms_are_one_output(tmp_path):
    """café written with é as one character and as e + a combining accent is one file on macOS (its file systems
    compare names in one Unicode form), so two outputs so named would be one file there: refused as the letter-case
    twins are."""
    from CeVAEAnomalyLib.io.targets import check_paths

    composed, decomposed = tmp_path / "caf\u00e9.nii.gz", tmp_path / "cafe\u0301.nii.gz"
    with pytest.raises(CeVAEError, match="one name in two Unicode forms .* one file on macOS"):
        check_paths([composed, decomposed], overwrite=False)
    with pytest.raises(CeVAEError, match="differ only in letter case"):  # both at once: said as letter case
        check_paths([composed, tmp_path / "CAFE\u0301.nii.gz"], overwrite=False)


def test_a_link_loop_deep_in_a_folder_tree_is_refused_naming_its_file(tmp_path):
    """The message shortens a long path; it kept the path's start and cut the name of the file that loops."""
    from CeVAEAnomalyLib.io.targets import refuse_unsearchable

    deep = tmp_path.joinpath(*["a_rather_long_folder_name"] * 5)
    deep.mkdir(parents=True)
    (deep / "scan_loop.nii.gz").symlink_to(deep / "other.nii.gz")
    (deep / "other.nii.gz").symlink_to(deep / "scan_loop.nii.gz")
    with pytest.raises(CeVAEError, match=r"^The image \.\.\..*/scan_loop\.nii\.gz cannot be opened: too many levels"):
        refuse_unsearchable(deep / "scan_loop.nii.gz", "image")
    with pytest.raises(CeVAEError, match=r"^The image .*/x+\.\.\. cannot be opened: file name too long"):
        refuse_unsearchable(tmp_path / ("x" * 300), "image")
    # a name too long in a folder of 80 characters or more (pytest's own are 70 to 90): the name's start still shown
    with pytest.raises(CeVAEError, match=r"^The image \.\.\..*/a_rather_long_folder_name/x{40}\.\.\. cannot be opened"):
        refuse_unsearchable(deep / ("x" * 300), "image")


@pytest.fixture
def bundled_copy(tiny_bundle, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny model standing in for the bundled default model (the package's own file)."""
    from CeVAEAnomalyLib import data

    bundled = tmp_path / "package" / "cevae_t1_default.cevae"
    bundled.parent.mkdir()
    bundled.write_bytes(tiny_bundle.read_bytes())
    monkeypatch.setattr(data, "default_model_path", lambda: bundled)
    return bundled


def _spellings_of(bundled: Path, tmp_path: Path) -> List[Path]:
    """The bundled model's file by its path, another spelling of it, a hard link and a symbolic link."""
    hard, soft = tmp_path / "hard.cevae", tmp_path / "soft.cevae"
    os.link(bundled, hard)
    soft.symlink_to(bundled)
    return [bundled, bundled.parent / ".." / bundled.parent.name / bundled.name, hard, soft]


BUNDLED_REFUSED = (r"^error: --out \S+ is the bundled default model, .* write the new model elsewhere and pass it "
                   r"with --model\.$")


@pytest.mark.parametrize("command", ["calibrate", "train", "adapt"])
def test_no_command_replaces_the_bundled_model_even_with_overwrite(command, bundled_copy, tiny_bundle, tmp_path,
                                                                   capsys):
    """calibrate, train and adapt with --out the bundled model's file (or a link to it) and --overwrite wrote over
    it, so every later detect without --model used the site's model; each is refused in one line, the file kept."""
    manifest = write_cohort(tmp_path, seeds=(1, 2))
    site = tmp_path / "site.cevae"
    site.write_bytes(tiny_bundle.read_bytes())  # another model than the bundled one
    model = [] if command == "train" else ["--model", str(site)]
    quick = {"calibrate": ["--orientations", "axial"], "train": ["--max-steps", "1", "--channels", "8,16"],
             "adapt": ["--steps", "1", "--folds", "2"]}[command]
    before = bundled_copy.read_bytes()
    for out in _spellings_of(bundled_copy, tmp_path):
        argv = [command, "--manifest", str(manifest), *model, "--out", str(out), "--overwrite", "--device", "cpu",
                *quick]
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err, BUNDLED_REFUSED)
        assert bundled_copy.read_bytes() == before


LIBRARY_REFUSED = (r"^The output path \S+ is the bundled default model, which detection uses where no model is "
                   r"given; it is never replaced: write the new model to another path and give that path as the "
                   r"model\.$")


def test_the_library_refuses_the_bundled_model_as_an_output(bundled_copy, head, tmp_path):
    """recalibrate(), adapt() and TrainConfig.check_outputs (which train runs) refuse it too, even with overwrite, in
    the words of a Python caller: they said "--out ... pass it with --model", options a script calling them has not."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.calibrate import recalibrate
    from CeVAEAnomalyLib.io.manifest import Subject
    from CeVAEAnomalyLib.training.adapt import adapt
    from CeVAEAnomalyLib.training.adapt_plan import AdaptOptions

    bundle = load_bundle(bundled_copy, "cpu")
    site = tmp_path / "site.cevae"
    site.write_bytes(bundled_copy.read_bytes())
    before = bundled_copy.read_bytes()
    for out in _spellings_of(bundled_copy, tmp_path):
        with pytest.raises(CeVAEError, match=LIBRARY_REFUSED):
            TrainConfig(out=out).check_outputs([], overwrite=True)
        with pytest.raises(CeVAEError, match=LIBRARY_REFUSED):
            recalibrate(bundle, [Subject(*head)], out, bundle.header.score_options, bundle.header.postprocess)
        with pytest.raises(CeVAEError, match=LIBRARY_REFUSED):
            adapt(site, [Subject(*head)] * 2, out, AdaptOptions(steps=1, overwrite=True))
    assert bundled_copy.read_bytes() == before
