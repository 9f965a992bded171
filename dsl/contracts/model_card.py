"""A model's weights folder: ``model.safetensors`` and its typed card ``model.json``.

The card is everything needed to rebuild the model and feed it as in its pretraining: the model
and loss settings, input channels, crop size, band selection and names, and the normalisation
(scheme and statistics). Pretraining checkpoints, registered model versions and fine-tuning
jobs all read it through :func:`load_weights`; nothing in it is ever unpickled.

Versioning: ``format_version`` (cards written before it existed are version 1). A newer or
unknown version is refused with a message that says so.

Untrusted input: a registered version can come from anyone with write access to the registry,
so both files are read as hostile. The card is typed strictly (no ``"2"`` for 2) with bounds on
everything that sizes the model (:data:`MAX_CHANS`, :data:`MAX_IMG_SIZE`, :data:`MAX_DIM`),
checked before anything is built; its file is capped at :data:`MAX_CARD_BYTES`. The weights'
safetensors header is read and checked (size capped at :data:`MAX_HEADER_BYTES`, every tensor
float32, names and shapes as the caller expects) before any tensor is; the tensors must all be
finite. Every problem is a ``ValueError`` naming the folder (or the ``origin`` given) and what
is wrong.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.documents import parse_document
from dsl.contracts.manifest import Bands, Stats

WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
CARD_VERSION = 1
# Input bands per sensor. Sentinel-1 has 2-4 polarisations, Sentinel-2 13 bands; 64 leaves room for
# stacks and derived indices. The card sizes the model before the weights are read, and the first
# layer grows with it (resnet18: 12.5 KB per band, so 200000 bands were 2.9 GB of RSS).
MAX_CHANS = 64
# Crop edge in pixels: 2048 px is 20 km at 10 m, far above the 120-256 px tiles of the archives.
# ViTs size their position embeddings (and Swin its attention masks) from it.
MAX_IMG_SIZE = 2048
# Projection head widths: a head is hidden x (features + proj) floats.
MAX_DIM = 65536
# A card is a few KB (band names and statistics); a megabyte is already a crafted one.
MAX_CARD_BYTES = 1 << 20
# A safetensors header is ~100 bytes per tensor (resnet50: ~30 KB); safetensors itself allows 100 MB.
MAX_HEADER_BYTES = 8 << 20
# The only dtype :func:`save_weights` writes.
WEIGHTS_DTYPE = "F32"


class ModelCard(BaseModel):
    """The typed content of ``model.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = CARD_VERSION
    model: ModelConfig
    loss: LossConfig
    s1_chans: int = Field(ge=1, le=MAX_CHANS)
    s2_chans: int = Field(ge=1, le=MAX_CHANS)
    img_size: int = Field(ge=1, le=MAX_IMG_SIZE)
    s1_bands: list[int] | None = Field(None, max_length=MAX_CHANS)
    s2_bands: list[int] | None = Field(None, max_length=MAX_CHANS)
    band_names: Bands
    normalisation: Literal["manifest", "clip"]
    stats: Stats

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not 1 <= v <= CARD_VERSION:
            raise ValueError(f"format_version {v} is not one this DSL reads (1..{CARD_VERSION}): upgrade DSL")
        return v

    @model_validator(mode="after")
    def _sizes_bounded(self) -> ModelCard:
        # ModelConfig's own bounds are only >= 1 (the config's); a card sizes a model on load
        for key in ("proj_dim", "proj_hidden_dim"):
            if getattr(self.model, key) > MAX_DIM:
                raise ValueError(f"model.{key} {getattr(self.model, key)} is above {MAX_DIM}")
        if not math.isfinite(self.loss.temperature):
            raise ValueError(f"loss.temperature must be finite, got {self.loss.temperature}")
        for sensor in ("s1", "s2"):
            summaries = getattr(self.stats, sensor)
            if len(summaries) > MAX_CHANS:
                raise ValueError(f"stats.{sensor} has {len(summaries)} bands, more than {MAX_CHANS}")
            for band, b in summaries.items():
                if not (math.isfinite(b.mean) and math.isfinite(b.std) and b.std >= 0):
                    raise ValueError(f"stats.{sensor}.{band}: mean and std must be finite, std >= 0 "
                                     f"(got {b.mean}, {b.std})")
        return self


def check_bands(card: ModelCard, origin: str) -> None:
    """The card's band names, selections and channel counts agree (as pretraining made them).

    Raises:
        ValueError: A selected band index outside the names, or a channel count that is not the
            number of (selected) bands.
    """
    for sensor in ("s1", "s2"):
        names = getattr(card.band_names, sensor) or []
        if len(names) > MAX_CHANS:
            raise ValueError(f"{origin}: band_names.{sensor} has {len(names)} bands, more than {MAX_CHANS}")
        picked = getattr(card, f"{sensor}_bands")
        if picked is not None and names and not all(0 <= i < len(names) for i in picked):
            raise ValueError(f"{origin}: {sensor}_bands {picked} select outside the {len(names)} {sensor} bands")
        chans = getattr(card, f"{sensor}_chans")
        n = len(picked) if picked is not None else len(names)
        if n and n != chans:
            raise ValueError(f"{origin}: {sensor}_chans is {chans} but the card names {n} {sensor} bands")


