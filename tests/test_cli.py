"""The avfast command."""

import subprocess
import sys

import pytest

from avfast import cli


def test_info_lists_every_backend_of_every_op():
    result = subprocess.run([sys.executable, "-m", "avfast", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "triton", "device", "av_pair_attention float32", "cuda", "triton", "reference"):
        assert word in result.stdout
    assert "* reference" in result.stdout or "* cuda" in result.stdout or "* triton" in result.stdout


def test_info_prints_the_gpu_dispatch_table():
    from avfast import _backend

    result = subprocess.run([sys.executable, "-m", "avfast", "info"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    for op, by_dtype in _backend.GPU_DISPATCH.items():
        for dtype_name, order in by_dtype.items():
            assert f"{op:<22} {dtype_name:<9} {' > '.join(order)}" in result.stdout


def test_gpu_dispatch_table_covers_every_op_and_kernel_dtype():
    """One order per op and kernel dtype, each a permutation of the backends; triton first
    (its kernels run on tensor cores, the CUDA C++ ones on FFMA: static.md)."""
    import torch

    from avfast import _backend
    from avfast.ops import OPS

    assert set(_backend.GPU_DISPATCH) == set(OPS)
    for op in OPS:
        for dtype in _backend.KERNEL_DTYPES:
            order = _backend.gpu_order(op, dtype)
            assert sorted(order) == sorted(_backend.BACKENDS) and order[0] == "triton", (op, dtype, order)
    assert _backend.gpu_order("cosine_lse", torch.float64) == ("reference",)


def test_triton_adapter_width_limit_is_a_reason_naming_r():
    import torch

    from avfast import _backend

    reason = _backend.unavailable_reason("triton", "av_adapter_attention", torch.device("cuda"), torch.bfloat16, r=384)
    assert reason == "triton kernels of av_adapter_attention take r <= 128, got r=384"
    assert _backend.unavailable_reason("triton", "av_adapter_attention", torch.device("cuda"), torch.bfloat16,
                                       r=128) is None


def test_unknown_command_and_benchmark_are_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train-everything"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "no-such-benchmark"])
    with pytest.raises(SystemExit):
        cli.main(["info", "--verbose"])
    assert "invalid choice" in capsys.readouterr().err
