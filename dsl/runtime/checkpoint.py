"""Checkpoints without pickle.

DeepSpeed state is loaded with ``weights_only=True`` and the job's position is JSON (weights
and their card: :mod:`dsl.contracts.model_card`).

DeepSpeed's own checkpoint engine loads with full unpickling enabled. Checkpoints
are untrusted input, so the engine's loader is replaced by one that only accepts tensors,
containers and primitives, plus the few plain DeepSpeed/torch value types listed below.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

STATE = "state.json"
DS_TAG = "deepspeed"
FULL_STATE = "full_state.pt"  # dsl.runtime.full_state: the state for another world size


def _safe_globals() -> list:
    """Value types DeepSpeed writes into its state dicts (no code runs when they are built)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    return out


def safe_load(path: str, map_location=None):
    """torch.load for untrusted files: tensors, containers, primitives and the types above."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError for a refused global, others for corruption
            raise ValueError(f"checkpoint file {path} is not a plain tensor checkpoint: {e}") from None


def use_safe_loading(engine) -> None:
    """Make a DeepSpeed engine load its checkpoints with :func:`safe_load`."""
    # imported here: deepspeed picks its accelerator on import, after the worker set it up
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


@contextlib.contextmanager
def local_copy(checkpoint) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder this process alone reads, removed on exit.

    Ray's ``Checkpoint.as_directory`` shares one temporary folder per checkpoint among the
    processes of a node: a worker arriving after the first download ended downloads again into
    that folder, rewriting files another worker is reading (a resume on a node with several
    workers failed with "internal miniz error": a torch file truncated under its reader), and
    the last to leave removes it. A private copy per process costs one download per worker.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)  # already local: read in place, never removed
        return
    folder = tempfile.mkdtemp(prefix="dsl-checkpoint-")
    try:
        checkpoint.to_directory(folder)
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_state(directory: Path, state: dict) -> None:
    """Write the job's position (plain JSON data) to ``directory/state.json``."""
    (directory / STATE).write_text(json.dumps(state))


def load_state(directory: Path) -> dict:
    """Read the job's position written by :func:`save_state`.

    Raises:
        ValueError: ``state.json`` is missing, unreadable or not valid JSON.
    """
    path = directory / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {directory} has no readable {STATE}: {e}") from None


def engine_counters(engine, world: int) -> dict:
    """What a resume on another world size needs besides the weights (plain JSON values).

    ``optimizer_steps`` counts the steps the optimizer took: an fp16 step skipped for an
    overflow advances DeepSpeed's ``global_steps`` but neither the optimizer nor the LR schedule.
    """
    return {
        "world": world,
        "global_steps": engine.global_steps,
        "skipped_steps": engine.skipped_steps,
        "global_samples": engine.global_samples,
        "optimizer_steps": engine.global_steps - engine.skipped_steps,  # = engine.optimizer_steps()
        "lr_scheduler": engine.lr_scheduler.state_dict(),
    }


def resume_engine(engine, directory: Path, world: int, batch_size: int) -> dict:
    """Load a checkpoint into ``engine`` (collective) and return the stream position to resume at.

    Written by the same number of workers, DeepSpeed's own per-rank files are loaded. Written by
    another number (an elastic resume, or a cluster that came back smaller), the world-size-free
    :data:`FULL_STATE` is: fp32 master weights and AdamW moments, then the step counters and
    the LR schedule. Either way the stream position is in samples of the epoch (independent of
    the world size, :func:`stream_position`): the new ranks continue the same sample order.

    Raises:
        ValueError: An unreadable ``state.json`` or full state, or one from another model.
    """
    from dsl.runtime import full_state

    state = load_state(directory)
    position = stream_position(state, world, batch_size)
    if state.get("world", world) == world:  # checkpoints written before "world" was recorded: same size
        engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=True)
        return position
    saved = safe_load(str(directory / FULL_STATE))
    full_state.load(engine, saved["weights"], saved["moments"], optimizer_steps=state["optimizer_steps"])
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state["lr_scheduler"])
    # the schedule's state alone does not reach the optimizer until its next step()
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps, engine.skipped_steps = state["global_steps"], state["skipped_steps"]
    engine.global_samples = state["global_samples"]
    return position


def stream_position(state: dict, world: int, batch_size: int) -> dict:
    """The ``{"epoch", "sample"}`` to resume the data stream at, from a checkpoint's state.

    Checkpoints written before sample-level dealing recorded ``{"epoch", "batch"[, "samples"]}``:
    their position is converted to samples (their shard-level order is gone, so such a resume
    continues the new order at the same count).
    """
    p = state["position"]
    if "sample" in p:
        sample = p["sample"]
    elif "samples" in p:
        sample = p["samples"]
    else:
        sample = p["batch"] * state.get("world", world) * batch_size
    return {"epoch": int(p["epoch"]), "sample": int(sample)}
