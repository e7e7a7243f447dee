"""What the README and docs say about the command line, checked against what it does."""
from __future__ import annotations

import ast
import inspect
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, make_head, write_cohort
from CeVAEAnomalyLib.cli.main import build_parser, main
from CeVAEAnomalyLib.io.lock import hold_output


def subparser(name: str):
    """The argparse parser of ``cevae-anomaly NAME``."""
    return build_parser()._subparsers._group_actions[0].choices[name]


def section(document: str, heading: str) -> str:
    """The text of ``document`` under ``heading`` up to the next heading of its level or above."""
    text = (REPO / document).read_text(encoding="utf-8")
    level = heading.split(" ", 1)[0]
    body = text.split(heading + "\n", 1)[1]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


def test_batch_names_every_file_it_writes_in_its_help_scaling_and_readme(tmp_path: Path, tiny_bundle) -> None:
    """Each file batch writes into --out-dir (a volume's outputs, the summary, the settings; with and without
    --shard) is named, with NAME and i-of-n for the volume and the shard, in its --help, in SCALING.md and in the
    README's paragraph below its command lines (whose example runs with --shard 1/4)."""
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
    readme = " ".join(re.search(r"\n`batch` writes, per volume NAME,.*?\n\n", (REPO / "README.md").read_text(
        encoding="utf-8"), re.S).group(0).split())
    for name in sorted(written):
        assert name in help_text, f"batch --help does not name {name}"
        assert name in scaling, f"docs/SCALING.md (Batch detection over a cohort) does not name {name}"
        assert name in readme, f"README.md (the paragraph on what batch writes) does not name {name}"


DOCUMENTS = ("README.md", "docs/SCALING.md", "docs/SLICER.md", "docs/WHAT_HAPPENS_WHEN.md", "docs/adapt.md",
             "docs/PERFORMANCE.md", "CeVAEAnomaly/Scripts/DetectVolume.py")
COMMANDS = ("train", "prepare", "adapt", "detect", "batch", "calibrate", "evaluate", "info", "share", "demo")


def documented_commands(text: str) -> Iterator[Tuple[str, List[str]]]:
    """(command, its flags) of every cevae-anomaly command line in ``text``: in code blocks (continued lines
    joined, up to a comment or the end of the line) and in inline code (`cevae-anomaly detect --x`, `detect --x`)."""
    text = re.sub(r"\\\n\s*", " ", text)
    runs = re.finditer(r"(?:cevae-anomaly|CeVAEAnomalyLib\.cli|DetectVolume\.py)\s+(\w+)?([^\n`#;&]*)", text)
    spans = re.finditer(rf"`({'|'.join(COMMANDS)})((?:\s+--[^`]*)?)`", text)
    for match in [*runs, *spans]:
        word, rest = match.group(1) or "", match.group(2)
        name = word
        if match.group(0).startswith("DetectVolume"):  # its flags follow the script's name
            name, rest = "DetectVolume", f"{word} {rest}"
        if name in (*COMMANDS, "DetectVolume"):
            yield name, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)


def test_every_flag_a_documented_command_line_shows_exists() -> None:
    """A flag in a command line of the README, the docs (the benchmark reports too) or the model card is one of that
    command's own."""
    pytest.importorskip("slicer")  # DetectVolume.py imports it
    sys.path.insert(0, str(REPO / "CeVAEAnomaly" / "Scripts"))
    import DetectVolume

    parsers = {name: subparser(name) for name in COMMANDS}
    parsers["DetectVolume"] = DetectVolume.build_parser()
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in parsers.items()}
    unknown, seen = [], 0
    for document in sorted({*DOCUMENTS, *every_document()}):
        for name, used in documented_commands((REPO / document).read_text(encoding="utf-8")):
            seen += 1
            unknown += [f"{document}: {name} {flag}" for flag in used if flag not in flags[name]]
    assert seen > 50 and not unknown, unknown


