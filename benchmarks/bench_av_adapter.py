"""Runs `avfast bench av-adapter` from this checkout; see benchmarks/README.md.

    TRITON_INTERPRET=0 python benchmarks/bench_av_adapter.py          # GPU
    python benchmarks/bench_av_adapter.py --quick --device cpu       # CPU check and smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avfast.cli import main  # noqa: E402  (the CLI picks the Triton mode before triton loads)

sys.exit(main(["bench", "av-adapter", *sys.argv[1:]]))
