"""A model fetched from the registry is a temporary copy: loading it deletes it, also on error.

``file://`` artifact URIs take MLflow's real download path (no server, no database), and the
temporary folders are made under this test's own folder, so other runs cannot interfere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsl.contracts.config import LossConfig, ModelConfig
from dsl.contracts.model_card import MODEL_CARD, ModelCard, save_weights
from dsl.models.dual import build_model
from dsl.registry import download, fetched, load_backbones
from dsl.registry.export import export_backbone

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
TRACKING = "sqlite:///unused.db"  # file:// URIs never reach the tracking store


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    model_cfg = ModelConfig(backbone="test_resnet", norm="group")
    torch.manual_seed(0)
    model = build_model(model_cfg, LossConfig(), 2, 13, img_size=32)
    card = ModelCard.model_validate({
        "model": model_cfg.model_dump(mode="json"), "loss": LossConfig().model_dump(mode="json"),
        "s1_chans": 2, "s2_chans": 13, "img_size": 32, "s1_bands": None, "s2_bands": None,
        "band_names": {"s1": ["VV", "VH"], "s2": S2}, "normalisation": "manifest",
        "stats": {"s1": {b: {"mean": 0.0, "std": 1.0} for b in ("VV", "VH")},
                  "s2": {b: {"mean": 0.0, "std": 1.0} for b in S2}}})
    folder = tmp_path_factory.mktemp("weights") / "backbone"
    folder.mkdir()
    save_weights(folder, model.state_dict(), card)
    return folder


def copies(temp: Path) -> list[Path]:
    return sorted(temp.glob("dsl-model-*"))


def test_load_deletes_its_downloaded_copy(weights, temp):
    model, card = load_backbones(weights.as_uri(), TRACKING)
    assert card.s2_chans == 13 and not model.training
    assert copies(temp) == []
    with fetched(weights.as_uri(), TRACKING) as folder:  # the copy exists while in use
        assert (folder / MODEL_CARD).exists() and copies(temp)
    assert copies(temp) == []


def test_failed_load_deletes_its_copy_too(weights, temp, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MODEL_CARD).write_text((weights / MODEL_CARD).read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a DSL weights folder"):
        load_backbones(broken.as_uri(), TRACKING)
    assert copies(temp) == []
    with pytest.raises(ValueError, match="cannot fetch"):
        load_backbones((tmp_path / "absent").as_uri(), TRACKING)
    assert copies(temp) == []


def test_local_folder_is_used_in_place_never_deleted(weights, temp):
    assert download(str(weights), TRACKING) == weights
    load_backbones(str(weights), TRACKING)
    assert (weights / MODEL_CARD).exists() and copies(temp) == []


def test_export_deletes_its_copy(weights, temp, tmp_path):
    export_backbone(weights.as_uri(), "s2", tmp_path / "s2.safetensors", TRACKING)
    assert (tmp_path / "s2.safetensors").exists() and copies(temp) == []
