"""The package, the Slicer module and the scripts run on every Python that Slicer ships.

Slicer 5.6-5.8 embed Python 3.9 and Slicer 5.10 embeds 3.12, and no 3.9 interpreter is at hand in
CI. So every Python file of the repository is checked statically: ``vermin`` (minimum version,
with annotations evaluated as ``parameterNodeWrapper`` does at run time) against the floor of
``requires-python``, and an AST check for modules and names removed in Python 3.12 and 3.13.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
CHECKED_DIRS = ("CeVAEAnomaly", "scripts", "Testing")

REMOVED_MODULES = {
    # 3.12
    "asynchat", "asyncore", "distutils", "imp", "smtpd",
    # 3.13 (PEP 594 and lib2to3)
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "lib2to3", "mailcap", "msilib", "nis",
    "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
}
REMOVED_NAMES = {
    # 3.12
    "configparser.SafeConfigParser", "configparser.ParsingError.filename", "configparser.RawConfigParser.readfp",
    "pkgutil.ImpImporter", "pkgutil.ImpLoader", "ssl.wrap_socket", "ssl.match_hostname", "ssl.RAND_pseudo_bytes",
    "gzip.GzipFile.filename", "pathlib.Path.link_to", "importlib.find_loader", "sqlite3.enable_shared_cache",
    "sqlite3.OptimizedUnicode",
    # 3.13
    "unittest.findTestCases", "unittest.makeSuite", "unittest.getTestCaseNames", "configparser.LegacyInterpolation", "locale.resetlocale", "typing.io", "typing.re",
    "pydoc.ispackage", "turtle.RawTurtle.settiltangle", "unittest.TestProgram.usageExit",
}
# TestCase aliases removed in 3.12; as method names they are unambiguous wherever they appear.
REMOVED_METHODS = {
    "assertEquals", "assertNotEquals", "assertAlmostEquals", "assertNotAlmostEquals", "assert_",
    "assertDictContainsSubset", "assertRegexpMatches", "assertNotRegexpMatches", "assertRaisesRegexp",
    "failUnless", "failIf", "failUnlessEqual", "failIfEqual", "failUnlessAlmostEqual", "failIfAlmostEqual",
    "failUnlessRaises", "readfp", "link_to",
}


def python_files() -> List[Path]:
    files = sorted(p for d in CHECKED_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 50, f"expected the whole repository, found {len(files)} files"
    return files


def minimum_python() -> str:
    """The floor of ``requires-python`` in pyproject.toml, e.g. "3.9"."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^requires-python\s*=\s*">=\s*(3\.\d+)"', text, re.MULTILINE)
    assert match, "pyproject.toml must declare requires-python = \">=3.N\""
    return match.group(1)


def run_vermin(paths: List[Path]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
           f"--target={minimum_python()}-", "--eval-annotations", "--feature", "union-types",
           "--no-tips", "--violations", "--no-parse-comments", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def removed_api_uses(source: str) -> List[str]:
    """Every use of a module or name removed in Python 3.12/3.13, as "line N: name"."""
    tree = ast.parse(source)
    aliases: Dict[str, str] = {}  # local name -> qualified name
    found: List[Tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                aliases[a.asname or top] = a.name if a.asname else top  # "import a.b" binds a
                if top in REMOVED_MODULES:
                    found.append((node.lineno, a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            aliases.update((a.asname or a.name, name) for a, name in zip(node.names, names))
            if node.module.split(".")[0] in REMOVED_MODULES:
                found.append((node.lineno, node.module))
            found += [(node.lineno, name) for name in names if name in REMOVED_NAMES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in REMOVED_METHODS:
                found.append((node.lineno, node.attr))
            head, _, rest = _dotted(node).partition(".")
            if head in aliases and f"{aliases[head]}.{rest}" in REMOVED_NAMES:
                found.append((node.lineno, f"{aliases[head]}.{rest}"))
    return [f"line {line}: {name}" for line, name in sorted(set(found))]


def _dotted(node: ast.AST) -> str:
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(node.id)
    return ".".join(reversed(parts))


def _uses(files: List[Path]) -> Iterator[str]:
    for path in files:
        for use in removed_api_uses(path.read_text(encoding="utf-8")):
            yield f"{path.relative_to(ROOT)} {use}"


def test_requires_python_matches_the_oldest_slicer_python():
    assert minimum_python() == "3.9"  # Slicer 5.6 and 5.8


def test_vermin_flags_a_310_api(tmp_path):
    """The check itself is live: the bug of issue 15 (Path.write_text(newline=...), 3.10) is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text('from pathlib import Path\nPath("x.csv").write_text("a\\r\\n", newline="")\n')
    hint = tmp_path / "hint.py"
    hint.write_text("from __future__ import annotations\ndef f(x: int | None) -> None: ...\n")
    result = run_vermin([bad, hint])
    assert result.returncode != 0
    assert "pathlib.Path.write_text(newline)" in result.stdout
    assert "union types as `X | Y`" in result.stdout


def test_every_python_file_runs_on_the_minimum_python():
    result = run_vermin(python_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_removed_api_check_finds_removed_modules_and_names():
    source = (
        "import imp\n"
        "import distutils.core as dc\n"
        "from asyncore import dispatcher\n"
        "import configparser as cp\n"
        "p = cp.SafeConfigParser()\n"
        "from pkgutil import ImpImporter\n"
        "import telnetlib, json\n"
        "class T:\n"
        "    def test(self):\n"
        "        self.assertEquals(1, 1)\n"
        "json.dumps({})\n"
        "import ssl\n"
        "ssl.create_default_context().wrap_socket\n"
    )
    assert removed_api_uses(source) == [
        "line 1: imp", "line 2: distutils.core", "line 3: asyncore",
        "line 5: configparser.SafeConfigParser", "line 6: pkgutil.ImpImporter", "line 7: telnetlib",
        "line 10: assertEquals",
    ]


def test_no_python_file_uses_apis_removed_in_312_or_313():
    assert list(_uses(python_files())) == []
