"""Every public name of the modules a researcher's script uses has a docstring (help() shows it)."""
import importlib
import inspect

import pytest

MODULES = ["CeVAEAnomalyLib.engine.detector", "CeVAEAnomalyLib.engine.bundle", "CeVAEAnomalyLib.options",
           "CeVAEAnomalyLib.result", "CeVAEAnomalyLib.io.images", "CeVAEAnomalyLib.data"]


def _public(module):
    """(qualified name, function or class) of each public function, class, method and property defined there."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_docstring(module_name):
    """DetectionResult.flagged_ml, Component.centroid_ras, Bundle.model_config and .preprocess, to_dict and flag_of
    had none: help() showed their names alone."""
    missing = [name for name, obj in _public(importlib.import_module(module_name)) if not inspect.getdoc(obj)]
    assert not missing

