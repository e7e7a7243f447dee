"""The panel's "Share model..." action (Qt-free): whether it is offered for the chosen model, where the copy goes by
default, which outputs it refuses, and what the status line says once the copy is written.

A calibrated or adapted model records each healthy volume by its node name, which may hold a patient's name or ID.
The copy is the logic's ``shareModel`` (engine/sharing.py): one file read and written with its header rewritten, done
in a moment, so the widget runs it in the GUI thread, not in a worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from ..data import is_bundled_model
from ..engine.bundle_checks import NAMES_REMOVED
from ..engine.header import BUNDLE_SUFFIX, read_header
from ..engine.sharing import ALREADY_SHARED
from ..errors import CeVAEError
from .adapt_panel import output_problem
from .gui_binding import typed_path

SHARED_TAG = "_shared"  # the default copy of NAME.cevae is NAME_shared.cevae, beside it


@dataclass(frozen=True)
class ModelSharing:
    """The action for the panel's model choice: ``bundled`` (Use bundled model ticked), ``model_path`` (the Model
    bundle field), ``readable`` (its header reads as a model) and ``busy_with`` (the task running, if any)."""

    bundled: bool
    model_path: str
    readable: bool = True
    busy_with: Optional[str] = None

    @classmethod
    def of_panel(cls, parameters: Any, readable: bool, busy_with: Optional[str],
                 shown: Optional["ModelSharing"] = None) -> "ModelSharing":
        """The action for the parameter node's ``useBundledModel`` and ``modelPath``: ``shown`` (the panel's last one)
        where the choice is unchanged, so that its :attr:`problem`, read from the disk, is read once per choice, not at
        every refresh of the panel."""
        made = cls(bool(parameters.useBundledModel), str(parameters.modelPath or ""), readable, busy_with)
        return shown if shown == made else made

    @property
    def model(self) -> Path:
        """The chosen model file (``~`` expanded: gui_binding.typed_path)."""
        return typed_path(self.model_path)

    @cached_property
    def problem(self) -> Optional[str]:
        """Why the action is not offered now, or None (asked of the disk once: whether the file is the bundled model,
        whether it is a file, whether it is a shareable copy already)."""
        if self.busy_with is not None:
            return ("Another task is running; wait for it to end (a calibration's or adaptation's model then becomes "
                    "the one in use, to share), or cancel it.")
        if self.bundled or (self.model_path and is_bundled_model(self.model)):
            return ("The bundled model names only public sample scans: share it as it is. Choose a model of your own "
                    "(untick Use bundled model) to write a copy of it without its scans' names.")
        if not self.model_path:
            return "Choose the model file to share (Model bundle)."
        if not self.readable or not self.model.is_file():
            return "The chosen model cannot be read (the status line says why); choose a model file to share."
        try:
            shared = NAMES_REMOVED in read_header(self.model).extra
        except CeVAEError:  # replaced since the panel read it: share_model says why
            shared = False
        return f"{self.model.name} {ALREADY_SHARED}." if shared else None

    @property
    def tooltip(self) -> str:
        """The button's tooltip: what it does, or why it is disabled."""
        return self.problem or (
            f"Write a copy of {self.model.name} that calls the scans it was made from scan 1, scan 2, ... instead of "
            "by their names (which may hold a patient's name or ID), to give to a colleague or another site; it "
            "detects exactly as the model does.")

    def default_output(self) -> Path:
        """Where the copy goes unless the user chooses another file: NAME_shared.cevae beside the model, or
        NAME_shared_2.cevae beside NAME_shared.cevae (not NAME_shared_shared)."""
        stem = self.model.stem
        tag = "_2" if stem.lower().endswith(SHARED_TAG) else SHARED_TAG
        return self.model.with_name(stem + tag + BUNDLE_SUFFIX)

    def share(self, logic: Any, output: str, replace: bool) -> str:
        """Write the copy to ``output`` (the path chosen; ``~`` expanded; .cevae added to a name of no suffix, as a save
        dialog with a default suffix adds it) with ``logic.shareModel`` and return what the status line says. Refused
        in one line, with nothing written: while :attr:`problem`, an output that is the model itself (also through a
        link) or the bundled model, or is not a .cevae file, and an existing file unless ``replace`` (the user was asked
        before replacing it: never for a name the suffix was added to)."""
        named = output + BUNDLE_SUFFIX if output and not Path(output).suffix else output
        problem = self.problem or output_problem(named, self.model, "shareable")
        if problem is not None:
            raise CeVAEError(problem)
        out = typed_path(named)
        exists = out.exists()
        if exists and not (replace and named == output):
            raise CeVAEError(f"{out} exists; choose another file name for the shareable copy.")
        return self.shared_message(logic.shareModel(self.model, out, overwrite=exists))

    def shared_message(self, copy: Path) -> str:
        """The status line once the copy ``copy`` is written: how many scans it renamed, that the model in use stays the
        model, and to give the copy alone."""
        scans = read_header(copy).extra[NAMES_REMOVED]["scans"]
        name = self.model.name
        return (f"Shareable copy of {name} saved as {copy}: the {scans} scan(s) it records are called scan 1, scan 2, "
                f"... instead of by their names; it detects exactly as {name}, which stays the model in use. Give the "
                "copy alone: the checkpoints (.ckpt) beside an adapted model hold the scans' paths.")
