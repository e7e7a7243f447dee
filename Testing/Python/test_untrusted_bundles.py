"""A tampered model bundle is refused with one clear line (exit 2) before anything large is built.

Each case edits one field of a real bundle's header (the JSON metadata or the safetensors
tensor table) and runs the real ``detect`` command on it.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from CeVAEAnomalyLib.cli.main import main

Edit = Callable[[Dict[str, Any], Dict[str, Any]], None]  # (bundle header, safetensors tensor table)


def rewrite(path: Path, edit: Edit, length_mod_256: Optional[int] = None) -> None:
    """Apply ``edit`` to the bundle header and tensor table of ``path``, keeping the tensor bytes
    (``length_mod_256``: pad the safetensors header to a length with this lowest byte)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    table = json.loads(raw[8 : 8 + n])
    header = json.loads(table["__metadata__"]["cevae_anomaly"])
    edit(header, table)
    table["__metadata__"]["cevae_anomaly"] = json.dumps(header)  # NaN/Infinity allowed, as a writer could
    new = json.dumps(table).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    if length_mod_256 is not None:
        new += b" " * ((length_mod_256 - len(new)) % 256)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def setting(section: str, key: str, value: Any) -> Edit:
    return lambda h, t: h[section].__setitem__(key, value)


def top(key: str, value: Any) -> Edit:
    return lambda h, t: h.__setitem__(key, value)


def calibration(edit: Callable[[Dict[str, Any]], None]) -> Edit:
    def apply(h, t):
        for entry in h["calibration"].values():
            edit(entry)
    return apply


def tensor_dtype(h: Dict[str, Any], t: Dict[str, Any]) -> None:
    name = next(k for k in t if k != "__metadata__" and t[k]["dtype"] == "F32")
    t[name]["dtype"] = "I32"  # same byte size: only the declared type is wrong


def shared_bytes(h: Dict[str, Any], t: Dict[str, Any]) -> None:
    """Two tensors of one shape declared on the same bytes (safetensors itself refuses the file, late)."""
    names = [k for k in t if k != "__metadata__"]
    a, b = next((a, b) for a in names for b in names if a < b and t[a]["shape"] == t[b]["shape"])
    t[b]["data_offsets"] = list(t[a]["data_offsets"])


def many_tables(n: int) -> Edit:
    """``n`` calibration tables, each keyed by another alpha (every detection and panel update parses every key)."""
    def apply(h, t):
        key, entry = next(iter(h["calibration"].items()))
        options = json.loads(key)
        for i in range(n):
            options["score"]["alpha"] = 1.0 + i / n
            h["calibration"][json.dumps(options, sort_keys=True)] = entry
    return apply


def calibrated_mode(steps: int) -> Edit:
    """A calibration table keyed by a thorough mode of ``steps`` test-time steps (adapt calibrates each again)."""
    def apply(h, t):
        key = next(iter(h["calibration"]))
        options = json.loads(key)
        options["score"]["test_time_steps"] = steps
        h["calibration"][json.dumps(options, sort_keys=True)] = h["calibration"].pop(key)
    return apply


def recalibration(**changes: Any) -> Edit:
    """A calibrated copy's record of its parent, scans and options (engine/calibrate.py) with ``changes``."""
    model = {"name": "base", "file": "base.cevae", "sha256": "ab" * 32}
    record = {"parent": model, "original": model, "calibrated_utc": "2025-01-01T00:00:00Z",
              "scans": [{"name": "h1", "sha256": "cd" * 32, "mask_sha256": None}],
              "options": {"score_options": {"score_type": "combi"}, "postprocess": {}, "default_fpr": 0.001,
                          "amp": False}}
    return top("recalibration", dict(record, **changes))


