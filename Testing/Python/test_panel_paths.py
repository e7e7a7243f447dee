"""Paths the module panel takes (CeVAEAnomalyLib.slicer, without Qt): a model typed as "~/site.cevae" names the same
file as the output fields' "~/site_calibrated.cevae" do."""
from __future__ import annotations

import ast
import shutil
from types import SimpleNamespace

from conftest import REPO
from CeVAEAnomalyLib.data import default_model_path
from CeVAEAnomalyLib.slicer import settings
from CeVAEAnomalyLib.slicer.adapt_panel import output_problem
from CeVAEAnomalyLib.slicer.gui_binding import takes_path_now
from CeVAEAnomalyLib.slicer.model_memory import remembered_value, start_model
from CeVAEAnomalyLib.slicer.share_panel import ModelSharing

MODULE_FILE = REPO / "CeVAEAnomaly" / "CeVAEAnomaly.py"


def widget_method(name: str) -> str:
    """The source of the panel widget's method ``name``."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CeVAEAnomalyWidget")
    return ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name))


def test_a_model_path_typed_with_a_tilde_is_the_file_in_the_home_folder(tmp_path, monkeypatch):
    """The output fields expanded "~", the model field did not: "~/site.cevae" was refused
    as "does not exist", and so was Share model... for it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "site.cevae"
    shutil.copyfile(default_model_path(), model)
    panel = SimpleNamespace(useBundledModel=False, modelPath="~/site.cevae")
    assert settings.model_problem(panel) is None
    assert settings.model_path(panel) == str(model)
    assert settings.chosen_model(panel).path == model
    assert settings.model_file_key(panel)[0] == str(model)
    assert settings.ModelSettingsCache().of(panel) is not None
    assert takes_path_now("modelPath", "~/site.cevae", typed=True, finished=False)  # a file: taken while typed
    sharing = ModelSharing.of_panel(panel, True, None)
    assert sharing.problem is None
    assert sharing.default_output() == tmp_path / "site_shared.cevae"
    assert remembered_value(panel) == str(model)  # the next scene finds it
    assert start_model("~/site.cevae").path == str(model)
    assert output_problem("~/site.cevae", model, "calibrated").startswith("Save the calibrated model under a new name")
    assert "typed_path(p.modelPath)" in widget_method("_currentModel")


def test_a_tilde_of_no_such_user_is_a_path_said_as_typed_not_a_crash(tmp_path):
    """Path.expanduser raises RuntimeError for "~nosuchuser/..."; a shell leaves such a word as typed."""
    typed = "~cevae-no-such-user/site.cevae"
    assert output_problem(typed, None, "adapted") == (f"Give the adapted model's full path (with its folder), not "
                                                     f"only '{typed}'.")
    panel = SimpleNamespace(useBundledModel=False, modelPath=typed)
    assert "does not exist" in settings.model_problem(panel)
    assert not takes_path_now("modelPath", typed, typed=True, finished=False)
