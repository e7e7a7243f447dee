"""The one exception type for problems a user can act on, and how error messages become one line."""
import re


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
