"""Reading a JSON document into a typed contract, with errors that name the file and the key."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Doc = TypeVar("Doc", bound=BaseModel)
# An offending value is quoted in the message up to this many characters: a crafted document can
# put megabytes in one key, and the error must stay one readable line.
MAX_QUOTE = 80


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_QUOTE else f"{text[:MAX_QUOTE]}... ({len(text)} characters)"


def describe(e: ValidationError) -> str:
    """One line per problem, each naming the dotted key: ``missing key 'x'`` or ``x.y: why (got v)``."""
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        out.append(f"missing key '{loc}'" if err["type"] == "missing" else
                   f"{loc}: {err['msg']} (got {_quote(err.get('input'))})")
    return "; ".join(out)


def parse_document(text: str, origin: str, model: type[Doc], advice: str = "", strict: bool = False) -> Doc:
    """Validate ``text`` (a JSON object) as ``model``.

    Args:
        text: The document.
        origin: Its file or URL, named in every error.
        model: The contract it must fit.
        advice: Appended to a JSON syntax error (what to do about it).
        strict: No type coercion: ``"2"`` is not an int, ``"true"`` not a bool (pydantic's strict
            mode; an int still fits a float).

    Raises:
        ValueError: Not JSON, nested too deeply to parse, not an object, or a missing, ill-typed or
            out-of-range key.
    """
    try:
        raw = json.loads(text)
    except ValueError as e:  # also an integer of more digits than Python converts (4300)
        raise ValueError(f"{origin}: not valid JSON ({e}){advice}") from None
    except RecursionError:  # Python's parser recurses per level: [[[[...]]]] exhausts the stack
        raise ValueError(f"{origin}: JSON nested too deeply to parse{advice}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: top level must be an object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, strict=strict)
    except RecursionError:
        raise ValueError(f"{origin}: nested too deeply to validate") from None
    except ValidationError as e:
        raise ValueError(f"{origin}: {describe(e)}") from None
