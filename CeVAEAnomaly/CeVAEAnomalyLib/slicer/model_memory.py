"""The model a new scene starts with: the one last used on this computer, while it can still be read (no Qt).

A site's calibrated or adapted model is made once and used for months; a radiologist who opens Slicer the
next day must not silently get the bundled model back. The widget keeps :func:`remembered_value` in the
application settings under :data:`SETTINGS_KEY` after each detection and each new model, and a new parameter
node (a new scene, a restart) starts from :func:`start_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import CeVAEError
from .gui_binding import typed_path
from .settings import ModelSettings

__all__ = ["SETTINGS_KEY", "StartModel", "remembered_value", "set_aside", "start_model"]

SETTINGS_KEY = "CeVAEAnomaly/LastModel"  # the model file last used; "" for the bundled model


@dataclass(frozen=True)
class StartModel:
    """What a new parameter node starts with."""

    path: Optional[str]  # the model file to use; None: the bundled model
    message: str  # for the status line ("" when there is nothing to say)
    forget: bool  # the remembered file cannot be used: remove it from the settings
    standing_in_for: str = ""  # the remembered file out of reach now, for which the bundled model stands in


def remembered_value(parameters: Any, standing_in_for: str = "") -> str:
    """What to remember of the panel's model choice: its file, or "" for the bundled model; while the bundled model
    only stands in for a remembered file out of reach (``standing_in_for``), that file, tried at the next start."""
    if parameters.useBundledModel or not parameters.modelPath:
        return standing_in_for
    return str(typed_path(parameters.modelPath))


def start_model(remembered: Any) -> StartModel:
    """The model for a new scene from the remembered value (the setting as the application gives it): that file if its
    header still reads as a model (weights are checked when it is loaded, as for any chosen file), otherwise the
    bundled model, saying why. A file that cannot be reached (gone, or on a share not mounted yet) stays remembered;
    one that no longer reads as a model is forgotten, and so is a value that is no file path (a list, a number, a NUL
    byte: another version's or a damaged settings file's)."""
    if not remembered:
        return StartModel(None, "", False)
    if not isinstance(remembered, str) or "\0" in remembered:
        return StartModel(None, f"The setting {SETTINGS_KEY} holds no model file path ({remembered!r}), so the bundled "
                                "model is in use; the setting is cleared.", forget=True)
    try:
        ModelSettings.read(typed_path(remembered))
    except (CeVAEError, OSError) as exc:
        there = typed_path(remembered).is_file()
        state = "cannot be used any more" if there else "cannot be reached now"
        return StartModel(None, f"The model used last on this computer {state}, so the bundled model is in use. {exc}",
                          forget=there, standing_in_for="" if there else remembered)
    return StartModel(str(typed_path(remembered)), f"The model used last on this computer is in use: {remembered}. "
                                                   "Tick 'Use bundled model' for the model shipped with the extension.",
                      False)


def set_aside(settings: Any) -> Callable[[], None]:
    """Remove the remembered model from the application ``settings`` (a QSettings: contains, value, setValue, remove)
    and return what puts it back as it was: the module's self-test starts as on a computer where the module was never
    used (with the bundled model), whatever this computer's user chose, and leaves that choice as it was."""
    kept = settings.value(SETTINGS_KEY) if settings.contains(SETTINGS_KEY) else None
    settings.remove(SETTINGS_KEY)

    def put_back() -> None:
        if kept is None:
            settings.remove(SETTINGS_KEY)
        else:
            settings.setValue(SETTINGS_KEY, kept)

    return put_back
