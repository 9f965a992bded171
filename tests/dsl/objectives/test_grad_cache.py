"""GradCache accumulation (``dsl.objectives.grad_cache``) equals the large contrastive batch.

Parity: R=2 gloo ranks x K=3 micro-batches of b=4 pairs, every rank and micro-batch with its own
inputs (seed and scale), float64. After the engine's MEAN over ranks, loss and gradients (all
parameters, the learnable temperature included) must equal one process computing the loss on
all R*K*b pairs. The towers have BatchNorm in their heads; in train mode it normalises each
micro-batch with its own statistics, so the mathematically right reference encodes the R*K
chunks one by one (K BatchNorm batches per rank, as plain accumulation) and computes ONE loss
over all of them. Separately: the caching pass and the replay give bit-identical outputs (with
dropout too) and the running statistics move once per micro-batch.

The DeepSpeed part (gas scaling, the boundary, counting) is checked against the pure-torch step
on two ranks with ZeRO 0, 2 and 3, and the real training loop runs with ``grad_accum=2``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from fixtures.dist import GlooPool
from fixtures.shards import ingested_shards, tiny_config
from torch import nn

from dsl.contracts.config import DeepSpeedConfig, LossConfig, OptimConfig
from dsl.losses import build_loss
from dsl.models.dual import DualEncoder
from dsl.objectives import CrossModalPair
from dsl.objectives.grad_cache import batchnorm_stats_kept, grad_cache_step

WORLD, K, B = 2, 3, 4  # ranks, micro-batches per optimizer step, pairs per micro-batch
IN1, IN2, FEAT, HIDDEN, EMB = 5, 7, 6, 8, 4
MODES = [(True, True), (True, False), (False, False)]  # (gather_with_grad, local_loss)
LOSSES = ["dual_ntxent", "clip"]


class _Backbone(nn.Module):
    """A pooled-feature stand-in for a timm model: DualEncoder reads ``num_features``."""

    def __init__(self, in_dim: int, dropout: float):
        super().__init__()
        self.num_features = FEAT
        self.net = nn.Sequential(nn.Linear(in_dim, FEAT), nn.Tanh(), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


def _objective(name: str, mode=(True, True), dropout: float = 0.0, dtype=torch.float64) -> CrossModalPair:
    """The real DualEncoder (BatchNorm heads, learnable temperature) and loss; same init everywhere."""
    torch.manual_seed(0)
    model = DualEncoder(_Backbone(IN1, dropout), _Backbone(IN2, dropout), proj_hidden_dim=HIDDEN,
                        proj_dim=EMB, head_norm=True, learnable_temperature=0.2)
    loss = build_loss(LossConfig(name=name, temperature=0.2, gather_with_grad=mode[0], local_loss=mode[1]))
    return CrossModalPair(model, loss).to(dtype).train()


def _micro_batch(rank: int, k: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Different values per rank and micro-batch: another seed and another scale."""
    g = torch.Generator().manual_seed(1000 * rank + k)
    scale = 1.0 + rank + 0.5 * k
    return (scale * torch.randn(B, IN1, generator=g, dtype=dtype),
            scale * torch.randn(B, IN2, generator=g, dtype=dtype) - rank)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _reference(name: str, mode=(True, True)):
    """One process, no process group: the loss over all R*K*b pairs, encoded chunk by chunk."""
    objective = _objective(name, mode)
    outs = [objective.encode(*_micro_batch(r, k)) for r in range(WORLD) for k in range(K)]
    loss = objective.loss(torch.cat([o1 for o1, _ in outs]), torch.cat([o2 for _, o2 in outs]),
                          objective.logit_scale)
    loss.backward()
    return loss.detach(), _grads(objective)


def _mean_over_ranks(loss, grads):
    """What the engine does: average gradients (and the logged loss) over ranks."""
    for t in [loss, *grads.values()]:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return loss, grads


def _grad_cache_on_rank(name, mode):
    rank = dist.get_rank()
    objective = _objective(name, mode)
    step = grad_cache_step(objective, [_micro_batch(rank, k) for k in range(K)])
    return _mean_over_ranks(step.loss.clone(), _grads(objective))


