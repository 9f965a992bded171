"""The per-worker pretraining loop; Ray Train runs one copy on every worker.

Data flows: shards -> make_loader (this rank's equal share) -> DeepSpeed engine (forward,
backward, ZeRO, precision, accumulation, clipping, LR schedule) -> contrastive loss whose
negatives are gathered from every rank. With ``deepspeed.grad_accum`` = K > 1 the K
micro-batches of an optimizer step are one contrastive batch (GradCache,
:func:`large_batch_step`), not K small ones. Every ``checkpoint_every`` optimizer steps all ranks
save the DeepSpeed state and the stream position and report them to Ray's storage.

Non-finite values (a NaN patch past the loader, a blow-up): an optimizer step whose loss or
gradients are not finite on any rank is skipped on every rank, counted (``nonfinite_steps``)
and leaves the weights, the optimizer, the LR schedule and the BatchNorm statistics as they
were; ``optim.max_nonfinite_steps`` of them in a row stop the job (:class:`NonFiniteTraining`).
A checkpoint is written only when every weight and moment is finite (:class:`NonFiniteWeights`).

On GPUs (:mod:`dsl.runtime.device`) the next batch is copied on a side stream while the step
runs, raw batches are normalised there (``data.normalise_on_device``), and the logged metrics
accumulate on the device (:class:`MetricWindow`): the host waits for the GPU at log steps only.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from dsl.collectives import all_reduce, mean_across_ranks
from dsl.contracts.config import Config
from dsl.contracts.errors import JobFailed
from dsl.contracts.manifest import Manifest, read_manifest
from dsl.contracts.model_card import ModelCard, save_weights
from dsl.data import Normaliser, resume_stream, with_positions
from dsl.data.bad_samples import BadSampleBudget, TooManyBadSamples
from dsl.data.stream import epoch_length
from dsl.objectives import build_objective
from dsl.objectives.grad_cache import CachedStep, grad_cache_step
from dsl.runtime import full_state
from dsl.runtime.checkpoint import (
    DS_TAG,
    FULL_STATE,
    engine_counters,
    local_copy,
    resume_engine,
    save_state,
)
from dsl.runtime.device import DevicePrefetcher, ModelInputs, memory_format, prepare_model
from dsl.runtime.engine import build_engine, optimizer_steps
from dsl.runtime.tracking import MetricLogger
from dsl.runtime.trainer import setup_worker, write_failure

log = logging.getLogger(__name__)


class NonFiniteTraining(JobFailed):
    """``optim.max_nonfinite_steps`` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteWeights(JobFailed):
    """The weights to checkpoint hold a NaN or an infinity; nothing was written."""


# Failures every rank raises at the same step, their decisions being all-reduced: the loop
# records them (dsl.runtime.trainer.write_failure) and returns; the driver raises them.
STOPS_EVERY_RANK = (NonFiniteTraining, NonFiniteWeights, TooManyBadSamples)


def model_card(cfg: Config, manifest: Manifest, s1_chans: int, s2_chans: int) -> ModelCard:
    """What rebuilds the model from its weights and feeds it as in pretraining (model.json)."""
    return ModelCard(
        model=cfg.model, loss=cfg.loss, s1_chans=s1_chans, s2_chans=s2_chans, img_size=cfg.data.crop_size,
        s1_bands=cfg.data.s1_bands, s2_bands=cfg.data.s2_bands, band_names=manifest.bands,
        normalisation=cfg.data.normalisation, stats=manifest.stats,
    )


@torch.no_grad()
def retrieval_top1(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """In-batch retrieval: how often a pair's partner is its nearest neighbour, both ways.

    Returns float32 scalars on the outputs' device (no host sync).
    """
    if z1.dim() > 2:  # MMA feature maps: compare pooled maps
        z1, z2 = z1.mean(dim=(2, 3)), z2.mean(dim=(2, 3))
    sim = nn.functional.normalize(z1.float(), dim=1) @ nn.functional.normalize(z2.float(), dim=1).T
    target = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == target).float().mean(), (sim.argmax(0) == target).float().mean()