def quoted(document: str, start: str) -> str:
    """The quotation in ``document`` that starts with ``start``, as a pattern: N a number, OUT and … any text
    (.OUT.lock: a hidden file, which the message gives with its folder)."""
    text = " ".join((REPO / document).read_text(encoding="utf-8").split())
    quote = re.escape(re.search(rf'"({re.escape(start)}[^"]*)"', text).group(1))
    quote = quote.replace(re.escape(".OUT"), r"(?:.*/)?\.OUT")
    return quote.replace("N", r"\d+").replace("OUT", ".+").replace("…", ".*")


def test_a_run_refused_by_the_lock_on_its_output_says_what_the_docs_quote(tmp_path: Path, tiny_bundle,
                                                                           capsys) -> None:
    """A second train on the same --out, and a second batch on the same --out-dir, are refused in the words
    WHAT_HAPPENS_WHEN.md and SCALING.md quote."""
    manifest = write_cohort(tmp_path)
    out = tmp_path / "m.cevae"
    with hold_output(out, "train"):
        assert main(["train", "--manifest", str(manifest), "--out", str(out)]) == 2
    assert re.search(quoted("docs/WHAT_HAPPENS_WHEN.md", "A train (process"), capsys.readouterr().err)
    with hold_output(tmp_path / "batch" / "summary.csv", "batch"):
        assert main(["batch", str(tmp_path), "--out-dir", str(tmp_path / "batch"), "--model", str(tiny_bundle),
                     "--threshold", "1"]) == 2
    assert re.search(quoted("docs/SCALING.md", "A batch (process"), capsys.readouterr().err)


def test_the_warning_of_a_mask_larger_than_a_brain_says_what_the_docs_quote(caplog) -> None:
    """A given mask of 7.9 L (a head mask) is warned of in the words WHAT_HAPPENS_WHEN.md quotes; it quoted them
    without "(at most about 3 L)" and the closing sentence, so the quotation was not found in the log."""
    from CeVAEAnomalyLib.engine.preprocess import warn_unlike_a_brain

    image = sitk.Image(79, 10, 10, sitk.sitkFloat32)
    image.SetSpacing((10.0, 10.0, 10.0))  # 1 ml voxels: 7900 of them
    with caplog.at_level(logging.WARNING):
        warn_unlike_a_brain(np.ones((10, 10, 79), bool), image)
    assert re.search(quoted("docs/WHAT_HAPPENS_WHEN.md", "The brain mask covers"), caplog.text)


API_MODULES = ("__init__.py", "slicer/logic.py", "engine/detector.py", "engine/bundle.py", "options.py", "result.py",
               "io/images.py", "data/__init__.py")  # the public API's modules: their docstrings name Python too


