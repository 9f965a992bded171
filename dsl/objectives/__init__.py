"""Pretraining objectives: a model, its loss, and how a batch of pairs becomes its two inputs.

The training loop knows one interface (:class:`~dsl.objectives.base.Objective`) and no loss
names. Kinds:

| kind | losses | inputs | output |
|---|---|---|---|
| :class:`~dsl.objectives.pair.CrossModalPair` | ``dual_ntxent`` (Dual-SimCLR), ``clip`` | S1, S2 | embeddings |
| :class:`~dsl.objectives.dense.DenseMaps` | ``mma`` | S1, S2 | aligned feature maps |
| :class:`~dsl.objectives.single_view.SingleView` | ``simclr`` | two augmentations of one sensor | embeddings |
"""

from __future__ import annotations

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.losses import build_loss
from dsl.models.dual import build_model
from dsl.objectives.base import Objective
from dsl.objectives.dense import DenseMaps
from dsl.objectives.pair import CrossModalPair
from dsl.objectives.single_view import SingleView

KINDS: dict[str, type[Objective]] = {
    "dual_ntxent": CrossModalPair,
    "clip": CrossModalPair,
    "mma": DenseMaps,
    "simclr": SingleView,
}


def build_objective(
    model_cfg: ModelConfig, loss_cfg: LossConfig, s1_chans: int, s2_chans: int, img_size: int | None = None
) -> Objective:
    """The objective ``loss_cfg.name`` names, with a freshly initialised model.

    Raises:
        ValueError: An unknown loss name or a refused distributed mode.
    """
    if loss_cfg.name not in KINDS:
        raise ValueError(f"loss.name: unknown objective {loss_cfg.name!r}; expected one of {sorted(KINDS)}")
    model = build_model(model_cfg, loss_cfg, s1_chans, s2_chans, img_size=img_size)
    return KINDS[loss_cfg.name](model, build_loss(loss_cfg))


__all__ = ["KINDS", "CrossModalPair", "DenseMaps", "Objective", "SingleView", "build_objective"]
