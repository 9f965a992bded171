"""The per-worker pretraining loop; Ray Train runs one copy on every worker.

Data flows: shards -> make_loader (this rank's equal share) -> DeepSpeed engine (forward,
backward, ZeRO, precision, accumulation, clipping, LR schedule) -> contrastive loss whose
negatives are gathered from every rank. Every ``checkpoint_every`` optimizer steps all ranks
save the DeepSpeed state and the stream position and report them to Ray's storage.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from dsl.config import Config
from dsl.data import batches_per_epoch, make_loader, read_manifest
from dsl.losses import augment, build_loss
from dsl.models.dual import build_model
from dsl.train.checkpoint import DS_TAG, load_state, save_state, save_weights, use_safe_loading
from dsl.train.launch import setup_worker
from dsl.train.schedule import warmup_cosine


def deepspeed_config(cfg: Config) -> dict:
    d = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,  # we pass a plain torch AdamW (no fused_adam build)
    }


class ContrastiveTask(nn.Module):
    """Wraps the model so the engine's forward returns exactly what the loss takes.

    Going through ``engine(a, b)`` (not ``engine.module.x``) keeps ZeRO-3's parameter
    gathering hooks in the path for every method.
    """

    def __init__(self, model: nn.Module, loss: str):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if self.loss == "simclr":
            return self.model(a), self.model(b)  # two views of one modality
        if self.loss == "mma":
            return self.model.feature_maps(a, b)
        return self.model(a, b)


def model_info(cfg: Config, manifest: dict, s1_chans: int, s2_chans: int) -> dict:
    """What rebuilds the model from its weights: stored beside them (model.json)."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "loss": cfg.loss.model_dump(mode="json"),
        "s1_chans": s1_chans,
        "s2_chans": s2_chans,
        "img_size": cfg.data.crop_size,
        "s1_bands": cfg.data.s1_bands,
        "s2_bands": cfg.data.s2_bands,
        "band_names": manifest["bands"],
        "normalisation": cfg.data.normalisation,
        "stats": manifest["stats"],
    }


@torch.no_grad()
def retrieval_top1(z1: Tensor, z2: Tensor) -> tuple[float, float]:
    """In-batch retrieval: how often a pair's partner is its nearest neighbour, both ways."""
    if z1.dim() > 2:  # MMA feature maps: compare pooled maps
        z1, z2 = z1.mean(dim=(2, 3)), z2.mean(dim=(2, 3))
    sim = nn.functional.normalize(z1.float(), dim=1) @ nn.functional.normalize(z2.float(), dim=1).T
    target = torch.arange(sim.shape[0], device=sim.device)
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


class MetricLogger:
    """Rank 0's MLflow writer: metrics every N steps and the node's system metrics."""

    def __init__(self, cfg: Config, run_id: str | None):
        self.client, self.monitor, self.run_id = None, None, run_id
        if run_id is None:
            return
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        self.client = MlflowClient(cfg.mlflow.tracking_uri)
        if cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True,
                                                tracking_uri=cfg.mlflow.tracking_uri)
            self.monitor.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()


def train_loop(config: dict) -> None:
    """Ray Train entry point. ``config``: {"cfg": resolved config tree, "run_id": MLflow run,
    "launch_time": when the driver started (epoch seconds)}."""
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    rank, world, device = setup_worker(cfg)
    import deepspeed

    manifest = read_manifest(cfg.data.shards)
    s1_chans = len(cfg.data.s1_bands or manifest["bands"]["s1"])
    s2_chans = len(cfg.data.s2_bands or manifest["bands"]["s2"])
    torch.manual_seed(cfg.data.seed)  # same initial weights on every rank
    model = build_model(cfg.model, cfg.loss, s1_chans, s2_chans, img_size=cfg.data.crop_size)
    task = ContrastiveTask(model, cfg.loss.name)
    loss_fn = build_loss(cfg.loss)
    optimizer = torch.optim.AdamW(task.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim))
    engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    use_safe_loading(engine)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)

    position = {"epoch": 0, "batch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=True)
            position = load_state(Path(d))["position"]
    step = engine.global_steps
    stop = min(cfg.optim.max_steps, cfg.scale.stop_at_step or cfg.optim.max_steps)
    per_epoch = batches_per_epoch(cfg.data, world, manifest)
    if per_epoch < 1:
        raise ValueError(f"{cfg.data.shards}: too few samples for {world} ranks x batch {cfg.data.batch_size}")
    logger = MetricLogger(cfg, config.get("run_id")) if rank == 0 else MetricLogger(cfg, None)
    aug = torch.Generator().manual_seed(cfg.data.seed * 1000 + rank)
    window: dict[str, float] = {}
    t_start = t_data = time.perf_counter()
    info = model_info(cfg, manifest, s1_chans, s2_chans)
    first_step = True

    def save(final: bool, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its shard
            state_dict = engine._zero3_consolidated_16bit_state_dict() if cfg.deepspeed.zero_stage == 3 else None
            if rank == 0:
                save_state(Path(tmp), {"position": position, "step": step, "final": final})
                state_dict = state_dict or engine.module.model.state_dict()
                save_weights(Path(tmp), {k.removeprefix("model."): v for k, v in state_dict.items()}, info)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    while step < stop:
        loader = make_loader(cfg.data, rank, world, epoch=position["epoch"], start_batch=position["batch"])
        for batch in loader:
            t_batch = time.perf_counter()
            s1 = batch["s1"].to(device, dtype, non_blocking=True)
            s2 = batch["s2"].to(device, dtype, non_blocking=True)
            if cfg.loss.name == "simclr":  # the baseline's two views: augmentations of one sensor
                x = s2 if model.modality == "s2" else s1
                s1, s2 = augment(x, aug), augment(x, aug)
            if first_step:  # how long a launch takes to reach training (Ray, DeepSpeed, data)
                logger.log({"launch_to_first_step_s": time.time() - config.get("launch_time", time.time()),
                            "torch_threads": torch.get_num_threads()}, step)
                first_step = False
            out1, out2 = engine(s1, s2)
            scale = getattr(model, "logit_scale", None)
            loss = loss_fn(out1.float(), out2.float(), scale)
            engine.backward(loss)
            engine.step()
            if scale is not None:  # as CLIP: the temperature never falls below 1/100
                with torch.no_grad():
                    scale.clamp_(0, math.log(100))
            position["batch"] += 1
            t_end = time.perf_counter()
            acc12, acc21 = retrieval_top1(out1, out2)
            for k, v in (("loss", loss.item()), ("retrieval_s1_to_s2", acc12), ("retrieval_s2_to_s1", acc21),
                         ("data_wait_s", t_batch - t_data), ("step_time_s", t_end - t_batch)):
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
                metrics["loss"] = _mean_across_ranks(metrics["loss"])
                metrics["lr"] = engine.get_lr()[0]
                metrics["pairs_per_s"] = world * cfg.data.batch_size * n / (time.perf_counter() - t_start)
                metrics["step"], metrics["epoch"] = step, position["epoch"]
                if scale is not None:
                    metrics["temperature"] = math.exp(-scale.item())
                window, t_start = {}, time.perf_counter()
                logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
                if step % cfg.scale.checkpoint_every == 0 or step >= stop:
                    save(final=step >= cfg.optim.max_steps, metrics=metrics)
                else:
                    ray.train.report(metrics)
            if step >= stop:
                break
            if position["batch"] >= per_epoch:
                break
        if position["batch"] >= per_epoch:  # every rank ends the epoch on the same batch
            position = {"epoch": position["epoch"] + 1, "batch": 0}
    logger.close()


def _mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
