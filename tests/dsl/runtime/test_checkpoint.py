"""Checkpoints never run code: ``safe_load`` refuses a pickle that would, before it runs.

The hostile files are real ``torch.save`` output (a zip with a data.pkl), as a tampered
DeepSpeed checkpoint would be; their payload makes a folder, so "did it run" is a plain check.
"""

from __future__ import annotations

import builtins
import os
import re

import pytest
import torch

from dsl.runtime.checkpoint import _safe_globals, load_state, safe_load, save_state


class MakesFolder:
    """Unpickling this calls ``os.mkdir(path)``: the side effect a refused file must never have."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class RunsShell:
    """Unpickling this calls ``os.system``: a shell command that would leave a marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    """Unpickling this calls ``eval`` (a builtin, not in torch's blocked modules like ``os``)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return builtins.eval, (f"__import__('os').mkdir({self.path!r})",)


PAYLOADS = {"mkdir": MakesFolder, "system": RunsShell, "eval": Evaluates}


def hostile(tmp_path, payload) -> str:
    """A checkpoint-shaped file: real tensors, and the payload hidden among them."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2, 2)}, "global_steps": 3, "extra": payload}, path)
    return str(path)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_hostile_checkpoint_is_refused_before_it_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = hostile(tmp_path, PAYLOADS[kind](str(marker)))
    assert not marker.exists()
    with pytest.raises(ValueError, match=rf"checkpoint file {re.escape(path)} is not a plain tensor checkpoint"):
        safe_load(path)
    assert not marker.exists(), "safe_load ran the pickle's code"


def test_allow_list_is_the_reviewed_value_types():
    """Any callable added to the allow-list is code a checkpoint could run: review it here."""
    names = {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
    assert names <= {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
    }, names
    assert all(isinstance(g, type) for g in _safe_globals())  # classes, never functions


def test_plain_checkpoint_loads(tmp_path):
    path = tmp_path / "plain.pt"
    state = {"module": {"w": torch.arange(6.0).reshape(2, 3)}, "global_steps": 7, "lr": [0.1, 0.01], "name": "x"}
    torch.save(state, path)
    out = safe_load(str(path), map_location="cpu")
    assert out["global_steps"] == 7 and out["lr"] == [0.1, 0.01] and out["name"] == "x"
    assert torch.equal(out["module"]["w"], state["module"]["w"])


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"checkpoint file {re.escape(str(path))} is not a plain tensor"):
        safe_load(str(path))


def test_state_round_trip_and_missing_state(tmp_path):
    save_state(tmp_path, {"position": {"epoch": 1, "batch": 4}, "step": 12})
    assert load_state(tmp_path) == {"position": {"epoch": 1, "batch": 4}, "step": 12}
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(tmp_path / 'none'))} has no readable state.json"):
        load_state(tmp_path / "none")
