"""Contrastive gradient accumulation that equals the large batch (GradCache; open_clip's ``accum_freq``).

Accumulating K micro-batches the usual way (K forward/backward passes, one optimizer step)
gives each micro-batch's contrastive loss only that micro-batch's negatives: the mean of K
small-batch losses, not the loss of the K-times larger batch the config describes. GradCache
(Gao et al. 2021) computes the large-batch gradient exactly, for one extra forward per
micro-batch and the memory of one micro-batch's activations plus K micro-batches' embeddings:

1. Cache: every micro-batch's forward without a graph (``mode="embed"``); keep its outputs
   ``(out1, out2)`` and the learnable temperature's value.
2. Loss: the objective's loss over all K micro-batches' outputs at once (its gather adds every
   rank's: :mod:`dsl.losses.gather`), with the cached outputs and a copy of ``logit_scale`` as
   leaves; its gradients w.r.t. those leaves.
3. Replay: every micro-batch's forward again, with a graph (``mode="replay"``), and backward of
   the surrogate ``sum(out1 * g1) + sum(out2 * g2) (+ logit_scale * g_s once)``: by the chain
   rule the parameter gradients summed over the K replays are the large-batch loss's.

The engine averages gradients over ranks as for a plain step, so the gather modes stay exact
(the loss on rank r is its share L_r of the global loss, as without accumulation). Exact as long
as each replay reproduces its cached outputs: the parameters have not moved (the optimizer steps
after the last replay), the random numbers are the same (each caching forward's RNG state is
restored for its replay) and BatchNorm normalises with the same batch statistics (train mode
uses the micro-batch's own both times: a K-micro-batch step is K BatchNorm batches, like plain
accumulation, "ghost" BatchNorm). Every objective works this way: its outputs may be embeddings
(Dual NT-Xent, CLIP, SimCLR's two views) or feature maps (MMA's locations are then drawn over
the large batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsl.objectives.base import Objective, at_least_fp32

Inputs = tuple[Tensor, Tensor]


@dataclass
class CachedStep:
    """What one GradCache step hands back for logging.

    Attributes:
        loss: The large-batch loss as this rank's loss module returns it (detached): with
            ``local_loss`` this rank's share, whose mean over ranks is the global loss.
        outputs: Each micro-batch's cached ``(out1, out2)``, detached.
    """

    loss: Tensor
    outputs: list[tuple[Tensor, Tensor]]


@contextmanager
def batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running statistics as they were before the block.

    In train mode a BatchNorm normalises with the batch's statistics and also updates its
    running mean/variance. GradCache's caching pass and its replay run every micro-batch twice,
    which would update the running statistics twice (an effective momentum of 1 - (1 - m)^2,
    and ``num_batches_tracked`` counting double). Restoring them after the caching pass leaves
    the replay's update only: the statistics evolve exactly as in plain training on the same
    micro-batches. The batch statistics, and so the outputs, are the same in both passes.
    Buffers are restored in place (the engine holds references to them).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, kept in zip(norms, saved, strict=True):
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for buffer, value in zip(live, kept, strict=True):
                    buffer.copy_(value)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def grad_cache_step(
    objective: Objective,
    micro_batches: Sequence[Inputs],
    run: Callable[..., tuple] | None = None,
    backward: Callable[[Tensor], None] | None = None,
) -> CachedStep:
    """Accumulate the large-batch gradient of ``micro_batches`` (one optimizer step's worth).

    Args:
        objective: The module being trained (``engine.module`` under DeepSpeed): its BatchNorm
            buffers are restored after the caching pass and its ``loss`` computes step 2.
        micro_batches: This rank's ``(a, b)`` inputs of the step, as :meth:`Objective.views`
            makes them; every rank passes the same number of equal-sized micro-batches.
        run: What runs a forward, ``run(a, b, mode=..., grads=...)``: the DeepSpeed engine, so
            ZeRO-3 gathers the parameters; default ``objective`` itself.
        backward: Backward of one replay's surrogate loss, called once per micro-batch, in
            order; under DeepSpeed ``engine.backward`` without its 1/K scaling, then
            ``engine.step()`` (:func:`dsl.train.loop.large_batch_step`). Default
            ``s.backward()``: the gradients accumulate in ``.grad``.

    Returns:
        The large-batch loss and the cached outputs.

    Raises:
        ValueError: No micro-batch.
    """
    if not micro_batches:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    run = run or objective
    backward = backward or (lambda surrogate: surrogate.backward())
    device = micro_batches[0][0].device
    states, cached, scale = [], [], None
    with torch.no_grad(), batchnorm_stats_kept(objective):
        for a, b in micro_batches:
            states.append(_rng_state(device))
            out1, out2, scale = run(a, b, mode="embed")
            cached.append((out1.detach(), out2.detach()))

    # the outputs as the loss gets them in the plain forward (fp32 at least), the temperature
    # in its own dtype
    leaves1 = [_leaf(at_least_fp32(o1)) for o1, _ in cached]
    leaves2 = [_leaf(at_least_fp32(o2)) for _, o2 in cached]
    scale_leaf = None if scale is None else _leaf(scale)
    with torch.enable_grad():
        loss = objective.loss(torch.cat(leaves1), torch.cat(leaves2), scale_leaf)
        wrt = [*leaves1, *leaves2, *([scale_leaf] if scale_leaf is not None else [])]
        grads = torch.autograd.grad(loss, wrt)
    k = len(micro_batches)
    grads1, grads2, grad_scale = grads[:k], grads[k : 2 * k], (grads[2 * k] if scale_leaf is not None else None)

    after_loss = _rng_state(device)  # the stream continues as if each micro-batch ran once
    for i, (a, b) in enumerate(micro_batches):
        _set_rng_state(states[i], device)
        # the temperature's gradient joins the first replay only (the others get a zero one)
        surrogate, _, _ = run(a, b, mode="replay", grads=(grads1[i], grads2[i], grad_scale if i == 0 else None))
        backward(surrogate)
    _set_rng_state(after_loss, device)
    return CachedStep(loss=loss.detach(), outputs=cached)
