"""Benchmark: one training step of each method, upstream's formulation against avfast.

A step is forward + the method's loss (mode ``fwd``, under no_grad: an evaluation step)
or forward + loss + backward into every trainable parameter (mode ``fwd+bwd``: the
training step without the optimizer, which is the same for all providers). Same model
weights, same random batch, bf16 autocast on CUDA (fp32 weights, as in training).

  upstream_eager      avfast.bench.upstream.<method>: upstream's formulation on our weights
                      (two frozen-ViT passes and per-block logits for MA-AVT, the
                      materialised pair tensor for dense DeepAVFusion, (L, B*T, D) blocks
                      with bmm attention for STG-CMA, ...)
  upstream_compiled   the same under torch.compile
  avfast              the avfast model (fused ops, automatic backend)
  avfast_compiled     the avfast model under torch.compile

Cases are the upstream ViT-B configurations (ViT-L for STG-CMA too) at upstream's
per-GPU batch; ``--quick`` runs the tiny configs. Targets (issue 6), per method:
avfast (best of eager/compiled) >= 2x upstream_eager's fwd+bwd speed and <= 0.6x its
peak memory. Results: benchmarks/results/<device>/train_step.{json,md,png}.

Usage: ``avfast bench train-step [--quick] [--cases mavt,stgcma] [--device cpu]``
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import partial
from typing import Any

import torch

from avfast.bench.common import (Case, bench_main, bench_parser, build_payload, keep_cases, measure_case,
                                 prepare_run, reset_compiled_state, run_cases, write_results)
from avfast.models import build_model

OP = "train_step"
PROVIDERS = {"upstream_eager": "plain", "upstream_compiled": "plain", "avfast": "avfast",
             "avfast_compiled": "avfast"}
UPSTREAM = {"mavt": "UpstreamMAVT", "stgcma": "UpstreamSTGCMA", "deepavfusion": "UpstreamDeepAVFusion",
            "dgsct": "UpstreamDGSCT"}
AUDIO_SHAPES = {"deepavfusion": (1, 128, 192), "mavt": (1, 224, 224), "stgcma": (10, 102, 128),
                "dgsct": (10, 32000)}
FRAMES = {"deepavfusion": 1, "mavt": 1, "stgcma": 10, "dgsct": 10}


@dataclasses.dataclass(frozen=True)
class StepCase:
    method: str
    size: str
    batch: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        extra = "".join(f"-{v}" for _, v in self.overrides)
        return f"{self.method}-{self.size}{extra}-B{self.batch}"


# upstream's per-GPU batches: MA-AVT 256 over 4 GPUs; DeepAVFusion fine-tune 32; STG-CMA 1 clip
# (10 frames; 4 here); DG-SCT 8. Dense DeepAVFusion is the one that materialises pairs upstream.
GPU_CASES = (
    StepCase("mavt", "base", 64),
    StepCase("deepavfusion", "base", 32, (("fusion_arch", "factorized"),)),
    StepCase("deepavfusion", "base", 32, (("fusion_arch", "dense"),)),
    StepCase("stgcma", "base", 4),
    StepCase("stgcma", "large", 4),
    StepCase("dgsct", "base", 8),
)
QUICK_CASES = (
    StepCase("mavt", "tiny", 2),
    StepCase("deepavfusion", "tiny", 2, (("fusion_arch", "dense"),)),
    StepCase("stgcma", "tiny", 1),
    StepCase("dgsct", "tiny", 1),
)


def upstream_of(method: str, model):
    """Upstream's formulation sharing ``model``'s parameters."""
    module = importlib.import_module(f"avfast.bench.upstream.{method}")
    return getattr(module, UPSTREAM[method])(model)


def make_batch(case: StepCase, model, device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random batch shaped like the loaders' for ``case.method``."""
    b, size = case.batch, model.config.img_size
    t = FRAMES[case.method]
    num_classes = model.config.num_classes

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    batch = {"frames": randn(b, t, 3, size, size), "audio": randn(b, *AUDIO_SHAPES[case.method]),
             "label": torch.randint(0, num_classes, (b,), generator=generator).to(device),
             "background": (torch.rand(b, generator=generator) < 0.2).to(device)}
    if t > 1:
        batch["segment_labels"] = torch.randint(0, num_classes, (b, t), generator=generator).to(device)
    return batch


