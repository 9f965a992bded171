"""Training integrity: non-finite losses and gradients, past the loader.

The loader drops NaN and out-of-range samples; these tests put the non-finite values where the
loader cannot see them: into the batches the step gets (``TrainStep`` on real DeepSpeed engines,
two gloo ranks on CPU), into the weights (a learning rate that blows them up in a real
``dsl pretrain``), into the weights about to be checkpointed (one rank's BatchNorm statistics)
and into a checkpoint about to be registered. Each asserts the outcome: the bad
step skipped on every rank (even when one rank alone saw the NaN), counted, and the weights
afterwards those of a run that never saw the bad batches; N in a row, or non-finite weights at a
checkpoint, stop the job with one line naming the step; nothing registered.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fixtures.dist import GlooPool
from fixtures.shards import TINY, ingested_shards
from torch import nn

from dsl.contracts.errors import JobFailed
from dsl.train.loop import NonFiniteSteps, NonFiniteTraining, NonFiniteWeights, poison_nonfinite

WORLD, B, IN1, IN2, FEAT = 2, 4, 5, 7, 6
STEPS = 6  # optimizer steps a clean run takes


# --- the pieces, without DeepSpeed ---

def test_poison_keeps_finite_gradients_and_turns_a_nonfinite_loss_into_nan_gradients():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    flags = []
    poison_nonfinite((w * torch.tensor([3.0, 4.0])).sum(), flags).backward()
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0])) and not flags[0]  # exactly the same gradient
    w.grad = None
    # a NaN term the gradient never sees: the loss is NaN, its gradient alone would be finite
    (poison_nonfinite((w * 3).sum() + torch.tensor(float("nan")), flags)).backward()
    assert torch.isnan(w.grad).all() and flags[1]
    w.grad = None
    poison_nonfinite((w * 3).sum() + torch.tensor(float("inf")), flags).backward()
    assert torch.isnan(w.grad).all() and flags[2]


def test_counter_stops_the_nth_skipped_step_in_a_row_and_an_applied_step_resets_it():
    steps = NonFiniteSteps(limit=3)
    steps.skipped(5, {"epoch": 0, "sample": 40})
    steps.skipped(5, {"epoch": 0, "sample": 48})
    steps.applied()
    steps.skipped(6, {"epoch": 0, "sample": 64})
    steps.skipped(6, {"epoch": 0, "sample": 72})
    assert (steps.total, steps.in_a_row) == (4, 2)
    with pytest.raises(NonFiniteTraining) as e:
        steps.skipped(6, {"epoch": 1, "sample": 8})
    message = str(e.value)
    assert isinstance(e.value, JobFailed) and "\n" not in message
    assert message.startswith("optimizer step 6: 3 steps in a row had a non-finite loss or gradient")
    assert "optim.max_nonfinite_steps=3" in message and "5 skipped since this start" in message
    assert "epoch 1 sample 8" in message


def test_a_checkpoint_with_nonfinite_weights_is_not_registered(tmp_path):
    from safetensors.torch import save_file

    from dsl.contracts.model_card import WEIGHTS
    from dsl.train.pretrain import check_weights_finite

    for value in (float("nan"), float("inf"), float("-inf")):
        save_file({"a": torch.ones(3), "b": torch.tensor([1.0, value]), "n": torch.tensor([2])}, tmp_path / WEIGHTS)
        with pytest.raises(JobFailed, match=rf"checkpoint {tmp_path}: 1 weight tensors hold NaN or infinite "
                                            r"values \(e.g. b\): not registered"):
            check_weights_finite(tmp_path)
    save_file({"a": torch.ones(3), "n": torch.tensor([2])}, tmp_path / WEIGHTS)
    check_weights_finite(tmp_path)


def test_the_workers_reason_comes_out_of_rays_wrapping():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from dsl.train.pretrain import worker_job_failure

    reason = NonFiniteTraining("optimizer step 3: 2 steps in a row ...")
    wrapped = WorkerGroupError("Traceback (most recent call last):\n ...", {
        0: UserExceptionWithTraceback(reason, "Traceback ...\nNonFiniteTraining: ..."),
        1: UserExceptionWithTraceback(RuntimeError("gloo: connection closed"), "Traceback ..."),
    })
    assert worker_job_failure(wrapped) is reason
    assert worker_job_failure(WorkerGroupError("x", {0: UserExceptionWithTraceback(ValueError("v"), "t")})) is None
    assert worker_job_failure(RuntimeError("plain")) is None


def _check_finite_on_rank(bad_rank: int):
    from dsl.train.loop import check_finite

    weights = {"model.w": torch.ones(2), "model.bn.running_var": torch.ones(2)}
    if dist.get_rank() == bad_rank:  # BatchNorm statistics are each rank's own
        weights["model.bn.running_var"] = torch.tensor([1.0, float("nan")])
    try:
        check_finite(weights, {"model.w/exp_avg": torch.zeros(2)}, step=7)
    except NonFiniteWeights as e:
        return str(e)
    return None


@pytest.mark.slow
def test_nonfinite_buffers_on_one_rank_stop_every_rank_before_the_checkpoint(gloo_pool):
    got = gloo_pool.run(_check_finite_on_rank, 1)
    assert got == ["step 7: the weights hold NaN or infinite values (another rank's buffers); "
                   "no checkpoint was written",
                   "step 7: the weights hold NaN or infinite values (1 tensors, e.g. model.bn.running_var); "
                   "no checkpoint was written"]
    assert gloo_pool.run(_check_finite_on_rank, -1) == [None, None]


# --- the real step (TrainStep, StepRunner, DeepSpeed) on two gloo ranks ---

class _Backbone(nn.Module):
    """A pooled-feature stand-in for a timm model (DualEncoder reads ``num_features``)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.num_features = FEAT
        self.net = nn.Sequential(nn.Linear(in_dim, FEAT), nn.Tanh())

    def forward(self, x):
        return self.net(x)


