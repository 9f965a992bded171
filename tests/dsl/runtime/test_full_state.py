"""``dsl.runtime.full_state`` on real DeepSpeed engines (gloo ranks, CPU): the fp32 master and
AdamW's moments leave an engine of one world size and continue training in another exactly;
``dsl.runtime.engine``: the parameter groups, fp32 gradient communication under bf16, and the
learnable temperature held inside [1/100, 1] under ZeRO-2/3 with a huge learning rate."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from fixtures.dist import GlooPool
from torch import nn

pytestmark = pytest.mark.slow

STEPS = 3
MICRO = 4  # pairs per rank and step in the 2-rank engine


class Net(nn.Module):
    """Weights, biases, a [1] scalar and (optionally) BatchNorm: every kind of parameter."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.b = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x, y):
        out = self.b(torch.relu(self.norm(self.a(x)))) * self.scale
        return ((out.float() - y) ** 2).mean()


def _batch(step: int, n: int = 2 * MICRO) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step; asymmetric (every sample differs)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g) * 3, torch.randn(n, 3, generator=g)


def _engine(stage: int, precision: str, micro: int, norm: bool = False, lr: float = 1e-2):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    from dsl.contracts.config import DeepSpeedConfig, OptimConfig
    from dsl.runtime.engine import build_engine

    torch.manual_seed(0)
    net = Net(norm)
    optim = OptimConfig(lr=lr, weight_decay=0.1, warmup_steps=1, max_steps=20)
    return build_engine(net, net.parameters(), optim, DeepSpeedConfig(zero_stage=stage, precision=precision, grad_clip=0),
                        micro)


def _train(engine, dtype, steps: range) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for step in steps:
        x, y = _batch(step)
        share = len(x) // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = engine(x.to(dtype), y)
        engine.backward(loss)
        engine.step()