CASES: Dict[str, Tuple[Edit, str]] = {
    "z of 1e9 (32 TB of weights)": (setting("model", "z_dim", 10**9), r"model\.z_dim must be a whole number in \[1, 8192\]"),
    "fractional z": (setting("model", "z_dim", 16.5), r"model\.z_dim must be a whole number"),
    "z as text": (setting("model", "z_dim", "16"), r"model\.z_dim must be a whole number"),
    "z in range, not the file's": (setting("model", "z_dim", 17), r"tensor \S+ has shape .*expected"),
    "negative channel width": (setting("model", "channels", [8, 16, -16, 32]), r"model\.channels\[2\] must be"),
    "no channels": (setting("model", "channels", []), r"model\.channels must be a list of 1 to 6"),
    "more layers than the input allows": (setting("model", "channels", [8] * 7), r"model\.channels must be a list"),
    "unsupported input size": (setting("model", "input_size", 96), r"model\.input_size must be one of \(64, 128\)"),
    "unknown architecture key": (setting("model", "depth", 3), r"section 'model' has unknown key\(s\) 'depth'"),
    "percentiles reversed": (lambda h, t: h["preprocess"].update(low_percentile=99.0, high_percentile=1.0),
                             r"preprocess\.high_percentile must be a finite number in \(99, 100\]"),
    "NaN percentile": (setting("preprocess", "high_percentile", math.nan), r"preprocess\.high_percentile"),
    "preprocess size differs": (setting("preprocess", "input_size", 128), r"preprocess\.input_size must equal"),
    "unknown loss": (setting("loss", "rec", "huber"), r"loss\.rec must be 'l1' or 'l2'"),
    "negative beta": (setting("loss", "beta", -1.0), r"loss\.beta must be a finite number"),
    "unknown score type": (setting("score_options", "score_type", "entropy"), r"score_options\.score_type must be one of combi, rec, grad, got 'entropy'"),
    "unknown score option": (setting("score_options", "temperature", 2.0),
                             r"section 'score_options' has unknown key\(s\) 'temperature'"),
    "unknown post-processing step": (setting("postprocess", "dilate_mm", 2.0),
                                     r"section 'postprocess' has unknown key\(s\) 'dilate_mm'"),
    "unknown normalisation spread": (setting("postprocess", "spread", "iqr"),
                                     r"postprocess\.spread must be one of mad, tail, got 'iqr'"),
    "huge median radius": (setting("postprocess", "median_radius", 10**6), r"postprocess\.median_radius must be"),
    # slices of the brain plus twice the margin are allocated: 1000 mm took 7.7 GB on a 0.5 mm scan (4 mm: 1 GB)
    "a preprocessing margin of 1000 mm": (setting("preprocess", "margin_mm", 1000),
                                          r"preprocess\.margin_mm must be a finite number in \[0, 100\], got 1000"),
    # 20000 tables took 2 s per threshold lookup (a 100 MB header holds 150000): the panel looks up several per click
    "20000 calibration tables": (many_tables(20000),
                                 r"section 'calibration' must hold at most 1000 calibration tables, got 200\d\d"),
    "thresholds rise with the rate": (calibration(lambda e: e["threshold"].reverse()),
                                      r"calibration table 1 has thresholds that rise with the rate"),
    "infinite threshold": (calibration(lambda e: e["threshold"].__setitem__(0, math.inf)),
                           r"calibration table 1 threshold 0 must be a finite number"),
    "rates not increasing": (calibration(lambda e: e["fpr"].reverse()), r"rates that do not increase strictly"),
    "table lengths differ": (calibration(lambda e: e["threshold"].pop()), r"as many thresholds as rates"),
    "calibration not a table": (top("calibration", [1, 2]), r"section 'calibration' must be a JSON object"),
    "default rate 2": (top("default_fpr", 2), r"default_fpr must be a finite number in \[1e-06, 0.5\]"),
    # the Slicer panel's rate field takes the calibration's rates only: a model outside them broke every update
    "default rate 0.7": (top("default_fpr", 0.7), r"default_fpr must be a finite number in \[1e-06, 0.5\]"),
    "default rate 1e-7": (top("default_fpr", 1e-7), r"default_fpr must be a finite number in \[1e-06, 0.5\]"),
    "default rate of 400 digits": (top("default_fpr", 10**400),
                                   r"default_fpr must be a finite number in \[1e-06, 0.5\]"),
    "a calibrated rate of 400 digits": (calibration(lambda e: e["fpr"].__setitem__(0, 10**400)),
                                        r"calibration table 1 rate 0 must be a finite number in \(0, 1\)"),
    "default rate as text": (top("default_fpr", "0.001"), r"default_fpr must be a finite number"),
    "unknown weight type": (top("weights_dtype", "int8"), r"weights_dtype must be 'float32' or 'float16'"),
    "integer tensor": (tensor_dtype, r"has type I32; float32 or float16 weights are expected"),
    "input size as a fraction": (setting("model", "input_size", 64.0), r"model\.input_size must be one of"),
    "preprocess size as a fraction": (setting("preprocess", "input_size", 64.0), r"preprocess\.input_size must equal"),
    "training record as text": (top("training", "x"), r"section 'training' must be a JSON object or null"),
    "modality as a number": (top("modality", 5), r"modality must be text, got 5"),
    "orientations as a list": (setting("score_options", "orientations", ["axial"]),
                               r"score_options\.orientations must be text, got \['axial'\]"),
    "tensor type and size disagree": (lambda h, t: t[next(k for k in t if k != "__metadata__")].update(dtype="F16"),
                                      r"does not fill its data offsets \(type F16"),
    "tensor type as an object": (lambda h, t: t[next(k for k in t if k != "__metadata__")].update(dtype={}),
                                 r"not a valid safetensors file: tensor \S+ has no valid type and shape"),
    "metadata value not text": (lambda h, t: t["__metadata__"].update(note=5),
                                r"not a valid safetensors file: its metadata holds a value that is not text"),
    "two tensors on the same bytes": (shared_bytes, r"not a valid safetensors file: tensor \S+ (overlaps|leaves a gap)"),
    "weights other than recorded": (top("weights_sha256", "0" * 64), r"weights are not those its header records"),
    "training volumes as a number": (top("training", {"subjects": 5}), r"training\.subjects must be a list of volumes"),
    "a training checksum as a list": (top("training", {"subjects": [{"name": "a", "sha256": [1]}]}),
                                      r"training\.subjects must be a list of volumes"),
    "a training volume's content checksum as a number": (
        top("training", {"subjects": [{"name": "a", "sha256": "0" * 64, "content_sha256": 5}]}),
        r"training\.subjects must be a list of volumes, each with a text name and sha256 \(and a text person and "
        r"content_sha256, if any\)"),
    "an adapted model's base volume without a text checksum": (
        top("adaptation", {"base_volumes": [{"name": "a", "sha256": 5}]}),
        r"adaptation\.base_volumes must be a list of volumes, each with a text name and sha256"),
    "unknown training orientation": (top("training", {"orientations": [5]}),
                                     r"training\.orientations must be a list of axial, coronal, sagittal, got \[5\]"),
    "calibrated voxel sizes reversed": (calibration(lambda e: e.update(largest_voxel_mm=[2.0, 1.0])),
                                        r"largest_voxel_mm\[1\] must be a finite number in \[2, 100\]"),
    "calibrated bright tails reversed": (calibration(lambda e: e.update(bright_tail=[0.6, 0.2])),
                                         r"bright_tail\[1\] must be a finite number in \[0\.6, 1000\]"),
    "calibrated bright tail as text": (calibration(lambda e: e.update(bright_tail="0.5")),
                                       r"bright_tail must be a list of two numbers, got '0\.5'"),
    "leave-one-out rate above 1": (calibration(lambda e: e.update(leave_one_out={"fpr": 0.001, "threshold": [5.0, 6.0],
                                                                                "rate": [0.001, 2]})),
                                   r"leave_one_out rate\[1\] must be a finite number in \[0, 1\], got 2"),
    "scan voxel count as a fraction": (calibration(lambda e: e.update(scan_voxels=[10, 2.5])),
                                       r"scan_voxels\[1\] must be a whole number, got 2\.5"),
    "NaN training contrast": (top("training_contrast", {"depth_contrast": math.nan}),
                              r"training_contrast\.depth_contrast must be a finite number"),
    "recalibration record as a list": (top("recalibration", [1]),
                                       r"section 'recalibration' must be a JSON object, got list"),
    "recalibration record without its scans": (lambda h, t: (recalibration()(h, t), h["recalibration"].pop("scans")),
                                               r"section 'recalibration' lacks 'scans'"),
    "recalibration parent's checksum as a number": (recalibration(parent={"name": "base", "sha256": 5}),
                                                    r"recalibration\.parent\.sha256 must be text or null, got 5"),
    "recalibration original without a name": (recalibration(original={"file": "base.cevae"}),
                                              r"recalibration\.original\.name must be text, got None"),
    "recalibration date as a number": (recalibration(calibrated_utc=2025),
                                       r"recalibration\.calibrated_utc must be a UTC time as YYYY-MM-DDTHH:MM:SSZ "
                                       r"\(ISO 8601\), got 2025"),
    "recalibration date in other words": (recalibration(calibrated_utc="yesterday"),
                                          r"recalibration\.calibrated_utc must be a UTC time as "
                                          r"YYYY-MM-DDTHH:MM:SSZ \(ISO 8601\), got 'yesterday'"),
    "training date as a number": (top("training", {"trained_utc": 2026}),
                                  r"training\.trained_utc must be a UTC time as YYYY-MM-DDTHH:MM:SSZ \(ISO 8601\), "
                                  r"got 2026"),
    "training date without its zone": (top("training", {"trained_utc": "2026-12-07T06:55:03"}),
                                       r"training\.trained_utc must be a UTC time as YYYY-MM-DDTHH:MM:SSZ "
                                       r"\(ISO 8601\), got '2026-12-07T06:55:03'"),
    "training date of no day": (top("training", {"trained_utc": "2026-02-30T00:00:00Z"}),
                                r"training\.trained_utc must be a UTC time as YYYY-MM-DDTHH:MM:SSZ \(ISO 8601\), "
                                r"got '2026-02-30T00:00:00Z'"),
    "recalibration scans empty": (recalibration(scans=[]), r"recalibration\.scans must be a non-empty list"),
    "recalibration scan checksum as a list": (recalibration(scans=[{"name": "h1", "sha256": [1]}]),
                                              r"recalibration\.scans\[0\]\.sha256 must be text, got \[1\]"),
    "recalibration unknown score type": (
        recalibration(options={"score_options": {"score_type": "entropy"}, "postprocess": {}, "default_fpr": 0.001,
                               "amp": False}),
        r"recalibration\.options\.score_options\.score_type must be one of combi, rec, grad, got 'entropy'"),
    "recalibration unknown option": (
        recalibration(options={"score_options": {}, "postprocess": {"dilate_mm": 2}, "default_fpr": 0.001,
                               "amp": False}),
        r"section 'recalibration\.options\.postprocess' has unknown key\(s\) 'dilate_mm'"),
    "recalibration default rate 2": (
        recalibration(options={"score_options": {}, "postprocess": {}, "default_fpr": 2, "amp": False}),
        r"recalibration\.options\.default_fpr must be a finite number in \[1e-06, 0.5\]"),
    "recalibration mixed precision as text": (
        recalibration(options={"score_options": {}, "postprocess": {}, "default_fpr": 0.001, "amp": "no"}),
        r"recalibration\.options\.amp must be true or false, got 'no'"),
    # refused before the tensors are compared with it (they would not match here)
    "a network of 10.8 billion multiply-adds per slice": (
        lambda h, t: (h["model"].update(input_size=128, channels=[128, 512, 2048], z_dim=1),
                      h["preprocess"].update(input_size=128)),
        r"holds a network too costly to run: it needs 10,755,768,320 multiply-adds per slice, more than the limit "
        r"of 10,000,000,000 \(detection's memory and time grow with both\)\. Use a model with narrower layers\.$"),
}


