"""Headless CeVAE anomaly detection through the Slicer module's logic.

Inside Slicer:   Slicer --no-splash --no-main-window --python-script DetectVolume.py --input IN --output-dir DIR
Plain Python:    python DetectVolume.py --input IN --output-dir DIR      (needs slicer-core)
Options:         DetectVolume.py --usage   (Slicer takes ``--help`` for itself; ``-h`` works in plain Python)

In an installed extension this file is in ``<module dir>/Scripts/`` (a sub-folder,
because Slicer loads every ``.py`` file of the module folder itself as a module).

The volume (a file, or a DICOM series folder as ``detect`` reads it) is loaded into an MRML scene, processed by
``CeVAEAnomalyLogic`` and the results are written into DIR with the input's geometry (the segmentation: the same
voxels, in the order Slicer stores segmentations, which may reverse a left-handed input's slice axis; NIfTI
images with a NIfTI input's qform and sform codes, as ``detect`` writes them):
``<name>_score.<ext>``, ``<name>_labelmap.<ext>``, ``<name>_segmentation.seg.nrrd``,
``<name>_components.csv`` and ``<name>_slices.csv`` (the ``NAME_<role>`` names of ``cevae-anomaly batch``,
which writes all but the segmentation of them), with ``<name>_record.json``, the record of how they were made
(``detect --record``); with ``--picture FILE.png`` also the key picture ``detect --picture`` draws (it needs
the research extra: matplotlib; refused before any work without it); with ``--report FILE.html`` also the HTML
report ``detect --report`` writes (the input named by its file's name; the key picture embedded where matplotlib is
installed, the page says otherwise). All files are written or none; as with
``detect``, a run is refused at once while another is writing one of its outputs. Relative paths are taken
from the working directory (Slicer itself would read them from its scene folder).
Exit status, as ``cevae-anomaly detect``'s: 0 on success; 2 for an input, argument or option refused (a missing or
unreadable volume, outputs that exist without ``--overwrite``, a bad value); 1 for an unexpected failure, out of
memory, and when the library cannot be imported; 130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM:
``kill``, a job scheduler's time limit; its temporary files removed, as on Ctrl-C); each with a one-line message
(an unexpected failure with its traceback too). Whatever ends it, a headless Slicer quits with a status.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

try:
    import slicer
except ImportError as _exc:  # plain Python without slicer-core: one line, as every other error of the script
    if __name__ != "__main__":
        raise
    sys.exit(f"DetectVolume: error: {type(_exc).__name__}: {_exc}; in plain Python the script needs slicer-core "
             "(pip install slicer-core), or run it inside Slicer (Slicer --python-script DetectVolume.py ...).")

if TYPE_CHECKING:
    import SimpleITK as sitk
    from CeVAEAnomalyLib.result import DetectionResult

_HERE = Path(__file__).resolve().parent
if not (_HERE / "CeVAEAnomalyLib").is_dir():  # Scripts/ beside the library
    sys.path.insert(0, str(_HERE.parent))

try:  # after the path set-up above; a failure must still end in an exit status (see the end)
    from CeVAEAnomalyLib.cli.main import command_line_wording, out_of_memory_advice
    from CeVAEAnomalyLib.errors import CeVAEError, one_line, out_of_memory
    from CeVAEAnomalyLib.interrupts import Terminated, sigterm_as_interrupt
    from CeVAEAnomalyLib.io import naming
    from CeVAEAnomalyLib.io.naming import file_stem
    from CeVAEAnomalyLib.options import (DetectionRequest, HelpWithDefaults, RunOptions, ScoreOptions,
                                         ThresholdPolicy, add_flags, output_path_value, path_value)
    from CeVAEAnomalyLib.result import PICTURE_MODULES, PICTURE_OUTPUT, REPORT_OUTPUT, refuse_unwritable_names
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic, CeVAEAnomalyResult
    from CeVAEAnomalyLib.system import require_research
except Exception as exc:  # noqa: BLE001 - missing or broken library, a dependency that fails to import
    _IMPORT_ERROR: Optional[BaseException] = exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger("DetectVolume")
VOLUME_FORMATS = ("nrrd", "nii.gz")
COMMAND = "DetectVolume"  # who holds the outputs, as another run refused is told ("A DetectVolume (process N) ...")
NIFTI_NAMES = (".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")  # NIfTI files and .hdr/.img pairs


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error of the script."""

    def error(self, message: str):
        self.exit(2, f"DetectVolume: error: {message} (see DetectVolume.py --usage)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="DetectVolume", description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--usage", action="help", help="show this help and exit (inside Slicer, which takes --help)")
    p.add_argument("--input", type=path_value, required=True,
                   help="input MRI volume file (NRRD, NIfTI, MHA, ...) or DICOM series folder")
    p.add_argument("--mask", type=path_value,
                   help="brain mask volume file or DICOM series folder (>0 is brain); automatic if absent")
    p.add_argument("--model", type=path_value, help="model bundle (.cevae); the bundled default model if absent")
    p.add_argument("--output-dir", type=path_value, required=True, help="folder for the results (created if needed)")
    add_flags(p, ScoreOptions, model_default=True, only=("score_type",))
    add_flags(p, ThresholdPolicy)
    add_flags(p, RunOptions, only=("device", "batch_size"))
    p.add_argument("--format", dest="volume_format", default="nrrd", choices=VOLUME_FORMATS,
                   help="file format of the score volume and labelmap")
    p.add_argument("--picture", type=output_path_value, help="also write this PNG key picture, as `cevae-anomaly "
                   "detect --picture` draws it (needs the research extra: matplotlib; absent: no picture)")
    p.add_argument("--report", type=output_path_value, help="also write this HTML report, as `cevae-anomaly detect "
                   "--report` writes it (the key picture embedded where matplotlib is installed)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    return p


def load_volume(scene: slicer.vtkMRMLScene, path: Path, labelmap: bool = False
                ) -> Tuple[slicer.vtkMRMLVolumeNode, "sitk.Image"]:
    """Read a volume file into a new node through a volume archetype storage node, once ``detect``'s reader has
    checked it (the storage node's reader fills a truncated NIfTI with zeros and fails on a colour or 4D volume
    without saying why); the node and that reader's image of the file (NaN voxels kept). A DICOM series folder,
    which ``detect`` reads too and a storage node does not (Slicer reads DICOM through its DICOM database), becomes
    the node of that reader's image, voxel for voxel."""
    from CeVAEAnomalyLib.io.images import read_image
    from CeVAEAnomalyLib.slicer import mrml

    what = "brain mask" if labelmap else "input volume"
    if not path.is_file() and not path.is_dir():
        raise CeVAEError(f"The {what} {path} does not exist or is neither a file nor a DICOM series folder.")
    image = read_image(path, "brain mask" if labelmap else "image")
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   file_stem(path))
    if path.is_dir():
        mrml.update_volume_from_image(node, image)
        return node, image
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise CeVAEError(f"The {what} {path} could not be read as a volume (corrupt or unsupported format).")
    return node, image


