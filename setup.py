"""Build and install avfast.

The CUDA/C++ extension ``avfast._C`` (sources under csrc/) is built when torch has CUDA
(``torch.version.cuda``) and nvcc is found; otherwise setup says why and installs the
pure-Python package (Triton and reference backends only).

Environment:
  AVFAST_BUILD_CUDA=0     do not build the extension
  TORCH_CUDA_ARCH_LIST    target architectures (default "8.0;9.0": A100 and H100)
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               CUDA toolkit; if unset, found from nvcc on PATH or /usr/local/cuda

  CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=2 \
      pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _log(msg: str) -> None:
    print(f"avfast setup: {msg}", file=sys.stderr)


def _is_cuda_home(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _nvcc_top(nvcc: str) -> str | None:
    """Toolkit root as nvcc reports it; nvcc on PATH may be a wrapper script."""
    try:
        res = subprocess.run(
            [nvcc, "--dryrun", "avfast_probe.cu"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    return os.path.normpath(m.group(1).strip()) if m else None


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit of nvcc on PATH, else /usr/local/cuda."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(_nvcc_top(nvcc))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if _is_cuda_home(c):
            return c
    return None


def _cuda_extension():
    """(ext_modules, cmdclass) for avfast._C, or ([], {}) with the reason printed."""
    if os.environ.get("AVFAST_BUILD_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        _log("AVFAST_BUILD_CUDA=0: not building avfast._C; installing pure Python.")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _log("nvcc not found (CUDA_HOME unset, no nvcc on PATH or at /usr/local/cuda/bin/nvcc): "
             "not building avfast._C; installing pure Python.")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        import torch
    except ImportError:
        _log("torch is not importable (install torch first and use --no-build-isolation): "
             "not building avfast._C; installing pure Python.")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: not building avfast._C; installing pure Python.")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    _log(f"building avfast._C with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list!r}, "
         f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    # Every csrc/**/*.{cpp,cu} except csrc/examples/ (C++ consumers built by CMake).
    sources = sorted(
        s
        for s in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
        + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
        if not s.startswith(os.path.join("csrc", "examples", ""))
    )
    defines = ["-DAVFAST_WITH_CUDA", f'-DAVFAST_CUDA_ARCH_LIST="{arch_list}"']
    ext = CUDAExtension(
        name="avfast._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={
            # No --use_fast_math: the kernels must match the fp32 reference closely.
            "cxx": ["-O3", "-std=c++17", *defines],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *defines],
        },
    )
    class _BuildExt(BuildExtension):
        """csrc/<op>/<op>.cpp and <op>.cu would both compile to <op>.o: keep the suffix."""

        def build_extensions(self):
            orig = self.compiler.object_filenames

            def object_filenames(source_filenames, *args, **kwargs):
                tagged = []
                for src in source_filenames:
                    stem, ext = os.path.splitext(src)
                    tagged.append(f"{stem}_{ext[1:]}{ext}")
                return orig(tagged, *args, **kwargs)

            self.compiler.object_filenames = object_filenames
            super().build_extensions()

    return [ext], {"build_ext": _BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="avfast",
    version="0.1.0",
    description="Fused audio-visual attention ops (exact dense AV pair attention, "
    "blockwise contrastive loss, AV-adapter) for PyTorch",
    packages=find_packages(include=["avfast", "avfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "triton", "numpy<2.4", "timm", "av", "tqdm"],
    extras_require={"dali": ["nvidia-dali-cuda130==2.4.0"],
                    "text": ["open_clip_torch==3.3.0", "transformers==5.25.0"]},
    entry_points={"console_scripts": ["avfast = avfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
