"""The DeepSpeed engine every training job builds the same way.

One place decides the DeepSpeed config (ZeRO stage, precision, accumulation, clipping), the
optimizer (a plain torch AdamW: no fused-op build needed), the per-optimizer-step LR schedule
and the pickle-free checkpoint loader. Pretraining and fine-tuning only hand over a module and
its parameter groups.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dsl.contracts.config import DeepSpeedConfig, OptimConfig
from dsl.runtime.checkpoint import use_safe_loading
from dsl.runtime.lr_schedule import warmup_cosine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(ds: DeepSpeedConfig, micro_batch_size: int) -> dict:
    """DeepSpeed's JSON config for ``ds`` with ``micro_batch_size`` samples per rank and step."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,  # we pass a plain torch AdamW (no fused_adam build)
    }


def build_engine(
    module: nn.Module,
    params: Iterable,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    micro_batch_size: int,
):
    """``(engine, input dtype)`` for ``module``.

    Args:
        module: What the engine's forward runs; every parameter a step needs must be used
            inside its forward (ZeRO-3 gathers partitions there).
        params: Parameters or parameter groups (groups may set their own ``lr`` and
            ``weight_decay``; ``optim`` gives the defaults).
        optim: Learning rate, weight decay, warmup and the step count of the schedule.
        ds: ZeRO stage, precision, accumulation, clipping.
        micro_batch_size: Samples per rank per forward.
    """
    import deepspeed  # imported late: it picks its accelerator on import, after worker set-up

    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(ds, micro_batch_size),
        dist_init_required=False,
    )
    use_safe_loading(engine)
    dtype = DTYPES[ds.precision]
    if dtype != torch.float32:
        # DeepSpeed casts the parameters, not the buffers: BatchNorm would then meet bf16/fp16
        # weights and fp32 running statistics, which torch refuses ("expected scalar type").
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
    return engine, dtype