@pytest.fixture
def calibrated(tiny_bundle, tmp_path) -> Path:
    path = Path(shutil.copy(tiny_bundle, tmp_path / "model.cevae"))
    rewrite(path, lambda h, t: h.update(score_options=h.get("score_options") or {"score_type": "combi"}))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_tampered_header_is_refused(name, calibrated, head, tmp_path, capsys):
    edit, message = CASES[name]
    rewrite(calibrated, edit)
    image, mask = head
    rc = main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated),
               "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "score.nii.gz").exists()


def _table_text(path: Path) -> str:
    """The bundle's tensor table (the JSON after the length field), as text."""
    raw = path.read_bytes()
    return raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]].decode()


def _put_table(path: Path, text: str) -> None:
    """Replace the bundle's tensor table by ``text`` (padded to 8 bytes), keeping its tensors' bytes."""
    raw = path.read_bytes()
    new = text.encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + struct.unpack("<Q", raw[:8])[0] :])


def _detect_errors(model: Path, head, tmp_path: Path, capsys) -> Tuple[int, List[str]]:
    """The exit code of ``detect`` with ``model`` on ``head``, and the non-empty lines it wrote to stderr."""
    image, mask = head
    rc = main(["detect", str(image), "--mask", str(mask), "--model", str(model),
               "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_a_header_nested_too_deeply_is_refused_in_one_line(calibrated, head, tmp_path, capsys):
    """JSON nested 100000 deep (the parser's recursion limit) in the bundle header."""
    table = json.loads(_table_text(calibrated))
    meta = table["__metadata__"]["cevae_anomaly"]
    table["__metadata__"]["cevae_anomaly"] = meta[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _put_table(calibrated, json.dumps(table))
    rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "is not valid JSON (nested too deeply)" in lines[0], lines


def test_a_key_written_twice_in_the_tensor_table_is_refused_in_one_line(calibrated, head, tmp_path, capsys):
    """Python's JSON reader keeps the last of two equal keys; safetensors' own parser refuses the file."""
    _put_table(calibrated, re.sub(r'("dtype": ?"F(16|32)")', r"\1, \1", _table_text(calibrated), count=1))
    rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "not a valid safetensors file" in lines[0], lines
    assert "the key 'dtype' is written twice in one object" in lines[0], lines


@pytest.mark.parametrize("command", ["info", "share"])
def test_a_key_written_twice_is_refused_by_info_and_share_as_by_detect(command, calibrated, tmp_path, capsys):
    """Python's JSON reader keeps the last of two equal keys, safetensors refuses the file: info called such a model
    valid (and the bundled one), share wrote a copy of it, while detect refused it as damaged."""
    _put_table(calibrated, re.sub(r'("dtype": ?"F(16|32)")', r"\1, \1", _table_text(calibrated), count=1))
    out = tmp_path / "shared.cevae"
    rc = main(["info", str(calibrated)] if command == "info" else ["share", str(calibrated), "--out", str(out)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert f"The model file {calibrated} is damaged or was edited (not a valid safetensors file: the key 'dtype' is " \
           "written twice in one object)" in lines[0], lines
    assert not out.exists()


def test_metadata_written_twice_is_refused_without_quoting_it(calibrated, head, tmp_path, capsys):
    """A tensor table that holds its metadata twice, the first a text naming a scan: Python's JSON reader keeps the
    last (valid) one, safetensors' parser refuses the file quoting the first. The refusal names the file and the
    problem, never what the header holds (scan names: `share` exists to strip them)."""
    table = json.loads(_table_text(calibrated))
    quoted = json.dumps(json.dumps({"scan": "sub-JohnDoe_1962"}))
    _put_table(calibrated, '{"__metadata__": ' + quoted + ", " + json.dumps(table)[1:])
    rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "is damaged or was edited (not a valid safetensors file" in lines[0], lines
    assert str(calibrated) in lines[0] and "the key '__metadata__' is written twice" in lines[0], lines
    assert "JohnDoe" not in lines[0] and '"' not in lines[0], lines


def test_safetensors_reason_is_said_without_what_it_quotes(tmp_path):
    """Where safetensors' parser refuses what Python's accepted, its reason is said up to what it quotes (safetensors
    0.8's own text, of the metadata written twice above), with the place it names."""
    from safetensors import SafetensorError

    from CeVAEAnomalyLib.engine.bundle import _unquoted

    said = ('Error while deserializing header: invalid JSON in header: invalid type: string "{\\"scan\\": '
            '\\"sub-JohnDoe_1962\\"}", expected a map at line 1 column 57')
    assert _unquoted(SafetensorError(said)) == ("Error while deserializing header: invalid JSON in header: invalid "
                                                "type: string at line 1 column 57")


@pytest.mark.parametrize("where", ["model header", "tensor table"])
def test_a_number_of_5000_digits_is_refused_in_one_line(where, calibrated, head, tmp_path, capsys):
    """Python's JSON reader refuses integers of more than 4300 digits with a plain ValueError, not a
    JSONDecodeError: it went through read_header."""
    table = json.loads(_table_text(calibrated))
    long_number = "1" * 5000
    if where == "model header":
        meta = table["__metadata__"]["cevae_anomaly"]
        table["__metadata__"]["cevae_anomaly"] = meta[:-1] + f', "note": {long_number}}}'
        _put_table(calibrated, json.dumps(table))
    else:
        _put_table(calibrated, json.dumps(table)[:-1] + f', "x": {long_number}}}')
    rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1 and "Exceeds the limit (4300 digits)" in lines[0], lines
    assert ("is not valid JSON" if where == "model header" else "unreadable header") in lines[0], lines


@pytest.mark.parametrize("record", ["written by", "trained with"])
def test_a_key_a_later_version_added_asks_for_an_update_not_an_original(record, calibrated, head, tmp_path, capsys):
    """A later CeVAEAnomaly may add a key to a known section; a bundle it wrote names that version (the writer's, and
    the training run's). This version tells the user to update, not that the file is damaged; the same key in a
    bundle written by this version (or an older one) is refused as damaged (CASES: unknown score option)."""
    from CeVAEAnomalyLib import __version__
    from CeVAEAnomalyLib.engine.bundle import load_bundle
    from CeVAEAnomalyLib.engine.header import WRITER_KEY

    assert load_bundle(calibrated).header.extra[WRITER_KEY] == __version__  # save_bundle records its writer
    later = "99.2.0"
    rewrite(calibrated, lambda h, t: (h["score_options"].update(temperature=2.0), h.update(
        {WRITER_KEY: later} if record == "written by" else {"versions": dict(h["versions"], cevae_anomaly=later)})))
    rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert f"{calibrated} was written by CeVAEAnomaly {later}, newer than this one ({__version__})" in lines[0], lines
    assert "'temperature'" in lines[0] and "Update CeVAEAnomaly to use it" in lines[0], lines
    assert "damaged" not in lines[0], lines


def test_a_later_version_that_is_not_newer_is_refused_as_damaged(calibrated):
    """A recorded version that is no later than this one's (or no version at all): the unknown key is an edit."""
    from CeVAEAnomalyLib import __version__
    from CeVAEAnomalyLib.engine.header import WRITER_KEY, read_header
    from CeVAEAnomalyLib.errors import CeVAEError

    for version in (__version__, "0.0.9", "unknown", 3):
        rewrite(calibrated, lambda h, t: (h["score_options"].update(temperature=2.0), h.update({WRITER_KEY: version})))
        with pytest.raises(CeVAEError, match="damaged or was edited"):
            read_header(calibrated)


def test_a_valid_recalibration_record_is_accepted(calibrated, head, tmp_path, capsys):
    rewrite(calibrated, recalibration())
    image, mask = head
    assert main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated),
                 "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"]) == 0, capsys.readouterr().err


def test_untampered_copy_is_accepted(calibrated, head, tmp_path, capsys):
    """Control: the rewrite itself keeps a valid bundle."""
    rewrite(calibrated, lambda h, t: None)
    image, mask = head
    assert main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated),
                 "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"]) == 0


