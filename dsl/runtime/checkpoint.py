"""Checkpoints without pickle.

DeepSpeed state is loaded with ``weights_only=True`` and the job's position is JSON (weights
and their card: :mod:`dsl.contracts.model_card`).

DeepSpeed's own checkpoint engine loads with full unpickling enabled. Checkpoints
are untrusted input, so the engine's loader is replaced by one that only accepts tensors,
containers and primitives, plus the few plain DeepSpeed/torch value types listed below.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE = "state.json"
DS_TAG = "deepspeed"


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
