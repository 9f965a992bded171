"""The training state without its world size: fp32 master weights and AdamW moments by name.

DeepSpeed's own checkpoint stores the ZeRO partitions of each rank (and, for bf16, each rank's
slice of the fp32 master), so it loads only on the world size that wrote it. This module
gathers the full fp32 value of every parameter and of its two AdamW moments, keyed by the
parameter's name in the module, and writes them back into an engine of any world size, any
ZeRO stage (0-3) and any precision. The same gathered weights are what a job registers: the
fp32 master, not the bf16/fp16 working copy.

Every function here is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner_optimizer(engine):
    """The torch optimizer DeepSpeed wraps (itself when DeepSpeed did not wrap it)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _ensure_moments(engine) -> None:
    """Give every tensor the torch optimizer steps AdamW moments, and link DeepSpeed's views.

    AdamW creates its state lazily at the first step, so a fresh engine has none to load into.
    And ZeRO-1/2 and BF16_Optimizer link each parameter's view of the moments once, right after
    the first parameter group has stepped: the views of the other groups stay empty (DeepSpeed
    0.19). Linking again once every group has state fixes both.
    """
    inner = _inner_optimizer(engine)
    # ZeRO-3 hands its flat fp32 sub-groups to the torch optimizer only during its step
    tensors = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    tensors += [t for group in inner.param_groups for t in group["params"]]
    for t in tensors:
        state = inner.state[t]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(t, memory_format=torch.preserve_format)
        state.setdefault("step", torch.tensor(0.0))
    relink = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is not None and hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        relink()


def _fp32_copies(engine) -> dict[int, Tensor]:
    """``id(working parameter) -> its fp32 master`` under DeepSpeed's FP16_UnfusedOptimizer.

    That wrapper (ZeRO stage 0 with fp16 or bf16 and a torch optimizer, as ours) keeps an fp32
    copy per parameter and steps the torch optimizer on the copies; it has no accessors.
    """
    opt = engine.optimizer
    if not (hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups")):
        return {}
    return {id(p): master for lp, hp in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
            for p, master in zip(lp, hp, strict=True)}


def _is_zero3(param: Tensor) -> bool:
    return hasattr(param, "ds_id")


def _has_master(param: Tensor) -> bool:
    """ZeRO-1/2 and BF16_Optimizer parameters carry a mapping to their fp32 fragment."""
    return hasattr(param, "_hp_mapping")


def gather(engine) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(weights, moments)``, full fp32 tensors on the CPU, on every rank.

    ``weights`` holds every parameter (from the optimizer's fp32 master) and every floating
    buffer (BatchNorm statistics, upcast) of ``engine.module`` by name; ``moments`` holds
    ``"<name>/exp_avg"`` and ``"<name>/exp_avg_sq"`` of every trained parameter (absent before
    the first optimizer step of a plain torch optimizer).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _ensure_moments(engine)
    inner = _inner_optimizer(engine)
    copies = _fp32_copies(engine)
    weights: dict[str, Tensor] = {}
    moments: dict[str, Tensor] = {}
    for name, p in engine.module.named_parameters():
        if _is_zero3(p) or _has_master(p):
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None:  # a frozen ZeRO-3 parameter: no master, gather the working copy
                value = _gathered(p)
            weights[name] = value.detach().float().cpu()
            if p.requires_grad:
                for key in MOMENTS:
                    moments[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
            continue
        master = copies.get(id(p), p)  # fp32 without ZeRO: the parameter is its own master
        weights[name] = master.detach().float().cpu().clone()
        if p.requires_grad:
            for key in MOMENTS:
                moments[f"{name}/{key}"] = inner.state[master][key].detach().float().cpu().clone()
    for name, b in engine.module.named_buffers():
        if b.is_floating_point():
            weights[name] = b.detach().float().cpu().clone()
    return weights, moments


def _gathered(p: Tensor) -> Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().float().cpu().clone()


def _set_zero3_partition(p: Tensor, full: Tensor, key: str | None) -> None:
    """This rank's slice of a ZeRO-3 parameter's fp32 master (``key`` None) or AdamW moment.

    DeepSpeed's ``safe_set_full_fp32_param`` cuts the slice without regard to the padding of the
    last partition, and fails for a parameter smaller than the world size (the [1] temperature
    on two ranks); this cuts it within the parameter and leaves the padding alone.
    """
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(p)
    chunk = full.flatten()[start:start + part.numel()]
    part.data[: chunk.numel()].copy_(chunk)


def load(engine, weights: dict[str, Tensor], moments: dict[str, Tensor], optimizer_steps: int) -> None:
    """Write ``weights`` and ``moments`` (from :func:`gather`, any world size) into ``engine``.

    Both the fp32 master and the working copy are set, so the next forward already uses them;
    AdamW's step count becomes ``optimizer_steps`` (its bias correction depends on it).

    Raises:
        ValueError: A parameter or buffer of the module is missing or has another shape.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _ensure_moments(engine)
    inner = _inner_optimizer(engine)
    copies = _fp32_copies(engine)

    def value(name: str, like: Tensor, shape: torch.Size) -> Tensor:
        if name not in weights:
            raise ValueError(f"the checkpoint's full state has no '{name}'")
        v = weights[name]
        if v.shape != shape:
            raise ValueError(f"the checkpoint's '{name}' has shape {tuple(v.shape)}, the model {tuple(shape)}")
        return v.to(like.device)

    for name, p in engine.module.named_parameters():
        if _is_zero3(p):
            full = value(name, p, p.ds_shape)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(full.to(p.dtype))  # broadcast from rank 0 and re-partitioned on exit
        else:
            full = value(name, p, p.shape)
            with torch.no_grad():
                p.data.copy_(full.to(p.dtype))
        if not p.requires_grad:
            continue
        if _is_zero3(p):
            _set_zero3_partition(p, full.float(), None)
            for key in MOMENTS:
                if f"{name}/{key}" in moments:
                    _set_zero3_partition(p, moments[f"{name}/{key}"].to(full.device), key)
            continue
        if _has_master(p):
            safe_set_full_fp32_param(p, full.float())
            for key in MOMENTS:
                if f"{name}/{key}" in moments:
                    safe_set_full_optimizer_state(p, moments[f"{name}/{key}"].to(full.device), key)
            continue
        master = copies.get(id(p), p)
        with torch.no_grad():
            master.data.copy_(full.to(master.dtype))
        for key in MOMENTS:
            if f"{name}/{key}" in moments:
                inner.state[master][key] = moments[f"{name}/{key}"].to(master.device, master.dtype).clone()
    for name, b in engine.module.named_buffers():
        if b.is_floating_point():
            with torch.no_grad():
                b.copy_(value(name, b, b.shape).to(b.dtype))
    for state in inner.state.values():
        if "exp_avg" in state:
            step = state.get("step")
            state["step"] = (torch.tensor(float(optimizer_steps), dtype=step.dtype, device=step.device)
                             if isinstance(step, Tensor) else torch.tensor(float(optimizer_steps)))
