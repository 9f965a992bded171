"""Engine overhead: a training step through Ray Train + DeepSpeed against a plain torch loop.

    python benchmarks/bench_engine.py [--backbone resnet18] [--crop 64] [--batch 32] [--steps 20]

Same model, batch, loss and thread count (one Ray worker with 2 threads vs one process with 2
threads); the step time is forward + backward + optimizer step, data waiting excluded on both
sides. Also reports the time from launch to the first step. Prints one JSON object.
Target: engine / plain <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds a file named like the `ingest` package; keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def plain_loop(cfg, s1_chans: int, s2_chans: int, steps: int) -> list[float]:
    """The limit: the same model and loss in the simplest possible torch loop."""
    import torch

    from dsl.losses import build_loss
    from dsl.models.dual import build_model

    torch.set_num_threads(cfg.scale.torch_threads)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, s1_chans, s2_chans, img_size=cfg.data.crop_size)
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    b, c = cfg.data.batch_size, cfg.data.crop_size
    s1, s2 = torch.randn(b, s1_chans, c, c), torch.randn(b, s2_chans, c, c)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        z1, z2 = model(s1, s2)
        loss = loss_fn(z1, z2, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (the Ray worker gets as many CPUs)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlflow import MlflowClient

    from dsl.contracts.config import IngestConfig, load_config
    from dsl.train.pretrain import pretrain
    from ingest.run import ingest
    from ingest.synth import synthesise

    tmp = Path(tempfile.mkdtemp(prefix="dsl-engine-"))
    synthesise(tmp / "raw", "sen12ms", 4 * args.batch, seed=0, size=args.crop)
    ingest(IngestConfig(source="sen12ms", input=str(tmp / "raw"), output=str(tmp / "shards"), progress=False))
    log_every = 5
    cfg = load_config(Path(__file__).parents[1] / "configs" / "pretrain" / "tiny.yaml", [
        f"data.shards={tmp / 'shards'}", "data.split=null", f"data.batch_size={args.batch}",
        f"data.crop_size={args.crop}", f"model.backbone={args.backbone}", "model.proj_hidden_dim=512",
        "model.proj_dim=128", f"optim.max_steps={args.steps}", f"deepspeed.zero_stage={args.zero_stage}",
        "scale.num_workers=1", f"scale.cpus_per_worker={args.threads}", f"scale.torch_threads={args.threads}", f"scale.log_every={log_every}",
        f"scale.checkpoint_every={args.steps}", f"scale.storage_path={tmp / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow.system_metrics=false",
    ])
    plain = plain_loop(cfg, 2, 13, args.steps)
    t0 = time.perf_counter()
    out = pretrain(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(cfg.mlflow.tracking_uri)
    # per-window mean step times; the first window holds warm-up steps on both sides
    engine_windows = [m.value for m in client.get_metric_history(out["run_id"], "step_time_s")][1:]
    first = client.get_metric_history(out["run_id"], "launch_to_first_step_s")[0].value
    plain_steady = statistics.mean(plain[log_every:])
    engine_steady = statistics.mean(engine_windows)
    print(json.dumps({
        "benchmark": "engine_overhead",
        "command": "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]),
        "backbone": args.backbone, "crop": args.crop, "batch": args.batch, "threads": args.threads,
        "zero_stage": args.zero_stage,
        "plain_step_s": round(plain_steady, 4),
        "ray_deepspeed_step_s": round(engine_steady, 4),
        "ratio": round(engine_steady / plain_steady, 3),
        "target_ratio": 1.10,
        "launch_to_first_step_s": round(first, 1),
        "engine_torch_threads": client.get_metric_history(out["run_id"], "torch_threads")[0].value,
        "pretrain_wall_s": round(wall, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