def load_mask(scene: slicer.vtkMRMLScene, path: Path, volume: slicer.vtkMRMLVolumeNode, image: "sitk.Image"
              ) -> Tuple[slicer.vtkMRMLVolumeNode, List[str]]:
    """The node of the brain mask file at ``path`` for the input ``volume`` (``image``: its file as detect reads it),
    and the warnings reading it (a DICOM series') and resampling it gave. A mask on another grid than the input file
    is resampled here as detect resamples it, from the two files' grids, and its node holds the brain on ``volume``'s
    grid: resampled from the nodes, a voxel centre lying exactly between two mask voxels took the other one where
    Slicer reverses a left-handed file's slice axis or reads an oblique grid's matrices a few bits off (brains
    thousands of voxels apart)."""
    import numpy as np
    import SimpleITK as sitk
    from CeVAEAnomalyLib.engine.preprocess import mask_array
    from CeVAEAnomalyLib.io.images import same_grid
    from CeVAEAnomalyLib.slicer import mrml
    from CeVAEAnomalyLib.slicer.logic import warningsLogged

    with warningsLogged() as said:
        node, mask = load_volume(scene, path, labelmap=True)
        if same_grid(mask, image):
            return node, said
        brain = sitk.GetImageFromArray(mask_array(mask, image).astype(np.uint8))
    brain.CopyInformation(image)
    mrml.update_volume_from_image(node, on_grid(brain, mrml.image_from_volume(volume)))
    return node, said


def restore_non_finite(node: slicer.vtkMRMLVolumeNode, path: Path, image: "sitk.Image") -> None:
    """Put back the NaN/Inf voxels of a float NIfTI (or .hdr/.img pair) that the storage node's reader (ITK) turned
    into 0, as the command line keeps them (``image``: ``path`` as its reader gives it): they are left out of the
    brain, with a warning, instead of scoring as dark tissue."""
    import numpy as np
    import SimpleITK as sitk
    from CeVAEAnomalyLib.slicer import mrml

    voxels = slicer.util.arrayFromVolume(node)
    if voxels.dtype.kind != "f" or not path.name.lower().endswith(NIFTI_NAMES):
        return
    if np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        return
    placed = on_grid(image, mrml.image_from_volume(node))  # a reversed axis reordered
    values = sitk.GetArrayViewFromImage(placed)
    lost = ~np.isfinite(values)
    voxels[lost] = values[lost]
    slicer.util.arrayFromVolumeModified(node)


