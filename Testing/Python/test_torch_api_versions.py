"""The torch API that the package calls exists in torch 2.1, the oldest it accepts (pyproject.toml, the Slicer
installer's dependencies.REQUIREMENTS). The tests run on a recent torch, where an API added later passes every test
and fails only for a user with an older one. The table below names those read in torch's sources at git tag v2.1.0
(the v2.1.0 wheel's torch/ files) and the one place each may be called, behind a guard."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from CeVAEAnomalyLib.engine.devices import mixed_precision
from CeVAEAnomalyLib.errors import CeVAEError

MODULE_DIR = REPO / "CeVAEAnomaly"
ALIASES = {"F": "torch.nn.functional", "nn": "torch.nn", "dist": "torch.distributed"}  # as the package imports them

# dotted name: (what torch 2.1 lacks, the (file, function) allowed to call it behind a guard, or None: nowhere)
NEWER_THAN_2_1: Dict[str, Tuple[str, Optional[Tuple[str, str]]]] = {
    "torch.autocast": ("device type mps before 2.5: RuntimeError 'unsupported autocast device_type', even with "
                       "enabled=False", ("engine/devices.py", "mixed_precision")),
    "torch.amp.autocast": ("as torch.autocast", None),
    "torch.amp.GradScaler": ("2.3 (2.1: torch.cuda.amp.GradScaler)", ("training/trainer.py", "_grad_scaler")),
    "torch.amp.is_autocast_available": ("2.4", None),
    "torch.serialization.add_safe_globals": ("2.4", None),
    "torch.serialization.safe_globals": ("2.5", None),
    "torch.get_default_device": ("2.3", None),
    "torch.accelerator": ("2.6", None),
}


def module_sources() -> List[Path]:
    """The Python files a user runs: the Slicer module, its library, its scripts and the research package."""
    files = [MODULE_DIR / "CeVAEAnomaly.py", *sorted((MODULE_DIR / "CeVAEAnomalyLib").rglob("*.py")),
             *sorted((MODULE_DIR / "Scripts").glob("*.py")),
             *sorted((MODULE_DIR / "CeVAEAnomalyResearch").glob("*.py"))]
    assert len(files) > 20
    return files


def dotted(node: ast.AST) -> str:
    """``torch.amp.GradScaler`` for that attribute chain, its first name as the package's aliases spell it."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([ALIASES.get(node.id, node.id), *reversed(parts)])


def uses(path: Path) -> List[Tuple[str, str, int]]:
    """(dotted name, enclosing function, line) of each name of the table that ``path`` reads."""
    found = []

    def walk(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Attribute):
                name = dotted(child)
                if any(name == n or name.startswith(n + ".") for n in NEWER_THAN_2_1):
                    found.append((name, function, child.lineno))
                    continue
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            walk(child, inner)

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def test_the_package_calls_no_torch_api_newer_than_2_1_unguarded():
    """Training on an Apple GPU (mps) built torch.autocast("mps", enabled=False) at every step, and detect --amp
    torch.autocast("mps", ...): torch before 2.5 refuses an mps autocast even disabled, so with torch 2.1 to 2.4 every
    training or adaptation on a Mac failed at its first step with a RuntimeError. Autocast is now made only by
    devices.mixed_precision, and only with --amp (read in torch v2.1.0's torch/amp/autocast_mode.py; no Mac here)."""
    calls = []
    for path in module_sources():
        where = path.relative_to(MODULE_DIR / "CeVAEAnomalyLib").as_posix() if "CeVAEAnomalyLib" in path.parts else ""
        for name, function, line in uses(path):
            allowed = next(a for n, (_, a) in NEWER_THAN_2_1.items() if name == n or name.startswith(n + "."))
            if allowed != (where, function):
                calls.append(f"{path.relative_to(REPO)}:{line} {name} in {function or 'module'}")
    assert calls == []


def test_the_table_names_what_this_torch_has():
    """Each name of the table exists in the torch the tests run on (else it would guard nothing: drop it)."""
    for name in NEWER_THAN_2_1:
        obj = torch
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), name
            obj = getattr(obj, part)


def test_mixed_precision_autocasts_only_when_asked():
    """On the CPU: bfloat16 with --amp, float32 without, and after either."""
    x, w = torch.ones(2, 3), torch.ones(4, 3)
    with mixed_precision(torch.device("cpu"), False):
        assert F.linear(x, w).dtype == torch.float32
    with mixed_precision(torch.device("cpu"), True):
        assert F.linear(x, w).dtype == torch.bfloat16
    assert F.linear(x, w).dtype == torch.float32


def test_mixed_precision_on_a_device_torch_cannot_autocast():
    """hip has no autocast in this torch, as mps has none before torch 2.5: without --amp nothing is asked of torch;
    with it, the refusal says what to do."""
    with mixed_precision(torch.device("hip"), False):
        pass
    with pytest.raises(CeVAEError, match=r"Mixed precision \(--amp\) is not available on hip .*run without it"):
        mixed_precision(torch.device("hip"), True)
