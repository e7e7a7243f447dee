"""The one exception type for problems a user can act on, how error messages become one line, and the words in which
they tell the caller's user what to do."""
import re
from dataclasses import dataclass


class CeVAEError(Exception):
    """A user-facing problem: the message says what is wrong and what to do.

    The command line prints it as one line (no traceback unless ``--debug``); the Slicer
    module shows it in an error dialog.
    """


# Where ITK/SimpleITK put their C++ source locations and object addresses into a message
_ITK_LOCATIONS = re.compile(
    r"Exception thrown in SimpleITK \S+:|ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|\S+\.(?:cxx|hxx|txx|cpp|h):\d+:"
)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, without the C++ file/line and object-address parts of ITK errors."""
    return " ".join(_ITK_LOCATIONS.sub(" ", str(exc)).split()) or type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: Python's MemoryError, or PyTorch's (an OutOfMemoryError on a CUDA GPU,
    a RuntimeError "can't allocate memory" from its CPU allocator or "MPS backend out of memory" on a Mac's GPU)."""
    failed = ("can't allocate memory", "out of memory")
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and any(words in str(exc) for words in failed))


@dataclass(frozen=True)
class Wording:
    """How the caller's user does what the messages of a long run (train, adapt) or a calibration advise, in the
    caller's words. By default the command line's: train's and calibrate's options, and adapt's in the messages only
    an adaptation says (replace_model, same_settings, detect_with, lower_rate); `cevae-anomaly adapt` names its own
    in the others too (cli.commands.ADAPT_WORDING), train where calibrate's differ (cli.commands.TRAIN_WORDING), the
    Slicer panel its controls (slicer.worker.PANEL_WORDING)."""

    stop: str = "Ctrl-C"  # stop the run now
    resume: str = "run again with --resume"  # go on from the last checkpoint
    resume_request: str = "--resume"  # the user's request to resume, as "... was given" and "... refused:" name it
    start_anew: str = "start anew with --overwrite instead of --resume"  # leave the checkpoint a resume refused
    same_model: str = "Resume with the same --channels, --z-dim and --input-size"  # the checkpoint's architecture
    less_memory: str = "use a smaller --input-size or --channels, or another device"  # out of memory at batch size 1
    cache_room: str = "Free space there, or give --cache-dir a folder on a disk with room"  # slice cache's disk full
    higher_rate: str = "give a higher --default-fpr"  # a default rate too low for the voxels calibrated on (calibrate)
    replace_model: str = "pass --overwrite to adapt again and replace it, or choose another --out"  # adapt: model done
    cpu_choice: str = "choose the device cpu or auto (--device cpu)"  # train on the CPU (devices.DeviceUnavailable)
    # a resume from a checkpoint past the run's end: ends "the checkpoint ... is at step {step}, " ({steps}: the run's)
    past_the_end: str = "past --max-steps {steps}; give --max-steps {step} or more"
    # an adaptation resumed from a checkpoint that does not record its steps and learning rate ({steps}, {lr}: this
    # run's): only adaptations reach it, so by default `cevae-anomaly adapt`'s options
    same_settings: str = "make sure --steps {steps} and --lr {lr:g} are those it was started with"
    detect_with: str = "Detect with it: cevae-anomaly detect SCAN --model {path}"  # the model adapt wrote ({path})
    lower_rate: str = "detect with a lower --fpr, or a --threshold"  # an adapted model's threshold is 0 at its rate
    # a resume refused for a checkpoint of another run: what to do; and, for a caller whose user sets no options (the
    # panel), what differs by kind: the model started from, the volumes, other settings ("": each option and volume
    # that differs is named, as the command line's user gives them)
    same_run: str = "Resume with the same volumes and options"
    other_model: str = ""
    other_volumes: str = ""
    other_settings: str = ""


COMMAND_LINE = Wording()