def _write(stage, precision, folder, norm=False):
    """Train STEPS steps on this pool's ranks, checkpoint them as the job does, train one more."""
    from dsl.runtime import full_state
    from dsl.runtime.checkpoint import DS_TAG, FULL_STATE, engine_counters, save_state

    world = torch.distributed.get_world_size()
    engine, dtype = _engine(stage, precision, 2 * MICRO // world, norm)
    _train(engine, dtype, range(STEPS))
    engine.save_checkpoint(folder, tag=DS_TAG)
    weights, moments = full_state.gather(engine)
    working = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    if torch.distributed.get_rank() == 0:
        torch.save({"weights": weights, "moments": moments}, f"{folder}/{FULL_STATE}")
        save_state(Path(folder), {"position": {"epoch": 0, "sample": STEPS * 2 * MICRO},
                                  **engine_counters(engine, world)})
    torch.distributed.barrier()
    _train(engine, dtype, range(STEPS, STEPS + 1))
    after, _ = full_state.gather(engine)
    return weights, moments, working, after


def _read(stage, precision, folder, norm=False):
    """A fresh engine on this pool's ranks resumes the checkpoint and trains the same next step."""
    from dsl.runtime import full_state
    from dsl.runtime.checkpoint import resume_engine

    world = torch.distributed.get_world_size()
    engine, dtype = _engine(stage, precision, 2 * MICRO // world, norm)
    position = resume_engine(engine, Path(folder), world, 2 * MICRO // world)
    again, moments = full_state.gather(engine)
    lr_resumed = engine.get_lr()[0]
    _train(engine, dtype, range(STEPS, STEPS + 1))
    after, _ = full_state.gather(engine)
    return again, moments, after, lr_resumed, position, engine.global_steps


@pytest.fixture(scope="module")
def one_rank():
    pool = GlooPool(world_size=1)
    try:
        yield pool
    finally:
        pool.close()


CASES = [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


@pytest.mark.parametrize(("stage", "precision"), CASES)
def test_two_ranks_to_one_and_back_continue_exactly(stage, precision, gloo_pool, one_rank, tmp_path):
    two = tmp_path / "from-two"
    two.mkdir()
    weights, moments, working, after2 = gloo_pool.run(_write, stage, precision, str(two))[0]
    names = {n for n, _ in Net().named_parameters()}
    assert names <= set(weights) and {f"{n}/{k}" for n in names for k in ("exp_avg", "exp_avg_sq")} == set(moments)
    if precision == "bf16":
        # the fp32 master, not the bf16 working copy: equal after rounding, finer before it
        for name in names:
            assert torch.equal(weights[name].bfloat16().float(), working[name]), name
        assert any(not torch.equal(weights[n], working[n]) for n in names)
    # the same checkpoint resumed by an engine of one rank: identical state, the same next step
    again, moments1, after1, lr1, position, steps = one_rank.run(_read, stage, precision, str(two))[0]
    for name in weights:
        assert torch.equal(again[name], weights[name]), name
    for key in moments:
        assert torch.equal(moments1[key], moments[key]), key
    assert lr1 == pytest.approx(lr_at_step_3()) and steps == STEPS + 1
    assert position == {"epoch": 0, "sample": STEPS * 2 * MICRO}  # samples: the same on one rank
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    for name in names:
        torch.testing.assert_close(after1[name], after2[name], atol=tol, rtol=tol, msg=name)
    # and back: one rank's checkpoint continued on two
    one = tmp_path / "from-one"
    one.mkdir()
    weights1, _, _, after1b = one_rank.run(_write, stage, precision, str(one))[0]
    again2, _, after2b, _, position2, _ = gloo_pool.run(_read, stage, precision, str(one))[0]
    for name in weights1:
        assert torch.equal(again2[name], weights1[name]), name
    assert position2 == {"epoch": 0, "sample": STEPS * 2 * MICRO}
    for name in names:
        torch.testing.assert_close(after2b[name], after1b[name], atol=tol, rtol=tol, msg=name)


def lr_at_step_3() -> float:
    """The LR the schedule gives the 4th optimizer step (warmup 1, cosine over 20 from 1e-2)."""
    return 1e-2 * 0.5 * (1 + math.cos(math.pi * (STEPS - 1) / 19))


def _roundtrip_buffers(folder):
    from dsl.runtime import full_state

    engine, dtype = _engine(2, "fp32", MICRO, norm=True)
    _train(engine, dtype, range(2))
    weights, moments = full_state.gather(engine)
    fresh, _ = _engine(2, "fp32", MICRO, norm=True)
    full_state.load(fresh, weights, moments, optimizer_steps=2)
    return weights, full_state.gather(fresh)[0]


def test_batchnorm_statistics_travel_with_the_weights(gloo_pool, tmp_path):
    weights, again = gloo_pool.run(_roundtrip_buffers, str(tmp_path))[0]
    for name in ("norm.running_mean", "norm.running_var", "norm.weight"):
        assert torch.equal(again[name], weights[name]), name
    assert weights["norm.running_mean"].abs().sum() > 0


def test_a_mismatched_model_is_refused_naming_the_parameter(gloo_pool):
    with pytest.raises(RuntimeError, match="the checkpoint's 'a.weight' has shape"):
        gloo_pool.run(_mismatch)


def _mismatch():
    from dsl.runtime import full_state

    engine, _ = _engine(0, "fp32", MICRO)
    weights, moments = full_state.gather(engine)
    weights["a.weight"] = weights["a.weight"][:3]
    full_state.load(engine, weights, moments, optimizer_steps=1)


def test_norms_biases_and_scalars_get_no_weight_decay():
    from dsl.runtime.engine import no_decay_groups

    net = Net(norm=True)
    by_name = {id(p): n for n, p in net.named_parameters()}
    groups = no_decay_groups([{"params": list(net.parameters()), "lr": 0.5, "weight_decay": 0.3}])
    names = [({by_name[id(p)] for p in g["params"]}, g["weight_decay"], g["lr"]) for g in groups]
    assert names == [({"a.weight", "b.weight"}, 0.3, 0.5),
                     ({"a.bias", "norm.weight", "norm.bias", "b.bias", "scale"}, 0.0, 0.5)]
    plain = no_decay_groups(net.parameters())
    assert [len(g["params"]) for g in plain] == [2, 5] and "weight_decay" not in plain[0]


def _temperature_under_huge_lr(stage: int, precision: str) -> list[float]:
    """SimCLR with a learnable temperature whose own LR is huge, for many steps.

    Two near-identical views of a patch through one encoder: the loss keeps asking for a lower
    temperature (a higher logit scale).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    from dsl.contracts.config import DeepSpeedConfig, LossConfig, ModelConfig, OptimConfig
    from dsl.objectives import build_objective
    from dsl.runtime.engine import build_engine

    torch.manual_seed(0)
    model = ModelConfig(backbone="test_resnet", proj_hidden_dim=16, proj_dim=8)
    objective = build_objective(model, LossConfig(name="simclr", learnable_temperature=True), 2, 4, img_size=16)
    scale = objective.logit_scale
    groups = [{"params": [p for p in objective.parameters() if p is not scale], "lr": 1e-3},
              {"params": [scale], "lr": 2.0}]
    engine, dtype = build_engine(objective, groups, OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=1, max_steps=1000),
                                 DeepSpeedConfig(zero_stage=stage, precision=precision, grad_clip=0), 4)
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    seen = []
    for _ in range(12):
        s2 = torch.randn(4, 4, 16, 16, generator=g)
        # two near-identical views: every positive far closer than any negative
        a, b = s2, s2 + 0.01 * torch.randn(s2.shape, generator=g)
        loss, _, _ = engine(a.to(dtype), b.to(dtype))
        engine.backward(loss)
        engine.step()
        seen.append(objective.temperature())
    from dsl.runtime import full_state

    raw = full_state.gather(engine)[0]["model.logit_scale"]  # the fp32 master, whole
    return seen + [float(raw.max())]


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (3, "fp32"), (3, "bf16")])
def test_effective_temperature_never_below_one_hundredth(stage, precision, gloo_pool):
    out = gloo_pool.run(_temperature_under_huge_lr, stage, precision)[0]
    seen, raw = out[:-1], out[-1]
    assert raw > math.log(100)  # the parameter itself ran past the bound ...
    assert min(seen) >= 1 / 100 - 1e-6  # ... the temperature the loss used never did
    assert seen[-1] == pytest.approx(1 / 100)


def test_bf16_reduces_gradients_in_fp32():
    from dsl.contracts.config import DeepSpeedConfig
    from dsl.runtime.engine import deepspeed_config

    for stage in (0, 1, 2, 3):
        cfg = deepspeed_config(DeepSpeedConfig(zero_stage=stage, precision="bf16"), 4)
        assert cfg["communication_data_type"] == "fp32", stage
    assert "communication_data_type" not in deepspeed_config(DeepSpeedConfig(precision="fp32"), 4)