def output_paths(input_path: Path, output_dir: Path, volume_format: str) -> Dict[str, Path]:
    """The result files, named as ``cevae-anomaly batch`` names them (one table: io/naming.py)."""
    return naming.output_paths(output_dir, file_stem(input_path), tuple(naming.OUTPUT_NAMES), f".{volume_format}")


def _node_writer(node: slicer.vtkMRMLStorableNode) -> Callable[[str], None]:
    """A writer of ``node`` for write_all, which words its failure as it words every output's (the output named, not
    the temporary file given here; what to do by the cause)."""
    def write(filename: str) -> None:
        storage = node.CreateDefaultStorageNode()
        storage.UnRegister(None)  # the caller owns the new node: without this one is left behind per file written
        storage.SetFileName(filename)
        storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise _write_failure(storage, node, filename)

    return write


def _write_failure(storage: slicer.vtkMRMLStorageNode, node: slicer.vtkMRMLStorableNode, filename: str) -> Exception:
    """Why ``storage`` could not write ``node`` to ``filename``: the system's error where the file cannot be opened
    for writing (a disk read-only, permissions: a storage node says no errno), else what the storage node said."""
    try:
        with open(filename, "ab"):
            pass
    except OSError as exc:
        return exc
    messages = storage.GetUserMessages()
    said = [messages.GetNthMessageText(i).strip() for i in range(messages.GetNumberOfMessages())]
    return RuntimeError("; ".join(text for text in said if text) or f"Slicer could not write {node.GetName()}")


def file_grid(image: "sitk.Image", path: Path) -> Optional["sitk.Image"]:
    """The voxel grid of the volume file at ``path`` when ``image`` holds the same voxels in another order;
    None when they are stored alike (or the file is not a plain 3D grid, e.g. a 4D file holding one volume).

    Slicer stores a left-handed volume (e.g. FSL's LAS NIfTI) with its slice axis reversed: the
    same voxels in the other order, which ``evaluate`` and other tools would not take for the
    input's grid.
    """
    import SimpleITK as sitk
    from CeVAEAnomalyLib.io.images import grid_difference

    if path.is_dir():  # a DICOM series: its node is the image detect's reader gives (load_volume), on that grid
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3 or sorted(reader.GetSize()) != sorted(image.GetSize()):
        return None
    grid = sitk.Image(list(reader.GetSize()), sitk.sitkUInt8)
    grid.SetSpacing(reader.GetSpacing())
    grid.SetOrigin(reader.GetOrigin())
    grid.SetDirection(reader.GetDirection())
    return None if grid_difference(grid, image) is None else grid


def on_grid(image: "sitk.Image", grid: "sitk.Image") -> "sitk.Image":
    """``image``'s voxels on ``grid``: the voxel centres coincide, so nearest-neighbour resampling only reorders
    them."""
    import SimpleITK as sitk

    target = sitk.Image(grid.GetSize(), image.GetPixelID())
    target.CopyInformation(grid)
    return sitk.Resample(image, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())


def slices_on_grid(detection: "DetectionResult", grid: "sitk.Image") -> "DetectionResult":
    """``detection`` with its slice table's axis and indices counted on ``grid`` (the same voxels reordered)."""
    image, rows = detection.score, []
    for row in detection.slices:
        along = _axis_on(grid, image, row.axis)
        voxel = [0, 0, 0]
        voxel[row.axis] = row.index
        index = grid.TransformPhysicalPointToContinuousIndex(image.TransformIndexToPhysicalPoint(voxel))[along]
        rows.append(replace(row, axis=along, index=int(round(index))))
    return replace(detection, slices=rows)


def _axis_on(grid: "sitk.Image", image: "sitk.Image", axis: int) -> int:
    """The axis of ``grid`` that runs along ``image``'s ``axis``."""
    import numpy as np

    directions = np.array(grid.GetDirection()).reshape(3, 3)
    along = np.array(image.GetDirection()).reshape(3, 3)[:, axis]
    return int(np.argmax(np.abs(directions.T @ along)))