@pytest.mark.parametrize("section, name, value, flag", [
    ("score_options", "test_time_steps", 100000, "--test-time-steps"),
    ("score_options", "mc_samples", 10000, "--mc-samples"),
    ("postprocess", "median_radius", 10, "--median-radius"),
])
def test_a_costly_recommendation_loads_but_is_used_only_when_asked_for(calibrated, head, tmp_path, capsys, section,
                                                                       name, value, flag):
    """A model's recommended settings are used by a plain detection: beyond what a model may recommend (a thorough
    mode of 100000 steps is hours per scan; 1000 latent samples took 220 s instead of 4 s; a median radius of 10, 90 s
    and 10 GB) such a detection is refused, naming the flag that asks for it; the model still loads (earlier versions
    wrote such bundles, e.g. calibrate --median-radius 4), and a request of its own runs."""
    from CeVAEAnomalyLib.engine.bundle import load_bundle

    rewrite(calibrated, setting(section, name, value))
    assert getattr(getattr(load_bundle(calibrated).header, section), name) == value
    image, mask = head
    score = tmp_path / "score.nii.gz"
    assert main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated), "--score", str(score),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: The model recommends {name} {value}, more than a model may recommend" in err, err
    assert f"Give {flag} {value} to use it anyway, or a lower value." in err and not score.exists()
    assert main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated), "--score", str(score),
                 "--device", "cpu", flag, "0" if name != "median_radius" else "1", "--threshold", "1"]) == 0, \
        capsys.readouterr().err  # (a median filter changes the map: calibrated with its own, so an absolute threshold)