class MetricWindow:
    """Per micro-batch means of the logged metrics since the last log step.

    The loss and retrieval sums stay on the device (float64, added in the order a host sum of
    ``.item()`` values would add them: the same numbers), so a step never waits for the GPU;
    :meth:`means` syncs once. Timings are host floats.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.sums: dict[str, Tensor] = {}
        self.times: dict[str, float] = {}
        self.n = 0

    def add_times(self, **seconds: float) -> None:
        """Add host timings (``data_wait_s=...``); averaged per micro-batch like the rest."""
        for k, v in seconds.items():
            self.times[k] = self.times.get(k, 0.0) + v

    def add(self, loss: Tensor, out1: Tensor, out2: Tensor) -> None:
        """Add one micro-batch: its (detached) loss and in-batch retrieval over its outputs."""
        acc12, acc21 = retrieval_top1(out1, out2)
        for k, v in (("loss", loss.detach()), ("retrieval_s1_to_s2", acc12), ("retrieval_s2_to_s1", acc21)):
            v = v.to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def means(self) -> dict[str, float]:
        """Every metric's mean per micro-batch; the one host sync of a window.

        Raises:
            ValueError: Nothing was added.
        """
        if not self.n:
            raise ValueError("MetricWindow.means: no micro-batch in the window")
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).tolist() if names else []
        return {**{k: v / self.n for k, v in self.times.items()},
                **{k: v / self.n for k, v in zip(names, values, strict=True)}}


def poison_nonfinite(t: Tensor, flags: list[Tensor]) -> Tensor:
    """``t`` to run backward from: itself when finite, else with every gradient made NaN.

    A non-finite loss does not always give non-finite gradients (one bad sample's term can be
    cut off by the graph), yet its step must not be taken. Multiplying by a constant 1 (exact:
    the same gradients) or NaN turns "the loss is not finite" into "the gradient norm is not
    finite", which DeepSpeed's optimizers already check, over all ranks at once, before they
    step (:class:`dsl.runtime.engine.SkipNonFiniteAdamW` where it has none). No host sync.
    Appends the (device) flag "t is not finite" to ``flags``.
    """
    bad = ~torch.isfinite(t.detach())
    flags.append(bad.any())
    return t * torch.where(bad, torch.full_like(t, float("nan")), torch.ones_like(t)).detach()


def nonfinite_names(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the floating tensors of ``tensors`` that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


class StepRunner:
    """Runs micro-batches through the engine: an optimizer step each, or GradCache over K.

    ``runner(a, b)`` returns the micro-batches finished by this call as ``(loss, out1, out2)``
    (detached loss, on the device): one with ``grad_accum`` 1; with K > 1 none until the K-th,
    then all K, each with the step's large-batch loss.

    After each call, ``nonfinite`` says whether the call ended an optimizer step that was
    skipped for a non-finite loss, surrogate or gradient on any rank (the same on every rank:
    DeepSpeed's gradient norm is a global one). Such a step also leaves the module's buffers
    (BatchNorm statistics, which a NaN batch turns NaN on its rank only) as they were before it.
    """

    def __init__(self, engine, grad_accum: int):
        self.engine, self.grad_accum = engine, grad_accum
        self.micro_batches: list[tuple[Tensor, Tensor]] = []  # the optimizer step's inputs so far
        self.nonfinite = False

    def __call__(self, a: Tensor, b: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Feed one micro-batch."""
        self.nonfinite = False
        if self.grad_accum > 1:
            self.micro_batches.append((a, b))
            if len(self.micro_batches) < self.grad_accum:
                return []
        buffers = [(buf, buf.clone()) for buf in self.engine.module.buffers()]
        skipped, flags = self.engine.skipped_steps, []
        if self.grad_accum == 1:
            loss, out1, out2 = self.engine(a, b)
            self.engine.backward(poison_nonfinite(loss, flags))
            self.engine.step()
            finished = [(loss.detach(), out1, out2)]
        else:
            # one contrastive batch at the K-th
            cached = large_batch_step(self.engine, self.micro_batches, flags)
            self.micro_batches = []
            finished = [(cached.loss, out1, out2) for out1, out2 in cached.outputs]
        if self.engine.skipped_steps > skipped and self._nonfinite(flags):
            self.nonfinite = True
            with torch.no_grad():
                for live, kept in buffers:
                    live.copy_(kept)
        return finished

    def _nonfinite(self, flags: list[Tensor]) -> bool:
        """Whether the step DeepSpeed just skipped was skipped for non-finite values."""
        if not self.engine.fp16_enabled():
            return True  # the gradient norm was inf or NaN: nothing else skips a step
        # fp16: DeepSpeed also skips a step whose scaled gradients overflowed, its loss scaler's
        # normal search; a step counts when a loss or surrogate was not finite on some rank
        bad = torch.stack(flags).any().float().reshape(1)
        return bool(all_reduce(bad, "max").item())


class NonFiniteSteps:
    """Counts the optimizer steps skipped for non-finite values and stops a run of them.

    Args:
        limit: ``optim.max_nonfinite_steps``: this many skipped in a row raise.
    """

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def applied(self) -> None:
        """An optimizer step was taken: the run of skipped ones is over."""
        self.in_a_row = 0

    def skipped(self, step: int, position: dict) -> None:
        """Optimizer step ``step`` (1-based, the one not taken) was skipped.

        Raises:
            NonFiniteTraining: The ``limit``-th skipped step in a row.
        """
        self.total += 1
        self.in_a_row += 1
        where = f"epoch {position.get('epoch')} sample {position.get('sample')}"
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"optimizer step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"and were skipped (optim.max_nonfinite_steps={self.limit}; {self.total} skipped since "
                f"this start; data read up to {where}); no weights were changed by them")
        log.warning("optimizer step %d skipped: non-finite loss or gradient (%d in a row, %d since this "
                    "start; data read up to %s)", step, self.in_a_row, self.total, where)


class TrainStep:
    """One batch as the loop trains on it: inputs, views, the engine's step(s), the metrics.

    Args:
        engine: The DeepSpeed engine around ``objective``.
        objective: Makes the views and holds the model.
        inputs: A batch on the device -> the model's inputs (normalised, cast, laid out).
        runner: Feeds the engine (:class:`StepRunner`).
        generator: The views' augmentation RNG.
        window: Where finished micro-batches' metrics go.
    """

    def __init__(self, engine, objective, inputs: ModelInputs, runner: StepRunner,
                 generator: torch.Generator, window: MetricWindow):
        self.engine, self.objective, self.inputs, self.runner = engine, objective, inputs, runner
        self.generator, self.window = generator, window

    def __call__(self, batch: dict) -> None:
        """Train on ``batch`` (already on the device); no host sync of its own."""
        s1, s2 = self.inputs(batch)
        a, b = self.objective.views(s1, s2, self.generator)
        finished = self.runner(self.inputs.layout(a), self.inputs.layout(b))
        if self.runner.nonfinite:
            return  # a skipped step's NaN would make the window's means NaN; it trained nothing
        for loss, out1, out2 in finished:
            # per micro-batch: the loss (under GradCache its step's large-batch loss, once per
            # micro-batch) and in-batch retrieval over the micro-batch
            self.window.add(loss, out1, out2)


def large_batch_step(engine, micro_batches: list[tuple[Tensor, Tensor]],
                     flags: list[Tensor] | None = None) -> CachedStep:
    """One optimizer step whose gradient is the large batch's: GradCache driven by DeepSpeed.

    The engine is configured with ``gradient_accumulation_steps`` = K = ``len(micro_batches)``,
    so each replay is one DeepSpeed micro-step (``engine.backward`` then ``engine.step``); the
    K-th is the accumulation boundary, where gradients are reduced over ranks, clipped, and the
    optimizer and the LR schedule step once. Every forward (caching and replay) runs through the
    engine, so ZeRO-3 gathers the parameters. ``scale_wrt_gas=False``: the surrogates already
    carry the gradient of the large-batch loss (a mean over all K micro-batches' anchors), which
    DeepSpeed's default division by K would shrink K times.

    A replay whose surrogate is not finite (a non-finite large-batch loss gives non-finite
    leaf gradients, hence surrogates) backpropagates NaN (:func:`poison_nonfinite`), so the
    K-th step is skipped; its flag is appended to ``flags``.

    Raises:
        ValueError: ``micro_batches`` is not one accumulation window of the engine.
    """
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}")

    flags = [] if flags is None else flags

    def backward(surrogate: Tensor) -> None:
        # ``poison_nonfinite``: also a new graph root, not the engine's output itself (it
        # multiplies by a constant 1 or NaN). DeepSpeed (0.19) hooks
        # every forward output to divide its gradient by gradient_accumulation_steps unless
        # engine.backward has registered the graph, which it does with a hook on the tensor it
        # is given; on the output itself that hook runs after the dividing one (stage 0 and
        # bf16 without ZeRO, where no loss scaler makes a new tensor): 1/K despite
        # scale_wrt_gas=False.
        engine.backward(poison_nonfinite(surrogate, flags), scale_wrt_gas=False)
        engine.step()

    return grad_cache_step(engine.module, micro_batches, run=engine, backward=backward)