def write_results(result: CeVAEAnomalyResult, paths: Dict[str, Path], overwrite: bool,
                  inputs: Sequence[Optional[Path]] = (), source: Optional[Path] = None,
                  published: Optional[List[Path]] = None, scan: Optional["sitk.Image"] = None) -> List[Path]:
    """Write every result to a temporary name beside its target, then rename all into place (``published`` gets
    each as it is renamed); the score, the labelmap and the slice table on the voxel grid of the ``source`` volume
    file, if given, the images in NIfTI with that file's qform and sform codes (an MNI-space scan's stay MNI); where
    ``paths`` has a picture, the key picture of ``scan``, the ``source`` file as detect reads it, as detect draws it
    (needs both); where it has a report, the report detect writes of them (its picture where matplotlib is
    installed)."""
    from CeVAEAnomalyLib.io.atomic import write_all
    from CeVAEAnomalyLib.io.nifti_codes import nifti_codes, write_image
    from CeVAEAnomalyLib.report import report_picture, result_report_html
    from CeVAEAnomalyLib.result import components_csv, record_json, slice_scores_csv

    detection = result.detection
    grid = file_grid(detection.score, source) if source else None
    codes = nifti_codes(source) if source else None
    on_file = detection if grid is None else replace(slices_on_grid(detection, grid), score=on_grid(
        detection.score, grid), labelmap=on_grid(detection.labelmap, grid))  # the same voxels in the file's order

    def image(volume: "sitk.Image", node, target: Path) -> object:
        """The volume as the file's grid holds it (the detection's image when no voxel moves), else the node."""
        if source is None:
            return _node_writer(node)
        return volume if codes is None else (lambda tmp: write_image(volume, tmp, codes, target))

    writers: Dict[Path, object] = {
        paths["score"]: image(on_file.score, result.nodes.score, paths["score"]),
        paths["labelmap"]: image(on_file.labelmap, result.nodes.labelmap, paths["labelmap"]),
        paths["segmentation"]: _node_writer(result.nodes.segmentation),
        paths["components"]: components_csv(detection),  # centroids and peaks in RAS: the same on either grid
        paths["slices"]: slice_scores_csv(on_file),
        paths["record"]: record_json(detection),
    }
    wanted = {PICTURE_OUTPUT, REPORT_OUTPUT} & set(paths)  # the report embeds the picture where it can be drawn
    picture = report_picture(scan, on_file, file_stem(source)) if wanted else None
    if PICTURE_OUTPUT in paths:
        writers[paths[PICTURE_OUTPUT]] = picture
    if REPORT_OUTPUT in paths:
        writers[paths[REPORT_OUTPUT]] = result_report_html(source.name, on_file, picture)
    return write_all(writers, overwrite, inputs, published, command=COMMAND)


class Progress:
    """The run's progress on the log: a line where the whole percentage or the step changes (a registration reports
    each of its hundreds of iterations, most at the same percentage)."""

    def __init__(self) -> None:
        self._last: Optional[Tuple[int, str]] = None

    def __call__(self, fraction: float, message: str) -> None:
        line = (round(100 * fraction), message)
        if line != self._last:
            self._last = line
            log.info("%3d%% %s", *line)


def absolute_paths(args: argparse.Namespace) -> None:
    """The path arguments made absolute from the working directory: a storage node in Slicer's scene reads a
    relative file name from the scene's root folder (Documents by default), not from where the command ran.
    (``abspath``, not ``resolve``: a link's own name still names the outputs.)"""
    for name in ("input", "mask", "model", "output_dir", "picture", "report"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(os.path.abspath(getattr(args, name))))


