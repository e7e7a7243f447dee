"""detect --picture and batch --pictures: one PNG key picture of a detection (scan, score heat, labelmap contour,
orientation letters, the slice and the top component's volume and side in its title), for readers outside Slicer;
a rerun of batch --pictures draws the missing pictures of volumes already done from their saved outputs."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CLI_WITHOUT_MATPLOTLIB
from CeVAEAnomalyLib.cli.main import EXIT_DONE, EXIT_REFUSED, main
from CeVAEAnomalyLib.data import data_path

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def lesioned(tmp_path_factory) -> Tuple[Path, Path, int]:
    """The bundled Colin27 (2 mm) with one bright 9 mm lesion 24 mm into the patient's right, written with its brain
    mask; and the lesion centre's k index (its file's slice axis is the axial one)."""
    folder = tmp_path_factory.mktemp("scans")
    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(data_path("colin27_brainmask_2mm.nii.gz")))
    pixels, brain = sitk.GetArrayFromImage(image), sitk.GetArrayViewFromImage(mask) > 0
    centre = np.argwhere(brain).mean(0) + [5, 0, 12]  # (k, j, i); +i is the patient's right (the file is RAS)
    kji = np.indices(pixels.shape).reshape(3, -1).T
    ball = (np.linalg.norm((kji - centre) * 2.0, axis=1) <= 9.0).reshape(pixels.shape)
    pixels[ball] = 1.6 * float(np.percentile(pixels[brain], 99.5))
    scan = sitk.GetImageFromArray(pixels)
    scan.CopyInformation(image)
    sitk.WriteImage(scan, str(folder / "lesioned.nii.gz"))
    sitk.WriteImage(mask, str(folder / "lesioned_mask.nii.gz"))
    return folder / "lesioned.nii.gz", folder / "lesioned_mask.nii.gz", int(round(centre[0]))


def detect(scan: Path, mask: Path, out: Path, *extra: str) -> int:
    return main(["detect", str(scan), "--mask", str(mask), "--score", str(out / "score.nii.gz"), "--device", "cpu",
                 *extra])


def test_detect_writes_the_picture_of_the_lesions_slice(lesioned, tmp_path):
    scan, mask, _ = lesioned
    picture = tmp_path / "key.png"
    assert detect(scan, mask, tmp_path, "--picture", str(picture)) == EXIT_DONE
    png = sitk.ReadImage(str(picture))  # a PNG that decodes
    assert png.GetSize() == (800, 400)
    rgb = sitk.GetArrayFromImage(png)[..., :3].astype(int)
    left, right = rgb[:, :400], rgb[:, 400:720]  # the scan panel; the overlay panel (without its colour bar)
    grey = lambda part: (part[..., 0] == part[..., 1]) & (part[..., 1] == part[..., 2])  # noqa: E731
    assert grey(left).all()  # the scan alone is grey
    dark = left[..., 0] < 10  # the scan panel's box: the rows and columns of its black background (not of text)
    (top, bottom), (first, last) = ((np.flatnonzero(dark.sum(a) > 100)[[0, -1]]) for a in (1, 0))
    inside = left[top:bottom, first:last]
    white = np.argwhere(grey(inside) & (inside[..., 0] >= 250)) + [top, first]  # the saturated lesion there
    hot = np.argwhere((right[..., 0] - right[..., 2] > 80))  # the heat over it: red, not grey
    assert len(white) > 50 and len(hot) > 50
    assert abs(white[:, 0].mean() - hot[:, 0].mean()) < 4  # on the same rows: the lesion's slice and place
    assert white[:, 1].mean() < (first + last) / 2  # the patient's right on the viewer's left (radiological)


def test_the_picture_is_drawn_through_the_top_components_peak(lesioned):
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.detector import detect as run
    from CeVAEAnomalyResearch.figures import file_slice, slice_through

    scan, mask, k = lesioned
    image = sitk.ReadImage(str(scan))
    result = run(image, str(default_model_path()), sitk.ReadImage(str(mask)), device="cpu")
    top = result.components[0]
    assert top.side == "right"
    assert abs(file_slice(image, slice_through(image, top.peak_lps))[1] - k) <= 2
    assert file_slice(image, slice_through(image, top.peak_lps))[0] == "k"


def test_an_existing_picture_is_kept_without_overwrite(lesioned, tmp_path, capsys):
    scan, mask, _ = lesioned
    picture = tmp_path / "key.png"
    picture.write_bytes(b"mine")
    assert detect(scan, mask, tmp_path, "--picture", str(picture)) == EXIT_REFUSED
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert picture.read_bytes() == b"mine" and not (tmp_path / "score.nii.gz").exists()  # nothing written
    assert detect(scan, mask, tmp_path, "--picture", str(picture), "--overwrite") == EXIT_DONE
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_a_picture_not_named_png_is_refused_before_scoring(lesioned, tmp_path, capsys):
    scan, mask, _ = lesioned
    assert detect(scan, mask, tmp_path, "--picture", str(tmp_path / "key.jpg")) == EXIT_REFUSED
    assert "name ending in .png" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["detect", "batch"])
def test_without_matplotlib_the_picture_is_refused_up_front_naming_the_extra(lesioned, tmp_path, command):
    scan, mask, _ = lesioned
    args = (["detect", str(scan), "--mask", str(mask), "--score", str(tmp_path / "s.nii.gz"), "--picture",
             str(tmp_path / "p.png")] if command == "detect" else
            ["batch", str(scan.parent), "--out-dir", str(tmp_path / "out"), "--pictures"])
    done = subprocess.run([sys.executable, "-c", CLI_WITHOUT_MATPLOTLIB, *args, "--device", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == EXIT_REFUSED, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs matplotlib" in lines[0] and "cevae-anomaly[research]" in lines[0], lines
    assert not any(tmp_path.rglob("*.nii.gz")) and not (tmp_path / "out").exists()  # nothing scored


def test_batch_pictures_and_a_rerun_that_draws_the_missing_ones_without_scoring(lesioned, tmp_path):
    scan, mask, _ = lesioned
    out = tmp_path / "out"
    assert main(["batch", str(scan.parent), "--out-dir", str(out), "--device", "cpu"]) == EXIT_DONE
    assert not (out / "lesioned_picture.png").exists()
    scored = (out / "lesioned_score.nii.gz").stat().st_mtime_ns
    assert main(["batch", str(scan.parent), "--out-dir", str(out), "--device", "cpu", "--pictures"]) == EXIT_DONE
    with open(out / "summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["skipped"]
    assert (out / "lesioned_score.nii.gz").stat().st_mtime_ns == scored  # not scored again
    drawn = (out / "lesioned_picture.png").read_bytes()
    assert sitk.ReadImage(str(out / "lesioned_picture.png")).GetSize() == (800, 400)
    fresh = tmp_path / "fresh"  # the picture of a scoring, as batch and detect draw it: the same
    assert main(["batch", str(scan.parent), "--out-dir", str(fresh), "--device", "cpu", "--pictures"]) == EXIT_DONE
    assert (fresh / "lesioned_picture.png").read_bytes() == drawn


def test_a_volume_scored_again_without_pictures_loses_its_old_picture(lesioned, tmp_path):
    """A batch rerun without --pictures that scored a volume again (its scan changed, or --overwrite) left the picture
    an earlier run with --pictures drew, which then showed another result than the outputs beside it."""
    scan, mask, _ = lesioned
    folder, out = tmp_path / "scans", tmp_path / "out"
    folder.mkdir()
    for path in (scan, mask):
        (folder / path.name).write_bytes(path.read_bytes())
    assert main(["batch", str(folder), "--out-dir", str(out), "--device", "cpu", "--pictures"]) == EXIT_DONE
    picture = out / "lesioned_picture.png"
    assert picture.is_file()
    image = sitk.ReadImage(str(scan))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 0.9, str(folder / scan.name))  # the scan changed
    assert main(["batch", str(folder), "--out-dir", str(out), "--device", "cpu"]) == EXIT_DONE
    with open(out / "summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok"]  # scored again
    assert not picture.exists()
    picture.write_bytes(b"an old picture")
    assert main(["batch", str(folder), "--out-dir", str(out), "--device", "cpu", "--overwrite"]) == EXIT_DONE
    assert not picture.exists()


def test_batch_refuses_a_picture_that_would_replace_an_input(lesioned, tmp_path, capsys):
    scan, mask, _ = lesioned
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (scan, mask):
        (folder / p.name).write_bytes(p.read_bytes())
    rows = f"image,mask,name\n{folder / scan.name},{folder / mask.name},lesioned\n"
    (folder / "list.csv").write_text(rows)
    (folder / "lesioned_picture.png").write_bytes(b"x")
    listed = tmp_path / "list.csv"
    listed.write_text(f"image,mask,name\n{folder / 'lesioned_picture.png'},{folder / mask.name},other\n"
                      f"{folder / scan.name},{folder / mask.name},lesioned\n")
    assert main(["batch", str(listed), "--out-dir", str(folder), "--device", "cpu", "--pictures"]) == EXIT_REFUSED
    assert "would replace the input" in capsys.readouterr().err


@pytest.fixture
def detect_volume(request):
    """Scripts/DetectVolume.py loaded as a module (conftest's ``script``), where slicer-core is installed."""
    pytest.importorskip("slicer")
    return request.getfixturevalue("script")


@pytest.mark.parametrize("handed", ["right", "left"])
def test_detect_volume_draws_the_picture_detect_draws(lesioned, tmp_path, detect_volume, handed):
    """Slicer's headless script had no --picture, which detect has: it draws the same picture now, byte for byte,
    also of a left-handed file (which Slicer holds with its slice axis reversed: the title names the file's slice)."""
    scan, mask, _ = lesioned
    if handed == "left":  # the same head, its first voxel axis reversed: an LAS file
        for path in (scan, mask):
            sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(path)), [True, False, False]), str(tmp_path / path.name))
        scan, mask = tmp_path / scan.name, tmp_path / mask.name
        assert np.linalg.det(np.reshape(sitk.ReadImage(str(scan)).GetDirection(), (3, 3))) < 0
    assert detect(scan, mask, tmp_path, "--picture", str(tmp_path / "detect.png")) == EXIT_DONE
    out = tmp_path / "results"
    assert detect_volume.main(["--input", str(scan), "--mask", str(mask), "--output-dir", str(out), "--device", "cpu",
                               "--picture", str(tmp_path / "script.png")]) == 0
    assert (tmp_path / "script.png").read_bytes() == (tmp_path / "detect.png").read_bytes()
    assert len(list(out.iterdir())) == 6  # and its other results, as without a picture