def test_adapt_leaves_out_a_calibrated_thorough_mode_a_model_may_not_recommend(calibrated, caplog):
    """adapt calibrates each of the base's modes again: one of 100000 steps would take hours per scan."""
    import logging

    from CeVAEAnomalyLib.training.adapt import _adaptable_modes

    with caplog.at_level(logging.WARNING):
        assert _adaptable_modes([0, 100, 1000, 100000], calibrated) == [0, 100, 1000]
    assert "calibrated for thorough modes of 100000 test-time steps, more than a model may recommend (1000)" \
        in caplog.text


def test_recommended_settings_up_to_their_ceilings_load_and_a_request_may_ask_for_more(calibrated):
    """A model may recommend up to 1000 test-time steps, 100 latent samples and a median radius of 3 (and hold a
    thorough mode of 1000 steps); a request keeps the command line's own limits over what the model recommends."""
    from CeVAEAnomalyLib.engine.header import read_header
    from CeVAEAnomalyLib.options import DetectionRequest

    rewrite(calibrated, lambda h, t: (h["score_options"].update(test_time_steps=1000, mc_samples=100),
                                      h["postprocess"].update(median_radius=3), calibrated_mode(1000)(h, t)))
    header = read_header(calibrated)
    assert (header.score_options.test_time_steps, header.score_options.mc_samples) == (1000, 100)
    asked = DetectionRequest.of(test_time_steps=100000, mc_samples=10000, median_radius=10)
    score, post = asked.options(header.score_options, header.postprocess)
    assert (score.test_time_steps, score.mc_samples, post.median_radius) == (100000, 10000, 10)


