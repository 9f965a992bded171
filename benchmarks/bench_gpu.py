"""GPU training throughput: pairs/s per GPU of the loop's whole step against a bare torch loop.

    python benchmarks/bench_gpu.py [--backbone resnet50] [--crop 128] [--batch 256] [--steps 100]
                                   [--precision bf16] [--zero-stage 2] [--compile] [--no-channels-last]

The loop's side is what ``dsl.train.loop`` runs per batch, in one process (a world of one:
DeepSpeed on a single-rank process group, no Ray): raw batches (S2 uint16, S1 float16) from
pinned memory, copied ahead on a side stream (:class:`dsl.runtime.device.DevicePrefetcher`),
normalised on the device, the objective's forward/backward/step through the DeepSpeed engine,
and the metrics accumulated on the device (one host sync per ``--log-every`` steps). The bare
side: the same model (same seed) with plain AdamW under autocast, on the same batches already
normalised and resident on the GPU; no engine, no metrics, no copies. Both use the same memory
format and compile setting. Data loading from shards is not measured (benchmarks/bench_loader.py).

Targets (issue 8): ResNet-50 backbones, 128 px, bf16: loop >= 0.9 x bare and >= 8,000 pairs/s
on an H100. Without CUDA it runs a tiny model (test_resnet, 32 px, a few steps) as a smoke test
of the same code and says so (``"smoke": true``); its figures mean nothing.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

TARGET_RATIO = 0.9
TARGET_PAIRS_PER_S = 8000  # per H100
N_BATCHES = 4  # distinct synthetic batches, cycled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank(cuda: bool) -> None:
    """A process group of one, as DeepSpeed's single-rank setup expects."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


def synthetic(cfg, manifest, device: torch.device) -> list[dict]:
    """Raw host batches as the loader ships them with ``data.normalise_on_device``; pinned on CUDA."""
    g = torch.Generator().manual_seed(0)
    b, c = cfg.data.batch_size, cfg.data.crop_size
    n1, n2 = len(manifest.bands.s1), len(manifest.bands.s2)
    out = []
    for _ in range(N_BATCHES):
        s1 = (torch.randn(b, n1, c, c, generator=g) * 4 - 15).to(torch.float16)  # dB
        s2 = torch.randint(0, 10000, (b, n2, c, c), generator=g, dtype=torch.int32).to(torch.uint16)
        batch = {"s1": s1, "s2": s2, "key": [f"k{i}" for i in range(b)]}
        if device.type == "cuda":
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.append(batch)
    return out


def fake_manifest():
    from dsl.contracts.manifest import Manifest
    from dsl.contracts.shard_format import S1_BANDS, S2_L1C_BANDS

    stats = {"s1": {n: {"mean": -15.0, "std": 4.0} for n in S1_BANDS},
             "s2": {n: {"mean": 1500.0 + 100 * i, "std": 900.0} for i, n in enumerate(S2_L1C_BANDS)}}
    return Manifest(format_version=1, shards=[], bands={"s1": list(S1_BANDS), "s2": list(S2_L1C_BANDS)},
                    stats=stats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_side(cfg, manifest, host_batches: list[dict], device: torch.device, warmup: int, steps: int) -> dict:
    """The loop's step, as ``dsl.train.loop.train_loop`` runs it per batch."""
    from dsl.collectives import mean_across_ranks
    from dsl.data import Normaliser
    from dsl.objectives import build_objective
    from dsl.runtime.device import DevicePrefetcher, ModelInputs, memory_format, prepare_model
    from dsl.runtime.engine import build_engine
    from dsl.train.loop import MetricWindow, StepRunner, TrainStep

    torch.manual_seed(cfg.data.seed)
    objective = build_objective(cfg.model, cfg.loss, len(manifest.bands.s1), len(manifest.bands.s2),
                                img_size=cfg.data.crop_size)
    prepare_model(objective, cfg.scale, device, compile_target=objective.model)
    engine, dtype = build_engine(objective, objective.parameters(), cfg.optim, cfg.deepspeed, cfg.data.batch_size)
    normaliser = Normaliser.from_manifest(manifest, cfg.data.normalisation)
    window = MetricWindow()
    train_step = TrainStep(engine, objective, ModelInputs(normaliser, dtype, memory_format(cfg.scale, device)),
                           StepRunner(engine, cfg.deepspeed.grad_accum), torch.Generator().manual_seed(0), window)
    total = (warmup + steps) * cfg.deepspeed.grad_accum
    items = ((batch, {"batch": i}) for i, batch in enumerate(itertools.islice(itertools.cycle(host_batches), total)))
    logged: list[dict] = []
    t0 = None
    for i, (batch, _) in enumerate(DevicePrefetcher(items, device, cfg.data.device_prefetch)):
        if i == warmup * cfg.deepspeed.grad_accum:
            _sync(device)
            t0 = time.perf_counter()
        train_step(batch)
        if (i + 1) % cfg.deepspeed.grad_accum == 0 and engine.global_steps % cfg.scale.log_every == 0:
            metrics = window.means()  # the loop's one host sync per window
            metrics["loss"] = mean_across_ranks(metrics["loss"])
            metrics["lr"] = engine.get_lr()[0]
            window.reset()
            logged.append(metrics)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"pairs_per_s": steps * cfg.deepspeed.grad_accum * cfg.data.batch_size / seconds,
            "seconds": seconds, "last_logged": logged[-1] if logged else None}


