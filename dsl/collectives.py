"""Every collective DSL runs, in one module (as lightly keeps them).

The pure parts (losses) and the runtime (training loops) both call these, so the module sits
just above the contracts and imports nothing of DSL. Without a process group every helper is
the identity of a world of one, so the same code runs in a single process and in tests.

Devices: nccl has no CPU backend, so a collective on a CPU tensor fails on GPU jobs at the
first call. Every helper here moves its tensor to the device the default group's backend
needs (the current CUDA device for nccl, as-is for gloo), runs the collective there and hands
the result back on the caller's device. Callers never think about it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_device() -> torch.device | None:
    """The device collective tensors must live on: CUDA under nccl, None (any) otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend()).lower()
    # a "cpu:gloo,cuda:nccl" group takes either device; a plain nccl group only CUDA tensors
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """Reduce ``t`` over ranks (``sum``, ``max`` or ``min``); returns a new tensor on ``t``'s device."""
    if world()[1] == 1:
        return t.clone()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    device = backend_device()
    work = t.detach().to(device, copy=True) if device is not None else t.detach().clone()
    dist.all_reduce(work, op=ops[op])
    return work.to(t.device)


def mean_across_ranks(value: float) -> float:
    """The mean over ranks of a Python number (a logged metric), in float64."""
    _, world_size = world()
    if world_size == 1:
        return value
    return all_reduce(torch.tensor([value], dtype=torch.float64)).item() / world_size


def gather_features(x: Tensor, gather_with_grad: bool) -> Tensor:
    """Concatenate every rank's ``[b, ...]`` tensor along dim 0, in rank order.

    Args:
        x: This rank's tensor; same shape on every rank and on the backend's device (a
            model's output is).
        gather_with_grad: Route gradient back through the gather to the owning ranks.

    Returns:
        ``[world_size * b, ...]``; ``x`` itself when there is no process group or one rank.
    """
    rank, world_size = world()
    if world_size == 1:
        return x
    if gather_with_grad:
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x  # the received copy has no graph; the local original does
    return torch.cat(parts, dim=0)
