"""Learning-rate schedule, stepped once per optimizer step."""

from __future__ import annotations

import math

from dsl.contracts.config import OptimConfig


def warmup_cosine(cfg: OptimConfig):
    """Multiplier for LambdaLR: linear warmup to 1, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
