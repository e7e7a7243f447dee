"""The module panel's one binding to its parameter node, kept across enter(), exit() and scene close.

``parameterNodeWrapper``'s ``connectGui`` returns the tag that ``disconnectGui`` needs only from
Slicer 5.10 on; in 5.6 and 5.8 it returns None and a binding cannot be undone, so a panel that
connects on every ``enter()`` (as Slicer's module template does) piles up live bindings. Here a
binding is made once per parameter node: a new wrapper of the node already bound reuses the bound
wrapper, and a binding is undone only where Slicer returned its tag. Qt-free.
"""
from __future__ import annotations

from typing import Any, Optional


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