def run(args: argparse.Namespace, scene: slicer.vtkMRMLScene, published: Optional[List[Path]] = None) -> List[Path]:
    """Detect and write the results; ``published`` gets each result file as it is renamed into place."""
    started = time.time()
    if args.picture:  # before anything is read: the picture is drawn by the research extra (matplotlib), as detect's
        require_research("DetectVolume.py --picture", PICTURE_MODULES)
    absolute_paths(args)
    request = DetectionRequest.from_args(args)  # refuses bad values before any file is read
    paths = output_paths(args.input, args.output_dir, args.volume_format)
    if args.picture:
        paths[PICTURE_OUTPUT] = args.picture
    if args.report:
        paths[REPORT_OUTPUT] = args.report
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.devices import resolve_device
    from CeVAEAnomalyLib.engine.header import read_header
    from CeVAEAnomalyLib.io.atomic import remove_abandoned_temporaries
    from CeVAEAnomalyLib.io.lock import hold_outputs
    from CeVAEAnomalyLib.io.targets import check_paths
    from CeVAEAnomalyLib.result import input_files
    from CeVAEAnomalyLib.slicer.logic import warningsLogged

    device = resolve_device(request.run.device)  # a missing GPU said (or its index refused) before any file is read
    request = replace(request, run=replace(request.run, device=str(device)))  # as detect: said once, not again
    check_paths(paths.values(), args.overwrite, (args.input, args.mask, args.model))  # fail before the slow part
    refuse_unwritable_names(paths)  # (a picture not named .png, a report not named .html)
    with hold_outputs(paths.values(), COMMAND):  # another run writing one of them is refused now, not after its work
        remove_abandoned_temporaries(paths.values(), started)  # what killed runs left
        read_header(args.model or default_model_path()).threshold_of(request)  # e.g. --fpr without calibration
        with warningsLogged() as read:  # (a DICOM series that may lack slices), recorded as detect records them
            volume, image = load_volume(scene, args.input)
        restore_non_finite(volume, args.input, image)
        mask, said = load_mask(scene, args.mask, volume, image) if args.mask else (None, [])
        sources = input_files(image=args.input, mask=args.mask)  # the files just read, for the record
        result = CeVAEAnomalyLogic(scene).process(volume, mask, request, modelPath=args.model, createLabelmap=True,
                                                  progress=Progress())
        record = result.detection.record  # with the warnings of reading the files and resampling the mask, as detect's
        result.detection.record = replace(record, inputs=sources, warnings=(*read, *said, *record.warnings))
        written = write_results(result, paths, args.overwrite, (args.input, args.mask, args.model),
                                source=args.input, published=published, scan=image)
    log.info("Wrote %s.", ", ".join(str(p) for p in written))
    return written


def interrupted_message(written: Sequence[Path], results: int, stop: str = "interrupted") -> str:
    """What a stop (``stop``: "interrupted", Ctrl-C, or "terminated", SIGTERM) left: the result files renamed into
    place before it, of ``results`` (the renames are held together, so all or none where the stop can be held)."""
    if not written:
        return f"DetectVolume: {stop}; nothing was written."
    files, left = ", ".join(map(str, written)), results - len(written)
    if not left:
        return f"DetectVolume: {stop} after every result was written ({files})."
    return f"DetectVolume: {stop}; only {files} {'was' if len(written) == 1 else 'were'} written, " \
           f"not the other {left} result{'s' * (left > 1)}."


def plain_scene() -> slicer.vtkMRMLScene:
    """A scene outside Slicer, with the default color tables Slicer's scene has (the labelmap's display
    looks its table up; without it VTK prints a warning)."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)  # adds the default color nodes
    colors.SetMRMLScene(None)
    return scene


def main(argv: Optional[List[str]] = None) -> int:
    """Run and return the exit status (errors are reported as one line on stderr)."""
    inside_slicer = getattr(slicer, "app", None) is not None
    if not inside_slicer:  # (inside, Slicer's own handler says the log; a second would double each line)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")  # as cevae-anomaly says it
    if _IMPORT_ERROR is not None:
        print(f"DetectVolume: error: the CeVAEAnomaly library could not be imported "
              f"({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); run the script from the installed "
              "module's Scripts folder or install the package.", file=sys.stderr)
        return 1
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        DetectionRequest.from_args(args)  # a bad option value is a bad argument too
    except SystemExit as exc:  # argparse printed the usage (and the problem)
        return int(exc.code or 0)
    except CeVAEError as exc:
        print(f"DetectVolume: error: {one_line(exc)} (see DetectVolume.py --usage)", file=sys.stderr)
        return 2
    scene = slicer.mrmlScene if inside_slicer else plain_scene()
    written: List[Path] = []
    results = len(naming.OUTPUT_NAMES) + (args.picture is not None) + (args.report is not None)
    try:
        with sigterm_as_interrupt():  # a scheduler's kill stops the run as Ctrl-C does: its temporary files removed
            run(args, scene, written)
    except CeVAEError as exc:  # refused, as detect refuses it
        print(f"DetectVolume: error: {command_line_wording(exc, 'detect')}", file=sys.stderr)
        return 2
    except Terminated:  # SIGTERM, as detect says it
        print(interrupted_message(written, results, "terminated"), file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C: still an exit status, so that a headless Slicer quits
        print(interrupted_message(written, results), file=sys.stderr)
        return 130
    except Exception as exc:
        if out_of_memory(exc):  # not a bug: one line, as detect says it
            print(f"DetectVolume: error: {out_of_memory_advice(batch_size=True)}", file=sys.stderr)
            return 1
        traceback.print_exc()  # a bug, not a user error: keep the traceback for the report
        print(f"DetectVolume: unexpected error ({type(exc).__name__}): {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _exit(status: int) -> None:
    """Quit Slicer properly when running inside it; otherwise leave the interpreter."""
    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - whatever ends the script, a headless Slicer must quit with a status
        traceback.print_exc()
        status = 1
    _exit(status)