def test_header_length_ending_in_0x80_is_not_taken_for_a_pickle(calibrated, head, tmp_path, capsys):
    """The first byte of a safetensors file is the lowest byte of its header length; 0x80 is also how
    pickles start. Such a bundle is valid and must load."""
    rewrite(calibrated, lambda h, t: None, length_mod_256=0x80)
    assert calibrated.read_bytes()[:1] == b"\x80"
    image, mask = head
    assert main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated),
                 "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"]) == 0, capsys.readouterr().err


def test_weights_that_overflow_are_refused_not_scored_as_nan(calibrated, head, tmp_path, capsys):
    """Finite weights so large that the network overflows (a model file edited, its checksum written anew) gave a
    score map of NaN and an empty labelmap without a word: detection now refuses the model."""
    import torch
    from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle

    bundle = load_bundle(calibrated, "cpu")
    with torch.no_grad():
        bundle.model.state_dict()["encoder.8.weight"].fill_(torch.finfo(torch.float32).max)
    save_bundle(calibrated, bundle.model, bundle.header)
    image, mask = head
    rc = main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated),
               "--score", str(tmp_path / "score.nii.gz"), "--device", "cpu"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "scores of this scan overflow (infinite or NaN values)" in lines[0], lines
    assert not (tmp_path / "score.nii.gz").exists()


