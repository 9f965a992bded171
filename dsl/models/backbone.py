"""timm backbones for any number of input bands, with a choice of normalisation.

``make_backbone`` returns a model whose ``forward`` gives pooled features ``[B, num_features]``;
:func:`feature_maps` gives its last spatial map ``[B, C, h, w]`` for dense losses (MMA).

Normalisation:
  * ``batch``: the model's own BatchNorm.
  * ``group``: every BatchNorm2d becomes a GroupNorm (32 groups where the width allows). The
    swap is done after construction because timm's ``norm_layer`` argument takes a different
    signature in each model family. Models without BatchNorm (ViT, Swin: LayerNorm) are unchanged.
  * ``syncbatch``: BatchNorm becomes SyncBatchNorm, which synchronises statistics over ranks.
    PyTorch only supports that on CUDA: on CPU it works without a process group (plain BatchNorm)
    but its training forward raises once one is initialised, so use it with GPUs only.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from dsl.models._timm import timm

Norm = Literal["batch", "group", "syncbatch"]


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` up to ``max_groups`` leaving >= 2 channels per group."""
    for g in range(min(max_groups, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _to_group_norm(bn: nn.BatchNorm2d) -> nn.Module:
    c = bn.num_features
    if isinstance(bn, timm.layers.BatchNormAct2d):  # norm + activation in one module
        gn = timm.layers.GroupNormAct(
            c, _num_groups(c), eps=bn.eps, affine=bn.affine, apply_act=False
        )
        gn.act, gn.drop = bn.act, bn.drop
    else:
        gn = nn.GroupNorm(_num_groups(c), c, eps=bn.eps, affine=bn.affine)
    if bn.affine:  # keeps e.g. ResNet's zero-initialised last gamma per block
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    return gn


def replace_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d in ``module`` for a GroupNorm, in place; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _to_group_norm(child))
        else:
            replace_batchnorm(child)
    return module


def make_backbone(
    name: str, in_chans: int, norm: Norm = "batch", img_size: int | None = None
) -> nn.Module:
    """A randomly initialised timm model that returns pooled features.

    Args:
        name: timm model name (``resnet18``, ``resnet50``, ``test_resnet``, ``vit_*``, ``swin_*``).
        in_chans: Number of input bands.
        norm: ``batch``, ``group`` or ``syncbatch`` (see module docstring).
        img_size: Input size for models that fix it at construction (ViT, Swin); ignored by
            the others.

    Returns:
        The model, with ``.num_features`` the width of its pooled output.

    Raises:
        ValueError: Unknown model name, ``in_chans < 1`` or an unknown ``norm``.
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}'")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if norm not in ("batch", "group", "syncbatch"):
        raise ValueError(f"norm must be 'batch', 'group' or 'syncbatch', got '{norm}'")
    kwargs = {"pretrained": False, "in_chans": in_chans, "num_classes": 0}
    try:
        model = timm.create_model(name, **kwargs, **({"img_size": img_size} if img_size else {}))
    except TypeError as e:  # CNNs take any input size and reject the argument
        if img_size is None or "img_size" not in str(e):
            raise
        model = timm.create_model(name, **kwargs)
    if norm == "group":
        replace_batchnorm(model)
    elif norm == "syncbatch":
        model = timm.layers.convert_sync_batchnorm(model)  # also handles timm's BatchNormAct2d
    return model


def feature_maps(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's last feature map as ``[B, C, h, w]`` (before pooling and head).

    CNNs already give NCHW; Swin gives NHWC; ViTs give tokens, whose class/register tokens are
    dropped and the patch tokens laid back on the patch grid.
    """
    out = backbone.forward_features(x)
    if out.ndim == 4:
        return out.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else out
    if out.ndim == 3 and hasattr(backbone, "patch_embed"):
        tokens = out[:, getattr(backbone, "num_prefix_tokens", 0) :]
        ph, pw = backbone.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        if h * w != tokens.shape[1]:
            raise ValueError(f"cannot lay {tokens.shape[1]} tokens on a {h}x{w} patch grid")
        return tokens.transpose(1, 2).reshape(out.shape[0], -1, h, w)
    raise ValueError(
        f"{type(backbone).__name__} gives features of shape {tuple(out.shape)}, not a spatial map"
    )
