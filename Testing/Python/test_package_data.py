"""The package's data files (default model, brain template, sample scans) are the ones whose SHA-256 the package
records: an accidental change of any of them fails here, a deliberate rebuild updates ``data.SHA256``."""
from __future__ import annotations

import hashlib
import re

import pytest

from conftest import REPO
from CeVAEAnomalyLib.data import DEFAULT_MODEL_NAME, SHA256, data_path, template_dir

DOCS = {"README.md", "NOTICE.md"}


def test_every_packaged_data_file_has_a_recorded_digest():
    packaged = {p.name for p in template_dir().iterdir() if p.is_file() and p.suffix != ".py" and p.name not in DOCS}
    assert set(SHA256) == packaged and DEFAULT_MODEL_NAME in packaged


@pytest.mark.parametrize("name", sorted(SHA256))
def test_the_packaged_file_is_the_recorded_one(name):
    digest = hashlib.sha256(data_path(name).read_bytes()).hexdigest()
    assert digest == SHA256[name], (
        f"{name} changed (sha256 {digest}); if it was rebuilt on purpose by the script named beside it in "
        "CeVAEAnomalyLib/data/__init__.py, record the new digest in SHA256 there")


def test_the_model_cards_digest_is_the_recorded_one():
    """The card (written by scripts/train_default_model.py with the model) names the model's sha256 too."""
    card = (REPO / "Resources" / "Models" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert re.search(rf"File: `{re.escape(DEFAULT_MODEL_NAME)}`, sha256 `([0-9a-f]{{64}})`", card).group(1) == (
        SHA256[DEFAULT_MODEL_NAME])