def _plain_accumulation_on_rank(name, mode):
    """The old way: each micro-batch's loss on its own negatives, DeepSpeed's 1/K scaling."""
    rank = dist.get_rank()
    objective = _objective(name, mode)
    total = 0.0
    for k in range(K):
        loss, _, _ = objective(*_micro_batch(rank, k))
        (loss / K).backward()
        total += loss.detach() / K
    return _mean_over_ranks(total, _grads(objective))


def _assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"grad={m[0]}-local={m[1]}")
@pytest.mark.parametrize("name", LOSSES)
def test_ranks_times_micro_batches_equal_one_large_batch(gloo_pool, name, mode):
    want = _reference(name, mode)
    # every parameter has a gradient: 2 backbones, 2 heads with BatchNorm, the temperature
    assert len(want[1]) == 2 * 2 + 2 * 5 + 1 and "logit_scale" in "".join(want[1])
    for got in gloo_pool.run(_grad_cache_on_rank, name, mode):
        _assert_same(got, want)


def test_plain_accumulation_is_not_the_large_batch(gloo_pool):
    want = _reference("clip")
    got = gloo_pool.run(_plain_accumulation_on_rank, "clip", (True, True))[0]
    assert not torch.allclose(got[0], want[0], rtol=1e-3)  # fewer negatives: a smaller loss
    with pytest.raises(AssertionError):
        _assert_same(got, want)


def test_one_micro_batch_is_the_plain_step():
    objective = _objective("dual_ntxent")
    a, b = _micro_batch(1, 2)
    loss, _, _ = objective(a, b)
    loss.backward()
    want = (loss.detach(), _grads(objective))
    objective = _objective("dual_ntxent")
    step = grad_cache_step(objective, [(a, b)])
    _assert_same((step.loss, _grads(objective)), want)


def _batchnorm_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in module.named_buffers() if "running" in n or "num_batches" in n]


