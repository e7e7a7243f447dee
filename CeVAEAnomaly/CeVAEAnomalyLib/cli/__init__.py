"""The ``cevae-anomaly`` command line (parser, commands, cohort batch)."""
from .main import main

__all__ = ["main"]
