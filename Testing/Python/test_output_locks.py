"""The output locks of io/lock.py as a command holds them: outputs whose long names share one lock file."""
from __future__ import annotations

import os

import pytest

from CeVAEAnomalyLib.errors import CeVAEError
from CeVAEAnomalyLib.io.lock import hold_output, hold_outputs, lock_path

pytestmark = pytest.mark.skipif(os.name != "posix", reason="outputs are locked with flock on POSIX only")


def test_outputs_whose_long_names_share_a_lock_file_are_held_once(tmp_path):
    stem = "a" * 249  # a lock file's name keeps the first 249 bytes of its output's (255 with "." and ".lock")
    score, labelmap = tmp_path / f"{stem}1.nrrd", tmp_path / f"{stem}2.nrrd"
    assert lock_path(score) == lock_path(labelmap)
    with hold_outputs([score, labelmap], "detect"):  # was: "A detect (process <this one>) is writing ..."
        with pytest.raises(CeVAEError, match="is writing"):  # still held against every other holder
            with hold_output(labelmap, "detect"):
                pass
    assert not os.path.lexists(lock_path(score))
