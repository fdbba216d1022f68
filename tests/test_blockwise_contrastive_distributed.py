"""Blockwise contrastive loss under torch.distributed: 2 CPU processes (gloo), each with half
of a batch, against one process on the whole batch (avfast.reference).

What equality means:
- loss: every rank returns the loss of the concatenated batch;
- feature gradients (z_a, z_v, and the module's input features): each rank's gradient for
  its slice equals the single-process gradient of that slice;
- projection parameters, replicated on every rank: each rank gets its samples' share, and
  the SUM over ranks equals the single-process gradient. DDP averages, so it would apply
  1/world_size of it (the same as upstream's MA-AVT training).

The worker is this file run as a script (``python <file> --worker RANK WORLD PORT OUT``).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avfast import _backend
from avfast.nn.contrastive import BlockwiseContrastiveLoss, gathered_blockwise_infonce, local_negatives
from avfast.reference.blockwise_infonce import blockwise_infonce as ref_infonce

WORLD = 2
K, B_LOCAL, D = 3, 5, 24
B = WORLD * B_LOCAL
DIM_OUT = 16
TAU = 0.1
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 90


def _valid(invalid: list[int]) -> torch.Tensor:
    v = torch.ones(B, dtype=torch.bool)
    v[invalid] = False
    return v


# name -> (valid over the full batch or None, reduction, dtype, AVFAST_BACKEND in the workers)
FUNCTION_CASES = {
    "all_valid_mean_f64": (None, "mean", torch.float64, None),
    "some_invalid_none_f64": (_valid([1, 6, 7]), "none", torch.float64, None),
    "rank1_all_invalid_sum_f64": (_valid([0, 5, 6, 7, 8, 9]), "sum", torch.float64, None),
    "rank0_all_invalid_mean_f64": (_valid([0, 1, 2, 3, 4, 9]), "mean", torch.float64, None),
    "all_invalid_mean_f64": (torch.zeros(B, dtype=torch.bool), "mean", torch.float64, None),
    "some_invalid_mean_f32": (_valid([3, 8]), "mean", torch.float32, None),
    "some_invalid_none_f32_triton": (_valid([3, 8]), "none", torch.float32, "triton"),
    "rank1_all_invalid_mean_f32_triton": (_valid([1, 5, 6, 7, 8, 9]), "mean", torch.float32, "triton"),
}
MODULE_VALID = _valid([2, 7])


def _features(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch z_a, z_v (K, B, D), the same in every process."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    z = torch.randn(2, K, B, D, generator=g, dtype=torch.float64)
    z[1] += 0.8 * z[0]  # correlated pairs: a loss far from log(B)
    return z[0].to(dtype), z[1].to(dtype)


def _module_inputs() -> tuple[BlockwiseContrastiveLoss, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1234)
    module = BlockwiseContrastiveLoss(D, DIM_OUT, num_blocks=K, tau=TAU).double()
    g = torch.Generator().manual_seed(99)
    feats = torch.randn(2, K, B, D, generator=g, dtype=torch.float64)
    return module, feats[0], feats[1]


def _shard(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    return t.narrow(dim, rank * B_LOCAL, B_LOCAL)


# ---------------------------------------------------------------------------------- worker


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, (valid, reduction, dtype, backend) in FUNCTION_CASES.items():
            if backend is not None:
                reason = _backend.unavailable_reason(backend, "cosine_lse", torch.device("cpu"), dtype)
                if reason is not None:
                    results[name] = {"skip": f"{backend}: {reason}"}
                    continue
                os.environ["AVFAST_BACKEND"] = backend
            z_a, z_v = (_shard(t, rank, 1).clone().requires_grad_() for t in _features(name, dtype))
            loss = gathered_blockwise_infonce(z_a, z_v, None if valid is None else _shard(valid, rank, 0),
                                              TAU, reduction)
            loss.sum().backward()
            os.environ.pop("AVFAST_BACKEND", None)
            results[name] = {"loss": loss.detach(), "grad_a": z_a.grad, "grad_v": z_v.grad}

        module, audio, visual = _module_inputs()
        audio, visual = (_shard(t, rank, 1).clone().requires_grad_() for t in (audio, visual))
        loss = module(audio, visual, _shard(MODULE_VALID, rank, 0))
        loss.backward()
        results["module"] = {"loss": loss.detach(), "grad_audio": audio.grad, "grad_visual": visual.grad,
                             "param_grads": {n: p.grad.clone() for n, p in module.named_parameters()}}

        # unequal local batches: every rank raises (the sizes are exchanged first)
        n = B_LOCAL if rank == 0 else B_LOCAL - 1
        z = torch.randn(K, n, D)
        try:
            gathered_blockwise_infonce(z, z)
            results["unequal"] = None
        except ValueError as err:
            results["unequal"] = str(err)
        with local_negatives():  # evaluation: each rank's batch on its own, any size
            results["local"] = {"loss": gathered_blockwise_infonce(z, z, None, 0.07), "single": z}
    finally:
        dist.destroy_process_group()
    torch.save(results, out / f"rank{rank}.pt")


# ----------------------------------------------------------------------------------- tests


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Runs the 2 workers once; returns each rank's results."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("MASTER_ADDR", "MASTER_PORT", "AVFAST_BACKEND"):
        env.pop(var, None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(WORLD), str(port), str(out)],
                              env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:  # every process exits
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("name", list(FUNCTION_CASES))
def test_function_equals_single_process(ranks, name):
    valid, reduction, dtype, _ = FUNCTION_CASES[name]
    if "skip" in ranks[0][name]:
        pytest.skip(ranks[0][name]["skip"])
    z_a, z_v = (t.clone().requires_grad_() for t in _features(name, dtype))
    want = ref_infonce(z_a, z_v, valid=valid, tau=TAU, reduction=reduction)
    grad_a, grad_v = torch.autograd.grad(want.sum(), (z_a, z_v), allow_unused=True, materialize_grads=True)
    tol = _tol(dtype)
    for r, res in enumerate(ranks):
        got = res[name]
        torch.testing.assert_close(got["loss"], want.detach(), **tol, msg=lambda m: f"rank {r} loss: {m}")
        torch.testing.assert_close(got["grad_a"], _shard(grad_a, r, 1), **tol, msg=lambda m: f"rank {r} z_a grad: {m}")
        torch.testing.assert_close(got["grad_v"], _shard(grad_v, r, 1), **tol, msg=lambda m: f"rank {r} z_v grad: {m}")
    if valid is not None and not valid.any():
        assert float(want.detach()) == 0.0
        for res in ranks:
            assert float(res[name]["loss"]) == 0.0
            assert not res[name]["grad_a"].any() and not res[name]["grad_v"].any()


def test_module_equals_single_process(ranks):
    module, audio, visual = _module_inputs()
    audio.requires_grad_()
    visual.requires_grad_()
    z_a, z_v = module.project(audio, visual)
    want = ref_infonce(z_a, z_v, valid=MODULE_VALID, tau=TAU)
    want.backward()
    tol = _tol(torch.float64)
    for r, res in enumerate(ranks):
        got = res["module"]
        torch.testing.assert_close(got["loss"], want.detach(), **tol)
        torch.testing.assert_close(got["grad_audio"], _shard(audio.grad, r, 1), **tol)
        torch.testing.assert_close(got["grad_visual"], _shard(visual.grad, r, 1), **tol)
    # replicated parameters: the per-rank shares sum to the single-process gradient
    for n, p in module.named_parameters():
        summed = sum(res["module"]["param_grads"][n] for res in ranks)
        torch.testing.assert_close(summed, p.grad, **tol, msg=lambda m: f"{n}: {m}")
        assert not torch.allclose(ranks[0]["module"]["param_grads"][n], p.grad)  # a share, not the whole


def test_unequal_local_batches_raise_on_every_rank(ranks):
    for res in ranks:
        msg = res["unequal"]
        assert msg is not None, "no ValueError for unequal local batch sizes"
        assert "gathered_blockwise_infonce" in msg and "z_a" in msg
        assert f"({K}, {B_LOCAL}, {D})" in msg and f"({K}, {B_LOCAL - 1}, {D})" in msg


def test_local_negatives_score_each_rank_alone(ranks):
    for res in ranks:
        z = res["local"]["single"]
        torch.testing.assert_close(res["local"]["loss"], ref_infonce(z, z, tau=0.07))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