def _batch(rank: int, index: int, poison: float | None) -> dict:
    """Rank ``rank``'s micro-batch number ``index`` (the same in every run), maybe with a bad value."""
    g = torch.Generator().manual_seed(1000 * rank + index)
    s1, s2 = torch.randn(B, IN1, generator=g), torch.randn(B, IN2, generator=g) + rank
    if poison is not None:
        s1[1, 2] = poison
    return {"s1": s1, "s2": s2}


def _run(stage: int, precision: str, grad_accum: int, bad: dict, limit: int = 10) -> dict:
    """Train ``STEPS`` optimizer steps' batches the way ``train_loop`` does; ``bad``: (step, micro) ->
    {rank: value} puts the value into that rank's micro-batch. A bad step's batches are extra: the
    good steps see the same batches as a run without them."""
    from dsl.contracts.config import DeepSpeedConfig, LossConfig, OptimConfig
    from dsl.losses import build_loss
    from dsl.models.dual import DualEncoder
    from dsl.objectives import CrossModalPair
    from dsl.runtime import full_state
    from dsl.runtime.device import ModelInputs
    from dsl.runtime.engine import build_engine, optimizer_steps
    from dsl.train.loop import MetricWindow, StepRunner, TrainStep

    rank = dist.get_rank()
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.manual_seed(0)
    model = DualEncoder(_Backbone(IN1), _Backbone(IN2), proj_hidden_dim=8, proj_dim=4, head_norm=True,
                        learnable_temperature=0.2)
    objective = CrossModalPair(model, build_loss(LossConfig(name="clip", temperature=0.2))).train()
    optim = OptimConfig(lr=0.05, weight_decay=0.01, warmup_steps=2, max_steps=20, max_nonfinite_steps=limit)
    engine, dtype = build_engine(objective, objective.parameters(), optim,
                                 DeepSpeedConfig(zero_stage=stage, precision=precision, grad_accum=grad_accum,
                                                 grad_clip=1.0), B)
    runner, window = StepRunner(engine, grad_accum), MetricWindow()
    train_step = TrainStep(engine, objective, ModelInputs(None, dtype), runner, torch.Generator(), window)
    counter = NonFiniteSteps(optim.max_nonfinite_steps)
    step, boundaries, losses, skipped_at, error = 0, 0, [], [], None
    attempts = sorted({s for s, _ in bad} | set(range(STEPS)))  # bad keys (s + 0.5, k) slot in between
    try:
        for s in attempts:
            for k in range(grad_accum):
                value = bad.get((s, k), {}).get(rank)
                index = int(s) * grad_accum + k if s == int(s) else 10_000 + int(s) * grad_accum + k
                train_step(_batch(rank, index, value))
            assert engine.global_steps != boundaries
            boundaries = engine.global_steps
            if optimizer_steps(engine) == step:
                assert runner.nonfinite
                skipped_at.append(s)
                counter.skipped(step + 1, {"epoch": 0, "sample": s})
                continue
            step = optimizer_steps(engine)
            counter.applied()
            losses.append(window.means()["loss"])
            window.reset()
    except NonFiniteTraining as e:
        error = str(e)
    weights, _ = full_state.gather(engine)
    return {"weights": weights, "losses": losses, "skipped_at": skipped_at, "total": counter.total,
            "error": error, "steps": optimizer_steps(engine), "lr": engine.get_lr()[0],
            "ds_skipped": engine.skipped_steps}


def _bad_and_clean(stage: int, precision: str, grad_accum: int, bad: dict) -> tuple[dict, dict]:
    return _run(stage, precision, grad_accum, bad), _run(stage, precision, grad_accum, {})


@pytest.fixture(scope="module")
def deepspeed_pool():
    pool = GlooPool(world_size=WORLD)  # DeepSpeed changes process state: ranks of their own
    try:
        yield pool
    finally:
        pool.close()


