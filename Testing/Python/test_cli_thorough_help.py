"""The help of --test-time-steps states the thorough mode's cost as the README does."""
from __future__ import annotations

import re

from conftest import REPO
from CeVAEAnomalyLib.cli.main import main


def test_the_thorough_modes_cost_in_the_help_is_the_readmes(capsys):
    """The help said "100 adds about 10 s on 2 CPU cores"; the README says 15 to 50 s per scan (measured: more)."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    cost = re.search(r"about (\d+ to \d+ s) more per scan on 2 CPU cores", readme)
    assert cost, "the README no longer states the thorough mode's cost"
    assert main(["detect", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert f"100 adds about {cost.group(1)} per scan on 2 CPU cores" in help_text
    assert "about 10 s" not in help_text
