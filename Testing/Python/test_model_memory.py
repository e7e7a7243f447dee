"""A new scene starts with the model used last on this computer (slicer/model_memory.py), with real bundle
files; the widget's binding to the application settings is read from the module source."""
from __future__ import annotations

import ast
import shutil
from types import SimpleNamespace

import pytest

slicer = pytest.importorskip("slicer")

from CeVAEAnomalyLib.data import default_model_path  # noqa: E402
from CeVAEAnomalyLib.slicer.model_memory import SETTINGS_KEY, remembered_value, start_model  # noqa: E402
from test_slicer_module import module_classes  # noqa: E402


def test_the_bundled_model_is_remembered_as_empty_and_a_chosen_file_by_its_path():
    assert remembered_value(SimpleNamespace(useBundledModel=True, modelPath="/site/model.cevae")) == ""
    assert remembered_value(SimpleNamespace(useBundledModel=False, modelPath="/site/model.cevae")) == \
        "/site/model.cevae"
    assert remembered_value(SimpleNamespace(useBundledModel=False, modelPath="")) == ""


def test_a_remembered_site_model_is_used_and_said(tmp_path):
    site = tmp_path / "site model.cevae"
    shutil.copyfile(default_model_path(), site)
    start = start_model(str(site))
    assert start.path == str(site) and not start.forget
    assert str(site) in start.message and "Use bundled model" in start.message


def test_nothing_remembered_starts_silently_with_the_bundled_model():
    assert start_model("") == start_model(None)
    start = start_model("")
    assert start.path is None and start.message == "" and not start.forget


@pytest.mark.parametrize("damage", ["truncated", "not a model"])
def test_a_remembered_model_that_cannot_be_read_gives_way_to_the_bundled_one_and_is_forgotten(tmp_path, damage):
    site = tmp_path / "site.cevae"
    if damage == "truncated":
        site.write_bytes(default_model_path().read_bytes()[:100])
    else:
        site.write_text("hello")
    start = start_model(str(site))
    assert start.path is None and start.forget
    assert "cannot be used any more, so the bundled model is in use" in start.message and str(site) in start.message


def test_a_remembered_model_out_of_reach_is_kept_for_the_next_start(tmp_path):
    """A share not mounted yet when Slicer starts: forgetting the model made the next start silent again."""
    start = start_model(str(tmp_path / "share" / "site.cevae"))
    assert start.path is None and not start.forget
    assert "cannot be reached now, so the bundled model is in use" in start.message


@pytest.mark.parametrize("value", [("/site/a.cevae", "/site/b.cevae"), 3, "/site/model\0.cevae"],
                         ids=["a list", "a number", "a NUL byte"])
def test_a_remembered_setting_that_is_no_file_path_is_cleared_not_a_crash_nor_kept(value):
    """The application setting as another version or a damaged settings file may leave it: a list or a number failed
    with a TypeError (the widget's str() of it was then kept for ever as a model "out of reach"), a path with a NUL
    byte with a ValueError, so the panel did not open. The bundled model is used and the setting is cleared."""
    start = start_model(value)
    assert start.path is None and start.forget and start.standing_in_for == ""
    assert start.message.startswith(f"The setting {SETTINGS_KEY} holds no model file path")
    assert "so the bundled model is in use" in start.message


def test_a_detection_with_the_bundled_model_standing_in_keeps_the_model_out_of_reach_remembered(tmp_path):
    """Slicer started before the share was mounted: the bundled model stood in, and the first detection with it
    made it the remembered model, so the site model was never tried again (and later starts said nothing)."""
    away = str(tmp_path / "share" / "site.cevae")
    start = start_model(away)
    assert start.path is None and start.standing_in_for == away
    bundled = SimpleNamespace(useBundledModel=True, modelPath="")
    assert remembered_value(bundled, start.standing_in_for) == away  # still tried at the next start
    chosen = SimpleNamespace(useBundledModel=False, modelPath="/site/other.cevae")
    assert remembered_value(chosen, start.standing_in_for) == "/site/other.cevae"  # a model the user chose
    damaged = tmp_path / "damaged.cevae"
    damaged.write_text("hello")
    assert start_model(str(damaged)).standing_in_for == ""  # forgotten: nothing stands in for it
    assert start_model("").standing_in_for == ""


def test_a_new_parameter_node_is_told_from_one_a_scene_brought():
    """The widget asks HasParameter before the wrapper writes its defaults: a new vtkMRMLScriptedModuleNode
    has no parameter, one from a saved scene (the bundled model chosen there) has it."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    assert not node.HasParameter("useBundledModel")
    node.SetParameter("useBundledModel", "true")
    assert node.HasParameter("useBundledModel")


def test_the_widget_starts_new_scenes_with_the_remembered_model_and_remembers_each_model_it_uses():
    widget = module_classes()["CeVAEAnomalyWidget"]
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    init = methods["initializeParameterNode"]
    assert init.index("HasParameter('useBundledModel')") < init.index("CeVAEAnomalyParameterNode(node)") < \
        init.index("self._startWithRememberedModel(kept)")
    assert "qt.QSettings().value(SETTINGS_KEY" in methods["_startWithRememberedModel"]
    assert "qt.QSettings().remove(SETTINGS_KEY)" in methods["_startWithRememberedModel"]
    assert "remembered_value(self._parameterNode, self._modelStandingIn)" in methods["_rememberModel"]
    assert "qt.QSettings().setValue(SETTINGS_KEY, value)" in methods["_rememberModel"]
    assert "self._modelStandingIn = start.standing_in_for" in methods["_startWithRememberedModel"]
    for finished in ("_showResult", "_useNewModel"):  # a detection, a calibration or adaptation
        assert "self._rememberModel()" in methods[finished]
    assert SETTINGS_KEY.startswith("CeVAEAnomaly/")


class _Settings:
    """A QSettings of one application's values (the calls set_aside makes)."""

    def __init__(self, **values):
        self.values = dict(values)

    def contains(self, key):
        return key in self.values

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value

    def remove(self, key):
        self.values.pop(key, None)


@pytest.mark.parametrize("remembered", ["/site/model.cevae", "", None])
def test_the_self_test_sets_the_users_remembered_model_aside_and_puts_it_back(remembered):
    """The module's self-test started with the model this computer's user chose last (its panel checks compare with
    the bundled model's settings, and failed for a site model) and its detection made the bundled model the
    remembered one. Now setUp sets the remembered model aside until the test's cleanups."""
    from CeVAEAnomalyLib.slicer.model_memory import set_aside

    settings = _Settings(**({} if remembered is None else {SETTINGS_KEY: remembered}), other="kept")
    before = dict(settings.values)
    put_back = set_aside(settings)
    assert settings.values == {"other": "kept"}  # a new scene starts with the bundled model (start_model(""))
    settings.setValue(SETTINGS_KEY, "")  # the test's detection with the bundled model remembers it
    put_back()
    assert settings.values == before
    test = module_classes()["CeVAEAnomalyTest"]
    methods = {n.name: ast.unparse(n) for n in test.body if isinstance(n, ast.FunctionDef)}
    assert methods["setUp"].index("self.addCleanup(set_aside(qt.QSettings()))") < \
        methods["setUp"].index("slicer.mrmlScene.Clear()")
    assert "finally:\n        self.doCleanups()" in methods["runTest"]
    assert "self.assertTrue(p.useBundledModel)" in methods["test_PanelChoicesAndStates"]
