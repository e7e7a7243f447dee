"""The one exception type for problems a user can act on, how error messages become one line, and the words in which
they tell the caller's user what to do."""
import errno
import re
from dataclasses import dataclass
from typing import Optional, Tuple


class CeVAEError(Exception):
    """A user-facing problem: the message says what is wrong and what to do.

    The command line prints it as one line (no traceback unless ``--debug``); the Slicer
    module shows it in an error dialog.
    """


class RunFailed(CeVAEError):
    """A failure that is not the input's or options' (out of memory, a process lost): the command line exits 1, as for
    an unexpected error, not 2 (refused), so that a script can tell a run that may finish with more memory."""


class WriteFailed(CeVAEError):
    """A file that could not be written. ``cause``: the error its write failed with -- an OSError with its errno where
    the system said why -- so that a caller can add what to do about it (:func:`~.io.targets.write_remedy`)."""

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


_FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, a used-up quota


def full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for a full disk or a used-up quota (errno ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in _FULL_DISK


# Where ITK/SimpleITK put their C++ source locations and object addresses into a message
_ITK_LOCATIONS = re.compile(
    r"Exception thrown in SimpleITK \S+:|ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|\S+\.(?:cxx|hxx|txx|cpp|h):\d+:"
)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, without the C++ file/line and object-address parts of ITK errors."""
    return " ".join(_ITK_LOCATIONS.sub(" ", str(exc)).split()) or type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: Python's MemoryError (NumPy's "Unable to allocate"), PyTorch's (an
    OutOfMemoryError on a CUDA GPU, a RuntimeError "can't allocate memory" from its CPU allocator, "not enough
    memory" from it on Windows, "MPS backend out of memory" on a Mac's GPU, "could not create a primitive" where
    oneDNN could not allocate a CPU convolution's work space), or ITK's RuntimeError "Failed to allocate memory for
    image"."""
    failed = ("can't allocate memory", "DefaultCPUAllocator: not enough memory", "out of memory",
              "Failed to allocate memory")
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and (any(words in str(exc) for words in failed)
                                           or str(exc) == "could not create a primitive"))


@dataclass(frozen=True)
class Wording:
    """How the caller's user does what the messages of a long run (train, adapt) advise, in the caller's words. Every
    front end gives every phrase, a command even those only another says, in its own options: the command line's train
    (COMMAND_LINE_TRAIN) and adapt (COMMAND_LINE_ADAPT), the Slicer panel its controls (slicer.worker.PANEL_WORDING)."""

    stop: str  # stop the run now
    resume: str  # go on from the last checkpoint
    run_again: str  # start the run again where it had written no checkpoint yet
    resume_request: str  # the user's request to resume, as "... was given" and "... refused:" name it
    start_anew: str  # leave the checkpoint a resume refused
    start_over: str  # leave the checkpoints of a run that was not resumed (and stopped or was refused)
    same_model: str  # a resume refused for the checkpoint's architecture
    less_memory: str  # out of memory at batch size 1
    cache_room: str  # the slice cache's disk full
    cache_dir: str  # the option that names the slice cache folder, as "give a folder for ..." says it
    out: str  # the option that names the model file the run writes, as "choose another ..." and "The ... is" say it
    higher_rate: str  # the default rate too low for the voxels the written model is calibrated on
    replace_model: str  # an adaptation's model written already
    cpu_choice: str  # train on the CPU (devices.DeviceUnavailable)
    # a resume from a checkpoint past the run's end: ends "the checkpoint ... is at step {step}, " ({steps}: the run's)
    past_the_end: str
    # an adaptation resumed from a checkpoint that does not record its steps and learning rate ({steps}, {lr}: this
    # run's)
    same_settings: str
    detect_with: str  # the model adapt wrote ({path}: quoted for the shell of this platform)
    lower_rate: str  # an adapted model's threshold is 0 at its rate
    # what to do with a scan unlike the others in the calibration of the model the run writes
    # (engine.calibration.unlike_scans); an adapted model was fine-tuned on it too
    unlike_scan: str
    # where no volume's person is known (io.manifest.unknown_persons_note): what would have said it, as "... says who
    # was scanned" ends it; and how to tell that some volumes are scans of one person
    unknown_persons: str
    same_person: str
    # a resume refused for a checkpoint of another run: what to do; and, for a caller whose user sets no options (the
    # panel), what differs by kind: the model started from, the volumes, other settings ("": each option and volume
    # that differs is named, as the command line's user gives them)
    same_run: str
    other_model: str
    other_volumes: str
    other_settings: str
    # where differences are named one by one (other_model ""): the caller's name for each run option, by its dotted
    # name in a checkpoint or the name of a group of them (the most specific first); an option not given is so named
    option_names: Tuple[Tuple[str, str], ...]


