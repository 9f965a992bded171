"""The per-worker pretraining loop; Ray Train runs one copy on every worker.

Data flows: shards -> make_loader (this rank's equal share) -> DeepSpeed engine (forward,
backward, ZeRO, precision, accumulation, clipping, LR schedule) -> contrastive loss whose
negatives are gathered from every rank. With ``deepspeed.grad_accum`` = K > 1 the K
micro-batches of an optimizer step are one contrastive batch (GradCache,
:func:`large_batch_step`), not K small ones. Every ``checkpoint_every`` optimizer steps all ranks
save the DeepSpeed state and the stream position and report them to Ray's storage.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from dsl.collectives import mean_across_ranks
from dsl.contracts.config import Config
from dsl.contracts.manifest import Manifest, read_manifest
from dsl.contracts.model_card import ModelCard, save_weights
from dsl.data import resume_stream
from dsl.objectives import build_objective
from dsl.objectives.grad_cache import CachedStep, grad_cache_step
from dsl.runtime import full_state
from dsl.runtime.checkpoint import DS_TAG, FULL_STATE, engine_counters, resume_engine, save_state
from dsl.runtime.engine import build_engine
from dsl.runtime.tracking import MetricLogger
from dsl.runtime.trainer import setup_worker


def model_card(cfg: Config, manifest: Manifest, s1_chans: int, s2_chans: int) -> ModelCard:
    """What rebuilds the model from its weights and feeds it as in pretraining (model.json)."""
    return ModelCard(
        model=cfg.model, loss=cfg.loss, s1_chans=s1_chans, s2_chans=s2_chans, img_size=cfg.data.crop_size,
        s1_bands=cfg.data.s1_bands, s2_bands=cfg.data.s2_bands, band_names=manifest.bands,
        normalisation=cfg.data.normalisation, stats=manifest.stats,
    )


@torch.no_grad()
def retrieval_top1(z1: Tensor, z2: Tensor) -> tuple[float, float]:
    """In-batch retrieval: how often a pair's partner is its nearest neighbour, both ways."""
    if z1.dim() > 2:  # MMA feature maps: compare pooled maps
        z1, z2 = z1.mean(dim=(2, 3)), z2.mean(dim=(2, 3))
    sim = nn.functional.normalize(z1.float(), dim=1) @ nn.functional.normalize(z2.float(), dim=1).T
    target = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


