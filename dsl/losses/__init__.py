"""Contrastive losses for S1/S2 pretraining, exact under multi-rank training.

Every loss takes ``(z1, z2, logit_scale=None)`` (MMA: feature maps instead of embeddings); a
``logit_scale`` of shape [1] from the model replaces the fixed temperature. How the
``gather_with_grad`` / ``local_loss`` modes stay equal to the single-process global-batch loss:
:mod:`dsl.losses.gather`.
"""

from __future__ import annotations

from torch import nn

from dsl.contracts.config import LossConfig
from dsl.losses.clip import ClipLoss
from dsl.losses.dual_ntxent import DualNTXentLoss
from dsl.losses.gather import gather_features
from dsl.losses.mma import MMALoss
from dsl.losses.simclr import SimCLRLoss


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module ``cfg.name`` names, with its temperature and distributed mode.

    Raises:
        ValueError: Unknown name or a refused (gather_with_grad, local_loss) combination.
    """
    mode = {"gather_with_grad": cfg.gather_with_grad, "local_loss": cfg.local_loss}
    if cfg.name == "dual_ntxent":
        return DualNTXentLoss(cfg.temperature, **mode)
    if cfg.name == "simclr":
        return SimCLRLoss(cfg.temperature, **mode)
    if cfg.name == "clip":
        return ClipLoss(temperature=cfg.temperature, **mode)
    if cfg.name == "mma":
        return MMALoss(temperature=cfg.temperature, **mode)
    raise ValueError(f"unknown loss '{cfg.name}'; expected dual_ntxent, clip, simclr or mma")


__all__ = [
    "ClipLoss",
    "DualNTXentLoss",
    "MMALoss",
    "SimCLRLoss",
    "build_loss",
    "gather_features",
]
