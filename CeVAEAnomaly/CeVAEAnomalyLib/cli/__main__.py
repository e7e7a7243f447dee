"""``python -m CeVAEAnomalyLib.cli``: the cevae-anomaly command."""
import sys

from .main import main

sys.exit(main())
