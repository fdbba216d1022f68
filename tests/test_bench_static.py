"""The static GPU-fitness gate's parts: parsers, occupancy, work models and the gate rules.
(CI runs the whole gate, `avfast bench static`, outside pytest: it compiles real kernels,
which the interpreter that tests run under cannot.)"""

import pytest

from avfast.bench import static

SASS = """
        code for sm_90
                Function : _cosine_lse_fwd_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/              @P0  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   FFMA R2, R3, R4, R5 ;
        /*0040*/                   MUFU.EX2 R6, R7 ;
        /*0050*/                   STL [R1], R2 ;
                Function : other_kernel
        /*0000*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
"""
PTXAS = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 98304 bytes smem"""


def test_sass_counts_per_function():
    counts = static.sass_counts(SASS)
    assert counts["_cosine_lse_fwd_kernel"] == {"total": 6, "HGMMA": 2, "FFMA": 1, "MUFU.EX2": 1, "STL": 1}
    assert counts["other_kernel"] == {"total": 1, "HMMA": 1}


def test_ptxas_usage_reads_registers_and_spills():
    assert static.ptxas_usage(PTXAS) == {"regs": 255, "stack": 40, "spill_stores": 36, "spill_loads": 28}
    assert static.ptxas_usage("ptxas info    : Used 64 registers")["spill_stores"] == 0


def test_occupancy_limits():
    h100 = static.GPUS["sm_90"]
    assert static.occupancy(255, 8, 98304, h100) == (1, "regs")
    assert static.occupancy(64, 4, 200 * 1024, h100) == (1, "smem")
    assert static.occupancy(24, 4, 0, h100) == (16, "warps")


def test_tensor_core_kind_from_sass():
    assert static._tensor_core({"HGMMA": 4}, "bf16") == "HGMMA"
    assert static._tensor_core({"HGMMA": 4}, "tf32") == "HGMMA.tf32"
    assert static._tensor_core({"HMMA": 4}, "bf16") == "HMMA"
    assert static._tensor_core({"FFMA": 9}, "fp32") == "FFMA"


def test_gemm_work_counts_padded_tiles_and_l2_rereads():
    flops, l2 = static._gemm_tiles(130, 256, 100, 128, 128, 64, 2)
    assert flops == 2 * 256 * 256 * 128
    assert l2 == 2 * 2 * (128 + 128) * 128 * 2


def _row(kernel="k", dtype="bf16", programs=200, spills=0, case="c", error=None):
    row = {"op": "op", "case": case, "dtype": dtype, "kernel": kernel, "programs": programs}
    for target in static.TARGETS:
        row[target] = {"error": error} if error else {"spill_stores": spills, "sm_waves": round(programs / 132, 2)}
    return row


def _case(fills=True, ratio=None):
    return static.StaticCase("op", "c", {}, lambda *a, **k: None, (1.0, 1.0), fills=fills, max_floor_ratio=ratio)


def test_gate_passes_a_clean_row_and_names_each_failure():
    assert static.gate([_case()], [_row()], [], {}) == []
    failures = static.gate([_case()], [_row(spills=16), _row(programs=48), _row(dtype="fp32", spills=8),
                                       _row(error="boom")], [], {})
    assert failures[0] == "k [op c, bf16]: spills 16 B/thread on sm_90 (expected 0)"
    assert failures[1] == "k [op c, bf16]: 48 programs on 132 SMs (0.36 waves, expected >= 1)"
    assert "compile for sm_90 failed: boom" in failures[2] and len(failures) == 4  # fp32 spills pass
    assert static.gate([_case(fills=False)], [_row(programs=48)], [], {}) == []


def test_gate_on_the_floor_ratio_and_cuda_build():
    summary = {"op": "op", "case": "c", "dtype": "bf16", "bound_us": 30.0, "gemm_floor_us": 10.0, "floor_ratio": 3.0,
                   "max_floor_ratio": 1.5}
    (failure,) = static.gate([_case()], [], [summary], {})
    assert failure == "op [c, bf16]: static bound 30.0 us is 3.0x the GEMM floor 10.0 us (expected <= 1.5x)"
    assert static.gate([_case()], [], [dict(summary, dtype="fp32")], {}) == []
    assert static.gate([_case()], [], [], {"x.cu": {"error": "nvcc: no"}}) == ["CUDA C++ x.cu: nvcc failed: nvcc: no"]


@pytest.mark.parametrize("op", ["av_pair_attention", "cosine_lse", "av_adapter_attention"])
def test_every_op_has_cases_and_a_work_model(op):
    chosen = [c for c in static.cases() if c.op == op]
    assert chosen and all(c.flops[0] > 0 and c.flops[1] > 0 for c in chosen)


def test_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert static.main(["--out", "unused"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