class _DrawingLoss(nn.Module):
    """A loss that draws random numbers, as MMA draws its locations."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.inner = loss

    def forward(self, z1, z2, logit_scale):
        torch.rand(3)
        return self.inner(z1, z2, logit_scale)


def test_replay_reproduces_the_cache_and_running_stats_move_once():
    objective = _objective("clip", dropout=0.3)
    plain = copy.deepcopy(objective)
    objective.loss = _DrawingLoss(objective.loss)
    micro = [_micro_batch(0, k) for k in range(K)]
    replayed = []

    def run(a, b, mode, grads=None):
        out = objective(a, b, mode=mode, grads=grads)
        if mode == "replay":
            replayed.append(out[1:])
        return out

    torch.manual_seed(5)
    step = grad_cache_step(objective, micro, run=run)
    rng_after = torch.get_rng_state()
    assert len(replayed) == K
    for (c1, c2), (r1, r2) in zip(step.outputs, replayed, strict=True):
        assert torch.equal(c1, r1) and torch.equal(c2, r2)  # same dropout masks, same batch stats
    # the running statistics are those of one plain pass per micro-batch, not two
    torch.manual_seed(5)
    with torch.no_grad():
        for a, b in micro:
            plain.encode(a, b)
    torch.rand(3)  # the loss's draw
    buffers, want = _batchnorm_buffers(objective), _batchnorm_buffers(plain)
    assert len(buffers) == 2 * 3 and buffers[2].item() == K  # two BatchNorm1d; num_batches_tracked
    for got, expected in zip(buffers, want, strict=True):
        assert torch.equal(got, expected)
    # the random stream continues as if each micro-batch ran once (dropout draws, then the loss's)
    assert torch.equal(rng_after, torch.get_rng_state())


def test_batchnorm_stats_kept_restores_in_place():
    bn = nn.BatchNorm1d(3).train()
    mean = bn.running_mean
    with batchnorm_stats_kept(nn.Sequential(bn)):
        bn(torch.randn(5, 3) + 4)
        assert bn.num_batches_tracked.item() == 1 and mean.abs().sum() > 0
    assert bn.running_mean is mean and mean.abs().sum() == 0 and bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_var, torch.ones(3))


def test_objective_modes():
    objective = _objective("clip")
    a, b = _micro_batch(0, 0)
    out1, out2, scale = objective(a, b, mode="embed")
    assert torch.equal(scale, objective.logit_scale.detach()) and not scale.requires_grad
    assert scale is not objective.logit_scale
    g1, g2 = torch.randn_like(out1), torch.randn_like(out2)
    surrogate, r1, r2 = objective(a, b, mode="replay", grads=(g1, g2, torch.tensor([2.0], dtype=torch.float64)))
    assert not r1.requires_grad and torch.equal(r1, out1.detach())
    surrogate.backward()
    assert objective.logit_scale.grad.item() == 2.0
    with pytest.raises(ValueError, match="unknown mode"):
        objective(a, b, mode="replay")
    with pytest.raises(ValueError, match="unknown mode"):
        objective(a, b, mode="other")


# --- DeepSpeed drives the same step: two ranks of their own (DeepSpeed changes process state) ---

DS_STEPS = 2
DS_OPTIM = OptimConfig(lr=0.01, weight_decay=0.0, warmup_steps=4, max_steps=10)  # lr x 0.25, 0.5, ...


def _deepspeed_vs_torch(stage: int, precision: str):
    """``large_batch_step`` (DeepSpeed, gas=K) against ``grad_cache_step`` + torch AdamW, per step."""
    rank = dist.get_rank()
    # what Ray Train's workers have: a CPU accelerator and the launcher's rank variables
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from dsl.runtime.engine import build_engine
    from dsl.runtime.lr_schedule import warmup_cosine
    from dsl.train.loop import large_batch_step

    objective = _objective("clip", dtype=torch.float32)
    reference = copy.deepcopy(objective)  # in the engine's dtype below, as DeepSpeed casts its module
    optim = DS_OPTIM
    engine, dtype = build_engine(objective, objective.parameters(), optim,
                                 DeepSpeedConfig(zero_stage=stage, precision=precision, grad_accum=K, grad_clip=0.0), B)
    boundary_grads = []
    deepspeed_step = engine.step

    def step_recording_grads():  # the reduced gradients the optimizer is about to use
        if engine.is_gradient_accumulation_boundary():
            boundary_grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        deepspeed_step()

    engine.step = step_recording_grads
    reference.to(dtype)
    schedule = warmup_cosine(optim)
    torch_optim = torch.optim.AdamW(reference.parameters(), lr=optim.lr, weight_decay=0.0)
    out = {"loss": [], "grad_error": [], "weight_error": [], "steps": [], "lr": []}
    for s in range(DS_STEPS):
        micro = [tuple(x.to(dtype) for x in _micro_batch(rank, K * s + k, torch.float32)) for k in range(K)]
        got = large_batch_step(engine, micro)
        torch_optim.zero_grad()
        want = grad_cache_step(reference, micro)
        loss, grads = _mean_over_ranks(want.loss.clone(), {n: g.float() for n, g in _grads(reference).items()})
        for p, (n, _) in zip(reference.parameters(), reference.named_parameters(), strict=True):
            p.grad = grads[n].to(dtype)
        for group in torch_optim.param_groups:
            group["lr"] = optim.lr * schedule(s)
        torch_optim.step()
        out["loss"].append((got.loss.item(), want.loss.item()))
        out["grad_error"].append(max(
            ((boundary_grads[s][n].double() - grads[n].double()).abs().max() / grads[n].abs().max()).item()
            for n in grads))
        # the optimizer's fp32 master weights; without ZeRO or bf16 the parameters themselves
        fp32 = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        fp32 = {n: p.detach() if fp32[n] is None else fp32[n] for n, p in engine.module.named_parameters()}
        out["weight_error"].append(max((fp32[n] - p).abs().max().item() for n, p in reference.named_parameters()))
        out["steps"].append((engine.global_steps, engine.micro_steps))
        out["lr"].append(engine.get_lr()[0])
    out["boundaries"] = len(boundary_grads)
    out["grad_names"] = sorted(boundary_grads[0]) == sorted(n for n, _ in reference.named_parameters())
    return out


@pytest.fixture(scope="module")
def deepspeed_pool():
    pool = GlooPool(world_size=WORLD)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision", "tolerance"), [
    (0, "fp32", 1e-5), (2, "fp32", 1e-5), (3, "fp32", 1e-5),
    (0, "bf16", 0.02),  # the seed paper's setting; a 1/K mistake is an error of 1 - 1/K
])
def test_deepspeed_step_equals_the_torch_grad_cache_step(deepspeed_pool, stage, precision, tolerance):
    from dsl.runtime.lr_schedule import warmup_cosine

    optim = DS_OPTIM
    for out in deepspeed_pool.run(_deepspeed_vs_torch, stage, precision):
        assert out["grad_names"] and out["boundaries"] == DS_STEPS  # one optimizer step per K replays
        assert out["steps"] == [(s + 1, K * (s + 1)) for s in range(DS_STEPS)]
        assert out["lr"] == pytest.approx([optim.lr * warmup_cosine(optim)(s + 1) for s in range(DS_STEPS)])
        # bf16: the reference runs in bf16 as DeepSpeed's module, but its optimizer has no fp32
        # master weights, so the two drift apart after the first step: compare that one only
        compared = DS_STEPS if precision == "fp32" else 1
        for got, want in out["loss"][:compared]:
            assert got == pytest.approx(want, rel=tolerance)
        assert max(out["grad_error"][:compared]) < tolerance, out["grad_error"]  # no 1/K, no double counting
        assert max(out["weight_error"][:compared]) < tolerance / 2, out["weight_error"]


# --- the training loop (Ray Train + DeepSpeed ZeRO-2 on CPU) with grad_accum=2 ---

@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    return ingested_shards(tmp_path_factory.mktemp("grad-cache"), "sen12ms", 320, seed=13)


def test_training_loop_accumulates_two_micro_batches_per_step(shards, tmp_path, ray_session):
    from mlflow import MlflowClient

    from dsl.contracts.manifest import read_manifest
    from dsl.data import resume_stream
    from dsl.objectives import build_objective
    from dsl.runtime.checkpoint import load_state
    from dsl.runtime.lr_schedule import warmup_cosine
    from dsl.train.pretrain import pretrain

    cfg = tiny_config(tmp_path, shards, "data.split=null", "data.batch_size=16", "deepspeed.grad_accum=2",
                      "optim.max_steps=4", "scale.log_every=1", "scale.checkpoint_every=4", "scale.max_failures=0",
                      "scale.name=grad-cache", "loss.name=clip", "loss.learnable_temperature=true")
    out = pretrain(cfg)
    assert out["step"] == 4 and out["model_version"] == "1"
    client = MlflowClient(cfg.mlflow.tracking_uri)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(out["run_id"], key)]

    loss = history("loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for _, v in loss)
    # the schedule stepped once per optimizer step, not once per micro-batch
    want_lr = [cfg.optim.lr * warmup_cosine(cfg.optim)(s) for s in (1, 2, 3, 4)]
    assert [v for _, v in history("lr")] == pytest.approx(want_lr)
    # 4 optimizer steps consumed 2 micro-batches each, on every rank
    ckpts = sorted(p for p in (tmp_path / "runs" / "grad-cache").glob("checkpoint_*") if p.is_dir())
    position = load_state(ckpts[-1])["position"]
    assert position == {"epoch": 0, "sample": 8 * 2 * 16}

    # step 1's logged loss is the loss of ONE batch of 2 ranks x 2 micro-batches x 16 pairs, at
    # the initial weights (the loop seeds them with data.seed), each micro-batch its own
    # BatchNorm batch: recomputed here in one process from the same stream
    torch.manual_seed(cfg.data.seed)
    manifest = read_manifest(cfg.data.shards)
    objective = build_objective(cfg.model, cfg.loss, len(manifest.bands.s1), len(manifest.bands.s2),
                                img_size=cfg.data.crop_size).train()
    outs = []
    with torch.no_grad():
        for rank in range(2):
            stream = resume_stream(cfg.data, rank, 2, {"epoch": 0, "sample": 0}, manifest)
            for _ in range(2):
                batch = next(stream)
                outs.append(objective.encode(*objective.views(batch["s1"].float(), batch["s2"].float())))
        large = objective.loss(torch.cat([o1 for o1, _ in outs]), torch.cat([o2 for _, o2 in outs]),
                               objective.logit_scale)
        # plain accumulation: micro-batch k of both ranks (outs: rank 0's k=0, 1, then rank 1's)
        plain = sum(objective.loss(torch.cat([outs[k][0], outs[2 + k][0]]), torch.cat([outs[k][1], outs[2 + k][1]]),
                                   objective.logit_scale) for k in range(2)) / 2
    assert loss[0][1] == pytest.approx(large.item(), rel=1e-4)
    assert abs(large.item() - plain.item()) > 0.1  # which plain accumulation would not log