def bare_side(cfg, manifest, host_batches: list[dict], device: torch.device, warmup: int, steps: int) -> dict:
    """The limit: the same model in the simplest torch loop, inputs already on the device."""
    from dsl.data import Normaliser
    from dsl.losses import build_loss
    from dsl.models.dual import build_model
    from dsl.runtime.device import memory_format

    fmt = memory_format(cfg.scale, device)
    torch.manual_seed(cfg.data.seed)
    model = build_model(cfg.model, cfg.loss, len(manifest.bands.s1), len(manifest.bands.s2),
                        img_size=cfg.data.crop_size).to(device, memory_format=fmt)
    if cfg.scale.compile and device.type == "cuda":
        model.compile()
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    norm = Normaliser.from_manifest(manifest, cfg.data.normalisation)
    batches = [norm.normalise_batch(b["s1"].to(device), b["s2"].to(device), fmt) for b in host_batches]
    low = {"bf16": torch.bfloat16, "fp32": None}[cfg.deepspeed.precision]
    t0 = None
    loss = None
    for i, (s1, s2) in enumerate(itertools.islice(itertools.cycle(batches), warmup + steps)):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            z1, z2 = model(s1, s2)
        loss = loss_fn(z1.float(), z2.float(), getattr(model, "logit_scale", None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.deepspeed.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.grad_clip)
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"pairs_per_s": steps * cfg.data.batch_size / seconds, "seconds": seconds,
            "last_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet50" if cuda else "test_resnet")
    p.add_argument("--crop", type=int, default=128 if cuda else 32)
    p.add_argument("--batch", type=int, default=256 if cuda else 8)
    p.add_argument("--steps", type=int, default=100 if cuda else 3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=20 if cuda else 1, help="untimed steps first (cuDNN autotuning)")
    p.add_argument("--log-every", type=int, default=50 if cuda else 2)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--loss", choices=["dual_ntxent", "clip"], default="dual_ntxent", help="a pair objective")
    p.add_argument("--compile", action="store_true", help="scale.compile (GPU only)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--prefetch", type=int, default=1, help="data.device_prefetch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU smoke)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dsl.contracts.config import load_config
    from dsl.runtime.device import configure_backends

    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = load_config(None, [
        f"model.backbone={args.backbone}", f"data.crop_size={args.crop}", f"data.batch_size={args.batch}",
        f"deepspeed.precision={args.precision}", f"deepspeed.zero_stage={args.zero_stage}", f"loss.name={args.loss}",
        f"scale.use_gpu={str(cuda).lower()}", f"scale.compile={str(args.compile).lower()}",
        f"scale.channels_last={str(not args.no_channels_last).lower()}", f"scale.log_every={args.log_every}",
        "data.normalise_on_device=true", f"data.device_prefetch={args.prefetch}", "scale.num_workers=1",
    ])
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone (DeepSpeed prints)
        init_single_rank(cuda)
        configure_backends(cfg.scale, device)
        manifest = fake_manifest()
        host = synthetic(cfg, manifest, device)
        loop = loop_side(cfg, manifest, host, device, args.warmup, args.steps)
        bare = bare_side(cfg, manifest, host, device, args.warmup, args.steps)
    ratio = loop["pairs_per_s"] / bare["pairs_per_s"]
    result = {
        "benchmark": "gpu_step",
        "command": " ".join(["python benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "smoke": not cuda,
        "note": ("no CUDA: a smoke test of the same code on a tiny model; the figures mean nothing"
                 if not cuda else "per GPU, world of one; shard loading not included"),
        "backbone": args.backbone, "crop": args.crop, "batch": args.batch, "precision": args.precision,
        "zero_stage": args.zero_stage, "loss": args.loss, "channels_last": cfg.scale.channels_last and cuda,
        "compile": cfg.scale.compile, "cudnn_benchmark": cfg.scale.cudnn_benchmark and cuda,
        "device_prefetch": args.prefetch, "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__,
        "loop_pairs_per_s": round(loop["pairs_per_s"], 1),
        "bare_pairs_per_s": round(bare["pairs_per_s"], 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_pairs_per_s_h100": TARGET_PAIRS_PER_S,
        "loop_last_logged": loop["last_logged"],
        "bare_last_loss": bare["last_loss"],
    }
    if cuda:
        result["meets_ratio"] = ratio >= TARGET_RATIO
        result["meets_pairs_per_s"] = loop["pairs_per_s"] >= TARGET_PAIRS_PER_S
    print(json.dumps(result, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
