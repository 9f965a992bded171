"""Import timm on a CPU-only torch.

torchvision's PyPI wheels (a timm dependency) are CUDA builds. Beside the CPU torch their C
ops cannot load, and torchvision 0.28 then fails at import while registering fake kernels for
``nms``/``qnms`` (the only two registrations it does not guard). Declaring those two schemas
first lets the pure-Python parts that timm uses import normally; the ops themselves stay
unavailable, and nothing in DSL calls them.
"""

from __future__ import annotations

import torch


def _declare_missing_torchvision_ops() -> None:
    try:
        torch.ops.torchvision.nms  # noqa: B018  (present when torchvision's C ops load)
        return
    except (AttributeError, RuntimeError):
        pass
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass  # already declared


_declare_missing_torchvision_ops()

import timm  # noqa: E402

__all__ = ["timm"]
