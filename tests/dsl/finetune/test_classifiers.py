"""Fine-tuning classifiers: the baselines' inputs, the linear probe's frozen backbones, and the
pretrained backbone's band check."""

from __future__ import annotations

import pytest
import torch

from dsl.contracts.config import Config, FinetuneConfig, LossConfig, ModelConfig
from dsl.contracts.manifest import Manifest
from dsl.contracts.model_card import ModelCard
from dsl.finetune.loop import backbone_inputs
from dsl.finetune.models import build_finetune_model
from dsl.models.dual import build_model

MODEL = ModelConfig(backbone="test_resnet", proj_hidden_dim=16, proj_dim=8)
S2 = [f"B{i}" for i in range(1, 14)]


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 16, 16, generator=g), torch.randn(n, 13, 16, 16, generator=g) + 3


@pytest.mark.parametrize("method, inputs", [
    ("s1", {"s1": 2}), ("s2", {"s2": 13}), ("early_fusion", {"s1s2": 15}), ("late_fusion", {"s1": 2, "s2": 13}),
])
def test_baselines_read_what_they_say(method, inputs):
    model = build_finetune_model(FinetuneConfig(method=method, backbone="scratch"), MODEL, 2, 13, 8, 16)
    assert {k: next(e.parameters()).shape[1] for k, e in model.encoders.items()} == inputs
    assert model(*_batch()).shape == (4, 8)


def _step(model, mode: str) -> None:
    opt = torch.optim.SGD(model.param_groups(0.1, 1.0, 0.0), lr=0.1)
    model.train()
    model(*_batch()).sum().backward()
    opt.step()


def test_linear_probe_trains_the_head_only_and_keeps_pretrained_statistics():
    torch.manual_seed(0)
    pretrained = build_model(MODEL, LossConfig(), 2, 13, img_size=16)
    for m in pretrained.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.25)
    model = build_finetune_model(FinetuneConfig(mode="linear", backbone="models:/m@a"), MODEL, 2, 13, 8, 16,
                                 pretrained=pretrained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, "linear")
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # weights and BatchNorm statistics untouched
    full = build_finetune_model(FinetuneConfig(mode="full", backbone="models:/m@a"), MODEL, 2, 13, 8, 16,
                                pretrained=build_model(MODEL, LossConfig(), 2, 13, img_size=16))
    before = {k: v.clone() for k, v in full.state_dict().items()}
    _step(full, "full")
    assert any(k.startswith("encoders.") and not torch.equal(v, before[k]) for k, v in full.state_dict().items())


def test_pretrained_backbone_refuses_shards_of_other_bands():
    stats = {"s1": {}, "s2": {}}
    card = ModelCard(model=MODEL, loss=LossConfig(), s1_chans=2, s2_chans=13, img_size=16, s2_bands=[3, 2],
                     band_names={"s1": ["VV", "VH"], "s2": S2}, normalisation="clip", stats=stats)
    same = Manifest(format_version=1, shards=[], bands={"s1": ["VV", "VH"], "s2": S2}, stats=stats)
    data, _ = backbone_inputs(Config(), same, card)
    assert (data.crop_size, data.s2_bands, data.normalisation) == (16, [3, 2], "clip")  # the pretraining's
    l2a = same.model_copy(update={"bands": same.bands.model_copy(update={"s2": [b for b in S2 if b != "B10"]})})
    with pytest.raises(ValueError, match=r"s2 bands \['B1', .*\] differ from the \['B1', .*'B10'.*\] the backbone "
                                         "was pretrained on"):
        backbone_inputs(Config(), l2a, card)
