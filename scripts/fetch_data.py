#!/usr/bin/env python3
"""Download and derive the healthy T1 sample data (colin27, mni152, robex) into DEST.

Usage: python scripts/fetch_data.py DEST [--names colin27 robex]
       python scripts/fetch_data.py DEST --names cortex_s1 brainbrowser1 brainbrowser2   # the benchmark's extra heads
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CeVAEAnomaly"))

from CeVAEAnomalyLib.errors import CeVAEError  # noqa: E402
from CeVAEAnomalyResearch.sampledata import EXTRA_NAMES, NAMES, fetch_healthy_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="output folder")
    parser.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES + EXTRA_NAMES,
                        help="subjects to fetch (default: the three of the demo and tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetch_healthy_data(args.dest, args.names)
    except CeVAEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