def check_finite(weights: dict[str, Tensor], moments: dict[str, Tensor], step: int) -> None:
    """Stop before a checkpoint of non-finite weights is written (a collective: every rank).

    ``weights`` and ``moments`` as :func:`dsl.runtime.full_state.gather` gives them (the same on
    every rank but the buffers, each rank's own): the verdict is reduced over ranks, so all
    raise together.

    Raises:
        NonFiniteWeights: A weight, buffer or AdamW moment holds a NaN or an infinity, on any rank.
    """
    bad = nonfinite_names(weights) + nonfinite_names(moments)
    if not all_reduce(torch.tensor([float(len(bad))]), "max").item():
        return
    named = (f"{len(bad)} tensors, e.g. {', '.join(bad[:3])}" if bad else "another rank's buffers")
    raise NonFiniteWeights(f"step {step}: the weights hold NaN or infinite values ({named}); "
                           "no checkpoint was written")


def train_loop(config: dict) -> None:
    """Ray Train entry point: pretrain from the latest checkpoint to the stop step.

    Args:
        config: ``{"cfg": resolved config tree, "run_id": MLflow run, "launch_time": when the
            driver started (epoch seconds)}``.
    """
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    rank, world, device = setup_worker(cfg)

    manifest = read_manifest(cfg.data.shards)
    s1_chans = len(cfg.data.s1_bands or manifest.bands.s1)
    s2_chans = len(cfg.data.s2_bands or manifest.bands.s2 or [])
    torch.manual_seed(cfg.data.seed)  # same initial weights on every rank
    objective = build_objective(cfg.model, cfg.loss, s1_chans, s2_chans, img_size=cfg.data.crop_size)
    prepare_model(objective, cfg.scale, device, compile_target=objective.model)
    engine, dtype = build_engine(objective, objective.parameters(), cfg.optim, cfg.deepspeed, cfg.data.batch_size)

    position = {"epoch": 0, "sample": 0}  # samples of the epoch consumed: any world size resumes it
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with local_copy(checkpoint) as d:
            position = resume_engine(engine, Path(d), world, cfg.data.batch_size)
    # steps the optimizer took (what the LR schedule follows); DeepSpeed's global_steps also
    # counts fp16 steps skipped for an overflow
    step, boundaries = optimizer_steps(engine), engine.global_steps
    stop = min(cfg.optim.max_steps, cfg.scale.stop_at_step or cfg.optim.max_steps)
    logger = MetricLogger(cfg, config.get("run_id")) if rank == 0 else MetricLogger(cfg, None)
    aug = torch.Generator().manual_seed(cfg.data.seed * 1000 + rank)
    window = MetricWindow()
    normaliser = (Normaliser.from_manifest(manifest, cfg.data.normalisation, cfg.data.s1_bands, cfg.data.s2_bands)
                  if cfg.data.normalise_on_device else None)
    inputs = ModelInputs(normaliser, dtype, memory_format(cfg.scale, device))
    runner = StepRunner(engine, cfg.deepspeed.grad_accum)
    train_step = TrainStep(engine, objective, inputs, runner, aug, window)
    nonfinite = NonFiniteSteps(cfg.optim.max_nonfinite_steps)
    t_start = t_data = time.perf_counter()
    card = model_card(cfg, manifest, s1_chans, s2_chans)
    first_step = True

    def save(final: bool, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            # collective: the fp32 master and AdamW's moments, whole, for another world size
            fp32, moments = full_state.gather(engine)
            check_finite(fp32, moments, step)
            engine.save_checkpoint(tmp, tag=DS_TAG)  # collective too: every rank writes its shard
            if rank == 0:
                save_state(Path(tmp), {"position": consumed, "step": step, "final": final, **engine_counters(engine, world)})
                torch.save({"weights": fp32, "moments": moments}, Path(tmp) / FULL_STATE)
                # registered weights are the fp32 master; integer buffers (BatchNorm's count) as they are
                state_dict = {k: fp32.get(k, v) for k, v in engine.module.state_dict().items()}
                weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
                save_weights(Path(tmp), weights, card)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # The stream's position advances as batches are read, which the device prefetch does ahead
    # of training; each batch comes with the position after it, and `consumed` is that of the
    # last batch trained on: what a checkpoint records, so a resumed job starts at the next one.
    consumed = dict(position)
    budget = BadSampleBudget(cfg.data.max_bad_fraction, epoch_length(cfg.data, manifest))
    stream = resume_stream(cfg.data, rank, world, position, manifest, raw=cfg.data.normalise_on_device) \
        if step < stop else ()
    try:
        for batch, consumed in DevicePrefetcher(with_positions(stream, position), device, cfg.data.device_prefetch):
            t_batch = time.perf_counter()
            if first_step:  # how long a launch takes to reach training (Ray, DeepSpeed, data)
                logger.log({"launch_to_first_step_s": time.time() - config.get("launch_time", time.time()),
                            "torch_threads": torch.get_num_threads()}, step)
                first_step = False
            budget.add(batch)
            epoch = batch.get("epoch", consumed["epoch"])
            train_step(batch)
            t_end = time.perf_counter()
            # host time: on GPU the kernels run on after it, so pairs_per_s is the rate to read there
            window.add_times(data_wait_s=t_batch - t_data, step_time_s=t_end - t_batch)
            t_data = t_end
            if engine.global_steps == boundaries:
                continue  # a micro-batch inside gradient accumulation: no optimizer step yet
            boundaries = engine.global_steps
            if optimizer_steps(engine) == step:
                # DeepSpeed skipped the update and the LR schedule (non-finite values, or an fp16
                # loss-scale overflow), so do we
                if runner.nonfinite:
                    nonfinite.skipped(step + 1, consumed)
                continue
            step = optimizer_steps(engine)
            nonfinite.applied()
            if step % cfg.scale.log_every == 0 or step % cfg.scale.checkpoint_every == 0 or step >= stop:
                n = window.n
                metrics = window.means()  # the host waits for the device here, once per window
                # the logged loss is the global one: every rank's local loss, averaged
                metrics["loss"] = mean_across_ranks(metrics["loss"])
                metrics["lr"] = engine.get_lr()[0]
                # samples replaced in their batches (bad ones; those of unreadable shards), all
                # ranks, since this start; past data.max_bad_fraction the job stops (below)
                planned, bad, skipped = all_reduce(torch.tensor(budget.counts(), dtype=torch.float64)).tolist()
                metrics["data_bad_samples"], metrics["data_skipped_samples"] = bad, skipped
                # optimizer steps skipped for non-finite values since this start (the same on every rank)
                metrics["nonfinite_steps"] = float(nonfinite.total)
                metrics["pairs_per_s"] = world * cfg.data.batch_size * n / (time.perf_counter() - t_start)
                metrics["step"], metrics["epoch"] = step, epoch  # the batch's (its position may have rolled over)
                if objective.temperature() is not None:
                    metrics["temperature"] = objective.temperature()
                window.reset()
                t_start = time.perf_counter()
                logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
                budget.check(planned, bad, skipped)
                if step % cfg.scale.checkpoint_every == 0 or step >= stop:
                    save(final=step >= cfg.optim.max_steps, metrics=metrics)
                else:
                    ray.train.report(metrics)
            if step >= stop:
                break
    except STOPS_EVERY_RANK as e:
        # Every rank raised it at this step (its decision is all-reduced): recorded for the
        # driver instead of raised, so Ray Train does not restart a job that would fail alike.
        logger.close()
        if rank == 0:
            write_failure(cfg, ray.train.get_context().get_experiment_name(), " ".join(str(e).split()))
        return
    logger.close()
