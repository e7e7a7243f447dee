"""scripts/train_default_model.py's paths: the bundled model's card goes into this checkout's Resources/Models wherever
the script runs from, another model's card beside it; the end of a run names the line data/__init__.py's SHA256
needs. (The functions the script's main uses: a real run trains for minutes.)"""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO
from CeVAEAnomalyLib.data import DEFAULT_MODEL_NAME, SHA256


@pytest.fixture(scope="module")
def recipe():
    pytest.importorskip("scipy")  # (the research code it imports)
    spec = importlib.util.spec_from_file_location("train_default_model", REPO / "scripts" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundled_models_card_goes_into_the_checkout_from_any_folder(recipe, tmp_path, monkeypatch):
    """The card's path was relative (Resources/Models/MODEL_CARD.md): run from another folder, the script wrote a card
    there and left the checkout's stale."""
    monkeypatch.chdir(tmp_path)
    bundled = REPO / "CeVAEAnomaly" / "CeVAEAnomalyLib" / "data" / DEFAULT_MODEL_NAME
    assert recipe.card_path(bundled) == REPO / "Resources" / "Models" / "MODEL_CARD.md"
    assert recipe.card_path(recipe.BUNDLED) == recipe.CARD and recipe.BENCHMARK == REPO / "docs" / "benchmark.md"
    monkeypatch.chdir(REPO)  # the bundled model named relative to the checkout, as the usage line shows it
    assert recipe.card_path(bundled.relative_to(REPO)) == REPO / "Resources" / "Models" / "MODEL_CARD.md"


def test_another_models_card_goes_beside_it_and_leaves_the_bundled_ones(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine.cevae"
    assert recipe.card_path(out) == tmp_path / "mine_MODEL_CARD.md"
    said = recipe.closing_words(out, "ab" * 32, recipe.card_path(out))
    assert str(out) in said and "ab" * 32 in said and "describe the bundled model only" in said
    assert "DEFAULT_MODEL_NAME:" not in said


def test_a_new_bundled_model_ends_with_the_line_for_sha256_in_data_init(recipe):
    new = "cd" * 32
    said = recipe.closing_words(recipe.BUNDLED, new, recipe.CARD)
    assert said.splitlines()[-1] == f'    DEFAULT_MODEL_NAME: "{new}",' and "test_package_data" in said
    same = recipe.closing_words(recipe.BUNDLED, SHA256[DEFAULT_MODEL_NAME], recipe.CARD)
    assert "names it already" in same and "DEFAULT_MODEL_NAME:" not in same
