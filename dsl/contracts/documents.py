"""Reading a JSON document into a typed contract, with errors that name the file and the key."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Doc = TypeVar("Doc", bound=BaseModel)


def describe(e: ValidationError) -> str:
    """One line per problem, each naming the dotted key: ``missing key 'x'`` or ``x.y: why (got v)``."""
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        out.append(f"missing key '{loc}'" if err["type"] == "missing" else
                   f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(out)


def parse_document(text: str, origin: str, model: type[Doc], advice: str = "") -> Doc:
    """Validate ``text`` (a JSON object) as ``model``.

    Args:
        text: The document.
        origin: Its file or URL, named in every error.
        model: The contract it must fit.
        advice: Appended to a JSON syntax error (what to do about it).

    Raises:
        ValueError: Not JSON, not an object, or a missing, ill-typed or out-of-range key.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e}){advice}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: top level must be an object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{origin}: {describe(e)}") from None
