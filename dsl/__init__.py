"""DSL: Dual-SimCLR pretraining of Sentinel-1/2 backbones from WebDataset shards."""

__version__ = "0.1.0"