def _overflowing_model(model: Path, score_power: Optional[float] = None) -> None:
    """Set the reconstruction bias of ``model`` to 1e4 (finite, but huge outputs), and its own score power of the
    asymmetry fusion to ``score_power`` (None: kept)."""
    from dataclasses import replace

    import torch
    from CeVAEAnomalyLib.engine.bundle import load_bundle, save_bundle

    bundle = load_bundle(model, "cpu")
    with torch.no_grad():
        bundle.model.state_dict()["decoder.8.bias"].fill_(1e4)
    header = bundle.header if score_power is None else replace(
        bundle.header, postprocess=bundle.header.postprocess.replace(score_power=score_power))
    save_bundle(model, bundle.model, header)


def _overflowing_detection(model: Path, head: Tuple[Path, Path], out: Path, *options: str) -> str:
    """The one error line of detect with ``model``, its reconstruction bias set to 1e4, and ``options``. In its own
    process, so that a hang fails the test."""
    import os
    import subprocess
    import sys

    _overflowing_model(model)
    image, mask = head
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.cli", "detect", str(image), "--mask", str(mask),
                           "--model", str(model), "--score", str(out), "--device", "cpu", *options],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert not out.exists()
    return lines[0]


def test_scores_that_overflow_in_post_processing_are_refused(calibrated, head, tmp_path):
    """Weights whose network output is finite but huge (a reconstruction bias of 1e4), with the asymmetry fusion's
    --score-power 10: the scores overflowed, and a map of NaN was written with no component (here), or, where
    infinite scores were left, every one was labelled and ITK's component statistics never ended on them (the
    detection hung, found with the bundled model). The score power asked for is named as a script gives it too."""
    line = _overflowing_detection(calibrated, head, tmp_path / "score.nii.gz", "--score-power", "10", "--threshold",
                                  "1")
    assert "post-processed scores of this scan overflow" in line, line
    assert "raised to the power 10 (--score-power; score_power= in Python)" in line, line  # (as detect() takes it)


def test_scores_that_overflow_with_mixed_precision_name_detects_option(calibrated, head, tmp_path):
    """With --amp the refusal advised to "run without mixed precision (--amp off)": detect has --amp and --no-amp,
    no --amp off. It names detect()'s keyword too: a script or the Slicer logic (amp=True) has no --amp to leave
    out."""
    line = _overflowing_detection(calibrated, head, tmp_path / "score.nii.gz", "--amp", "--score-power", "10",
                                  "--threshold", "1")
    assert "post-processed scores of this scan overflow" in line, line
    assert "run without mixed precision (leave out --amp; amp=False in Python), or the model file" in line, line
    assert "--amp off" not in line, line


