"""Checkpoints: the resumable state of a run, written atomically and verified before it replaces the last.

Each holds a SHA-256 of its content (:func:`state_digest`), checked when it is read: PyTorch loads changed bytes
inside a tensor without a word.

A checkpoint also holds the run's identity (:func:`run_identity`: its options and the checksums
of its training and validation volumes); a resume that differs from it is refused
(:func:`check_same_run`). The training log is trimmed back to a checkpoint on resume.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import logging
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import COMMAND_LINE_TRAIN, MODEL_OPTIONS, CeVAEError, Wording
from ..io.atomic import atomic_path
from ..io.manifest import Subject
from .config import LOG_HEADER, RESUME_MAY_CHANGE

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: the run's identity is stored and checked on resume
DIGEST_KEY = "sha256"  # the checkpoint's record of state_digest (checkpoints of earlier releases lack it)


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and the plain data, keys in sorted
    order, all but the digest itself. torch does not check the bytes it loads, so a flipped bit would be trained on."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` (tensors and plain data, nested) to ``digest``, each part tagged with its kind and length."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}:".encode())
        for key, item in sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))):
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, numbers, bool, None, a dtype: its type and repr (floats' repr round-trips exactly)
        text = repr(value).encode("utf-8", "surrogatepass")
        digest.update(f"P{type(value).__name__}:{len(text)}:".encode() + text)


def write_checkpoint(state: Dict[str, Any], path: Path,
                     advice: Optional[Callable[[BaseException], str]] = None) -> None:
    """Write ``state`` with its :func:`state_digest` beside ``path``, read it back and check it, then rename: a
    failed write keeps the previous one. ``advice(error)``: what its error says after the cause (default: that the
    previous checkpoint is kept)."""
    state = dict(state, **{DIGEST_KEY: state_digest(state)})
    try:
        with atomic_path(path, durable=True) as tmp:  # a resume after a power cut finds it whole
            torch.save(state, tmp)
            if state_digest(torch.load(tmp, map_location="cpu", weights_only=True)) != state[DIGEST_KEY]:
                raise OSError("the file read back differs from what was written")
    except (OSError, RuntimeError, EOFError) as exc:  # torch reports failed writes as RuntimeError
        after = "; the previous one is kept." if advice is None else f". {advice(exc)}"
        raise CeVAEError(f"Could not write the checkpoint {path}: {_reason(exc)}{after}") from None


def _reason(exc: BaseException) -> str:
    """The cause of a failed write in words (torch's own messages name C++ source lines)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "the file could not be written completely (disk full or a file-size limit?)"


# what a checkpoint holds besides its version, configuration and identity: key -> (type, what it must be)
_FIELDS: Dict[str, Tuple[type, str]] = {
    "model": (dict, "the weights"), "opt": (dict, "the optimiser state"), "step": (int, "a step count"),
    "epoch": (int, "an epoch count"), "offset": (int, "a position in the epoch"), "batch_size": (int, "a batch size"),
    "world": (int, "a number of ranks"), "gen": (torch.Tensor, "a random state"),
    "torch_rng": (torch.Tensor, "a random state"),
}


def damaged(path: Path, why: str, wording: Wording = COMMAND_LINE_TRAIN) -> CeVAEError:
    """The error for a checkpoint that is not one this program wrote, or no longer whole (``wording``: the caller's
    words for starting anew)."""
    return CeVAEError(f"The checkpoint {path} is damaged or not a CeVAEAnomaly checkpoint ({why}); it was not "
                      f"loaded. Remove it, or {wording.start_anew}.")


def read_checkpoint(path: Path, model_cfg: Dict[str, Any], shared_hint: str = "",
                    wording: Wording = COMMAND_LINE_TRAIN) -> Dict[str, Any]:
    """The state saved at ``path`` for a model of configuration ``model_cfg``, its fields checked; a refusal says
    what to do in ``wording``."""
    if not path.is_file():
        raise CeVAEError(f"{wording.resume_request} was given but there is no checkpoint at {path}{shared_hint}.")
    if path.stat().st_size == 0:
        raise damaged(path, "the file is empty", wording)
    if compressed_records(path):
        raise damaged(path, "it holds compressed records, which torch never writes and would unpack whole", wording)
    try:
        with warnings.catch_warnings():  # torch's warnings about what it refuses to unpickle
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused to import a name (an object, not tensors or data): "Unsupported global" (torch 2.4
        # and later), "Unsupported class" (2.1-2.3)
        if any(words in str(exc).lower() for words in ("global", "unsupported class")):
            raise damaged(path, "it holds objects other than tensors and plain data, which are never "
                                "unpickled", wording) from None
        raise damaged(path, "it cannot be read as a checkpoint: UnpicklingError", wording) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, random bytes, a bundle renamed: torch's many types
        raise damaged(path, f"it cannot be read as a checkpoint: {type(exc).__name__}", wording) from None
    if not isinstance(state, dict):
        raise damaged(path, f"it holds a {type(state).__name__}, not a checkpoint's fields", wording)
    problem = _bulk_problem(state, path.stat().st_size)
    if problem:
        raise damaged(path, problem, wording)
    _check_digest(state, path, wording)
    for key in ("version", "model_cfg", "run", "parts"):  # compared with this run's, shown and walked as plain data
        if not _is_plain(state.get(key)):
            raise damaged(path, f"its field {key!r} holds other than plain data", wording)
    version = state.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_VERSION:
        raise CeVAEError(f"The checkpoint {path} was written by a newer version of CeVAEAnomaly (checkpoint format "
                         f"{version}; this one reads {CHECKPOINT_VERSION}); update CeVAEAnomaly to resume it.")
    problem = _identity_problem(state.get("run")) or _parts_problem(state.get("parts"))
    if problem:
        raise damaged(path, problem, wording)
    if version != CHECKPOINT_VERSION:
        raise CeVAEError(f"The checkpoint {path} was written by another version of CeVAEAnomaly, which does not "
                         f"record what defines its run; {wording.start_anew}.")
    if state.get("model_cfg") != model_cfg:
        saved = state.get("model_cfg") if isinstance(state.get("model_cfg"), Mapping) else {}
        differences = "; ".join(f"{key} ({_show(was)} in the checkpoint, {_show(now)} now)"
                                for key, was, now in _changed_options(saved, model_cfg)) or "unreadable"
        raise CeVAEError(f"{wording.resume_request} refused: the checkpoint {path} holds a model of another "
                         f"architecture: {differences}. {wording.same_model}, or {wording.start_anew}.")
    for key, (kind, what) in _FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise damaged(path, f"its field {key!r} is not {what}", wording)
        if kind is int and value < (1 if key in ("batch_size", "world") else 0):
            raise damaged(path, f"its field {key!r} is {value}", wording)
    return state


def compressed_records(path: Path) -> bool:
    """Whether the zip archive at ``path`` holds a compressed record: torch writes them stored, and unpacks one whole
    into memory, whatever size it unpacks to (a file that is not a zip archive is left to torch to refuse)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _bulk_problem(state: Dict[str, Any], size: int) -> Optional[str]:
    """Why reading ``state``, loaded from a file of ``size`` bytes, would take more than its file holds, or None: its
    tensors, copied whole by the checksum and the checks, view more values than they store (one value expanded, a
    tensor under several names), or are of a kind without values of their own (sparse, meta); it holds more values
    than bytes (one referenced over and over: each costs a byte or more where it is not), or nests over 64 deep."""
    stored: Dict[int, int] = {}
    viewed = 0
    pending: List[Tuple[Any, int]] = [(state, 0)]
    for _ in range(size + 1):
        if not pending:
            break
        value, depth = pending.pop()
        if depth > 64:
            return "it is nested more than 64 deep"
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.device.type == "meta":
                return f"it holds a tensor of a kind no CeVAEAnomaly writes ({value.layout}, on {value.device.type})"
            storage = value.untyped_storage()
            stored[storage.data_ptr()] = max(stored.get(storage.data_ptr(), 0), storage.nbytes())
            viewed += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple, set, frozenset)):  # (torch loads sets too)
            pending.extend((item, depth + 1) for item in value)
    if pending:
        return "it holds more values than its file's size allows (data referenced over and over)"
    if viewed > sum(stored.values()):
        return f"its tensors view more values than it stores ({viewed} bytes of {sum(stored.values())})"
    return None


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON-like data (text keys), nested at most 64 deep: what a run record holds."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth >= 64:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())


def _identity_problem(run: Any) -> Optional[str]:
    """Why a checkpoint's run record (:func:`run_identity`) cannot be compared with this run's, or None (also for
    none: :func:`check_same_run` says so)."""
    if run is None:
        return None
    if not isinstance(run, dict) or not isinstance(run.get("options"), dict):
        return "its run record has no options"
    for role in ("train", "validation"):
        volumes = run.get(role)
        if not isinstance(volumes, list) or not all(
                isinstance(v, dict) and isinstance(v.get("image"), str) and isinstance(v.get("image_sha256"), str)
                and "mask_sha256" in v and isinstance(v["mask_sha256"], (str, type(None))) for v in volumes):
            return f"its run record's {role} volumes are not a list of paths and checksums"
    return None


def _parts_problem(parts: Any) -> Optional[str]:
    """Why a checkpoint's ``parts`` (from which step the run trained with which learning rate, ranks, batch size and
    kind of device, which earlier releases did not all record; the bundle's training record) are unusable, or None
    (also for none: checkpoints of earlier releases lack them)."""
    def whole(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if parts is None or isinstance(parts, list) and parts and all(
            isinstance(p, dict) and whole(p.get("from_step"), 0) and whole(p.get("ranks"), 1)
            and isinstance(p.get("lr"), (int, float)) and not isinstance(p.get("lr"), bool)
            and math.isfinite(p["lr"]) and p["lr"] > 0 and ("batch_size" not in p or whole(p["batch_size"], 1))
            and p.get("device", "cpu") in ("cpu", "cuda", "mps") for p in parts):
        return None
    return ("its field 'parts' is not a list of training parts (a first step, a learning rate, a number of ranks, "
            "a batch size and a kind of device)")


def _check_digest(state: Dict[str, Any], path: Path, wording: Wording) -> None:
    """Refuse a checkpoint whose content differs from the digest written with it (one written by an earlier
    release has none, and is checked field by field only)."""
    if DIGEST_KEY not in state:
        return
    try:
        same = state[DIGEST_KEY] == state_digest(state)
    except (RuntimeError, TypeError, ValueError):  # a tensor numpy cannot view
        same = False
    if not same:
        raise damaged(path, "its content does not match the checksum written with it", wording)


def weights_problem(model: torch.nn.Module, saved: Mapping[Any, Any]) -> Optional[str]:
    """Why ``saved`` (a checkpoint's weights) are not ``model``'s: a name missing or added, a tensor of another dtype,
    shape or layout (load_state_dict casts another dtype silently: booleans become 0 and 1, integers are truncated,
    complex numbers lose their imaginary part); None where they fit."""
    own = model.state_dict()
    for key, want in own.items():
        got = saved.get(key)
        if not isinstance(got, torch.Tensor):
            return f"{key!r} is {'missing' if key not in saved else 'not a tensor'}"
        if (got.dtype, got.shape, got.layout) != (want.dtype, want.shape, want.layout):
            return f"{key!r} is {_tensor_kind(got)}, this model's is {_tensor_kind(want)}"
    extra = next((key for key in saved if key not in own), None)
    return None if extra is None else f"{extra!r:.80} is not a weight of this model"


def _tensor_kind(t: torch.Tensor) -> str:
    """A tensor's dtype and shape (and layout, where not strided) in words: "float32 of shape (8, 1)"."""
    layout = "" if t.layout == torch.strided else f" ({t.layout})"
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}{layout}"


def optimizer_problem(opt: torch.optim.Optimizer, saved: Any) -> Optional[str]:
    """Why ``saved`` (a checkpoint's optimiser state) does not fit ``opt``, or None. torch loads any state and fails
    only at the next step; the reference is the state that ``opt``'s kind of optimiser has after one step on copies
    of its parameters (settings a newer torch added may be missing: it fills them in), and a second step on them
    is taken with ``saved``."""
    copies = [{"params": [p.detach().clone().requires_grad_(True) for p in g["params"]]} for g in opt.param_groups]
    reference = type(opt)(copies, **opt.defaults)
    for group in copies:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    reference.step()
    want = reference.state_dict()
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list) and len(saved["param_groups"]) == len(copies)):
        return "it is not the state of this run's optimiser"
    for group, wanted in zip(saved["param_groups"], want["param_groups"]):
        if not (isinstance(group, dict) and _is_plain(group.get("params")) and group["params"] == wanted["params"]):
            return "its parameter groups list other parameters"
        odd = [k for k, v in wanted.items() if k in group and not _same_kind(group[k], v)]
        if odd:
            return f"its setting {odd[0]!r} is not a {type(wanted[odd[0]]).__name__}"
    for index, entry in saved["state"].items():
        wanted = want["state"].get(index) if isinstance(index, int) else None
        if wanted is None or not isinstance(entry, dict) or set(entry) != set(wanted):
            return f"the state of parameter {index!r:.20} is not that of this run's optimiser"
        odd = [k for k, v in wanted.items() if not _same_kind(entry[k], v)]
        if odd:
            got, want = entry[odd[0]], wanted[odd[0]]
            kinds = f" ({_tensor_kind(got)}, not {_tensor_kind(want)})" if isinstance(got, torch.Tensor) else ""
            return f"the {odd[0]!r} of parameter {index} has another type or shape than its parameter's{kinds}"
    try:  # and a step with it on the copies (a setting missing, a value torch cannot use)
        reference.load_state_dict(copy.deepcopy(saved))
        reference.step()
    except Exception as exc:  # noqa: BLE001 - torch's many kinds of errors for unusable state
        return f"a training step with it fails ({type(exc).__name__})"
    return None


