"""Classifiers for fine-tuning: backbones, their pooled features concatenated, one linear head.

| method | backbones | input |
|---|---|---|
| ``dual`` | the registered model's S1 and S2 backbones (projection heads dropped) | S1, S2 |
| ``late_fusion`` | two from scratch | S1, S2 |
| ``early_fusion`` | one from scratch | S1 and S2 bands stacked |
| ``s1`` / ``s2`` | one from scratch | one sensor |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsl.contracts.config import FinetuneConfig, ModelConfig
from dsl.models.backbone import make_backbone

INPUTS = {"dual": ("s1", "s2"), "late_fusion": ("s1", "s2"), "early_fusion": ("s1s2",),
          "s1": ("s1",), "s2": ("s2",)}


class FinetuneModel(nn.Module):
    """Backbones keyed by what they read (``s1``, ``s2`` or ``s1s2``) and a linear head.

    Args:
        encoders: Pooled-feature models (``.num_features`` wide) keyed by input.
        num_classes: Output logits.
        frozen: Linear probe: the backbones get no gradient and their BatchNorm stays in eval
            mode (running statistics of the pretraining, not of the few labelled batches).
        pretrained: The backbones come pretrained (their lr may be scaled down).
    """

    def __init__(self, encoders: dict[str, nn.Module], num_classes: int, frozen: bool = False,
                 pretrained: bool = False):
        super().__init__()
        bad = set(encoders) - {"s1", "s2", "s1s2"}
        if not encoders or bad:
            raise ValueError(f"encoders must be keyed by s1, s2 or s1s2, got {sorted(encoders)}")
        self.encoders = nn.ModuleDict(encoders)
        self.frozen, self.pretrained = frozen, pretrained
        self.head = nn.Linear(sum(e.num_features for e in encoders.values()), num_classes)
        if frozen:
            self.encoders.requires_grad_(False)

    def train(self, mode: bool = True) -> FinetuneModel:
        """Set train/eval mode, but keep frozen backbones (and their BatchNorm) in eval mode."""
        super().train(mode)
        if self.frozen:
            self.encoders.eval()
        return self

    def forward(self, s1: Tensor, s2: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        inputs = {"s1": s1, "s2": s2}
        feats = [enc(inputs[k] if k in inputs else torch.cat([s1, s2], dim=1))
                 for k, enc in self.encoders.items()]
        return self.head(torch.cat(feats, dim=1))

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups of the trainable parameters.

        The head trains at ``lr``; pretrained backbones at ``lr * backbone_lr_scale`` (mode
        linear freezes them, so they get no group), scratch ones at ``lr``.
        """
        scale = backbone_lr_scale if self.pretrained else 1.0
        groups = [{"params": list(self.head.parameters()), "lr": lr, "weight_decay": weight_decay}]
        backbone = [p for p in self.encoders.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": lr * scale, "weight_decay": weight_decay})
        return groups


def build_finetune_model(
    ft: FinetuneConfig,
    model_cfg: ModelConfig,
    s1_chans: int,
    s2_chans: int,
    num_classes: int,
    img_size: int | None = None,
    pretrained: nn.Module | None = None,
) -> FinetuneModel:
    """The classifier for ``ft.method``.

    Args:
        ft: Method and mode.
        model_cfg: Backbone names and norm of the scratch baselines.
        s1_chans: S1 input bands after selection.
        s2_chans: S2 input bands after selection.
        num_classes: Head width.
        img_size: Crop size, for backbones that fix it (ViT, Swin).
        pretrained: The registered DualEncoder (``dual`` only).

    Raises:
        ValueError: ``dual`` without a pretrained model, or a baseline given one.
    """
    if (ft.method == "dual") != (pretrained is not None):
        raise ValueError(f"method {ft.method!r}: a pretrained model is needed by 'dual' and only by it")
    if ft.method == "dual":
        encoders = {"s1": pretrained.s1_backbone, "s2": pretrained.s2_backbone}
    else:
        names = {"s1": model_cfg.s1_backbone or model_cfg.backbone, "s2": model_cfg.s2_backbone or model_cfg.backbone,
                 "s1s2": model_cfg.backbone}
        chans = {"s1": s1_chans, "s2": s2_chans, "s1s2": s1_chans + s2_chans}
        encoders = {k: make_backbone(names[k], chans[k], model_cfg.norm, img_size) for k in INPUTS[ft.method]}
    return FinetuneModel(encoders, num_classes, frozen=ft.mode == "linear", pretrained=pretrained is not None)