def parse_card(text: str, origin: str) -> ModelCard:
    """Validate a card's text strictly (no strings for numbers); errors name ``origin`` and the key.

    Raises:
        ValueError: Not a JSON object, does not fit :class:`ModelCard` (bounds included) or its
            bands disagree with its channel counts.
    """
    card = parse_document(text, origin, ModelCard, strict=True)
    check_bands(card, origin)
    return card


def check_finite(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity.

    Args:
        state_dict: Name -> tensor.
        what: What is being done or read (``"registering run 1a2b"``, a folder), for the message.

    Raises:
        ValueError: ``"<what>: tensor '<name>' is not finite (<n> of <m> values NaN/inf)"``, naming the
            first such tensor.
    """
    for name, t in state_dict.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{what}: tensor '{name}' is not finite ({bad} of {t.numel()} values NaN/inf); "
                                 "a registered version never holds non-finite weights")


def save_weights(directory: Path, state_dict: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Weights as fp32 safetensors and the card that rebuilds the model.

    Non-finite weights are refused before anything is written: they could never be loaded again.

    Raises:
        ValueError: A tensor holds NaN or infinity; the message names it (``... 'name' is not finite ...``).
    """
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    check_finite(tensors, f"{directory}: not saving weights")
    save_file(tensors, str(Path(directory) / WEIGHTS))
    (Path(directory) / MODEL_CARD).write_text(json.dumps(card.model_dump(mode="json"), indent=1))


def _not_a_folder(origin: str, why: object) -> ValueError:
    return ValueError(f"{origin}: not a DSL weights folder ({WEIGHTS} + {MODEL_CARD}): {why}")


def load_card(directory: Path, origin: str | None = None) -> ModelCard:
    """The card of a weights folder, without reading the weights.

    Args:
        directory: The folder.
        origin: What to call it in errors (a model URI); the folder by default.

    Raises:
        ValueError: No readable, valid ``model.json`` there (or one over :data:`MAX_CARD_BYTES`).
    """
    origin = origin or str(directory)
    path = Path(directory) / MODEL_CARD
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CARD_BYTES + 1)
    except OSError as e:
        raise _not_a_folder(origin, e) from None
    if len(data) > MAX_CARD_BYTES:
        raise ValueError(f"{origin}: {MODEL_CARD} is over {MAX_CARD_BYTES} bytes: not a model card")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{origin}: {MODEL_CARD} is not UTF-8 text ({e})") from None
    return parse_card(text, f"{origin}: {MODEL_CARD}")


def read_header(directory: Path, origin: str | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's weights, from the safetensors header alone.

    Reads at most :data:`MAX_HEADER_BYTES` and no tensor data.

    Raises:
        ValueError: Not a safetensors file (a pickle, say), a header over the cap or not a JSON
            object of tensor entries, a tensor that is not float32 or whose byte range does not
            fit its shape or the file.
    """
    origin = origin or str(directory)
    path = Path(directory) / WEIGHTS

    def bad(why: str) -> ValueError:
        return _not_a_folder(origin, f"{WEIGHTS}: {why}")

    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{len(head)} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise bad(f"header of {n} bytes, over the {MAX_HEADER_BYTES} a model needs (or not safetensors)")
            raw = f.read(n)
        size = path.stat().st_size
    except OSError as e:
        raise _not_a_folder(origin, e) from None
    if len(raw) < n:
        raise bad(f"header of {n} bytes but the file ends after {len(raw)}")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(type(o) is int for o in entry["data_offsets"])):
            raise bad(f"tensor '{name}': malformed header entry")
        if entry.get("dtype") != WEIGHTS_DTYPE:
            raise bad(f"tensor '{name}' is {entry.get('dtype')!r}, DSL weights are all {WEIGHTS_DTYPE}")
        start, stop = entry["data_offsets"]
        if stop - start != 4 * math.prod(entry["shape"]) or start < 0:
            raise bad(f"tensor '{name}': {stop - start} bytes for shape {entry['shape']}")
        shapes[name], end = tuple(entry["shape"]), max(end, stop)
    if 8 + n + end > size:
        raise bad(f"tensors end at byte {8 + n + end} of a {size}-byte file (truncated?)")
    return shapes


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], origin: str) -> None:
    """The weights hold exactly the expected tensors, each of its expected shape.

    Raises:
        ValueError: Names a few missing, unexpected and misshapen tensors.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [f"{k} {list(found[k])} (model: {list(expected[k])})"
                 for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshapen:
        parts = [f"{label} {items[:3]}{f' and {len(items) - 3} more' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                 if items]
        raise ValueError(f"{origin}: weights do not fit the model its {MODEL_CARD} describes: {'; '.join(parts)}")


def load_weights(
    directory: Path, origin: str | None = None, expected: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """(state dict, card) of a weights folder, every check done before a tensor is read.

    Args:
        directory: The folder.
        origin: What to call it in errors (a model URI); the folder by default.
        expected: Name -> shape of the model's state dict (``dsl.registry`` builds it from the card
            on the meta device); None checks the header's own consistency only.

    Raises:
        ValueError: The folder lacks either file, one is not valid, the weights do not fit
            ``expected`` or hold NaN/infinity.
    """
    directory = Path(directory)
    origin = origin or str(directory)
    card = load_card(directory, origin)
    shapes = read_header(directory, origin)
    if expected is not None:
        check_shapes(shapes, expected, origin)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise _not_a_folder(origin, e) from None
    check_finite(state, origin)
    return state, card
