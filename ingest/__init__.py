"""Ingest: co-located Sentinel-1/2 pairs from raw archives into WebDataset shards."""
