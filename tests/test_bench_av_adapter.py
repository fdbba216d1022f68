"""Smoke test of the AV-Adapter benchmark on CPU (Triton through TRITON_INTERPRET=1, set
by conftest). Never asserts timings."""

from __future__ import annotations

import json

import pytest
import torch

from avfast import _backend
from avfast.bench import av_adapter as bench
from avfast.bench import common

SHAPE = bench.QUICK_SHAPES[0]  # one case, and no upstream_compiled: a cold inductor compile on CPU alone
# takes ~20 s. upstream_eager must run anywhere; the avfast rows run or skip with the backend's reason
PROVIDERS = ("upstream_eager", "upstream_cudagraphs", "avfast_triton", "avfast_cuda", "avfast_cudagraphs")


def _available(backend: str) -> bool:
    return _backend.unavailable_reason(backend, bench.BACKEND_OP, torch.device("cpu"), torch.float32) is None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_av_adapter")
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--cases", SHAPE.name,
                     "--providers", ",".join(PROVIDERS)])
    return rc, out, json.loads((out / "av_adapter.json").read_text())


def test_quick_cpu_run(quick_run):
    rc, out, payload = quick_run
    assert rc == 0 and payload["check"]["passed"]
    checked = {e["provider"]: e for e in payload["check"]["results"]}
    assert checked["upstream_eager"]["result"] == "PASS"
    assert checked["avfast_reference"]["result"] == "PASS"
    for backend in ("triton", "cuda"):
        entry = checked[f"avfast_{backend}"]
        assert entry["result"] == ("PASS" if _available(backend) else "SKIP"), entry

    rows = payload["rows"]
    assert all(r["status"] in {"ok", "skip", "oom", "error"} for r in rows)
    for provider in PROVIDERS:
        for mode in common.MODES:
            hit = [r for r in rows if (r["case"], r["provider"], r["mode"]) == (SHAPE.name, provider, mode)]
            assert len(hit) == 1, (provider, mode)
            row = hit[0]
            assert row["op"] == bench.OP and row["kind"] == bench.PROVIDERS[provider]
            backend = bench.FORCED_BACKEND.get(provider)
            if provider == "upstream_eager" or (backend and _available(backend)):
                assert row["status"] == "ok", row
                assert row["median_ms"] is not None and row["p20_ms"] is not None
            elif provider.endswith("cudagraphs"):
                assert row["status"] == "skip" and "CUDA graphs" in row["error"], row
            else:
                assert row["status"] == "skip" and row["error"], row
            for key in ("gpu", "torch", "triton", "dtype", "shape", "commit", "hbm_floor_ms"):
                assert key in row
    assert payload["metadata"]["gpu"] == "cpu"
    (case,) = payload["cases"]
    assert case["name"] == SHAPE.name and case["hbm_floor_ms"]["fwd+bwd"] > case["hbm_floor_ms"]["fwd"] > 0

    md = (out / "av_adapter.md").read_text()
    assert "Check (PASSED)" in md and "NOT the GPU benchmark" in md and f"### {SHAPE.name}" in md


def test_hbm_formula():
    s = bench.AdapterShape(N=2, Lv=3, La=4, D=5, r=6)
    tokens, weights = 2 * 7 * 5, 2 * (2 * 5 * 6 + 6 + 5)
    assert bench.hbm_bytes(s, 2) == {"fwd": 2 * (2 * tokens + weights), "fwd+bwd": 2 * (5 * tokens + 3 * weights)}


def test_upstream_formulation_equals_module_float64():
    module, inputs, _ = bench._setup(bench.AdapterShape(3, 5, 2, 16, 4), "cpu", torch.float64)
    want = bench.upstream_av_adapter(module, *inputs)
    got = module(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_unknown_provider_is_rejected():
    with pytest.raises(ValueError, match="unknown providers"):
        bench.run(device="cpu", quick=True, providers=["nope"])
