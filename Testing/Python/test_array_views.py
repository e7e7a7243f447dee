"""``sitk.GetArrayViewFromImage`` returns a view that does not keep its image alive: a view of an image
made in the same expression points into freed memory as soon as the call returns (the automatic brain
mask's depth map did, and its masks then changed from run to run). Every view must be of a named image."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("CeVAEAnomaly", "scripts", "Testing") for p in (ROOT / folder).rglob("*.py"))


def _named(node: ast.AST) -> bool:
    """Whether ``node`` is a name or an attribute of one (``image``, ``result.score``): an object that outlives
    the expression. Anything else makes a new one (``f(x)``, ``mask > 0``, ``image[:, :, 3]``)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def temporary_views(source: str) -> list:
    """Line numbers of ``GetArrayViewFromImage`` calls whose argument is not a named image."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "GetArrayViewFromImage"
            and node.args and not _named(node.args[0])]


@pytest.mark.parametrize("source, lines", [
    ("d = sitk.SignedMaurerDistanceMap(m)\nv = sitk.GetArrayViewFromImage(d)\n", []),
    ("v = sitk.GetArrayViewFromImage(result.score) > 0\n", []),
    ("v = sitk.GetArrayViewFromImage(sitk.SignedMaurerDistanceMap(m))\n", [1]),
    ("x = 1\nv = GetArrayViewFromImage(detect(image).score) > 0\n", [2]),
    ("v = sitk.GetArrayViewFromImage(mask > 0)\n", [1]),
    ("v = sitk.GetArrayViewFromImage(image[:, :, 3])\n", [1]),
])
def test_views_of_temporary_images_are_found(source, lines):
    assert temporary_views(source) == lines


def test_no_view_of_a_temporary_image():
    assert any(p.name == "brainmask.py" for p in SOURCES)
    found = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES for n in temporary_views(p.read_text(encoding="utf-8"))]
    assert found == [], "views of images that die at once (name the image first): " + ", ".join(found)