def test_detect_volume_refuses_a_picture_without_matplotlib_before_any_work(lesioned, tmp_path, detect_volume,
                                                                           capsys, monkeypatch):
    scan, mask, _ = lesioned
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: the import machinery finds nothing
    out = tmp_path / "results"
    assert detect_volume.main(["--input", str(scan), "--mask", str(mask), "--output-dir", str(out), "--device", "cpu",
                               "--picture", str(tmp_path / "key.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("DetectVolume: error: `DetectVolume.py --picture` needs "
                                                   "matplotlib") and "cevae-anomaly[research]" in lines[0], lines
    assert not out.exists() and not (tmp_path / "key.png").exists()


def test_detect_volume_refuses_a_picture_misnamed_or_existing_before_scoring(lesioned, tmp_path, detect_volume,
                                                                            capsys):
    scan, mask, _ = lesioned
    out = tmp_path / "results"
    args = ["--input", str(scan), "--mask", str(mask), "--output-dir", str(out), "--device", "cpu", "--picture"]
    assert detect_volume.main([*args, str(tmp_path / "key.jpg")]) == 2
    assert "name ending in .png" in capsys.readouterr().err
    (tmp_path / "key.png").write_bytes(b"mine")
    assert detect_volume.main([*args, str(tmp_path / "key.png")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "key.png").read_bytes() == b"mine" and not out.exists()  # nothing scored or written


def test_a_scan_named_with_dollar_signs_gets_its_picture_titled_as_named(lesioned, tmp_path):
    scan, mask, _ = lesioned
    named = tmp_path / "cost$\\frac$x.nii.gz"  # '$...$' is matplotlib's mathtext: '\\frac' without arguments failed
    named.write_bytes(scan.read_bytes())
    assert detect(named, mask, tmp_path, "--picture", str(tmp_path / "key.png")) == EXIT_DONE
    assert sitk.ReadImage(str(tmp_path / "key.png")).GetSize() == (800, 400)


def test_dollar_signs_in_a_title_are_drawn_as_written():
    from CeVAEAnomalyResearch.figures import overlay_figure

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    fig = overlay_figure(image, image, title="a$b$c_50%: axial slice")
    fig.canvas.draw()
    drawn = fig._suptitle.get_window_extent().width
    plain = fig.text(0.5, 0.5, "a$b$c_50%: axial slice", fontsize=fig._suptitle.get_fontsize(), parse_math=False)
    assert drawn == pytest.approx(plain.get_window_extent().width)  # as math: 'abc' with an italic b, no '$'


@pytest.mark.parametrize("order", ["LPS", "RIP"])
def test_thick_slices_across_the_pictured_plane_are_drawn_to_scale(order):
    from CeVAEAnomalyResearch.figures import overlay_figure

    colin = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    spacing = (6.5, 2.0, 2.0)  # sagittal 6.5 mm slices: the axial picture is a reformat, 6.5 mm wide pixels
    size = [int(round(n * s / t)) for n, s, t in zip(colin.GetSize(), colin.GetSpacing(), spacing)]
    thick = sitk.DICOMOrient(sitk.Resample(colin, size, sitk.Transform(), sitk.sitkLinear, colin.GetOrigin(), spacing,
                                           colin.GetDirection()), order)
    fig = overlay_figure(thick, thick)
    fig.canvas.draw()
    width_mm, height_mm = size[0] * spacing[0], size[1] * spacing[1]  # patient right-left, anterior-posterior
    for ax in fig.axes[:2]:  # the scan panel, the overlay panel
        box = ax.get_window_extent()
        assert box.width / box.height == pytest.approx(width_mm / height_mm, rel=0.03)


def test_the_overlay_legend_names_only_what_is_drawn():
    """The overlay panel's title named the labelmap (cyan) where none was given or it was empty, and the truth where
    none of it lay on the slice drawn."""
    from CeVAEAnomalyResearch.figures import overlay_figure

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    bright = image > float(np.percentile(sitk.GetArrayViewFromImage(image), 99.5))  # a labelmap on the slice drawn
    empty = bright * 0
    score = sitk.Cast(bright, sitk.sitkFloat32)  # the slice drawn is the one with most score: the labelmap's

    def legend(labelmap, truth=None) -> str:
        return overlay_figure(image, score, labelmap, truth).axes[1].get_title()

    assert legend(bright, bright) == "score (heat), labelmap (cyan), truth (green dashed)"
    assert legend(None) == legend(empty) == legend(empty, empty) == "score (heat)"
    assert legend(empty, bright) == "score (heat), truth (green dashed)"


@pytest.mark.parametrize("length", [64, 150])  # 64: a DICOM series folder named by its UID, as long as they come
def test_a_long_name_in_the_title_is_drawn_whole_within_the_picture(length):
    from CeVAEAnomalyResearch.figures import overlay_figure

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    name = ("1.3.12.2.1107.5.2.43.66012." + "1234567890" * 15)[:length]
    fig = overlay_figure(image, image, title=f"{name}: axial slice k=47 of the file\nno component: the most ...")
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # not cut at both edges
    assert box.y1 <= fig.bbox.height and all(box.y0 > ax.get_window_extent().y1 for ax in fig.axes[:2])


KEEPS_BACKEND = """
import matplotlib
matplotlib.use(sys.argv[1])
import matplotlib.pyplot as plt
import SimpleITK as sitk
from CeVAEAnomalyLib.data import data_path
from CeVAEAnomalyResearch.figures import key_picture_png, overlay_figure

image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
png = key_picture_png(image, image, None, 300.0, [], None, "colin")
overlay_figure(image, image, title="kept by the caller")
print(png[:4] == b"\\x89PNG", matplotlib.get_backend(), plt.get_fignums())
"""


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_drawing_a_picture_keeps_the_callers_backend_and_leaves_no_pyplot_figures(backend):
    """A researcher's session (Jupyter inline, an interactive window) lost its backend to Agg on the first picture,
    and every overlay_figure stayed registered with pyplot (memory over a loop of pictures)."""
    done = subprocess.run([sys.executable, "-c", "import sys\n" + KEEPS_BACKEND, backend], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", backend, "[]"]


def test_nan_and_inf_in_a_score_map_are_left_out_of_the_slice_choice_and_the_colour_scale(tmp_path):
    """A score map with a NaN voxel (research API: overlay_png_bytes, key_picture_png of a score read from NRRD or
    MetaImage; ITK reads NaN and inf in NIfTI as 0) had the picture drawn through the NaN's slice (NaN won the
    slices' argmax), and a patch of inf made the colour scale's top NaN (a scale of 0 to 0.1 drawn)."""
    from CeVAEAnomalyResearch.figures import best_slice, canonical_slice, key_picture_png, overlay_figure

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)  # its k axis is the axial one
    kji = np.indices(sitk.GetArrayViewFromImage(image).shape, dtype=np.float32)
    blob = 10 * np.exp(-((kji[0] - 30) ** 2 + (kji[1] - 50) ** 2 + (kji[2] - 45) ** 2) / (2 * 8.0 ** 2))
    edited = blob.copy()
    edited[60, 50, 45] = np.nan
    edited[70, 20:60, 20:70] = np.inf  # 2000 voxels: more than the top 0.1 % of the positive ones
    files = []
    for name, values in (("clean", np.where(np.isfinite(edited), edited, 0)), ("edited", edited)):
        score = sitk.GetImageFromArray(values)
        score.CopyInformation(image)
        sitk.WriteImage(score, str(tmp_path / f"{name}.nrrd"))
        files.append(sitk.ReadImage(str(tmp_path / f"{name}.nrrd")))
    clean, edited_score = files
    assert best_slice(edited_score) == best_slice(clean) == canonical_slice(image, 2, 30)  # the blob's slice
    tops = [overlay_figure(image, s).axes[1].images[1].norm.vmax for s in (clean, edited_score)]
    assert np.isfinite(tops[1]) and tops[1] == pytest.approx(tops[0])  # the scale of the finite scores
    (tmp_path / "key.png").write_bytes(key_picture_png(image, edited_score, None, 4.0, [], None, "edited"))
    assert sitk.ReadImage(str(tmp_path / "key.png")).GetSize() == (800, 400)


def test_a_users_usetex_setting_does_not_send_the_titles_through_latex(tmp_path):
    """A user's matplotlibrc with ``text.usetex: True`` sent the picture's texts through LaTeX: without a TeX
    install the picture failed (latex could not be found), with one a name's '_', '%' and '$' were LaTeX syntax.
    The texts are plain: the picture is drawn without TeX, whatever the user's setting."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "matplotlibrc").write_text("text.usetex: True\n")
    (tmp_path / "bin").mkdir()  # the PATH: no latex, dvipng or ghostscript
    script = ("import sys\nimport matplotlib\nimport SimpleITK as sitk\nfrom pathlib import Path\n"
              "from CeVAEAnomalyLib.data import data_path\nfrom CeVAEAnomalyResearch.figures import key_picture_png\n"
              "assert matplotlib.rcParams['text.usetex']\n"
              "image = sitk.ReadImage(str(data_path('colin27_t1_2mm.nii.gz')), sitk.sitkFloat32)\n"
              "Path(sys.argv[1]).write_bytes(key_picture_png(image, image, None, 30.0, [], None, 'sub_01 50% $x$'))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "key.png")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MPLCONFIGDIR": str(tmp_path / "config"),
                                            "PATH": str(tmp_path / "bin")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert sitk.ReadImage(str(tmp_path / "key.png")).GetSize() == (800, 400)


def test_a_component_under_5_cubic_mm_is_titled_with_its_volume_as_the_summary_line_says_it():
    """A component that a lower --min-volume keeps (under 5 mm³) was titled '0.00 ml' while the summary line says
    its volume (result.flagged_text: 0.003 ml); the picture's title says it as the summary line does."""
    from CeVAEAnomalyLib.result import Component, components_summary
    from CeVAEAnomalyResearch.figures import file_slice, key_picture_png, overlay_png_bytes, slice_through

    image = sitk.ReadImage(str(data_path("colin27_t1_2mm.nii.gz")), sitk.sitkFloat32)
    peak = image.TransformIndexToPhysicalPoint((45, 50, 30))
    tiny = Component(1, 1, 0.003, 5.0, 5.0, peak, peak, "left")
    assert components_summary([tiny]).endswith("the first: 0.003 ml, the patient's left")
    k = slice_through(image, peak)
    axis, index = file_slice(image, k)
    title = (f"tiny: axial slice {axis}={index} of the file\nthrough the peak of component 1 of 1: 0.003 ml, the "
             "patient's left")
    assert key_picture_png(image, image, None, 300.0, [tiny], None, "tiny") == overlay_png_bytes(
        image, image, None, slices=[k], title=title, floor=150.0)
