"""Smoke test of the blockwise_infonce benchmark on CPU (Triton through TRITON_INTERPRET=1,
set by conftest). Never asserts timings."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from avfast import _backend
from avfast.bench import blockwise_infonce as bench
from avfast.bench import common

MUST_RUN = {"upstream_eager", "upstream_compiled", "avfast_auto"}  # plain PyTorch or the CPU reference
SHAPES = bench.QUICK_SHAPES[:1]  # one case: torch.compile on CPU dominates the run time


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_infonce")
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--cases", SHAPES[0].name])
    return rc, out, json.loads((out / "blockwise_infonce.json").read_text())


def test_quick_cpu_run(quick_run):
    rc, out, payload = quick_run
    assert rc == 0 and payload["check"]["passed"]
    checked = {e["provider"]: e for e in payload["check"]["results"]}
    assert checked["upstream_eager"]["result"] == "PASS"
    assert checked["avfast_reference"]["result"] == "PASS"
    assert checked["avfast_auto"]["result"] == "PASS"
    triton_ok = _backend.unavailable_reason("triton", bench.BACKEND_OP, torch.device("cpu"), torch.float32) is None
    if triton_ok:
        assert checked["avfast_triton"]["result"] == "PASS", checked["avfast_triton"]

    rows = payload["rows"]
    assert all(r["status"] in {"ok", "skip", "oom", "error"} for r in rows)
    for shape in SHAPES:
        for provider in bench.PROVIDERS:
            for mode in common.MODES:
                hit = [r for r in rows if (r["case"], r["provider"], r["mode"]) == (shape.name, provider, mode)]
                assert len(hit) == 1, (shape.name, provider, mode)
                row = hit[0]
                assert row["op"] == bench.OP and row["kind"] == bench.PROVIDERS[provider]
                if provider in MUST_RUN or (provider == "avfast_triton" and triton_ok):
                    assert row["status"] == "ok", row
                    assert row["median_ms"] is not None and row["p20_ms"] is not None
                if provider.endswith("cudagraphs") or (provider == "inf_cl" and not importlib.util.find_spec("inf_cl")):
                    assert row["status"] == "skip", row
                for key in ("gpu", "torch", "triton", "dtype", "shape", "commit"):
                    assert key in row
    assert payload["metadata"]["gpu"] == "cpu"
    cases = {c["name"]: c for c in payload["cases"]}
    assert set(cases) == {s.name for s in SHAPES}
    assert all(c["hbm_floor_ms"]["fwd+bwd"] > 0 and c["matmul_floor_ms"]["fwd+bwd"] > 0 for c in cases.values())

    md = (out / "blockwise_infonce.md").read_text()
    assert "Check (PASSED)" in md and "NOT the GPU benchmark" in md and "## Floors" in md
    for shape in SHAPES:
        assert f"### {shape.name}" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "blockwise_infonce.png").stat().st_size > 0


def test_floor_formulas():
    s = bench.LossShape(K=3, B=5, d=7)
    assert bench.hbm_bytes(s, 2) == {"fwd": 2 * 2 * 105, "fwd+bwd": 2 * 3 * 2 * 105}
    assert bench.matmul_flops(s) == {"fwd": 2 * 3 * 25 * 7, "fwd+bwd": 8 * 3 * 25 * 7}


def test_upstream_formulation_equals_reference():
    g = torch.Generator().manual_seed(0)
    z_a, z_v = torch.randn(2, 4, 9, 12, generator=g, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    from avfast.reference.blockwise_infonce import blockwise_infonce as ref

    for reduction in ("mean", "none"):
        torch.testing.assert_close(bench.upstream_loss(z_a, z_v, valid, reduction),
                                   ref(z_a, z_v, valid=valid, tau=bench.TAU, reduction=reduction))
