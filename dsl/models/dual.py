"""The two-tower S1/S2 model (Dual-SimCLR, CLIP, MMA) and the one-tower SimCLR baseline."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.models._timm import timm
from dsl.models.backbone import feature_maps, make_backbone
from dsl.models.heads import ProjectionHead

Modality = Literal["s1", "s2"]


def _register_logit_scale(module: nn.Module, temperature: float | None) -> None:
    # Shape [1], not 0-dim: deepspeed.initialize crashes on 0-dim parameters.
    if temperature is None:
        module.register_parameter("logit_scale", None)
        return
    if not temperature > 0:
        raise ValueError(f"learnable_temperature must be > 0, got {temperature}")
    module.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / temperature)))


class DualEncoder(nn.Module):
    """Separate S1 and S2 backbones and projection heads; no weights are shared.

    Args:
        s1_backbone: Pooled-feature model for S1 (``.num_features`` wide).
        s2_backbone: Pooled-feature model for S2; a distinct module.
        proj_hidden_dim: Hidden width of both heads.
        proj_dim: Embedding width of both heads.
        head_norm: BatchNorm1d in the heads.
        learnable_temperature: Initial temperature of a learnable ``logit_scale`` (log of
            1/t, shape [1]); None leaves ``logit_scale`` None and the loss uses its own.

    Raises:
        ValueError: The backbones share parameters, or the temperature is not positive.
    """

    def __init__(
        self,
        s1_backbone: nn.Module,
        s2_backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: bool = True,
        learnable_temperature: float | None = None,
    ):
        super().__init__()
        if {id(p) for p in s1_backbone.parameters()} & {id(p) for p in s2_backbone.parameters()}:
            raise ValueError("s1_backbone and s2_backbone share parameters; build two backbones")
        self.s1_backbone = s1_backbone
        self.s2_backbone = s2_backbone
        self.s1_head = ProjectionHead(
            s1_backbone.num_features, proj_hidden_dim, proj_dim, head_norm
        )
        self.s2_head = ProjectionHead(
            s2_backbone.num_features, proj_hidden_dim, proj_dim, head_norm
        )
        _register_logit_scale(self, learnable_temperature)

    def forward(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Projections ``(z1, z2)``, each ``[B, proj_dim]``."""
        h1, h2 = self.features(s1, s2)
        return self.s1_head(h1), self.s2_head(h2)

    def features(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled backbone features (what fine-tuning uses)."""
        return self.s1_backbone(s1), self.s2_backbone(s2)

    def feature_maps(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Last spatial maps ``[B, C, h, w]`` of both backbones (for MMA)."""
        return feature_maps(self.s1_backbone, s1), feature_maps(self.s2_backbone, s2)


class SingleEncoder(nn.Module):
    """One backbone and head for the single-modality SimCLR baseline.

    Args:
        backbone: Pooled-feature model (``.num_features`` wide).
        proj_hidden_dim: Hidden width of the head.
        proj_dim: Embedding width.
        head_norm: BatchNorm1d in the head.
        learnable_temperature: As :class:`DualEncoder`.
        modality: Which input the backbone reads (``s1`` or ``s2``), kept for export.
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        head_norm: bool = True,
        learnable_temperature: float | None = None,
        modality: Modality = "s2",
    ):
        super().__init__()
        if modality not in ("s1", "s2"):
            raise ValueError(f"modality must be 's1' or 's2', got '{modality}'")
        self.modality = modality
        self.backbone = backbone
        self.head = ProjectionHead(backbone.num_features, proj_hidden_dim, proj_dim, head_norm)
        _register_logit_scale(self, learnable_temperature)

    def forward(self, x: Tensor) -> Tensor:
        """Projection ``[B, proj_dim]`` of one view."""
        return self.head(self.backbone(x))

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features of one view, without the projection head."""
        return self.backbone(x)

    def feature_maps(self, x: Tensor) -> Tensor:
        """Last spatial map ``[B, C, h, w]`` of the backbone."""
        return feature_maps(self.backbone, x)


def build_model(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    s1_chans: int,
    s2_chans: int,
    img_size: int | None = None,
    modality: Modality = "s2",
) -> DualEncoder | SingleEncoder:
    """Build the model a config asks for.

    That is a :class:`SingleEncoder` on ``modality`` for the SimCLR baseline (loss ``simclr``),
    a :class:`DualEncoder` otherwise.

    Args:
        model_cfg: Backbone names (``s1_backbone``/``s2_backbone`` override ``backbone``), norm
            and head widths.
        loss_cfg: Loss name and temperature (learnable when ``learnable_temperature``).
        s1_chans: Number of S1 bands.
        s2_chans: Number of S2 bands.
        img_size: Crop size, for backbones that fix it (ViT, Swin).
        modality: The SimCLR baseline's modality.

    Raises:
        ValueError: ``modality`` is neither ``s1`` nor ``s2``.
    """
    if modality not in ("s1", "s2"):
        raise ValueError(f"modality must be 's1' or 's2', got '{modality}'")
    temperature = loss_cfg.temperature if loss_cfg.learnable_temperature else None
    heads = {
        "proj_hidden_dim": model_cfg.proj_hidden_dim,
        "proj_dim": model_cfg.proj_dim,
        "head_norm": model_cfg.head_norm,
        "learnable_temperature": temperature,
    }
    names = {
        "s1": model_cfg.s1_backbone or model_cfg.backbone,
        "s2": model_cfg.s2_backbone or model_cfg.backbone,
    }
    chans = {"s1": s1_chans, "s2": s2_chans}

    def backbone(m: Modality) -> nn.Module:
        return make_backbone(names[m], chans[m], model_cfg.norm, img_size)

    if loss_cfg.name == "simclr":
        model = SingleEncoder(backbone(modality), modality=modality, **heads)
    else:
        model = DualEncoder(backbone("s1"), backbone("s2"), **heads)
    if model_cfg.norm == "syncbatch":
        # The heads' BatchNorm1d too: per-rank statistics in the projection head let a rank tell
        # its local negatives from the gathered remote ones (SimCLR's information leak).
        model = timm.layers.convert_sync_batchnorm(model)
    return model
