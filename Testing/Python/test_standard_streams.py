"""The command in scripts and pipelines: its standard output full or closed, its standard error closed, the
environment of a job scheduler (cevae-anomaly as a process, as a shell runs it)."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from CeVAEAnomalyLib.cli.main import EXIT_REFUSED


def cevae(args: List[str], stdout=subprocess.PIPE, stderr=subprocess.PIPE, closing: Optional[int] = None,
          **env: str) -> subprocess.CompletedProcess:
    """``cevae-anomaly ARGS`` in a process, its file descriptor ``closing`` closed (`>&-`, `2>&-`)."""
    before: Optional[Callable[[], None]] = (lambda: os.close(closing)) if closing is not None else None
    return subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli", *args], stdout=stdout, stderr=stderr,
                          preexec_fn=before, env=dict(os.environ, OMP_NUM_THREADS="1", **env), timeout=120)


@pytest.mark.parametrize("args", [["info"], ["info", "--json"]], ids=["text", "json"])
def test_a_full_standard_output_is_said_in_one_line_not_as_a_bug(args: List[str]) -> None:
    """`info --json > /dev/full` (a full disk under the file a script sends it to) said "error: unexpected OSError:
    [Errno 28] No space left on device (... report it)", exit 1, as if it were a bug of the program."""
    with open("/dev/full", "w") as full:
        proc = cevae(args, stdout=full)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_REFUSED, err
    assert err.startswith("error: could not write to the standard output: No space left on device"), err
    assert "unexpected" not in err and "Exception ignored" not in err and len(err.splitlines()) == 1, err


def test_a_closed_standard_output_is_an_error_not_a_silent_success() -> None:
    """`info --json >&-`: nothing was printed, and the exit status said done (0)."""
    proc = cevae(["info", "--json"], stdout=None, closing=1)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_REFUSED, err
    assert err.startswith("error: the standard output is closed"), err


def test_a_closed_standard_error_keeps_the_documented_exit_status(tmp_path: Path) -> None:
    """`cevae-anomaly info missing.cevae 2>&-` (a cron line that drops messages but checks the status): the error line
    could not be said, and the AttributeError that followed made the exit status 1 (unexpected failure) instead of 2
    (refused input)."""
    proc = cevae(["info", str(tmp_path / "missing.cevae")], stderr=None, closing=2)
    assert proc.returncode == EXIT_REFUSED
    proc = cevae(["info", "--json"], stderr=None, closing=2)  # the result still printed, done
    assert proc.returncode == 0 and proc.stdout.startswith(b"{")


@pytest.mark.parametrize("value", ["", "two", "0x2"])
def test_a_world_size_that_is_no_number_is_one_line(value: str) -> None:
    """WORLD_SIZE (torchrun's) exported empty or as a word by a job template: every command, even `--version`, ended
    in a ValueError traceback. --version still answers; a command says what is wrong."""
    proc = cevae(["--version"], WORLD_SIZE=value)
    assert proc.returncode == 0 and proc.stdout.startswith(b"cevae-anomaly "), proc.stderr
    proc = cevae(["info", "--json"], WORLD_SIZE=value)
    assert proc.returncode == EXIT_REFUSED and not proc.stdout, proc.stderr
    assert proc.stderr.decode() == f"error: The environment variable WORLD_SIZE must be a whole number (torchrun " \
                                   f"sets it), got {value!r}; unset it to run as one process.\n"
