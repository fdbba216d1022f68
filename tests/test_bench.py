"""Smoke test of the benchmark harness on CPU (the kernels through TRITON_INTERPRET=1,
set by conftest). Never asserts timings."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from avfast import _backend
from avfast.bench import av_pair_attention as bench
from avfast.bench import common, fusion_block

STATUSES = {"ok", "skip", "oom", "error"}
# Plain-PyTorch eager providers, which must run anywhere.
MUST_RUN = {"literal", "avfast_reference", "two_sdpa", "upstream_literal", "upstream_factorized",
            "avfast_dense_reference", "avfast_dense"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    return rc, out, json.loads((out / "av_pair_attention.json").read_text())


def test_quick_cpu_run(quick_run):
    rc, out, payload = quick_run
    assert rc == 0
    assert payload["check"]["passed"]
    checked = {e["provider"]: e for e in payload["check"]["results"]}
    assert checked["avfast_reference"]["result"] == "PASS"
    for backend in ("triton", "cuda"):
        if _backend.unavailable_reason(backend, bench.OP, torch.device("cpu"), torch.float32) is None:
            assert checked[f"avfast_{backend}"]["result"] == "PASS", checked[f"avfast_{backend}"]

    rows = payload["rows"]
    assert all(r["status"] in STATUSES for r in rows)
    assert all((r["status"] == "ok") == (r["error"] is None) for r in rows)
    for op, shapes, providers in ((bench.OP, bench.QUICK_OP_SHAPES, bench.OP_PROVIDERS),
                                  (fusion_block.BLOCK_OP, fusion_block.QUICK_BLOCK_SHAPES, fusion_block.BLOCK_PROVIDERS)):
        for shape in shapes:
            for provider in providers:
                for mode in common.MODES:
                    hit = [r for r in rows if (r["op"], r["case"], r["provider"], r["mode"])
                           == (op, shape.name, provider, mode)]
                    assert len(hit) == 1, (op, shape.name, provider, mode)
                    row = hit[0]
                    if provider in MUST_RUN:
                        assert row["status"] == "ok", row
                        assert row["median_ms"] is not None and row["p20_ms"] is not None
                    if provider in ("avfast_triton", "avfast_cuda"):
                        backend = provider.removeprefix("avfast_")
                        if _backend.unavailable_reason(backend, bench.OP, torch.device("cpu"), torch.float32) is None:
                            assert row["status"] == "ok", row
                    if provider.endswith("cudagraphs"):
                        assert row["status"] == "skip"
                    for key in ("gpu", "torch", "triton", "dtype", "shape", "commit"):
                        assert key in row
    assert payload["metadata"]["gpu"] == "cpu"
    assert any("NOT the GPU benchmark" in n for n in payload["metadata"]["notes"])

    md = (out / "av_pair_attention.md").read_text()
    assert "Kernel check (PASSED)" in md and "NOT the GPU benchmark" in md
    for shape in (*bench.QUICK_OP_SHAPES, *bench.QUICK_BLOCK_SHAPES):
        assert f"### {shape.name}" in md
    assert "HBM floor" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "av_pair_attention.png").stat().st_size > 0


def test_hbm_floor_formula():
    s = bench.PairShape(B=2, Na=3, Nv=5, F=7, H=11, Dq=16, Dv=8)
    inputs = 2 * 7 * 11 * 16 + 2 * (3 + 5) * 11 * (16 + 8) + 11 * 8
    out = 2 * 7 * 11 * 8
    assert bench.hbm_bytes(s, 2) == {"fwd": 2 * (inputs + out), "fwd+bwd": 2 * (3 * inputs + 2 * out)}


def test_device_slug_and_merge():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.peak_hbm("NVIDIA H100 80GB HBM3")[1] == 3.35e12

    def row(provider, ms):
        return {"op": "x", "provider": provider, "kind": "plain", "mode": "fwd", "case": "c",
                "status": "ok", "median_ms": ms}

    old = {"rows": [row("a", 1.0), row("b", 2.0)], "cases": [{"op": "x", "name": "c"}]}
    new = {"metadata": {}, "rows": [row("b", 3.0)], "cases": [{"op": "x", "name": "c"}]}
    merged = common.merge_payload(old, new)
    assert sorted((r["provider"], r["median_ms"]) for r in merged["rows"]) == [("a", 1.0), ("b", 3.0)]
    assert len(merged["cases"]) == 1


def test_markdown_speedup_and_errors():
    base = {"op": "x", "case": "c", "shape": {}, "note": "", "peak_mem_mb": 1.0, "error": None}
    rows = [
        {**base, "provider": "peer", "kind": "plain", "mode": "fwd", "status": "ok", "median_ms": 2.0},
        {**base, "provider": "slow", "kind": "plain", "mode": "fwd", "status": "ok", "median_ms": 8.0},
        {**base, "provider": "ours", "kind": "avfast", "mode": "fwd", "status": "ok", "median_ms": 0.5},
        {**base, "provider": "ours", "kind": "avfast", "mode": "fwd+bwd", "status": "oom",
         "median_ms": None, "error": "OutOfMemoryError: boom"},
    ]
    md = common.markdown({"metadata": {"device": "cuda"}, "rows": rows, "cases": []}, "t")
    assert "| ours | 0.500 | oom |" in md and "4.00×" in md
    assert "- ours, fwd+bwd: oom: OutOfMemoryError: boom" in md


def test_run_provider_records_failures():
    case = common.Case("x", "c", {"n": 1})

    def build():
        def step():
            raise RuntimeError("unsupported shape\nmore")
        return step

    r = common.run_provider(case, "p", "plain", "fwd", build, device=torch.device("cpu"),
                            dtype=torch.float32, timing=common.Timing(warmup_calls=1, cpu_reps=1))
    assert r.status == "error" and r.error == "RuntimeError: unsupported shape"
    r = common.run_provider(case, "p", "plain", "fwd", build, device=torch.device("cpu"),
                            dtype=torch.float32, timing=common.Timing(), skip="no backend")
    assert r.status == "skip" and r.error == "no backend" and r.median_ms is None