def large_batch_step(engine, micro_batches: list[tuple[Tensor, Tensor]]) -> CachedStep:
    """One optimizer step whose gradient is the large batch's: GradCache driven by DeepSpeed.

    The engine is configured with ``gradient_accumulation_steps`` = K = ``len(micro_batches)``,
    so each replay is one DeepSpeed micro-step (``engine.backward`` then ``engine.step``); the
    K-th is the accumulation boundary, where gradients are reduced over ranks, clipped, and the
    optimizer and the LR schedule step once. Every forward (caching and replay) runs through the
    engine, so ZeRO-3 gathers the parameters. ``scale_wrt_gas=False``: the surrogates already
    carry the gradient of the large-batch loss (a mean over all K micro-batches' anchors), which
    DeepSpeed's default division by K would shrink K times.

    Raises:
        ValueError: ``micro_batches`` is not one accumulation window of the engine.
    """
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}")

    def backward(surrogate: Tensor) -> None:
        # ``+ 0.0``: a new graph root, not the engine's output itself. DeepSpeed (0.19) hooks
        # every forward output to divide its gradient by gradient_accumulation_steps unless
        # engine.backward has registered the graph, which it does with a hook on the tensor it
        # is given; on the output itself that hook runs after the dividing one (stage 0 and
        # bf16 without ZeRO, where no loss scaler makes a new tensor): 1/K despite
        # scale_wrt_gas=False.
        engine.backward(surrogate + 0.0, scale_wrt_gas=False)
        engine.step()

    return grad_cache_step(engine.module, micro_batches, run=engine, backward=backward)


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
    engine, dtype = build_engine(objective, objective.parameters(), cfg.optim, cfg.deepspeed, cfg.data.batch_size)

    position = {"epoch": 0, "batch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            position = resume_engine(engine, Path(d), world, cfg.data.batch_size)
    step = engine.global_steps
    stop = min(cfg.optim.max_steps, cfg.scale.stop_at_step or cfg.optim.max_steps)
    logger = MetricLogger(cfg, config.get("run_id")) if rank == 0 else MetricLogger(cfg, None)
    aug = torch.Generator().manual_seed(cfg.data.seed * 1000 + rank)
    window: dict[str, float] = {}
    t_start = t_data = time.perf_counter()
    card = model_card(cfg, manifest, s1_chans, s2_chans)
    first_step = True

    def save(final: bool, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its shard
            # collective too: the fp32 master and AdamW's moments, whole, for another world size
            fp32, moments = full_state.gather(engine)
            if rank == 0:
                save_state(Path(tmp), {"position": {**position, "samples": position["batch"] * world * cfg.data.batch_size},
                                       "step": step, "final": final, **engine_counters(engine, world)})
                torch.save({"weights": fp32, "moments": moments}, Path(tmp) / FULL_STATE)
                # registered weights are the fp32 master; integer buffers (BatchNorm's count) as they are
                state_dict = {k: fp32.get(k, v) for k, v in engine.module.state_dict().items()}
                weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
                save_weights(Path(tmp), weights, card)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # position advances as batches are handed out, so a checkpoint resumes at the next batch
    batches = resume_stream(cfg.data, rank, world, position, manifest) if step < stop else ()
    micro_batches: list[tuple[Tensor, Tensor]] = []  # the optimizer step's inputs so far (grad_accum > 1)
    for batch in batches:
        t_batch = time.perf_counter()
        s1 = batch["s1"].to(device, dtype, non_blocking=True)
        s2 = batch["s2"].to(device, dtype, non_blocking=True)
        a, b = objective.views(s1, s2, aug)
        if first_step:  # how long a launch takes to reach training (Ray, DeepSpeed, data)
            logger.log({"launch_to_first_step_s": time.time() - config.get("launch_time", time.time()),
                        "torch_threads": torch.get_num_threads()}, step)
            first_step = False
        if cfg.deepspeed.grad_accum == 1:
            loss, out1, out2 = engine(a, b)
            engine.backward(loss)
            engine.step()
            done = [(loss.item(), out1, out2)]
        else:  # one contrastive batch over the step's micro-batches: GradCache at the K-th
            micro_batches.append((a, b))
            done = []
            if len(micro_batches) == cfg.deepspeed.grad_accum:
                cached = large_batch_step(engine, micro_batches)
                done = [(cached.loss.item(), out1, out2) for out1, out2 in cached.outputs]
                micro_batches = []
        objective.after_step()
        t_end = time.perf_counter()
        # per micro-batch means: the loss (under GradCache its step's large-batch loss, once per
        # micro-batch) and in-batch retrieval over the micro-batch
        for k, v in (("data_wait_s", t_batch - t_data), ("step_time_s", t_end - t_batch)):
            window[k] = window.get(k, 0.0) + v
        for loss_value, out1, out2 in done:
            acc12, acc21 = retrieval_top1(out1, out2)
            for k, v in (("loss", loss_value), ("retrieval_s1_to_s2", acc12), ("retrieval_s2_to_s1", acc21)):
                window[k] = window.get(k, 0.0) + v
            window["n"] = window.get("n", 0) + 1
        t_data = t_end
        if engine.global_steps == step:
            continue  # a micro-batch inside gradient accumulation: no optimizer step yet
        step = engine.global_steps
        if step % cfg.scale.log_every == 0 or step % cfg.scale.checkpoint_every == 0 or step >= stop:
            n = window.pop("n")
            metrics = {k: v / n for k, v in window.items()}
            # the logged loss is the global one: every rank's local loss, averaged
            metrics["loss"] = mean_across_ranks(metrics["loss"])
            metrics["lr"] = engine.get_lr()[0]
            metrics["pairs_per_s"] = world * cfg.data.batch_size * n / (time.perf_counter() - t_start)
            metrics["step"], metrics["epoch"] = step, position["epoch"]
            if objective.temperature() is not None:
                metrics["temperature"] = objective.temperature()
            window, t_start = {}, time.perf_counter()
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
            if step % cfg.scale.checkpoint_every == 0 or step >= stop:
                save(final=step >= cfg.optim.max_steps, metrics=metrics)
            else:
                ray.train.report(metrics)
        if step >= stop:
            break
    logger.close()
