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

from dsl.collectives import all_reduce
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
        # Gradients are summed across ranks in fp32 and, under ZeRO, accumulated over micro-batches
        # in fp32: in bf16, 8 bits of mantissa lose small per-rank contributions. (DeepSpeed
        # refuses fp32 accumulation without ZeRO; its stage-0 bf16 wrapper keeps an fp32 master.)
        # fp16 keeps DeepSpeed's default: the loss scaler's overflow check expects fp16 gradients.
        **({"communication_data_type": "fp32"} if ds.precision == "bf16" else {}),
        **({"data_types": {"grad_accum_dtype": "fp32"}} if ds.precision == "bf16" and ds.zero_stage else {}),
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,  # we pass a plain torch AdamW (no fused_adam build)
    }


def no_decay_groups(params: Iterable) -> list[dict]:
    """Split parameters (or groups) so norms, biases and scalars get no weight decay.

    A parameter of fewer than two dimensions (bias, norm scale and shift, the learnable
    temperature) is not a weight matrix: decaying it pulls BatchNorm towards zero output and
    the temperature towards 1, which is not the regulariser AdamW's decay is meant to be.
    Each group keeps its other settings (``lr``...); the decayed half keeps its
    ``weight_decay`` (or the optimizer default), the other gets ``weight_decay=0``.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        members = list(group["params"])
        decay = [p for p in members if p.ndim >= 2]
        keep = [p for p in members if p.ndim < 2]
        if decay:
            out.append({**group, "params": decay})
        if keep:
            out.append({**group, "params": keep, "weight_decay": 0.0})
    return out


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips its update when a gradient is not finite, the way DeepSpeed's wrappers do.

    DeepSpeed (0.19) skips the update of a step whose gradient norm is inf or NaN under every
    wrapper it puts around the torch optimizer (ZeRO 1-3, its bf16 and fp16 optimizers): the
    wrapper sets ``overflow``, and the engine then counts the step in ``skipped_steps``, leaves
    the LR schedule where it was and clears the gradients. ZeRO stage 0 in fp32 has no wrapper:
    the engine steps this optimizer itself, and reads the same ``overflow`` when it has one. The
    flag is reduced over ranks, so no rank steps while another skips.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW's step, or nothing (``overflow`` set) when any rank has a non-finite gradient."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros(1, device=device)
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        self.overflow = bool(all_reduce(bad, "max").item())  # the one host sync, as DeepSpeed's
        if self.overflow:
            return None
        return super().step(closure)


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
            ``weight_decay``; ``optim`` gives the defaults). Norms, biases and other
            parameters of fewer than two dimensions get no weight decay (:func:`no_decay_groups`).
        optim: Learning rate, weight decay, warmup and the step count of the schedule.
        ds: ZeRO stage, precision, accumulation, clipping.
        micro_batch_size: Samples per rank per forward.
    """
    import deepspeed  # imported late: it picks its accelerator on import, after worker set-up

    # ZeRO 0 in fp32 is the one engine whose optimizer DeepSpeed does not wrap (see the class)
    adamw = SkipNonFiniteAdamW if ds.zero_stage == 0 and ds.precision == "fp32" else torch.optim.AdamW
    optimizer = adamw(no_decay_groups(params), lr=optim.lr, weight_decay=optim.weight_decay)
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


def optimizer_steps(engine) -> int:
    """Optimizer steps ``engine`` has taken: DeepSpeed's ``global_steps`` without the skipped ones.

    DeepSpeed skips the update (and the LR schedule's step) of a step whose gradients are not
    finite (under fp16 also a loss-scale overflow; in fp32 without ZeRO through
    :class:`SkipNonFiniteAdamW`), yet counts it in ``global_steps``: a job stopping at
    ``global_steps == max_steps`` would end before its schedule does.
    """
    return engine.global_steps - engine.skipped_steps
