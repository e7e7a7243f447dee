"""Entries of another slicing version in a --cache-dir: an upgrade that changed how slices are made left the old
version's entries in the folder, never read again and never mentioned (a cohort's cache silently doubled on disk).
They are known by name; a run says once how many, how much space and how to remove them, and removes nothing."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

from CeVAEAnomalyLib.cli.main import main
from CeVAEAnomalyLib.engine.config import PreprocessConfig
from CeVAEAnomalyLib.io.atomic import temp_beside
from CeVAEAnomalyLib.training.cache import SLICING_VERSION, SliceCache
from conftest import write_cohort

# `prepare` (argv[2:]) run as a version whose SLICING_VERSION is argv[1] (an older or a later release)
AS_VERSION = ("import sys; from CeVAEAnomalyLib.training import cache; cache.SLICING_VERSION = int(sys.argv[1]); "
              "from CeVAEAnomalyLib.cli.main import main; sys.exit(main(sys.argv[2:]))")
SAID = re.compile(r"Slice cache (\S+): (\d+) entries \(([0-9.]+) MB\) were prepared by another version of CeVAEAnomaly "
                  r"\(slicing version ([^)]+)\) and are not used by this one\. Once no run of that version uses the "
                  r"folder, remove them with: (rm .+)")


def cohort(tmp_path: Path) -> Path:
    """A manifest of three small heads with their masks."""
    return write_cohort(tmp_path, (1, 2, 3), size=(32, 36, 28))


def prepare_as(version: int, manifest: Path, cache: Path) -> str:
    """Run `prepare` as a release of slicing version ``version`` in its own process; its log."""
    done = subprocess.run([sys.executable, "-c", AS_VERSION, str(version), "prepare", "--manifest", str(manifest),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def names(cache: Path) -> List[str]:
    return sorted(p.name for p in cache.iterdir())


def test_an_older_versions_entries_are_said_once_with_their_size_and_removed_by_the_command_said(tmp_path, caplog):
    manifest, cache = cohort(tmp_path), tmp_path / "cache"
    old = SLICING_VERSION - 1
    prepare_as(old, manifest, cache)
    before = names(cache)
    assert len(before) == 6 and all(n.startswith(f"s{old}-") for n in before)  # the version is in the names
    size = sum((cache / n).stat().st_size for n in before)
    outside = tmp_path / "elsewhere.npy"
    outside.write_bytes(b"x" * 10**7)
    (cache / f"s{old}-{'e' * 32}.npy").symlink_to(outside)  # a link is never counted nor followed
    log = prepare_as(SLICING_VERSION, manifest, cache)  # the upgrade
    said = SAID.findall(log)
    assert said == [(str(cache), "3", f"{size / 1e6:.1f}", str(old), said[0][4])]
    assert "3 volume(s), 3 preprocessed now and 0 found ready" in log
    current = [n for n in names(cache) if n.startswith(f"s{SLICING_VERSION}-")]
    assert len(current) == 6
    common = ["train", "--manifest", str(manifest), "--max-steps", "1", "--channels", "8,16,16,32", "--z-dim", "16",
              "--batch-size", "8", "--device", "cpu", "--val-fraction", "0.34", "--cache-dir", str(cache)]
    with caplog.at_level(logging.INFO):  # two preparations (training and held-out volumes), said once
        assert main([*common, "--out", str(tmp_path / "a.cevae")]) == 0
    assert len(SAID.findall(caplog.text)) == 1 and "0 volume(s) preprocessed now, 2 found ready" in caplog.text
    subprocess.run(said[0][4], shell=True, check=True)  # what the user is told to run
    assert names(cache) == current and outside.stat().st_size == 10**7  # the link was removed, not what it names
    log = prepare_as(SLICING_VERSION, manifest, cache)
    assert "3 preprocessed now" not in log and "0 preprocessed now and 3 found ready" in log
    assert not SAID.search(log)


def test_entries_named_by_their_hash_alone_are_read_and_said_only_once_another_version_comes(tmp_path, caplog):
    """Versions up to slicing version 5 named an entry by its hash alone: this version reads the current ones under
    that name (an upgrade within version 5 prepares nothing again), and a later version counts them as another's."""
    manifest, cache = cohort(tmp_path), tmp_path / "cache"
    assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(cache)]) == 0
    for path in cache.iterdir():  # as the version before this one named them
        prefix, rest = path.name.split("-", 1)
        assert prefix == f"s{SLICING_VERSION}"
        path.rename(cache / rest)
    unnamed = names(cache)
    with caplog.at_level(logging.INFO):
        assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(cache)]) == 0
    assert "0 preprocessed now and 3 found ready" in caplog.text and not SAID.search(caplog.text)
    assert names(cache) == unnamed
    log = prepare_as(SLICING_VERSION + 1, manifest, cache)
    said = SAID.findall(log)
    assert [s[1:4] for s in said] == [("3", f"{sum((cache / n).stat().st_size for n in unnamed) / 1e6:.1f}",
                                       f"{SLICING_VERSION} or earlier")]
    subprocess.run(said[0][4], shell=True, check=True)
    assert len(names(cache)) == 6 and all(n.startswith(f"s{SLICING_VERSION + 1}-") for n in names(cache))


def test_temporaries_of_killed_writes_of_named_entries_are_removed(tmp_path):
    manifest, cache = cohort(tmp_path), tmp_path / "cache"
    cache.mkdir()
    old = Path(temp_beside(cache / f"s{SLICING_VERSION}-{'a' * 32}.npy"))  # as a killed write leaves it
    old.write_bytes(b"x" * 100)
    os.utime(old, (1.0, 1.0))
    assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(cache)]) == 0
    assert not old.exists() and len(names(cache)) == 6


def test_a_damaged_entry_named_by_its_hash_alone_is_removed_once_made_again_under_its_name(tmp_path, caplog):
    """An entry of this slicing version named by its hash alone (as versions up to 5 named them) that was damaged was
    made again under its s<V>- name, and the damaged files stayed behind for ever (never read again, never said)."""
    manifest, cache = cohort(tmp_path), tmp_path / "cache"
    assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(cache)]) == 0
    for path in cache.iterdir():  # as the version before this one named them
        path.rename(cache / path.name.split("-", 1)[1])
    unnamed = names(cache)
    damaged = cache / unnamed[1]  # an .npy: its last bytes (slices) changed in place
    data = bytearray(damaged.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        assert main(["prepare", "--manifest", str(manifest), "--cache-dir", str(cache)]) == 0
    assert "1 preprocessed now and 2 found ready" in caplog.text
    stem = damaged.name[:-len(".npy")]
    assert names(cache) == sorted([*(n for n in unnamed if not n.startswith(stem)),
                                   f"s{SLICING_VERSION}-{stem}.json", f"s{SLICING_VERSION}-{stem}.npy"])


def test_other_versions_are_named_in_numeric_order(tmp_path, caplog):
    """Slicing versions 9 and 10 were said as "10, 9" (sorted as text)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for version in (10, 9, 11):
        for ext in ("npy", "json"):
            (cache / f"s{version}-{'a' * 32}.{ext}").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING):
        SliceCache(cache, PreprocessConfig()).say_other_versions()
    said = SAID.findall(caplog.text)
    assert said[0][3] == "9, 10, 11"
    assert said[0][4] == "rm " + " ".join(f"{cache}/s{v}-*.{ext}" for v in (9, 10, 11) for ext in ("npy", "json"))
