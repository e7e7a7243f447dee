"""Package data: the default model bundle, the brain-mask template and the sample scans.

They ship inside the package (wheel and Slicer extension alike) and are found with
:mod:`importlib.resources`, so a plain ``pip install`` can detect with the default model.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Dict

from ..errors import CeVAEError

DEFAULT_MODEL_NAME = "cevae_t1_default.cevae"

# SHA-256 of each packaged data file (Testing/Python/test_package_data.py checks them; Slicer's Sample Data checks
# the samples' copies). A deliberate rebuild records its new digest here. Files and the scripts that write them:
# the model: scripts/train_default_model.py (training, or --calibrate-only), which also writes
# Resources/Models/MODEL_CARD.md naming this digest; the template: scripts/make_template.py; the lesioned scan and
# its truth: scripts/make_lesion_sample.py.
SHA256: Dict[str, str] = {
    DEFAULT_MODEL_NAME: "05043e3da229b60eccedcb215c139cd89e6c3d8575ffd01fa7c10788f31a2053",
    "colin27_t1_2mm.nii.gz": "fa5852c341e629f7410fe7ed736382eb4e2127b208fb9835bd6f35d24e1236b1",
    "colin27_brainmask_2mm.nii.gz": "b0a75c7e04cd62eb157d27fbf44d4c6c946af0e12df4265477c40900c7fbd358",
    "colin27_lesions_t1_2mm.nii.gz": "7aad9d670713e497eede9d8fe9aacec8e0db092b55db11db98642090b3d7335f",
    "colin27_lesions_truth_2mm.nii.gz": "8da2cf4b19f0d4ebc04a12d257cb221b29a00977a7379257faa518cca3676101",
}


def data_path(name: str) -> Path:
    """Path of the packaged file ``name`` (it may be missing: callers check)."""
    return Path(str(files(__name__) / name))


def default_model_path() -> Path:
    """The bundled default model; a clear error if it is missing."""
    path = data_path(DEFAULT_MODEL_NAME)
    if not path.is_file():
        raise BundledModelMissing(path)
    return path


class BundledModelMissing(CeVAEError):
    """The bundled default model's file is missing (an installation without its package data). The message says what
    to do as a library caller and the Slicer panel's user do it; :meth:`for_command_line` names the command's
    argument."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"The bundled default model {path} is missing (the installation is incomplete): use a model "
                         "bundle of your own (in Slicer: untick Use bundled model and choose it as the Model bundle), "
                         "or install CeVAEAnomaly again.")

    def for_command_line(self, command: str) -> str:
        """The message as the user of ``command`` gives a model: `info` takes it as its argument, the others (detect,
        batch, calibrate, adapt, demo, Slicer's DetectVolume) with ``--model``."""
        give = "give a model bundle: cevae-anomaly info BUNDLE" if command == "info" else "pass --model BUNDLE"
        return (f"The bundled default model {self.path} is missing (the installation is incomplete): {give}, or "
                "install CeVAEAnomaly again.")


def is_bundled_model(path: Path) -> bool:
    """Whether ``path`` names the bundled default model's file, by path, link or inode (False where it is missing)."""
    from ..io.targets import Inputs

    try:
        bundled = default_model_path()
    except CeVAEError:  # (missing: nothing to replace)
        return False
    return Inputs([bundled]).which(Path(path)) is not None


class BundledOutputError(CeVAEError):
    """A model output that is the bundled default model's file. The message names it as a library caller knows it
    (the output path); :meth:`for_command_line` says it with the command line's options."""

    def __init__(self, out: Path) -> None:
        self.out = out
        super().__init__(f"The output path {out} is the bundled default model, which detection uses where no model is "
                         "given; it is never replaced: write the new model to another path and give that path as the "
                         "model.")

    def for_command_line(self) -> str:
        """The message as the command line's user knows the output and the model: ``--out`` and ``--model``."""
        return (f"--out {self.out} is the bundled default model, which every detect without --model uses; it is never "
                "replaced: write the new model elsewhere and pass it with --model.")


def refuse_bundled_output(out: Path) -> None:
    """Refuse a model output ``out`` that is the bundled default model, even with overwrite: every ``detect``
    without ``--model`` (and Slicer's "Use bundled model") would then use the new model. (The recipe that makes the
    bundled model, scripts/train_default_model.py, writes it with Trainer.run and save_bundle, which do not check.)"""
    if is_bundled_model(out):
        raise BundledOutputError(out)


def template_dir() -> Path:
    """Folder of the brain-mask template files (colin27 T1 and brain mask, 2 mm)."""
    return data_path(DEFAULT_MODEL_NAME).parent
