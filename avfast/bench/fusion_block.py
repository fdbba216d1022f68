"""Block-level part of the pair-attention benchmark: one DeepAVFusion dense fusion layer.

Providers (same weights for the dense ones; gradients of the tokens and every parameter):

  upstream_literal          avfast.reference.fusion_blocks.UpstreamDenseFusionBlock (pair tensor)
  upstream_factorized       UpstreamFactorizedFusionBlock: upstream's aggregation-token
                            approximation; x_fusion holds sum(fusion_tkns) tokens
  avfast_dense_reference    avfast.nn.DenseAVFusionBlock, AVFAST_BACKEND=reference (eager peer)
  avfast_dense              avfast.nn.DenseAVFusionBlock, automatic backend
  avfast_dense_compiled     the same under torch.compile
  avfast_dense_cudagraphs   the same under torch.compile(mode="reduce-overhead")

Dims: B batch, F fusion tokens, Nv image tokens, Na audio tokens, D width.
Run through ``avfast.bench.av_pair_attention.run`` (``--level block``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from avfast.bench.common import (
    Case,
    Result,
    Timing,
    auto_backend_note,
    make_step,
    measure_case,
    reset_compiled_state,
)

BLOCK_OP = "dense_fusion_block"
PAIR_OP = "av_pair_attention"  # the op inside the block, for the backend note
BLOCK_PROVIDERS = {  # provider -> kind
    "upstream_literal": "plain",
    "upstream_factorized": "plain",
    "avfast_dense_reference": "plain",
    "avfast_dense": "avfast",
    "avfast_dense_compiled": "avfast",
    "avfast_dense_cudagraphs": "avfast",
}


@dataclass(frozen=True)
class BlockShape:
    B: int
    Na: int
    Nv: int
    F: int
    D: int = 768
    heads: int = 12
    attn_ratio: float = 0.25
    mlp_ratio: float = 1.0
    fusion_tkns: tuple[int, int, int] = (16, 8, 8)  # factorized block: (fusion, image agg, audio agg)

    @property
    def name(self) -> str:
        return f"B{self.B}-Na{self.Na}-Nv{self.Nv}-F{self.F}-D{self.D}"


# VGGSound pretraining (96 audio x 196 image tokens) and fine-tuning crops (19 x 49).
GPU_BLOCK_SHAPES = (BlockShape(64, 96, 196, 16), BlockShape(128, 19, 49, 16))
QUICK_BLOCK_SHAPES = (BlockShape(2, 6, 10, 4, D=64, heads=4, fusion_tkns=(4, 2, 2)),)


def _module_step(module, call, tokens, dout, mode: str, graphs: bool = False):
    """One timed call of ``call(*tokens)``: under no_grad (fwd), or with autograd.grad of
    dout w.r.t. the tokens and ``module``'s parameters (fwd+bwd)."""
    return make_step(call, tokens, mode, leaves=[*tokens, *module.parameters()], dout=dout, cudagraphs=graphs)


def run_case(s: BlockShape, providers, device: torch.device, dtype: torch.dtype,
             timing: Timing) -> tuple[Case, list[Result]]:
    """Measures ``providers`` (names from BLOCK_PROVIDERS) on one shape, fwd and fwd+bwd."""
    from avfast.nn import DenseAVFusionBlock
    from avfast.reference.fusion_blocks import UpstreamDenseFusionBlock, UpstreamFactorizedFusionBlock

    case = Case(BLOCK_OP, s.name, {**asdict(s), "fusion_tkns": list(s.fusion_tkns)})
    torch.manual_seed(0)
    upstream = UpstreamDenseFusionBlock(s.D, s.heads, s.attn_ratio, s.mlp_ratio).to(device=device, dtype=dtype)
    ours = DenseAVFusionBlock.from_upstream(upstream)
    factorized = UpstreamFactorizedFusionBlock(
        s.D, s.heads, s.attn_ratio, s.mlp_ratio, num_fusion_tkns=s.fusion_tkns
    ).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)

    def rand(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    x_image, x_audio = rand(s.B, s.Nv, s.D).requires_grad_(), rand(s.B, s.Na, s.D).requires_grad_()
    x_fusion, dout = rand(s.B, s.F, s.D).requires_grad_(), rand(s.B, s.F, s.D)
    n_fact = sum(s.fusion_tkns)
    x_fusion_fact, dout_fact = rand(s.B, n_fact, s.D).requires_grad_(), rand(s.B, n_fact, s.D)
    dense = (x_fusion, x_image, x_audio)

    def provider(name: str, mode: str):
        """(build, skip reason, note, forced AVFAST_BACKEND: "" = unset (auto))."""
        if name == "upstream_literal":
            return (lambda: _module_step(upstream, upstream, dense, dout, mode)), None, "", None
        if name == "upstream_factorized":
            note = f"approximation: aggregation tokens, x_fusion has {n_fact} tokens {s.fusion_tkns}"
            return (lambda: _module_step(factorized, factorized, (x_fusion_fact, x_image, x_audio), dout_fact, mode),
                    None, note, None)
        if name == "avfast_dense_reference":
            return (lambda: _module_step(ours, ours, dense, dout, mode)), None, "", "reference"
        graphs = name == "avfast_dense_cudagraphs"
        skip = "CUDA graphs need a CUDA device" if graphs and device.type != "cuda" else None

        def build(compiled=name != "avfast_dense"):
            call = ours
            if compiled:
                reset_compiled_state()
                call = torch.compile(ours, dynamic=False, **({"mode": "reduce-overhead"} if graphs else {}))
            return _module_step(ours, call, dense, dout, mode, graphs)

        return build, skip, auto_backend_note(PAIR_OP, device, dtype), ""

    results = measure_case(case, providers, BLOCK_PROVIDERS, provider, device=device, dtype=dtype, timing=timing)
    reset_compiled_state()  # frees this case's CUDA-graph pools
    return case, results