def _step(f, model, batch: dict, mode: str, autocast: bool):
    """One call: forward + loss (no_grad for fwd), plus backward for fwd+bwd."""
    def run():
        with torch.autocast(batch["frames"].device.type, dtype=torch.bfloat16, enabled=autocast):
            if mode == "fwd":
                with torch.no_grad():
                    return model.loss(f(batch["frames"], batch["audio"]), batch)[0]
            loss = model.loss(f(batch["frames"], batch["audio"]), batch)[0]
        for p in model.trainable_parameters():
            p.grad = None
        loss.backward()
        return loss
    return run


def _provider(model, upstream, batch, autocast, name: str, mode: str):
    """(build, skip, note, forced backend) of one provider."""
    target = upstream if name.startswith("upstream") else model

    def build():
        reset_compiled_state()
        f = torch.compile(target) if name.endswith("compiled") else target
        return _step(f, target, batch, mode, autocast)

    return build, None, "", None


def _run_case(c: StepCase, providers, run) -> tuple[Case, list]:
    gen = torch.Generator().manual_seed(0)
    model = build_model(c.method, c.size, **dict(c.overrides)).to(run.device)
    model.train()
    upstream = upstream_of(c.method, model)
    batch = make_batch(c, model, run.device, gen)
    autocast = run.device.type == "cuda" and run.dtype == torch.bfloat16
    trainable = sum(p.numel() for p in model.trainable_parameters())
    case = Case(OP, c.name, {"method": c.method, "size": c.size, "batch": c.batch, **dict(c.overrides),
                             "trainable_params": trainable})
    results = measure_case(case, providers, PROVIDERS, partial(_provider, model, upstream, batch, autocast),
                           device=run.device, dtype=run.dtype, timing=run.timing)
    del model, upstream, batch
    reset_compiled_state()
    return case, results


def check(device) -> dict[str, Any]:
    """Loss and gradients of avfast vs upstream's formulation, float32, tiny configs, eval mode
    (no dropout): the benchmark compares the same computation."""
    entries, passed = [], True
    for c in QUICK_CASES:
        gen = torch.Generator().manual_seed(1)
        model = build_model(c.method, "tiny", **dict(c.overrides)).to(device).eval()
        upstream = upstream_of(c.method, model)
        batch = make_batch(c, model, device, gen)
        losses, grads = [], []
        for f in (upstream, model):
            for p in model.trainable_parameters():
                p.grad = None
            loss = f.loss(f(batch["frames"], batch["audio"]), batch)[0]
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                          for p in model.trainable_parameters()])
        loss_err = abs(losses[0] - losses[1]) / max(1.0, abs(losses[0]))
        grad_err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(*grads))
        ok = loss_err <= 1e-4 and grad_err <= 1e-3
        passed &= ok
        entries.append({"case": c.name, "loss_rel_err": loss_err, "grad_rel_err": grad_err, "passed": ok})
        print(f"check {c.name}: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e} {'ok' if ok else 'FAILED'}")
    return {"passed": passed, "entries": entries}


def run(device=None, dtype=None, quick=False, out_dir=None, providers=None, cases=None) -> dict[str, Any]:
    bench = prepare_run("avfast bench train-step", device, dtype, quick, out_dir, providers, list(PROVIDERS),
                        notes=["A step = forward + loss (fwd, no_grad) and + backward (fwd+bwd); the optimizer "
                               "is left out (the same for every provider)."], cpu_detail="models on the CPU")
    chosen = keep_cases(QUICK_CASES if quick else GPU_CASES, cases)
    names = providers or list(PROVIDERS)
    if quick and bench.device.type == "cpu" and not providers:  # torch.compile on CPU takes minutes
        names = [n for n in names if not n.endswith("_compiled")]
        note = "--quick on CPU: the compiled providers are left out (--providers names them)."
        bench.notes.append(note)
        print("NOTE: " + note)
    check_result = check(bench.device)
    case_list, results = run_cases(bench, [partial(_run_case, c, names, bench) for c in chosen])
    payload = build_payload(bench, check_result, case_list, results, PROVIDERS)
    return write_results(payload, bench.out_dir, "train_step", "Train step: upstream formulation vs avfast", "",
                         bench.device, merge=False)


def main(argv=None) -> int:
    parser = bench_parser("avfast bench train-step", __doc__.split("\n\n")[0], list(PROVIDERS),
                          "mavt,deepavfusion-base-dense")
    return bench_main(parser, run, argv)