# where the command line learns who was scanned: a manifest's 'subject' column, else a BIDS file name
COMMAND_LINE_UNKNOWN_PERSONS = "No manifest 'subject' column or BIDS file name (sub-<label>_...)"
COMMAND_LINE_SAME_PERSON = "name it in a 'subject' column"
# the phrases every command that runs long says alike, in its options
_COMMAND_LINE = dict(
    unknown_persons=COMMAND_LINE_UNKNOWN_PERSONS, same_person=COMMAND_LINE_SAME_PERSON,
    stop="Ctrl-C", resume="run again with --resume", run_again="run again", resume_request="--resume",
    start_anew="start anew with --overwrite instead of --resume", start_over="start anew with --overwrite",
    cache_room="Free space there, or give --cache-dir a folder on a disk with room", cache_dir="--cache-dir",
    out="--out", cpu_choice="choose the device cpu or auto (--device cpu)",
    detect_with="Detect with it: cevae-anomaly detect SCAN --model {path}",
    lower_rate="detect with a lower --fpr, or a --threshold", same_run="Resume with the same volumes and options",
    other_model="", other_volumes="", other_settings="")
# `cevae-anomaly train`: it calibrates the model it writes at the default rate, and has no --default-fpr
COMMAND_LINE_TRAIN = Wording(
    **_COMMAND_LINE, same_model="Resume with the same --channels, --z-dim and --input-size",
    option_names=(("model.channels", "--channels"), ("model.z_dim", "--z-dim"), ("model.input_size", "--input-size"),
                  ("preprocess.input_size", "--input-size"), ("loss.beta", "--beta"), ("loss.ce_weight", "--ce-weight"),
                  ("loss.rec", "--rec-loss"), ("augment", "--no-augment or --acquisition-augment"),
                  ("val_fraction", "--val-fraction"), ("orientations", "--orientations"), ("seed", "--seed"),
                  ("amp", "--amp"), ("batch_size", "--batch-size")),
    less_memory="use a smaller --input-size or --channels, or another device",
    higher_rate="give a higher --default-fpr to `cevae-anomaly calibrate` on the trained model",
    replace_model="pass --overwrite to train again and replace it, or choose another --out",
    past_the_end="past --max-steps {steps}; give --max-steps {step} or more",
    same_settings="make sure --max-steps {steps} and --lr {lr:g} are those it was started with",
    unlike_scan="calibrate the trained model without it (cevae-anomaly calibrate) unless it is a healthy scan of this "
                "protocol")
# the run options of a fine-tuning that its starting model decides: its file, architecture, loss, preprocessing, slice
# orientations and augmentation (training.checkpoint names them by kind, adapt's as --model)
MODEL_OPTIONS = ("init_from", "model", "loss", "preprocess", "orientations", "augment")
# `cevae-anomaly adapt`: an adaptation has the architecture and the default rate of its --model (train's --channels,
# --z-dim, --input-size and --max-steps, calibrate's --default-fpr are not adapt's)
COMMAND_LINE_ADAPT = Wording(
    **_COMMAND_LINE, same_model="Resume with the --model that adaptation started from",
    option_names=(("adaptation.steps", "--steps"), ("adaptation.lr", "--lr"), ("batch_size", "--batch-size"),
                  ("seed", "--seed"), ("amp", "--amp"), ("folds", "--folds"),
                  *((name, "--model") for name in MODEL_OPTIONS)),
    less_memory="close other programs that use its memory, or give another --device",
    higher_rate="detect with a higher --fpr",
    replace_model="pass --overwrite to adapt again and replace it, or choose another --out",
    past_the_end="past --steps {steps}; give --steps {step} or more",
    same_settings="make sure --steps {steps} and --lr {lr:g} are those it was started with",
    unlike_scan="adapt again without it unless it is a healthy scan of this protocol: the adapted model was "
                "fine-tuned on it too, so it may take what is unusual in it for healthy")
# `cevae-anomaly calibrate`'s advice for a default rate too low (engine.calibrate; the other phrases are a long run's)
CALIBRATE_HIGHER_RATE = "give a higher --default-fpr"
# and for a scan unlike the others it calibrates on (engine.calibration.unlike_scans)
CALIBRATE_UNLIKE_SCAN = "calibrate without it unless it is a healthy scan of this protocol"
# and for healthy volumes of different acquisitions (engine.calibrate's warning ends with it)
CALIBRATE_PER_ACQUISITION = "Calibrate one model per acquisition."
