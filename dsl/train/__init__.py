"""Pretraining on Ray Train + DeepSpeed."""
