"""Backbones (timm), projection heads and the two-tower model."""
