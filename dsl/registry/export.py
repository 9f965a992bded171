"""Export one registered backbone as a plain timm state dict in safetensors.

The file holds the S1 or S2 backbone's weights under exactly timm's key names (the
``s1_backbone.``/``s2_backbone.`` prefix stripped, no projection head) and, in its safetensors
header and a ``.json`` sidecar beside it, what is needed to use it: ``arch``, ``in_chans``,
``norm``, ``img_size``, the band names and the input normalisation.

Loading, for ``norm: batch`` (and ``syncbatch``, whose keys are BatchNorm's)::

    from safetensors.torch import load_file
    model = timm.create_model(arch, in_chans=in_chans, num_classes=0)  # + img_size= for ViT/Swin
    model.load_state_dict(load_file("backbone.safetensors"))  # strict

``num_classes=0`` matters: the export has no classifier, so a 1000-class ``fc`` would be an
unexpected missing key. Add a new head after loading (``model.reset_classifier(n)``) for
fine-tuning; torchgeo's timm-based models take the same state dict.

For ``norm: group`` the model has GroupNorm where timm builds BatchNorm (no running statistics),
so a stock ``timm.create_model`` does not fit. Build the same model as DSL does and load it:
:func:`load_exported` (or ``dsl.models.backbone.make_backbone(arch, in_chans, "group")`` then
``load_state_dict``), which needs only timm and this package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dsl.contracts.model_card import ModelCard
from dsl.models.backbone import make_backbone
from dsl.registry import fetched, read_version


def _input_spec(card: ModelCard, modality: str) -> dict:
    """Band names and normalisation of the inputs the backbone was trained on."""
    names = getattr(card.band_names, modality) or []
    picked = getattr(card, f"{modality}_bands")
    if picked is not None and names:
        names = [names[i] for i in picked]
    spec = {"bands": names, "normalisation": card.normalisation}
    stats = getattr(card.stats, modality) or {}
    if spec["normalisation"] == "manifest" and names and all(n in stats for n in names):
        spec["mean"] = [stats[n].mean for n in names]
        # as dsl.data.normalise: a constant band keeps scale 1
        spec["std"] = [stats[n].std if stats[n].std > 0 else 1.0 for n in names]
    elif spec["normalisation"] == "clip":
        spec["clip"] = [-25.0, 0.0] if modality == "s1" else [0.0, 10000.0]
        spec["note"] = "clip to the range, then scale to [0, 1]"
    return spec


def export_backbone(uri: str, modality: str, out: str | Path, tracking_uri: str) -> dict:
    """Write the ``modality`` backbone of ``uri`` to ``out`` (safetensors) and ``out``.json.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/...`` or a folder.
        modality: ``s1`` or ``s2``.
        out: Destination ``.safetensors`` file; the sidecar gets the suffix ``.json``.
        tracking_uri: MLflow tracking URI the model is registered in.

    Returns:
        The metadata written to the header and the sidecar.

    Raises:
        ValueError: Bad modality, an unreachable model, a card or weights that are not valid
            (:func:`dsl.registry.read_version`: checked before anything is built), or weights
            that do not fit the backbone.
    """
    if modality not in ("s1", "s2"):
        raise ValueError(f"modality must be 's1' or 's2', got '{modality}'")
    with fetched(uri, tracking_uri) as folder:  # a downloaded copy is deleted again
        state, card = read_version(folder, uri)
    prefix = f"{modality}_backbone."
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        found = sorted({k.split(".", 1)[0] for k in state})
        raise ValueError(f"{uri}: no '{prefix}*' weights (a two-tower model is needed); top-level keys: {found}")
    m = card.model
    arch = getattr(m, f"{modality}_backbone") or m.backbone
    norm = "group" if m.norm == "group" else "batch"  # SyncBatchNorm's keys are BatchNorm's
    in_chans, img_size = getattr(card, f"{modality}_chans"), card.img_size
    # Load into the model it will be rebuilt as: proves the keys fit (strict) and restores the
    # dtypes the registry flattened to float32 (BatchNorm's num_batches_tracked is int64).
    backbone = make_backbone(arch, in_chans, norm, img_size)
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{uri}: {modality} weights do not fit timm '{arch}' (in_chans={in_chans}): {e}") from None
    tensors = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    timm_kwargs = {"in_chans": in_chans, "num_classes": 0}
    if hasattr(backbone, "patch_embed") and img_size:  # ViT/Swin fix the input size
        timm_kwargs["img_size"] = img_size
    meta = {"arch": arch, "in_chans": in_chans, "norm": norm, "img_size": img_size, "modality": modality,
            "num_features": backbone.num_features, "timm_kwargs": timm_kwargs,
            "input": _input_spec(card, modality), "source": uri}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    header = {"format": "pt", "dsl": json.dumps(meta), "arch": arch, "in_chans": str(in_chans), "norm": norm}
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, out)  # never a half-written file under the final name
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def read_metadata(path: str | Path) -> dict:
    """The metadata :func:`export_backbone` put in the file's safetensors header."""
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    if "dsl" not in header:
        raise ValueError(f"{path}: no 'dsl' metadata in the safetensors header (not a DSL export)")
    return json.loads(header["dsl"])


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """An exported backbone rebuilt (any norm) and loaded strictly, in eval mode, and its metadata."""
    meta = read_metadata(path)
    model = make_backbone(meta["arch"], meta["in_chans"], meta["norm"], meta.get("img_size"))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta


def command(cfg, args) -> int:
    """``dsl export``: write ``--model``'s ``--modality`` backbone to ``--out``."""
    meta = export_backbone(args.model, args.modality, args.out, cfg.mlflow.tracking_uri)
    print(f"wrote {meta['arch']} ({meta['modality']}, in_chans={meta['in_chans']}, norm={meta['norm']}) "
          f"to {args.out}")
    return 0


__all__ = ["command", "export_backbone", "load_exported", "read_metadata"]
