"""SimCLR baseline loss: one modality, two augmented views, the same NT-Xent as Dual-SimCLR.

The loss is :class:`~dsl.losses.dual_ntxent.DualNTXentLoss` with the two views in place of
the two modalities (same distributed modes). The views come from
:func:`dsl.data.augment.augment`.
"""

from __future__ import annotations

from dsl.losses.dual_ntxent import DualNTXentLoss


class SimCLRLoss(DualNTXentLoss):
    """NT-Xent between two views of one modality; arguments as :class:`DualNTXentLoss`."""
