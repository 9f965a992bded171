"""Backbones, heads and the two-tower model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.models.backbone import feature_maps, make_backbone
from dsl.models.dual import DualEncoder, SingleEncoder, build_model
from dsl.models.heads import ProjectionHead

S1, S2 = 2, 13
TINY = ModelConfig(backbone="test_resnet")


def _batch(b: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, S1, size, size), torch.randn(b, S2, size, size)


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet18"])
def test_dual_encoder_shapes(backbone):
    model = build_model(
        ModelConfig(backbone=backbone, proj_hidden_dim=32, proj_dim=16), LossConfig(), S1, S2
    )
    s1, s2 = _batch()
    z1, z2 = model(s1, s2)
    assert z1.shape == z2.shape == (2, 16)
    widths = [model.s1_backbone.num_features, model.s2_backbone.num_features]
    assert [h.shape for h in model.features(s1, s2)] == [(2, widths[0]), (2, widths[1])]
    m1, m2 = model.feature_maps(s1, s2)
    assert m1.shape == m2.shape == (2, model.s1_backbone.num_features, 2, 2)  # stride 32
    stems = [
        next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        for net in (model.s1_backbone, model.s2_backbone)
    ]
    assert [stem.in_channels for stem in stems] == [S1, S2]
    assert model.logit_scale is None


@pytest.mark.parametrize("in_chans", [S1, S2])
def test_backbone_takes_any_band_count(in_chans):
    net = make_backbone("resnet18", in_chans)
    assert net.num_features == 512
    assert net(torch.randn(2, in_chans, 32, 32)).shape == (2, 512)


def test_towers_share_no_parameters():
    model = build_model(TINY, LossConfig(), S1, S2)

    def storage(*modules: nn.Module) -> set[int]:
        return {p.data_ptr() for m in modules for p in m.parameters()}

    s1_params = storage(model.s1_backbone, model.s1_head)
    assert s1_params and not s1_params & storage(model.s2_backbone, model.s2_head)
    net = make_backbone("test_resnet", S1)
    with pytest.raises(ValueError, match="share"):
        DualEncoder(net, net)


def test_group_norm_has_no_batchnorm():
    model = build_model(ModelConfig(backbone="test_resnet", norm="group"), LossConfig(), S1, S2)
    for backbone in (model.s1_backbone, model.s2_backbone):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in backbone.modules())
    assert isinstance(model.s1_head.net[1], nn.BatchNorm1d)  # the head keeps its BatchNorm
    model.eval()
    s1, s2 = _batch(1)  # no batch statistics: a single sample is fine
    assert model.features(s1, s2)[0].shape == (1, model.s1_backbone.num_features)


def test_group_norm_keeps_activation_of_fused_norm_act():
    net = make_backbone("test_efficientnet", S2, norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    fused = [m for m in net.modules() if type(m).__name__ == "GroupNormAct"]
    assert fused and any(not isinstance(m.act, nn.Identity) for m in fused)


def test_syncbatch_converts():
    net = make_backbone("test_resnet", S1, norm="syncbatch")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())


def test_syncbatch_reaches_the_projection_heads():
    for loss in ("dual_ntxent", "simclr"):
        model = build_model(TINY.model_copy(update={"norm": "syncbatch"}), LossConfig(name=loss), S1, S2)
        heads = [model.s1_head, model.s2_head] if loss == "dual_ntxent" else [model.head]
        for head in heads:
            assert any(isinstance(m, nn.SyncBatchNorm) for m in head.modules()), loss
        assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules()), loss


def test_learnable_temperature():
    model = build_model(TINY, LossConfig(name="clip", learnable_temperature=True), S1, S2)
    assert isinstance(model.logit_scale, nn.Parameter) and model.logit_scale.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert "logit_scale" in dict(model.named_parameters())


def test_simclr_builds_single_encoder():
    for modality, chans in (("s1", S1), ("s2", S2)):
        model = build_model(TINY, LossConfig(name="simclr"), S1, S2, modality=modality)
        assert isinstance(model, SingleEncoder) and model.modality == modality
        assert model(torch.randn(2, chans, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="modality"):
        build_model(TINY, LossConfig(name="simclr"), S1, S2, modality="s3")


def test_separate_backbone_names():
    cfg = ModelConfig(backbone="resnet18", s1_backbone="test_resnet", s2_backbone="test_vit")
    model = build_model(cfg, LossConfig(), S1, S2, img_size=32)
    z1, z2 = model(*_batch(2, 32))
    assert z1.shape == z2.shape == (2, 128)


def test_vit_feature_map_is_patch_grid():
    net = make_backbone("test_vit", S2, img_size=64)
    side = 64 // net.patch_embed.patch_size[0]
    maps = feature_maps(net, torch.randn(2, S2, 64, 64))
    assert maps.shape == (2, net.num_features, side, side)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown timm model"):
        make_backbone("resnet_does_not_exist", S1)
    with pytest.raises(ValueError, match="norm"):
        make_backbone("test_resnet", S1, norm="layer")
    with pytest.raises(ValueError, match="in_chans"):
        make_backbone("test_resnet", 0)
    with pytest.raises(ValueError, match="widths"):
        ProjectionHead(0)
    with pytest.raises(ValueError, match="temperature"):
        SingleEncoder(make_backbone("test_resnet", S1), learnable_temperature=0.0)


def test_head_norm_option():
    assert isinstance(ProjectionHead(8, 16, 4, norm=True).net[1], nn.BatchNorm1d)
    assert isinstance(ProjectionHead(8, 16, 4, norm=False).net[1], nn.Identity)
