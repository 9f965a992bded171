"""``dsl.runtime.checkpoint``: the engine's loader swap keeps its settings and the caller's
``map_location``; ``safe_load`` honours ``map_location`` (shown with ``meta``, so without GPUs)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from dsl.runtime.checkpoint import load_state, safe_load, save_state, use_safe_loading


class MakesFolder:
    """Unpickling this makes a folder: the side effect a refused file must never have."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_safe_load_stays_safe_when_the_environment_asks_torch_for_unsafe_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # only a call that leaves weights_only unset obeys
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.ones(1), "x": MakesFolder(str(marker))}, path)
    with pytest.raises(ValueError, match="is not a plain tensor checkpoint"):
        safe_load(str(path))
    assert not marker.exists()


def test_safe_load_maps_tensors_where_asked(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert safe_load(str(path))["w"].device.type == "cpu"
    assert safe_load(str(path), map_location="meta")["w"].device.type == "meta"


def test_engine_loads_through_safe_load_with_its_own_settings(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.model_checkpointing import CHECKPOINT_SERIALIZATION

    engine = SimpleNamespace(_config=SimpleNamespace(checkpoint_config={CHECKPOINT_SERIALIZATION: True}),
                             checkpoint_engine=None)
    use_safe_loading(engine)
    ce = engine.checkpoint_engine
    assert isinstance(ce, TorchCheckpointEngine) and ce.zipfile_serialization is True
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.arange(3.0)}, "global_steps": 2}, path)
    out = ce.load(str(path), map_location="meta")
    assert out["global_steps"] == 2 and out["module"]["w"].device.type == "meta"
    assert torch.equal(ce.load(str(path))["module"]["w"], torch.arange(3.0))


def test_state_is_plain_json(tmp_path):
    save_state(tmp_path, {"b": [1, 2], "a": None})
    assert (tmp_path / "state.json").read_text() == '{"b": [1, 2], "a": null}'
    (tmp_path / "state.json").write_text("{broken")
    try:
        load_state(tmp_path)
    except ValueError as e:
        assert str(e).startswith(f"checkpoint {tmp_path} has no readable state.json: ")
        assert e.__cause__ is None and e.__suppress_context__
    else:
        raise AssertionError("a broken state.json was read")
