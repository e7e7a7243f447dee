"""The module panel's binding to its parameter node: one, kept across enter(), exit() and scene close, and when a
typed path reaches it (:func:`takes_path_now`).

``parameterNodeWrapper``'s ``connectGui`` returns the tag that ``disconnectGui`` needs only from
Slicer 5.10 on; in 5.6 and 5.8 it returns None and a binding cannot be undone, so a panel that
connects on every ``enter()`` (as Slicer's module template does) piles up live bindings. Here a
binding is made once per parameter node: a new wrapper of the node already bound reuses the bound
wrapper, and a binding is undone only where Slicer returned its tag. Qt-free.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

MODEL_PATH = "modelPath"  # the parameter whose file the panel reads (the other path fields are where a model goes)


def typed_path(text: str) -> Path:
    """The file a path typed in the panel names (model or output): ``~`` and ``~user`` expanded as a shell would, a
    ``~user`` of no such user left as typed (``Path.expanduser`` raises there)."""
    return Path(os.path.expanduser(text))


def takes_path_now(field: str, text: str, typed: bool, finished: bool) -> bool:
    """Whether the parameter ``field`` takes its path field's ``text`` now. A change the user did not type (a file
    dialog, the field's history, the panel itself) and the end of typing (``finished``: Enter, or the field left)
    always; while ``typed``, a save-as path too (its checks only look at the path), but the model path only once it
    names a file: each value it takes is read and its problem put on the status line, which said "does not exist" at
    every keystroke."""
    return finished or not typed or field != MODEL_PATH or typed_path(text).is_file()


class GuiBinding:
    """Which parameter-node wrapper the panel is bound to (at most one live binding per node)."""

    def __init__(self) -> None:
        self.wrapper: Optional[Any] = None
        self._tag: Optional[Any] = None

    def bind(self, wrapper: Optional[Any], gui: Any) -> Optional[Any]:
        """Bind ``gui`` to ``wrapper``'s parameter node; the wrapper to use (the one already bound to that
        node, if any). None unbinds where possible and returns None."""
        if wrapper is None:
            self.release()
            return None
        if self.wrapper is not None and self.wrapper.parameterNode is wrapper.parameterNode:
            return self.wrapper
        self.release()
        self._tag = wrapper.connectGui(gui)
        self.wrapper = wrapper
        return wrapper

    def release(self) -> None:
        """Undo the binding if Slicer can (5.10+). In 5.6 and 5.8 it stays, and binding the same node
        again reuses it instead of adding a second one."""
        if self.wrapper is not None and self._tag is not None:
            self.wrapper.disconnectGui(self._tag)
            self.wrapper, self._tag = None, None