def _same_kind(value: Any, wanted: Any) -> bool:
    """Whether ``value`` can stand where an optimiser has ``wanted``: a tensor of its dtype, shape and layout where it
    mirrors a parameter (load_state_dict casts it to the parameter's dtype silently), a tensor of its shape or a
    number for a step count, a number for a number, a pair of numbers for a pair, true/false/None for a flag."""
    if isinstance(wanted, torch.Tensor):
        if wanted.dim() == 0:
            return isinstance(value, (int, float)) and not isinstance(value, bool) or (
                isinstance(value, torch.Tensor) and value.dim() == 0)
        return isinstance(value, torch.Tensor) and (value.dtype, value.shape, value.layout) == (
            wanted.dtype, wanted.shape, wanted.layout)
    if wanted is None or isinstance(wanted, bool):
        return value is None or isinstance(value, bool)
    if isinstance(wanted, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(wanted, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(wanted) and all(
            _same_kind(v, w) for v, w in zip(value, wanted))
    return type(value) is type(wanted)


def run_identity(options: Mapping[str, Any], train: Sequence[Subject], validation: Sequence[Subject],
                 checksums: Mapping[Path, str]) -> Dict[str, Any]:
    """What defines a run, as plain data for a checkpoint: ``options`` (every setting a resume may not
    change) and each training and validation volume's path and checksums (so, also the split)."""
    def volumes(subjects: Sequence[Subject]) -> List[Dict[str, Optional[str]]]:
        return [{"image": str(s.image), "image_sha256": checksums[s.image],
                 "mask_sha256": checksums[s.mask] if s.mask is not None else None} for s in subjects]

    return {"options": _plain(dict(options)), "train": volumes(train), "validation": volumes(validation)}


# a field every checkpoint of the versions that sliced as training.cache.SLICING_VERSION 5 but did not record it wrote
# (since 2026-12-06 16:26 UTC); a checkpoint recording neither is of an earlier version, whose slices may differ
_SINCE_SLICING_5 = "replaces"


def with_slicing(state: Mapping[str, Any], slicing: int, path: Path,
                 wording: Wording = COMMAND_LINE_TRAIN) -> Optional[Mapping[str, Any]]:
    """The run identity of the checkpoint ``state`` (at ``path``) with the slicing version of the slices it trained on
    (``options.slicing``, inferred for versions since 5 that did not record it); refused where that is not
    ``slicing``, this version's: the rest of the run would train on slices of another kind."""
    run = state.get("run")
    if not isinstance(run, Mapping) or not isinstance(run.get("options"), Mapping):
        return run  # (check_same_run names it)
    options = run["options"]
    was = options.get("slicing", 5 if _SINCE_SLICING_5 in state else None)
    if was == slicing:
        return dict(run, options=dict(options, slicing=slicing))
    said = (f"slicing version {_show(was)}; this version's is {slicing}" if was is not None else
            "it does not record how its slices were prepared, as earlier versions did not")
    raise CeVAEError(f"{wording.resume_request} refused: the checkpoint {path} was trained on slices that another "
                     f"version of CeVAEAnomaly may have prepared otherwise ({said}), so the rest of the run would "
                     f"train on slices of another kind; {wording.start_anew}, or resume it with the version that "
                     f"wrote it.")


def check_same_run(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], path: Path,
                   wording: Wording = COMMAND_LINE_TRAIN) -> None:
    """Refuse to resume from the checkpoint at ``path`` a run whose identity differs; name what differs, and say what
    to do in ``wording``."""
    if saved is None:
        raise CeVAEError(f"The checkpoint {path} does not record what defines its run; {wording.start_anew}.")
    changed, volumes, adaptation = run_differences(saved, current)
    if adaptation is not None:
        log.warning("The checkpoint %s was written before an adaptation recorded its steps and learning rate: %s (its "
                    "fold models calibrate the final one, so they must be trained alike).", path,
                    wording.same_settings.format(steps=adaptation.get("steps"), lr=adaptation.get("lr")))
    if changed or volumes:
        raise CeVAEError(f"{wording.resume_request} refused: the checkpoint {path} belongs to another run: "
                         f"{_differences(changed, volumes, wording)}. {wording.same_run}, or {wording.start_anew}.")


def run_differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                    ) -> Tuple[List[Tuple[str, Any, Any]], List[str], Optional[Mapping[str, Any]]]:
    """What differs between a checkpoint's run identity ``saved`` and ``current`` (:func:`run_identity`), without a
    word logged: the options (dotted name, saved value, current value) and the volumes, in words; and an adaptation's
    steps and learning rate that an earlier version did not record, taken as the current ones (None: none were)."""
    options = _base_by_content(saved["options"], current["options"])
    # what a resume may change now but an earlier version recorded as the run's (a train run's batch size)
    options = {k: v for k, v in options.items() if k in current["options"] or k not in RESUME_MAY_CHANGE}
    adaptation = _unrecorded_adaptation(options, current["options"])
    if adaptation is not None:
        options = dict(options, adaptation=adaptation)
    changed = _changed_options(options, current["options"])
    volumes = [said for role in ("train", "validation") for said in _changed_volumes(role, saved[role], current[role])]
    return changed, volumes, adaptation