NAN, INF = float("nan"), float("inf")
# Extra bad steps between the clean ones, (step, micro-batch) -> {rank: value}: NaN on rank 1
# only (the asymmetric case), +inf and NaN on both, -inf on rank 0 only in the last micro-batch
# of a GradCache step.
BAD_PLAIN = {(0.5, 0): {1: NAN}, (2.5, 0): {0: INF, 1: NAN}, (4.5, 0): {0: -INF}}
BAD_ACCUM = {(0.5, 0): {1: NAN}, (2.5, 1): {0: -INF}, (4.5, 0): {0: NAN, 1: INF}}
CASES = [(0, "fp32", 1, BAD_PLAIN), (2, "fp32", 1, BAD_PLAIN), (0, "bf16", 2, BAD_ACCUM), (2, "bf16", 2, BAD_ACCUM),
         (2, "fp32", 2, BAD_ACCUM), (3, "fp32", 1, BAD_PLAIN)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision", "grad_accum", "bad"), CASES,
                         ids=[f"zero{c[0]}-{c[1]}-k{c[2]}" for c in CASES])
def test_a_nonfinite_step_is_skipped_on_every_rank_as_if_never_seen(deepspeed_pool, stage, precision, grad_accum,
                                                                    bad):
    results = deepspeed_pool.run(_bad_and_clean, stage, precision, grad_accum, bad)
    for got, clean in results:
        assert got["error"] is None and clean["skipped_at"] == [] and clean["ds_skipped"] == 0
        # every bad step skipped, on both ranks (one rank's NaN too), counted, the others taken
        assert got["skipped_at"] == sorted(s for s, _ in bad) and got["total"] == len(bad)
        assert got["ds_skipped"] == len(bad) and got["steps"] == clean["steps"] == STEPS
        assert got["lr"] == clean["lr"]  # the LR schedule did not move for a skipped step
        # the logged losses are the good steps' own (a skipped step's NaN is not in a window)
        assert got["losses"] == pytest.approx(clean["losses"], rel=1e-6, abs=1e-7)
        # the weights (fp32 master and this rank's BatchNorm statistics): those of the clean run
        assert got["weights"].keys() == clean["weights"].keys()
        for name, value in got["weights"].items():
            assert torch.isfinite(value).all(), name
            torch.testing.assert_close(value, clean["weights"][name], rtol=1e-6, atol=1e-7, msg=name)
    (r0, _), (r1, _) = results
    for name, value in r0["weights"].items():  # the parameters are the same on both ranks
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, r1["weights"][name]), name


def _in_a_row(stage: int, precision: str) -> dict:
    # one good step, then rank 1 alone sees NaN three times in a row: the third stops both ranks
    return _run(stage, precision, 1, {(0.5, 0): {1: NAN}, (0.6, 0): {1: NAN}, (0.7, 0): {1: NAN}}, limit=3)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (2, "fp32"), (2, "bf16")])
def test_max_nonfinite_steps_in_a_row_stop_every_rank_with_one_line(deepspeed_pool, stage, precision):
    for got in deepspeed_pool.run(_in_a_row, stage, precision):
        assert got["error"] is not None and "\n" not in got["error"]
        assert got["error"].startswith("optimizer step 2: 3 steps in a row had a non-finite loss or gradient")
        assert "optim.max_nonfinite_steps=3" in got["error"]
        assert got["steps"] == 1 and all(torch.isfinite(v).all() for v in got["weights"].values())


# --- `dsl pretrain` (Ray Train + DeepSpeed ZeRO-2) whose weights blow up ---

@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    return ingested_shards(tmp_path_factory.mktemp("nonfinite"), "sen12ms", 96, seed=7)


def _pretrain(tmp_path: Path, shards, capsys, *overrides: str) -> tuple[int, str]:
    from dsl.cli import main

    code = main(["pretrain", "--config", str(TINY), f"data.shards={shards}",
                 f"scale.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "data.split=null", "data.batch_size=8", "optim.warmup_steps=0", "optim.max_steps=4",
                 "scale.log_every=1", "scale.max_failures=0", *overrides])
    return code, capsys.readouterr().err


def _registered(tmp_path: Path) -> list:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models()


def test_diverged_weights_stop_pretrain_after_n_skipped_steps_in_one_line(shards, tmp_path, capsys):
    # lr 1e37: the first step's update (~lr) leaves finite weights whose every forward overflows
    code, err = _pretrain(tmp_path, shards, capsys, "optim.lr=1e37", "optim.max_nonfinite_steps=2",
                          "scale.checkpoint_every=100", "scale.name=diverged")
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("dsl pretrain:")]
    assert lines == [lines[0]] and lines[0].startswith(
        "dsl pretrain: error: optimizer step 2: 2 steps in a row had a non-finite loss or gradient"), err
    assert _registered(tmp_path) == []

