"""Getting batches onto the accelerator fast, and the model ready for it.

- :func:`configure_backends`: cuDNN autotuning (``scale.cudnn_benchmark``) on GPU workers.
- :func:`prepare_model`: NHWC weights (``scale.channels_last``) and ``torch.compile``
  (``scale.compile``), before DeepSpeed wraps the module.
- :class:`DevicePrefetcher`: the next batches copied to the GPU on a side CUDA stream from
  pinned memory while the current step runs; on CPU the batches pass through as they are.
- :class:`ModelInputs`: a batch on the device -> the model's inputs: normalised there when the
  loader shipped raw values (``data.normalise_on_device``), cast to the engine's precision, in
  the model's memory format.

Nothing here needs Ray or DeepSpeed: the benchmark (``benchmarks/bench_gpu.py``) runs the same
pieces in one process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dsl.contracts.config import ScaleConfig
from dsl.data.normalise import Normaliser


def on_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device (the GPU settings apply)."""
    return torch.device(device).type == "cuda"


def memory_format(scale: ScaleConfig, device: torch.device) -> torch.memory_format:
    """The layout of the model's weights and inputs on ``device``: NHWC on GPUs when configured."""
    return torch.channels_last if scale.channels_last and on_gpu(device) else torch.contiguous_format


def configure_backends(scale: ScaleConfig, device: torch.device) -> None:
    """Process-wide GPU settings; nothing on CPU.

    cuDNN's autotuner times each convolution's algorithms on first use and keeps the fastest:
    worth it when shapes never change, as in pretraining (fixed crop and batch).
    """
    if on_gpu(device):
        torch.backends.cudnn.benchmark = scale.cudnn_benchmark


def prepare_model(module: nn.Module, scale: ScaleConfig, device: torch.device,
                  compile_target: nn.Module | None = None) -> nn.Module:
    """``module`` in the memory format :func:`memory_format` picks, ``compile_target`` compiled.

    Call before DeepSpeed wraps the module. ZeRO 1-3 and DeepSpeed's bf16 optimizer re-lay
    parameters out in flat buffers (contiguous again); the NHWC inputs still make cuDNN run its
    NHWC kernels then, converting the weights on the fly.

    Args:
        module: What the engine will run (e.g. the objective); changed in place.
        scale: ``channels_last`` and ``compile``.
        device: The worker's device: on CPU nothing changes.
        compile_target: The submodule to compile (the objective's model: the loss stays eager);
            compiled in place (``nn.Module.compile``), so parameter names and checkpoints are
            unchanged. None: ``module``.
    """
    if not on_gpu(device):
        return module
    fmt = memory_format(scale, device)
    if fmt is torch.channels_last:
        module.to(memory_format=fmt)
    if scale.compile:
        (compile_target if compile_target is not None else module).compile()
    return module


def _tensors(batch: dict) -> Iterator[Tensor]:
    return (v for v in batch.values() if isinstance(v, Tensor))


class DevicePrefetcher:
    """Iterates ``(batch, extra)`` pairs with ``depth`` batches beyond the current one on the way.

    On CUDA the copies of the batches read ahead run on a side stream (``non_blocking`` from
    pinned memory: the loader pins, ``data.pin_memory``) while the compute stream runs the
    current step. Handing a batch out makes the compute stream wait for its copy and marks its
    tensors as used there (``record_stream``), so the caching allocator never gives their
    memory to a later copy while the step still reads it. On CPU the tensors pass through
    untouched, with the same read-ahead.

    ``extra`` travels with its batch unchanged: the stream position after it
    (:func:`dsl.data.with_positions`), which a checkpoint must use rather than the live one.

    Args:
        items: ``(batch dict, extra)`` pairs; the batch's tensors are moved, other values kept.
        device: Where the step runs.
        depth: Batches read (and copied) ahead of the one handed out; 0: none.
    """

    def __init__(self, items: Iterable[tuple[dict, Any]], device: torch.device, depth: int = 1):
        self.items, self.device, self.depth = items, torch.device(device), depth
        self.stream = torch.cuda.Stream(self.device) if on_gpu(self.device) else None

    def _start(self, batch: dict) -> tuple[dict, Any]:
        """Queue ``batch``'s copy; returns the moved batch and the event that marks its end."""
        if self.stream is None:
            return batch, None
        with torch.cuda.stream(self.stream):
            moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                     for k, v in batch.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def _hand_out(self, batch: dict, event) -> dict:
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in _tensors(batch):
                t.record_stream(current)
        return batch

    def __iter__(self) -> Iterator[tuple[dict, Any]]:
        """The items in order, each batch on the device."""
        source = iter(self.items)
        pending: deque = deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) <= self.depth:
                try:
                    batch, extra = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((*self._start(batch), extra))
            if not pending:
                return
            batch, event, extra = pending.popleft()
            yield self._hand_out(batch, event), extra


class ModelInputs:
    """A batch on the device -> ``(s1, s2)`` as the model takes them.

    Args:
        normaliser: Normalises raw batches on the device (``data.normalise_on_device``);
            None when the loader normalised already.
        dtype: The engine's input precision.
        fmt: Memory format of the inputs (:func:`memory_format`).
    """

    def __init__(self, normaliser: Normaliser | None, dtype: torch.dtype,
                 fmt: torch.memory_format = torch.contiguous_format):
        self.normaliser, self.dtype, self.fmt = normaliser, dtype, fmt

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The model's ``(s1, s2)``; on CPU with loader normalisation the batch's own tensors (fp32)."""
        s1, s2 = batch["s1"], batch["s2"]
        if self.normaliser is not None:
            s1, s2 = self.normaliser.normalise_batch(s1, s2, self.fmt)
        return s1.to(self.dtype, memory_format=self.fmt), s2.to(self.dtype, memory_format=self.fmt)

    def layout(self, x: Tensor) -> Tensor:
        """``x`` (e.g. an augmented view) in the inputs' NHWC layout; as it is otherwise."""
        return x if self.fmt is torch.contiguous_format else x.contiguous(memory_format=self.fmt)
