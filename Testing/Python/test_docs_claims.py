"""What the README and docs say about the command line, checked against what it does."""
from __future__ import annotations

import re
from pathlib import Path

import SimpleITK as sitk

from conftest import REPO, make_head
from CeVAEAnomalyLib.cli.main import build_parser, main


def subparser(name: str):
    """The argparse parser of ``cevae-anomaly NAME``."""
    return build_parser()._subparsers._group_actions[0].choices[name]


def section(document: str, heading: str) -> str:
    """The text of ``document`` under ``heading`` up to the next heading of its level or above."""
    text = (REPO / document).read_text(encoding="utf-8")
    level = heading.split(" ", 1)[0]
    body = text.split(heading + "\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


def test_batch_names_every_file_it_writes_in_its_help_and_in_scaling(tmp_path: Path, tiny_bundle) -> None:
    """Each file batch writes into --out-dir (a volume's outputs, the summary, the settings; with and without
    --shard) is named, with NAME and i-of-n for the volume and the shard, in its --help and in SCALING.md."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, mask = make_head(seed=3)
    sitk.WriteImage(image, str(inputs / "h.nii.gz"))
    sitk.WriteImage(mask, str(inputs / "h_mask.nii.gz"))
    written = set()
    for shard in ([], ["--shard", "1/2"]):
        out = tmp_path / f"out{len(shard)}"
        assert main(["batch", str(inputs), "--out-dir", str(out), "--model", str(tiny_bundle), "--threshold", "1",
                     *shard]) == 0
        written |= {re.sub(r"^h_", "NAME_", p.name).replace("1-of-2", "i-of-n") for p in out.iterdir()}
    assert "batch_settings_shard-i-of-n.json" in written
    help_text = " ".join(subparser("batch").description.split())
    scaling = section("docs/SCALING.md", "## Batch detection over a cohort")
    for name in sorted(written):
        assert name in help_text, f"batch --help does not name {name}"
        assert name in scaling, f"docs/SCALING.md (Batch detection over a cohort) does not name {name}"
