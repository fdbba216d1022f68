"""Run the test suite once per seed: ``python3 tests/seed_sweep.py --seeds 20``.

Each run sets ``AVFAST_TEST_SEED`` (the seed of every ``fresh_seed()`` draw, of the modules'
``module_seed()`` constants and of the fuzz), so a failure names the seed that replays it.
``--seeded-only`` runs just the files that use either (the other tests do not depend on
the seed). Prints one line per seed (passed / failed, wall time) and exits 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def seeded_files() -> list[str]:
    return sorted(str(p) for p in TESTS.glob("test_*.py")
                  if "fresh_seed(" in p.read_text() or "module_seed(" in p.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="number of seeds (20)")
    ap.add_argument("--first", type=int, help="seeds first, first+1, ... (default: drawn at random)")
    ap.add_argument("--seeded-only", action="store_true", help="only the files that call fresh_seed() or module_seed()")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds: expected >= 1, got {args.seeds}")
    seeds = ([args.first + i for i in range(args.seeds)] if args.first is not None
             else [random.SystemRandom().randrange(2**32) for _ in range(args.seeds)])
    targets = seeded_files() if args.seeded_only else [str(TESTS)]
    failed, start = [], time.perf_counter()
    for seed in seeds:
        tick = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets,
                              *args.pytest_args], env={**os.environ, "AVFAST_TEST_SEED": str(seed)},
                             capture_output=True, text=True)
        summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"AVFAST_TEST_SEED={seed}: {'passed' if run.returncode == 0 else 'FAILED'} "
              f"in {time.perf_counter() - tick:.0f} s: {summary}", flush=True)
        if run.returncode != 0:
            failed.append(seed)
            print(run.stdout[-4000:], flush=True)
    print(f"{len(seeds)} seeds, {len(failed)} failed {failed}, {time.perf_counter() - start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
