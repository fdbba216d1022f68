"""Benchmark the blockwise contrastive loss (MA-AVT); see benchmarks/README.md.

    TRITON_INTERPRET=0 python benchmarks/bench_blockwise_infonce.py            # GPU
    python benchmarks/bench_blockwise_infonce.py --quick --device cpu         # CPU smoke check

Thin wrapper around ``avfast.bench.blockwise_infonce.main`` (also ``python -m
avfast.bench.blockwise_infonce``) that benchmarks this checkout's avfast.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _wants_cpu(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1].startswith("cpu")
        if arg.startswith("--device="):
            return arg.split("=", 1)[1].startswith("cpu")
    import torch  # importing torch does not import triton

    return not torch.cuda.is_available()


if __name__ == "__main__":
    # On CPU the Triton kernels run through the interpreter, which must be chosen before
    # triton is imported (``import avfast`` imports it).
    if _wants_cpu(sys.argv[1:]):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from avfast.bench.blockwise_infonce import main

    sys.exit(main(sys.argv[1:]))
