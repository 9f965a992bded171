"""The MLflow model registry for backbones: register, load, without pickle.

A registered version is an MLflow Model folder: ``MLmodel`` (signature, flavor ``dsl``),
``model.safetensors`` (both backbones and heads) and ``model.json`` (what rebuilds them).
It has no ``python_function`` flavor on purpose: loading never unpickles anything, it reads
safetensors into a model built from ``model.json``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch import nn

from dsl.contracts.model_card import MODEL_CARD, WEIGHTS, ModelCard, load_weights
from dsl.models.dual import build_model

ARTIFACT = "backbone"


def _signature(card: ModelCard):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = card.img_size
    d = card.model.proj_dim
    return ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, card.s1_chans, size, size), "s1"),
            TensorSpec(np.dtype(np.float32), (-1, card.s2_chans, size, size), "s2"),
        ]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, d), "z1"), TensorSpec(np.dtype(np.float32), (-1, d), "z2")]),
    )


def register_backbones(
    weights_dir: str | Path, run_id: str, name: str, alias: str, tags: dict[str, str], tracking_uri: str
) -> str:
    """Log the weights folder as the run's ``backbone`` model and register it under ``name``.

    Returns:
        The new model version; ``alias`` points at it.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    _, card = load_weights(Path(weights_dir))  # refuse to register something unloadable
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        for f in (WEIGHTS, MODEL_CARD):
            shutil.copy(Path(weights_dir) / f, folder / f)
        model = Model(artifact_path=ARTIFACT, run_id=run_id, signature=_signature(card))
        model.add_flavor("dsl", weights=WEIGHTS, info=MODEL_CARD, format="safetensors")
        model.save(str(folder / "MLmodel"))
        client.log_artifacts(run_id, str(folder), ARTIFACT)
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(f"runs:/{run_id}/{ARTIFACT}", name, tags=tags).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def _fetch(uri: str, tracking_uri: str) -> tuple[Path, Path | None]:
    """(folder with the model's files, the temporary folder made for it or None)."""
    if Path(uri).is_dir():
        return Path(uri), None
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    dst = Path(tempfile.mkdtemp(prefix="dsl-model-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))), dst
    except Exception as e:
        shutil.rmtree(dst, ignore_errors=True)
        raise ValueError(f"cannot fetch {uri} from {tracking_uri}: {e}") from None


def download(uri: str, tracking_uri: str) -> Path:
    """Return a local folder with the model's files.

    ``uri`` is ``models:/name@alias``, ``models:/name/3``, ``runs:/...`` or a local folder
    (returned as is); anything else is downloaded into a new temporary folder, which the
    caller then owns and deletes. :func:`fetched` does both.

    Raises:
        ValueError: The model cannot be fetched from the tracking server.
    """
    return _fetch(uri, tracking_uri)[0]


@contextmanager
def fetched(uri: str, tracking_uri: str) -> Iterator[Path]:
    """:func:`download` as a context: a downloaded copy is deleted on exit, also on error.

    A local folder ``uri`` is used in place and never deleted.

    Raises:
        ValueError: The model cannot be fetched from the tracking server.
    """
    folder, temp = _fetch(uri, tracking_uri)
    try:
        yield folder
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def load_backbones(uri: str, tracking_uri: str) -> tuple[nn.Module, ModelCard]:
    """The registered model, rebuilt and loaded from safetensors (strict), and its card.

    A downloaded copy of the model is deleted once loaded, also when loading fails.
    """
    with fetched(uri, tracking_uri) as folder:
        state, card = load_weights(folder)
    model = build_model(card.model, card.loss, card.s1_chans, card.s2_chans, img_size=card.img_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{uri}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, card
