"""Replot a results JSON written by an avfast benchmark (no GPU needed; needs matplotlib).

    python benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3/av_pair_attention.json [out.png]

The PNG defaults to the JSON's path with a .png suffix.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avfast.bench.common import plot_results  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    json_path = Path(argv[0])
    png_path = Path(argv[1]) if len(argv) > 1 else json_path.with_suffix(".png")
    if plot_results(json_path, png_path):
        print(f"wrote {png_path}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
