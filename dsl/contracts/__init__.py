"""Contracts: what every other layer agrees on, importing nothing of DSL above it.

- :mod:`~dsl.contracts.config`: the one typed config tree and its ``key=value`` overrides.
- :mod:`~dsl.contracts.shard_format`: the members of a shard sample and the band names.
- :mod:`~dsl.contracts.manifest`: the typed ``manifest.json`` of a dataset of shards.
- :mod:`~dsl.contracts.model_card`: the typed ``model.json`` beside a model's safetensors weights.
- :mod:`~dsl.contracts.storage`: fsspec URLs, and the one pyarrow filesystem Ray Train needs.
- :mod:`~dsl.contracts.provenance`: the code version recorded with every artefact.
- :mod:`~dsl.contracts.documents`: JSON documents read into typed contracts, errors naming the key.
- :mod:`~dsl.contracts.errors`: the error kinds the ``dsl`` command turns into exit codes.
"""
