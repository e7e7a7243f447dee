"""The Slicer adapter: the only code that imports slicer (MRML nodes, the module's logic)."""