def test_scores_that_overflow_with_the_models_own_score_power_name_no_option(calibrated, head, tmp_path):
    """A model whose own score power (10) makes its scores overflow, detected from the Slicer panel (its worker, in its
    own process), which has no score power control: the refusal said "raised to the power 10 (--score-power)", an
    option of detect's the user had not given. The command line, given no --score-power, says it alike."""
    import os
    import subprocess
    import sys

    from CeVAEAnomalyLib.options import DetectionRequest

    _overflowing_model(calibrated, score_power=10)
    image, mask = head
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"task": "detect", "image": str(image), "mask": str(mask), "model": str(calibrated),
                                   "request": DetectionRequest.of(threshold=1, device="cpu").to_dict(),
                                   "out_dir": str(tmp_path / "results")}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    worker = subprocess.run([sys.executable, "-m", "CeVAEAnomalyLib.slicer.worker", str(request)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert worker.returncode == 2, worker.stderr
    error = json.loads(worker.stdout.strip().splitlines()[-1])["error"]
    said = "far larger than a trained model's, raised to the power 10 (the model's score power); the model file may"
    assert said in error and "--" not in error, error
    line = _overflowing_detection(calibrated, head, tmp_path / "score.nii.gz", "--threshold", "1")
    assert said in line and "--score-power" not in line, line


def test_a_small_file_whose_layers_are_huge_is_refused_before_its_weights_are_read(calibrated, head, tmp_path,
                                                                                   capsys):
    """A first layer of 1024 channels at 128 px: 0.3 MB of weights, 8.4 million values per slice; detection of the
    2 mm sample took 5.6 GB and 76 s on one thread (4096 channels: 1 MB, about 21 GB and 5.6 min). Written by the
    project's own save_bundle, so its tensors match its architecture."""
    from dataclasses import replace

    import torch
    from CeVAEAnomalyLib.engine.bundle import load_bundle, read_header, save_bundle
    from CeVAEAnomalyLib.engine.config import ModelConfig
    from CeVAEAnomalyLib.engine.model import CeVAE
    from CeVAEAnomalyLib.errors import CeVAEError

    header = read_header(calibrated)
    header = replace(header, preprocess=replace(header.preprocess, input_size=128))
    torch.manual_seed(0)
    save_bundle(calibrated, CeVAE(ModelConfig(input_size=128, channels=(1024, 1), z_dim=1)), header)
    assert calibrated.stat().st_size < 10**6
    expected = (f"{calibrated} holds a network too costly to run: it computes 8,407,042 values per slice (the outputs "
                "of its layers), more than the limit of 4,000,000 (detection's memory and time grow with both). Use a "
                "model with narrower layers.")
    for load in (read_header, load_bundle):
        with pytest.raises(CeVAEError) as err:
            load(calibrated)
        assert str(err.value) == expected
    image, mask = head
    rc = main(["detect", str(image), "--mask", str(mask), "--model", str(calibrated), "--score",
               str(tmp_path / "score.nii.gz"), "--device", "cpu", "--batch-size", "4", "--orientations", "axial"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and lines == ["error: " + expected], lines
    assert not (tmp_path / "score.nii.gz").exists()


@pytest.mark.parametrize("command", ["detect", "info", "share"])
def test_a_key_written_twice_in_the_model_header_is_refused_in_one_line(command, calibrated, head, tmp_path, capsys):
    """The tensor table's keys written twice were refused, the model header's were not: Python's JSON reader kept the
    last of two "default_fpr" (or "calibration", "name") keys, so info, share and detect used a value that another
    reader of the file, or a person reading it, would not; save_bundle never writes a key twice."""
    table = json.loads(_table_text(calibrated))
    meta = table["__metadata__"]["cevae_anomaly"]
    table["__metadata__"]["cevae_anomaly"] = '{"default_fpr": 0.5, ' + meta[1:]
    _put_table(calibrated, json.dumps(table))
    out = tmp_path / "shared.cevae"
    if command == "detect":
        rc, lines = _detect_errors(calibrated, head, tmp_path, capsys)
    else:
        rc = main(["info", str(calibrated)] if command == "info" else ["share", str(calibrated), "--out", str(out)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and lines == [f"error: In the header of {calibrated}, the key 'default_fpr' is written twice in one "
                                 "object; the model file is damaged or was edited: use an original copy."], lines
    assert not out.exists()
