"""resume_engine's decisions without DeepSpeed: which files a resume loads, what it restores.

The engine is a stand-in with DeepSpeed's attributes and a real torch optimizer and LR schedule;
``full_state.load`` is recorded instead of run (tests/dsl/runtime/test_full_state.py runs it on
real engines). The checkpoint files are real: state.json and a torch-saved full state.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsl.runtime import checkpoint, full_state
from dsl.runtime.checkpoint import (
    DS_TAG,
    FULL_STATE,
    engine_counters,
    resume_engine,
    stream_position,
)


class Engine:
    """DeepSpeed's counters, a real AdamW + LambdaLR, and a recorded load_checkpoint."""

    def __init__(self, lr: float = 1.0):
        w = torch.nn.Parameter(torch.zeros(2))
        b = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.AdamW([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=lr)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))
        self.global_steps, self.skipped_steps, self.global_samples = 0, 0, 0
        self.loaded = []

    def load_checkpoint(self, path, tag=None, load_module_strict=None):
        self.loaded.append((path, tag, load_module_strict))


def written(tmp_path, world: int | None, position: dict, steps: int = 7, skipped: int = 2) -> dict:
    """A checkpoint folder as the training loop writes it, by an engine that took ``steps``."""
    src = Engine()
    for _ in range(steps - skipped):
        src.optimizer.step()
        src.lr_scheduler.step()
    src.global_steps, src.skipped_steps, src.global_samples = steps, skipped, 448
    state = {"position": position, "step": steps - skipped, "final": False, **engine_counters(src, world or 4)}
    if world is None:
        del state["world"]  # written before the world size was recorded
    (tmp_path / checkpoint.STATE).write_text(json.dumps(state))
    torch.save({"weights": {"model.w": torch.ones(2)}, "moments": {"model.w": {"exp_avg": torch.ones(2)}}},
               tmp_path / FULL_STATE)
    return state


@pytest.fixture
def loads(monkeypatch):
    calls = []
    monkeypatch.setattr(full_state, "load", lambda engine, weights, moments, optimizer_steps: calls.append(
        (weights, moments, optimizer_steps)))
    return calls


def test_engine_counters_record_what_another_world_size_needs():
    e = Engine()
    for _ in range(3):
        e.optimizer.step()
        e.lr_scheduler.step()
    e.global_steps, e.skipped_steps, e.global_samples = 5, 2, 320
    c = engine_counters(e, 8)
    assert c == {"world": 8, "global_steps": 5, "skipped_steps": 2, "global_samples": 320, "optimizer_steps": 3,
                 "lr_scheduler": e.lr_scheduler.state_dict()}
    json.dumps(c)  # plain JSON values


def test_same_world_size_loads_deepspeeds_own_files(tmp_path, loads):
    written(tmp_path, 4, {"epoch": 2, "sample": 96})
    e = Engine()
    assert resume_engine(e, tmp_path, 4, 8) == {"epoch": 2, "sample": 96}
    assert e.loaded == [(str(tmp_path), DS_TAG, True)] and loads == []
    assert (e.global_steps, e.skipped_steps) == (0, 0)  # DeepSpeed's own load restores those


def test_a_checkpoint_without_world_is_taken_as_the_same_size(tmp_path, loads):
    written(tmp_path, None, {"epoch": 0, "batch": 3})
    e = Engine()
    assert resume_engine(e, tmp_path, 2, 8) == {"epoch": 0, "sample": 3 * 2 * 8}
    assert e.loaded and not loads


def test_another_world_size_loads_the_full_state_schedule_and_counters(tmp_path, loads):
    state = written(tmp_path, 4, {"epoch": 1, "sample": 160}, steps=7, skipped=2)
    e = Engine()
    assert resume_engine(e, tmp_path, 2, 8) == {"epoch": 1, "sample": 160}  # samples: any world size
    assert e.loaded == []  # DeepSpeed's per-rank files are for 4 ranks
    (weights, moments, steps), = loads
    assert torch.equal(weights["model.w"], torch.ones(2)) and torch.equal(moments["model.w"]["exp_avg"], torch.ones(2))
    assert steps == 5 == state["optimizer_steps"]
    assert (e.global_steps, e.skipped_steps, e.global_samples) == (7, 2, 448)
    assert e.lr_scheduler.state_dict() == state["lr_scheduler"]
    # the schedule's LR is in the optimizer now, not only after its next step()
    assert [g["lr"] for g in e.optimizer.param_groups] == pytest.approx([1.0 / 6] * 2)


def test_a_hostile_full_state_is_refused(tmp_path, loads):
    written(tmp_path, 4, {"epoch": 0, "sample": 0})
    (tmp_path / FULL_STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint file {tmp_path / FULL_STATE} is not a plain tensor checkpoint"):
        resume_engine(Engine(), tmp_path, 2, 8)
    assert loads == []


@pytest.mark.parametrize("position, world, expect", [
    ({"epoch": 3, "sample": 40}, 8, 40),  # samples of the epoch: as written
    ({"epoch": 3, "batch": 5, "samples": 40}, 8, 40),  # the previous format recorded both
    ({"epoch": 3, "batch": 5}, 8, 5 * 2 * 4),  # older: batches of the writer's world size (2)
])
def test_stream_positions_of_every_checkpoint_format(position, world, expect):
    assert stream_position({"position": position, "world": 2}, world, 4) == {"epoch": 3, "sample": expect}
    assert stream_position({"position": {"epoch": 1, "batch": 3}}, 6, 4) == {"epoch": 1, "sample": 72}


@pytest.mark.parametrize("position, expect", [
    ({"epoch": 1, "batch": 5, "samples": 33}, 33),  # "samples" wins over "batch" (5 x 2 x 4 = 40)
    ({"epoch": 1, "samples": 33}, 33),  # "samples" alone
])
def test_a_recorded_sample_count_wins_over_the_batch_count(position, expect):
    assert stream_position({"position": position, "world": 2}, 8, 4) == {"epoch": 1, "sample": expect}


def test_the_full_state_goes_into_the_engine_being_resumed(tmp_path, monkeypatch):
    written(tmp_path, 4, {"epoch": 0, "sample": 0})
    into = []
    monkeypatch.setattr(full_state, "load", lambda engine, *args, **kwargs: into.append(engine))
    e = Engine()
    resume_engine(e, tmp_path, 2, 8)
    assert into == [e]


def test_a_schedule_of_another_number_of_param_groups_is_refused(tmp_path, loads):
    """A schedule state with 3 groups for an optimizer with 2: refused, not half applied."""
    state = written(tmp_path, 4, {"epoch": 0, "sample": 0})
    state["lr_scheduler"]["_last_lr"] = [0.5, 0.5, 0.5]
    (tmp_path / checkpoint.STATE).write_text(json.dumps(state))
    e = Engine()
    with pytest.raises(ValueError):
        resume_engine(e, tmp_path, 2, 8)
