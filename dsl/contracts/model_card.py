"""A model's weights folder: ``model.safetensors`` and its typed card ``model.json``.

The card is everything needed to rebuild the model and feed it as in its pretraining: the model
and loss settings, input channels, crop size, band selection and names, and the normalisation
(scheme and statistics). Pretraining checkpoints, registered model versions and fine-tuning
jobs all read it through :func:`load_weights`; nothing in it is ever unpickled.

Versioning: ``format_version`` (cards written before it existed are version 1). A newer or
unknown version is refused with a message that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.documents import parse_document
from dsl.contracts.manifest import Bands, Stats

WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
CARD_VERSION = 1


class ModelCard(BaseModel):
    """The typed content of ``model.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = CARD_VERSION
    model: ModelConfig
    loss: LossConfig
    s1_chans: int = Field(ge=1)
    s2_chans: int = Field(ge=1)
    img_size: int = Field(ge=1)
    s1_bands: list[int] | None = None
    s2_bands: list[int] | None = None
    band_names: Bands
    normalisation: Literal["manifest", "clip"]
    stats: Stats

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if not 1 <= v <= CARD_VERSION:
            raise ValueError(f"format_version {v} is not one this DSL reads (1..{CARD_VERSION}): upgrade DSL")
        return v


def parse_card(text: str, origin: str) -> ModelCard:
    """Validate a card's text; errors name ``origin`` and the key.

    Raises:
        ValueError: Not a JSON object or does not fit :class:`ModelCard`.
    """
    return parse_document(text, origin, ModelCard)


def save_weights(directory: Path, state_dict: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Weights as fp32 safetensors and the card that rebuilds the model."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(Path(directory) / WEIGHTS))
    (Path(directory) / MODEL_CARD).write_text(json.dumps(card.model_dump(mode="json"), indent=1))


def load_card(directory: Path) -> ModelCard:
    """The card of a weights folder, without reading the weights.

    Raises:
        ValueError: No readable, valid ``model.json`` there.
    """
    path = Path(directory) / MODEL_CARD
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{directory}: not a DSL weights folder ({WEIGHTS} + {MODEL_CARD}): {e}") from None
    return parse_card(text, str(path))


def load_weights(directory: Path) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """(state dict, card) of a weights folder.

    Raises:
        ValueError: The folder lacks either file or one is not valid.
    """
    directory = Path(directory)
    card = load_card(directory)
    try:
        return load_file(str(directory / WEIGHTS)), card
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{directory}: not a DSL weights folder ({WEIGHTS} + {MODEL_CARD}): {e}") from None
