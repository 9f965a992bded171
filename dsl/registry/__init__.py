"""The MLflow model registry for backbones: register, load, without pickle.

A registered version is an MLflow Model folder: ``MLmodel`` (signature, flavor ``dsl``),
``model.safetensors`` (both backbones and heads) and ``model.json`` (what rebuilds them).
It has no ``python_function`` flavor on purpose: loading never unpickles anything, it reads
safetensors into a model built from ``model.json``.

Loading treats both files as hostile (:mod:`dsl.contracts.model_card`): the card is typed with
bounds, its backbone names must be models DSL builds (timm's registry, never a hub download),
the model is first built on PyTorch's ``meta`` device (shapes, no memory) and the weights'
safetensors header checked against it before a tensor is read or a real model built, and the
weights must be finite. Every failure is one ``ValueError`` naming the model URI; a downloaded
copy is deleted on every path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsl.contracts.model_card import MODEL_CARD, WEIGHTS, ModelCard, load_card, load_weights
from dsl.models._timm import timm
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

    # refuse to register something unloadable: the full load checks, non-finite weights included
    _, card = read_version(Path(weights_dir), f"not registering {weights_dir} (run {run_id})")
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
    except BaseException as e:  # Ctrl-C mid-download too: never leave the copy behind
        shutil.rmtree(dst, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
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


def _build(card: ModelCard, origin: str) -> nn.Module:
    """The model the card describes (on the current default device), or a ValueError naming ``origin``.

    Backbone names are checked against timm's registry first: ``timm.create_model`` would also
    take ``hf-hub:`` names and download them.
    """
    m = card.model
    for key in ("backbone", "s1_backbone", "s2_backbone"):
        name = getattr(m, key)
        if name is not None and not timm.is_model(name):
            raise ValueError(f"{origin}: {MODEL_CARD}: model.{key} '{name}' is not a model DSL can build "
                             "(not in timm's registry, see timm.list_models())")
    try:
        return build_model(m, card.loss, card.s1_chans, card.s2_chans, img_size=card.img_size)
    except Exception as e:  # timm asserts on some sizes (Swin's window vs img_size) or raises TypeError
        raise ValueError(f"{origin}: {MODEL_CARD} describes a model DSL cannot build: "
                         f"{type(e).__name__}: {e}") from None


def expected_state(card: ModelCard, origin: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the state dict of the model ``card`` describes, built without memory.

    The model is built on PyTorch's ``meta`` device: a crafted card cannot make this allocate,
    and the real model is only built once weights of exactly its size have been found.

    Raises:
        ValueError: A backbone name DSL does not know or a model that cannot be built.
    """
    with torch.device("meta"):
        model = _build(card, origin)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_version(folder: Path, origin: str) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The checked state dict and card of a model version's folder: every check short of building it.

    Card (typed, bounded, bands consistent), backbone names, the safetensors header (float32,
    names and shapes of the model the card describes) before any tensor is read, then the
    tensors (all finite).

    Args:
        folder: The version's files.
        origin: Named in every error (the model URI).

    Raises:
        ValueError: One line naming ``origin`` and what is wrong.
    """
    card = load_card(folder, origin)
    return load_weights(folder, origin, expected_state(card, origin))[0], card


def load_backbones(uri: str, tracking_uri: str) -> tuple[nn.Module, ModelCard]:
    """The registered model, rebuilt and loaded from safetensors (strict), and its card.

    A downloaded copy of the model is deleted once loaded, also when loading fails.

    Raises:
        ValueError: The model cannot be fetched, or its card or weights are not valid
            (:func:`read_version`); the message names ``uri``.
    """
    with fetched(uri, tracking_uri) as folder:
        state, card = read_version(folder, uri)
    model = _build(card, uri)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes were checked against the meta model: not expected
        raise ValueError(f"{uri}: weights do not fit the model: {e}") from None
    model.eval()
    return model, card