def docstrings(module: str) -> str:
    """Every docstring (module, classes, functions) of ``module``, a path in CeVAEAnomalyLib."""
    tree = ast.parse((REPO / "CeVAEAnomaly" / "CeVAEAnomalyLib" / module).read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def documented_python_names(text: str) -> Iterator[str]:
    """The dotted names of the project's Python that ``text`` uses: what ``from CeVAEAnomaly... import A, B`` imports
    (``CeVAEAnomalyLib.options.A``) and every name written out (``CeVAEAnomalyLib.result.record_json``)."""
    for module, names in re.findall(r"from (CeVAEAnomaly\w*(?:\.\w+)*) import ([\w ,]+)", text):
        yield from (f"{module}.{name.split(' as ')[0].strip()}" for name in names.split(",") if name.strip())
    yield from re.findall(r"\bCeVAEAnomaly(?:Lib|Research)(?:\.\w+)+", text)


def python_name_exists(dotted: str) -> bool:
    """Whether ``dotted`` is a module of the project or a name in one. The Slicer module (CeVAEAnomaly.py) imports Qt,
    so its names are those it exports (``__all__``)."""
    if dotted.startswith("CeVAEAnomaly."):
        tree = ast.parse((REPO / "CeVAEAnomaly" / "CeVAEAnomaly.py").read_text(encoding="utf-8"))
        exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(target, "id", None) == "__all__" for target in n.targets))
        return dotted.split(".", 1)[1] in exported
    parts = dotted.split(".")
    for length in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:length]))
        except ImportError:
            continue
        for name in parts[length:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


def test_every_python_name_the_docs_and_docstrings_use_exists() -> None:
    """A name a snippet imports or the text names (README, docs, model card, the public API's docstrings) is one the
    package has: a renamed or removed function fails here, not in a user's console."""
    pytest.importorskip("slicer")  # CeVAEAnomalyLib.slicer's modules import it
    texts = {document: (REPO / document).read_text(encoding="utf-8")
             for document in (*DOCUMENTS[:-1], "Resources/Models/MODEL_CARD.md")}
    texts.update({f"CeVAEAnomalyLib/{module} (docstrings)": docstrings(module) for module in API_MODULES})
    used = {(where, name) for where, text in texts.items() for name in documented_python_names(text)}
    missing = sorted(f"{where}: {name}" for where, name in used if not python_name_exists(name))
    assert len(used) > 30 and not missing, missing


def every_document() -> List[str]:
    """The README, every page of docs/ (the benchmark reports too) and the model card, as repository paths."""
    pages = sorted(str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md"))
    return ["README.md", *pages, "Resources/Models/MODEL_CARD.md"]


def script_flags(script: Path) -> set:
    """The option strings a script's argparse parser defines (its add_argument calls, read without running it)."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    return {arg.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}


def documented_script_lines(text: str) -> Iterator[Tuple[str, List[str]]]:
    """(script path, its flags) of every command line of a repository script in ``text`` (scripts/, Testing/benchmarks/;
    continued lines joined, up to a comment, the end of the line or of the inline code, and up to a ``--`` after which
    flags are the script's to pass on)."""
    text = re.sub(r"\\\n\s*", " ", text)
    for match in re.finditer(r"\b((?:scripts|Testing/benchmarks)/\w+\.py)([^\n`#;&|>)]*)", text):
        own = re.split(r"\s--(?:\s|$)", match.group(2), maxsplit=1)[0]
        yield match.group(1), re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", own)


def test_every_documented_script_line_names_a_script_and_its_flags() -> None:
    """A benchmark or tool script a document tells to run (``python scripts/benchmark_train.py --variants cevae``)
    exists, and each flag its line shows is one of that script's own."""
    wrong, seen = [], 0
    for document in every_document():
        for script, used in documented_script_lines((REPO / document).read_text(encoding="utf-8")):
            seen += 1
            if not (REPO / script).is_file():
                wrong.append(f"{document}: {script} does not exist")
                continue
            known = script_flags(REPO / script) | {"--help"}
            wrong += [f"{document}: {script} {flag}" for flag in used if flag not in known]
    assert seen > 50 and not wrong, wrong


def bundled_model_figures() -> List[Tuple[str, str]]:
    """(a phrase the README uses for a figure of the bundled model, that figure as ``info`` gives it, rounded as the
    README writes it)."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.model_info import model_info

    info = model_info(default_model_path())
    calibration = info["calibration"]
    others = {entry["flags"]: entry["threshold"] for entry in calibration["other_scorings"]}
    sides, tails = calibration["largest_voxel_mm"], calibration["bright_tail"]
    megabytes = Path(info["file"]).stat().st_size / 1e6
    default = next(entry["threshold"] for entry in calibration["thresholds"] if entry["default"])
    return [
        ("threshold {} for the three-orientation", f"{default:.2f}"),
        ("{} for its axial map alone", f"{others['--orientations axial']:.2f}"),
        ("held-out healthy false-positive rate of {}", f"{calibration['default_fpr']:.3g}"),
        ("the bundled model's, {}, was chosen", f"{calibration['default_fpr']:.3g}"),
        ("the bundled one: {} mm)", f"{sides[0]:g} to {sides[1]:g}"),
        ("slices thicker than {} mm for the bundled model", f"{calibration['warns_above_mm']:g}"),
        ("the bundled one: {})", f"{tails[0]:.2f} to {tails[1]:.2f}"),
        ("seed 0, {} steps", f"{info['training']['steps']}"),
        ("cevae_t1_default.cevae` ({} MB", f"{megabytes:.1f}"),
    ]


def test_the_figures_the_readme_gives_of_the_bundled_model_are_the_models() -> None:
    """The README's figures of the bundled model (its thresholds, rate, calibrated voxel sizes and bright tail, steps,
    size) are those `cevae-anomaly info` gives: it said "threshold 5.52 with the axial model", of the earlier axial-only
    model, where info on the model now says 5.611."""
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    wrong = []
    for phrase, figure in bundled_model_figures():
        pattern = re.escape(phrase).replace(re.escape("{}"), r"([0-9][0-9.]*(?: to [0-9][0-9.]*)?)")
        said = re.findall(pattern, text)
        if said != [figure]:
            wrong.append(f"{phrase.format(figure)!r}: the README says {said or 'nothing of it'}")
    assert not wrong, wrong


def test_what_the_docs_say_of_the_version_that_wrote_the_bundled_model_is_what_info_gives() -> None:
    """The README said `written_by` (info --json) is null for the bundled model, and docs/WHAT_HAPPENS_WHEN.md that it
    records only the version that trained it; since its calibration for the published map was added the bundled file
    records the version that wrote it, which info says ("written by cevae-anomaly 0.1.0")."""
    from CeVAEAnomalyLib.data import default_model_path
    from CeVAEAnomalyLib.engine.model_info import describe_model, model_info

    info = model_info(default_model_path())
    assert info["written_by"], "the bundled model records no writer: the docs' words below need no change"
    assert f"written by cevae-anomaly {info['written_by']}" in describe_model(info)
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    said = re.findall(r"`written_by` in `--json`, ([^)]*)\)", readme)
    assert said and not any("bundled" in words for words in said), said
    what = " ".join((REPO / "docs/WHAT_HAPPENS_WHEN.md").read_text(encoding="utf-8").split())
    assert "A bundle written by this version records the version that wrote it" in what
    assert "the bundled model and older files record only" not in what


def test_the_help_of_every_false_positive_rate_states_the_range_the_readme_gives() -> None:
    """detect's and batch's --fpr and calibrate's --default-fpr say the rates a calibration covers, as the README
    does ("rates 1e-6 to 0.5"): --fpr's help gave none, and a rate above 0.5 was refused only once the model was
    read, in other words than one above 1."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "rates 1e-6 to 0.5" in readme
    for command, flag in (("detect", "--fpr"), ("batch", "--fpr"), ("calibrate", "--default-fpr")):
        action = next(a for a in subparser(command)._actions if flag in a.option_strings)
        assert "from 1e-06 to 0.5" in " ".join(action.help.split()), (command, flag, action.help)


def test_the_help_of_threshold_and_amp_states_units_default_and_the_readmes_caveat() -> None:
    """--threshold's help said no unit (a user could not tell a score from a rate or a percentile) nor that 0 marks
    the whole brain; detect's --amp said "mixed precision" only, where train's says more and the README warns that
    the calibration was made in full precision (maps up to 10 % off on the CPU)."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "the calibration was made in full precision, and on the CPU a review measured maps up to 10 %" in readme
    for command in ("detect", "batch", "calibrate"):
        helps = {o: " ".join(a.help.split()) for a in subparser(command)._actions for o in a.option_strings}
        assert "full precision" in helps["--amp"] and "10 %" in helps["--amp"], helps["--amp"]
        assert helps["--amp"].endswith("(default: off)"), helps["--amp"]
        if command != "calibrate":
            assert "in the map's units" in helps["--threshold"] and "0 or less: the whole brain" in helps["--threshold"]


def documented_signatures(text: str, names: Iterable[str]) -> Iterator[Tuple[str, List[Tuple[str, str]]]]:
    """(method, its (parameter, default text or '') pairs) of every signature ``text`` writes out for one of ``names``
    (``logic.startCalibration(volumes, masks, outputPath, modelPath=None, ...)``); calls with values
    (``shareModel("site.cevae", ...)``) and elided ones (``startDetection(volumeNode, ...)``) are no signatures."""
    text = " ".join(text.split())
    for name, inside in re.findall(rf"\b({'|'.join(names)})\(([^()`]*)\)", text):
        parts = [part.strip() for part in inside.split(",")]
        if all(re.fullmatch(r"(\*\*)?\w+(=[^=]+)?", part) for part in parts):
            yield name, [tuple(part.split("=", 1)) if "=" in part else (part, "") for part in parts]


def test_the_console_signatures_the_docs_write_out_are_the_logics() -> None:
    """The Slicer logic's methods as docs/SLICER.md and the README write them out (``process(volumeNode,
    maskNode=None, ...)``, ``startCalibration``, ``startAdaptation``, ``shareModel``) name the method's parameters, in
    its order, with its defaults: a console user types them as written."""
    pytest.importorskip("slicer")
    from CeVAEAnomalyLib.slicer.logic import CeVAEAnomalyLogic

    methods = {name: inspect.signature(getattr(CeVAEAnomalyLogic, name)) for name in dir(CeVAEAnomalyLogic)
               if not name.startswith("_") and callable(getattr(CeVAEAnomalyLogic, name))}
    wrong, seen = [], set()
    for document in ("docs/SLICER.md", "README.md"):
        for name, documented in documented_signatures((REPO / document).read_text(encoding="utf-8"), methods):
            seen.add(name)
            actual = [p for p in methods[name].parameters.values() if p.name != "self"]
            order = [p.name for p in actual]
            for parameter, default in documented:
                own = next((p for p in actual if p.name == parameter.lstrip("*")), None)
                if own is None:
                    wrong.append(f"{document}: {name} has no parameter {parameter}")
                elif default and (own.default is inspect.Parameter.empty or own.default != ast.literal_eval(default)):
                    wrong.append(f"{document}: {name}'s {parameter} defaults to {own.default!r}, not {default}")
            named = [parameter.lstrip("*") for parameter, _ in documented if parameter.lstrip("*") in order]
            if named != sorted(named, key=order.index):
                wrong.append(f"{document}: {name}'s parameters are {order}, not in the order {named}")
    assert {"process", "startCalibration", "startAdaptation", "shareModel"} <= seen and not wrong, (seen, wrong)


DOCUMENTED_DEFAULTS = (  # (document, phrase with {} where it gives the default, command, the flag's dest)
    ("docs/adapt.md", "`--steps` steps per run (default {})", "adapt", "steps"),
    ("docs/adapt.md", "at `--lr` (default {},", "adapt", "lr"),
    ("docs/adapt.md", "Adam, batch {})", "adapt", "batch_size"),
    ("docs/adapt.md", "`--seed` (default {})", "adapt", "seed"),
    ("docs/adapt.md", "`--checkpoint-every` (default {} steps)", "adapt", "checkpoint_every"),
    ("docs/adapt.md", "at most `--folds`, default {};", "adapt", "folds"),
    ("README.md", "(`--steps` per run, default {},", "adapt", "steps"),
    ("README.md", "default 100, `--lr` {})", "adapt", "lr"),
    ("README.md", "at most `--folds` {};", "adapt", "folds"),
    ("README.md", "`--val-fraction`, in [0, 1), default {})", "train", "val_fraction"),
    ("README.md", "cevae-anomaly demo [--out-dir {}]", "demo", "out_dir"),
    ("docs/SLICER.md", "(`--format`: {}, the default,", "DetectVolume", "volume_format"),
)


def test_the_defaults_the_docs_give_of_command_line_flags_are_the_parsers() -> None:
    """A flag's default that the README or a page of docs/ states (adapt's steps, learning rate, folds, seed and
    checkpoint cadence; train's validation share; the headless script's format) is the one its parser holds."""
    pytest.importorskip("slicer")  # DetectVolume.py imports it
    sys.path.insert(0, str(REPO / "CeVAEAnomaly" / "Scripts"))
    import DetectVolume

    parsers = {name: subparser(name) for name in ("adapt", "train", "demo")}
    parsers["DetectVolume"] = DetectVolume.build_parser()
    wrong = []
    for document, phrase, command, dest in DOCUMENTED_DEFAULTS:
        text = " ".join((REPO / document).read_text(encoding="utf-8").split())
        pattern = re.escape(phrase).replace(re.escape("{}"), r"([\w.+-]+)")
        said = re.findall(pattern, text)
        default = parsers[command].get_default(dest)
        if len(said) != 1:
            wrong.append(f"{document}: {phrase!r} found {len(said)} times")
        elif said[0] != str(default) and not (isinstance(default, (int, float)) and float(said[0]) == default):
            wrong.append(f"{document}: {phrase.format(said[0])!r}, where {command}'s default is {default!r}")
    assert not wrong, wrong
