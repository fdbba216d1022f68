"""The ``avfast`` command (also ``python -m avfast``).

    avfast info                      versions, device, and which backend serves each op
    avfast bench pair-attention ...  the av_pair_attention benchmark (a kernel-vs-reference
                                     check on CPU when no GPU is present)
    avfast bench blockwise-infonce . the blockwise_infonce benchmark (likewise)
    avfast bench av-adapter ...      the STG-CMA AV-Adapter benchmark (likewise)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

BENCHMARKS = {
    "pair-attention": "avfast.bench.av_pair_attention",
    "blockwise-infonce": "avfast.bench.blockwise_infonce",
    "av-adapter": "avfast.bench.av_adapter",
}
HOST_RUN = {  # what a forced kernel backend does with CPU tensors
    "cuda": "available when forced: the CUDA kernels' code run serially on the host (for tests)",
    "triton": "available when forced: the Triton interpreter (for tests)",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    import torch

    from avfast import __version__, _backend
    from avfast.ops import OPS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = [
        ("avfast", __version__),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none"),
        ("triton", _version("triton")),
        ("timm", _version("timm")),
        ("DALI", _version("nvidia-dali-cuda130")),
        ("device", torch.cuda.get_device_name() if cuda else "cpu (no CUDA GPU)"),
        ("avfast._C", "loaded" if _backend._C is not None else _backend._C_ERROR),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nbackends on {device} (auto choice marked *; AVFAST_BACKEND={os.environ.get('AVFAST_BACKEND', '')}):")
    for op in OPS:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                chosen = _backend.select(op, device, dtype)
            except (RuntimeError, ValueError) as err:
                chosen = f"error: {err}"
            print(f"  {op} {str(dtype).removeprefix('torch.')}:")
            for backend in _backend.BACKENDS:
                reason = _backend.unavailable_reason(backend, op, device, dtype)
                status = reason or "available"
                if reason is None and device.type == "cpu" and backend != "reference":
                    status = HOST_RUN[backend]
                print(f"    {'*' if backend == chosen else ' '} {backend:<9} {status}")
    return 0


def _device_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--device" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def bench(name: str, args: list[str]) -> int:
    import torch  # does not import triton

    device = _device_arg(args)
    if device is None and not torch.cuda.is_available():
        print("No CUDA GPU: running the CPU kernel-vs-reference check (quick mode); "
              "its timings are not the GPU benchmark.")
        device, args = "cpu", ["--device", "cpu", "--quick", *args]
    if device is not None and device.startswith("cpu"):
        # Triton kernels run through the interpreter on CPU; set before triton loads them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(BENCHMARKS[name])
    return module.main(args) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avfast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and the backend of each op")
    p_bench = sub.add_parser("bench", help="run a benchmark; arguments after the name go to it")
    p_bench.add_argument("name", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    return bench(args.name, rest)


if __name__ == "__main__":
    sys.exit(main())
