"""Extract the served storage version's openAPIV3Schema of KubeRay's CRDs into small JSON files.

The three CRD YAMLs of a release are ~3 MB together; the tests need only each CRD's schema.
Run it against a KubeRay checkout (a plain clone or a bare mirror) at the pinned tag::

    python tests/data/kuberay/extract.py /path/to/kuberay v1.7.0

It writes ``<plural>.schema.json`` beside this file: the ``openAPIV3Schema`` of the version with
``storage: true``, with every ``description`` string removed (prose, ignored by validation) and
nothing else changed, dumped with sorted keys so a re-extraction diffs cleanly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = ("rayclusters", "rayjobs", "raycronjobs")
HERE = Path(__file__).resolve().parent


def strip_descriptions(node):
    """``node`` without ``description`` strings (a property named ``description`` is a dict: kept)."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def storage_schema(crd: dict) -> dict:
    """The openAPIV3Schema of the CRD's storage version, with its version and kind recorded."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["x-dsl-source"] = {"kind": crd["spec"]["names"]["kind"], "group": crd["spec"]["group"],
                              "version": version["name"]}
    return schema


def main(repo: str, ref: str) -> None:
    """Write one ``<plural>.schema.json`` per CRD of ``ref`` in the KubeRay git repository ``repo``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for plural in CRDS:
        text = subprocess.run(["git", "-C", repo, "show", f"{ref}:ray-operator/config/crd/bases/ray.io_{plural}.yaml"],
                              check=True, capture_output=True, text=True).stdout
        schema = storage_schema(yaml.load(text, Loader=loader))
        (HERE / f"{plural}.schema.json").write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
