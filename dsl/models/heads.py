"""SimCLR projection head."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear - (BatchNorm1d) - ReLU - Linear, mapping pooled features to the loss space.

    Keep ``norm=True``: a GroupNorm CNN with a head without BatchNorm was measured to collapse.

    Args:
        in_dim: Width of the backbone's pooled features.
        hidden_dim: Width of the hidden layer.
        out_dim: Width of the embedding the loss sees.
        norm: BatchNorm1d after the first linear layer.

    Raises:
        ValueError: A width below 1.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, norm: bool = True):
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"head widths must be >= 1, got {in_dim}, {hidden_dim}, {out_dim}")
        # With BatchNorm after it, the first layer's bias would be cancelled: leave it out.
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=not norm),
            nn.BatchNorm1d(hidden_dim) if norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Project pooled features ``[B, in_dim]`` to embeddings ``[B, out_dim]``."""
        return self.net(x)