def _unrecorded_adaptation(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The current run's adaptation settings (steps, lr) where the checkpoint's ``saved`` options are a fine-tuning's
    written before adaptations recorded them (another kind of run differs in its other options); else None."""
    adaptation = current.get("adaptation")
    return adaptation if adaptation is not None and "adaptation" not in saved and saved.get("init_from") else None


def _differences(changed: List[Tuple[str, Any, Any]], volumes: List[str], wording: Wording) -> str:
    """What differs between a resume and its checkpoint's run (``changed`` options, ``volumes`` in words): each option
    and volume, or, where ``wording`` names them by kind, the model, the volumes and the other settings."""
    if not wording.other_model:
        return "; ".join(_options_said(changed, wording) + volumes)
    options = {key.split(".")[0] for key, _, _ in changed}
    kinds = ((options & set(MODEL_OPTIONS), wording.other_model), (volumes, wording.other_volumes),
             (options - set(MODEL_OPTIONS), wording.other_settings))
    return "; ".join(said for differ, said in kinds if differ)


def _options_said(changed: List[Tuple[str, Any, Any]], wording: Wording) -> List[str]:
    """Each ``changed`` option (dotted name, value in the checkpoint, value now) in words, where several of one group
    set by one option (``--no-augment`` sets ten strengths) are one clause naming that option once."""
    names = dict(wording.option_names)
    by_group: Dict[str, List[Tuple[str, Any, Any]]] = {}
    for key, was, now in changed:
        group = _group(key, names)
        by_group.setdefault(key if group is None else group, []).append((key, was, now))
    said = []
    for group, members in by_group.items():
        if len(members) == 1:
            key, was, now = members[0]
            said.append(f"{_option_name(key, wording)} ({_show(was)} in the checkpoint, {_show(now)} now)")
            continue
        said.append(f"{group}, set by {names[group]} ({_values(group, members, 1)} in the checkpoint; "
                    f"{_values(group, members, 2)} now)")
    return said


def _values(group: str, members: List[Tuple[str, Any, Any]], n: int) -> str:
    """The values (``n``: 1, in the checkpoint; 2, now) of the changed options ``members`` of ``group``: each after
    its name in the group, or "all V" where they are one."""
    shown = [_show(m[n]) for m in members]
    if len(set(shown)) == 1:
        return f"all {shown[0]}"
    return ", ".join(f"{key[len(group) + 1:]} {value}" for (key, _, _), value in zip(members, shown))


def _group(key: str, names: Mapping[str, str]) -> Optional[str]:
    """The named group (of ``names``) the run option of dotted name ``key`` belongs to, where ``key`` has no name of its
    own; None otherwise."""
    if key in names:
        return None
    parts = key.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in names), None)


def _option_name(key: str, wording: Wording) -> str:
    """The run option of dotted name ``key`` as the caller's user gives it (``wording.option_names``): its own name, or
    ``key`` and its group's (e.g. "init_from.sha256, set by --model"); ``key`` itself where the caller names neither."""
    names = dict(wording.option_names)
    if key in names:
        return names[key]
    group = _group(key, names)
    return key if group is None else f"{key}, set by {names[group]}"


def _base_by_content(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Mapping[str, Any]:
    """``saved`` with a base model recorded by its path (checkpoints written before the base was recorded by its
    SHA-256) taken as the current one when that file still holds the same content."""
    was, now = saved.get("init_from"), current.get("init_from")
    if not (isinstance(was, str) and isinstance(now, Mapping)):
        return saved
    from ..io.checksum import sha256_of

    try:
        same = sha256_of(Path(was)) == now.get("sha256")
    except OSError:
        return saved
    return dict(saved, init_from=now) if same else saved


def _plain(value: Any) -> Any:
    """``value`` as JSON-like data (lists, dicts, str, numbers, None) that ``weights_only`` loading accepts."""
    if hasattr(value, "__dataclass_fields__"):
        value = {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _changed_options(saved: Mapping[str, Any], current: Mapping[str, Any],
                     prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted name, saved value, current value) of every option that differs (nested dicts compared by key).

    An option the checkpoint lacks was added since it was written; it matches when it is off (0, False or
    None), which is how the older run behaved."""
    out = []
    for key in sorted(set(saved) | set(current)):
        was, now = saved.get(key), current.get(key)
        if key not in saved and now in (0, False, None):
            continue
        if isinstance(was, Mapping) and isinstance(now, Mapping):
            out += _changed_options(was, now, f"{prefix}{key}.")
        elif was != now:
            out.append((prefix + key, was, now))
    return out


def _changed_volumes(role: str, saved: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> List[str]:
    """How the ``role`` volumes (training or validation) differ, in words: changed (the scan, or only its brain mask:
    removed, added or changed), missing, added."""
    def content(v: Mapping[str, Any]) -> Tuple[Any, Any]:
        return v["image_sha256"], v["mask_sha256"]

    kept = {content(v) for v in saved} & {content(v) for v in current}
    gone = [v for v in saved if content(v) not in kept]
    new = [v for v in current if content(v) not in kept]
    was, now = {v["image"]: v for v in gone}, {v["image"]: v for v in new}
    changed = sorted(set(was) & set(now))
    by_words: Dict[str, List[str]] = {}
    for image in changed:
        by_words.setdefault(_what_changed(was[image], now[image]), []).append(image)
    by_words["in the checkpoint's run, not in this one"] = [i for i in was if i not in now]
    by_words["in this run, not in the checkpoint's"] = [i for i in now if i not in was]
    what = "training" if role == "train" else "validation"
    out = []
    for words, files in by_words.items():
        if files:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            out.append(f"{what} volume(s) {words}: {shown}")
    return out


def _what_changed(was: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """How a volume recorded as ``was`` in a checkpoint and ``now`` in a resume (same path, other content) differs, as
    "volume(s) ..." ends it: its scan, or only its brain mask (removed, added or changed)."""
    if was["image_sha256"] != now["image_sha256"]:
        return "changed since the checkpoint"
    if now["mask_sha256"] is None:
        return "whose brain mask was removed since the checkpoint"
    if was["mask_sha256"] is None:
        return "given a brain mask since the checkpoint"
    return "whose brain mask changed since the checkpoint"


def _show(value: Any) -> str:
    return "none" if value is None else repr(value)


def _with_this_header(header: List[List[str]]) -> List[List[str]]:
    """The log's header row (none in an empty log), the previous version's (without the last column of
    :data:`LOG_HEADER`, ``checkpoint``) as this version writes it, naming the cell the resumed run's rows add."""
    return [list(LOG_HEADER)] if header == [list(LOG_HEADER[:-1])] else header


def truncate_log(path: Path, step: int, first_row: Optional[List[str]] = None,
                 step_row: Optional[List[str]] = None) -> Optional[List[str]]:
    """Drop log rows written after the checkpoint a run resumes from (they are trained again); the log's first row
    as it is left (None: it has none). ``first_row``: the first row of the checkpoint's run, as the checkpoint
    records it; a log whose first row is another (the earlier run's, which a fresh run stopped between its first
    checkpoint and its log kept) is started again with the header alone, saying so, not continued as a mix of
    two runs. ``step_row``: the row of the checkpoint's own step, as it records it, added where the log of its run
    lacks it (a stop came between the checkpoint's write and the row's)."""
    if not path.is_file():
        return None
    from ..io.atomic import atomic_write_text

    try:
        with open(path, newline="", encoding="utf-8") as fh:  # (NUL bytes out: Python < 3.11's csv refuses them)
            rows = list(csv.reader(io.StringIO(fh.read().replace("\0", ""))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CeVAEError(f"The training log {path} is damaged ({type(exc).__name__}); move it away to resume "
                         "(the checkpoint is intact).") from None
    # blank rows (a tail a power cut left zero-filled: its NUL bytes are out) are dropped like rows after the
    # checkpoint; any other row must start with a step number (isdigit alone takes '²', which int refuses)
    rows = rows[:1] + [r for r in rows[1:] if r and r[0].strip()]
    for row in rows[1:]:
        if not (row[0].isascii() and row[0].isdigit()):
            raise CeVAEError(f"The training log {path} is damaged (a row does not start with a step number: "
                             f"{row[0][:20]!r}); move it away to resume (the checkpoint is intact).")
    kept = _with_this_header(rows[:1]) + [r for r in rows[1:] if int(r[0]) <= step]
    if first_row is not None and len(rows) > 1 and rows[1] != first_row:
        log.warning("The training log %s holds another run's rows (the earlier run's: this run was stopped before "
                    "it wrote its own log): it is started again, without this run's rows up to step %d.", path, step)
        kept = [list(LOG_HEADER)]
    elif step_row is not None and step_row[:1] == [str(step)] and all(int(r[0]) < step for r in kept[1:]):
        kept.append(list(step_row))
    if kept != rows:
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write_text(path, text.getvalue())
    return kept[1] if len(kept) > 1 else None
