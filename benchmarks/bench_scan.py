"""The scan benchmark suite from a checkout: `cigma-ray bench`, with results kept next to this file.

    python benchmarks/bench_scan.py [cigma-ray bench options, e.g. --device cuda --model vit_base_patch16_224]

Forward rate, paper-style loop, engine scan and mask stage, measured together (cigma_ray/bench/suite.py);
the JSON and PNG go to benchmarks/results/ wherever it is run from.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cigma_ray.cli import main

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    sys.exit(main(["bench", "--results", str(RESULTS), *sys.argv[1:]]))
