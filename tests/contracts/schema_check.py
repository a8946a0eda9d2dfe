"""Validate wire instances against the published AsyncAPI schemas (jsonschema), and build a
sample instance of every contract model from its type annotations.

The schemas come from `contracts.asyncapi.generate()` (what `--write` commits), so a test
checks the generator's output even while the committed file awaits regeneration.
"""

from __future__ import annotations

import json
import math
import types
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import jsonschema
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from contracts.asyncapi import generate


@cache
def document() -> dict[str, Any]:
    return generate()


def validator(component: str) -> jsonschema.Draft202012Validator:
    """A validator for one component schema (`#/components/schemas/<component>`), refs resolved in the document."""
    doc = document()
    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def envelope_errors(body: bytes | str | dict[str, Any], event_type: str | None = None) -> list[str]:
    """Schema violations of an envelope on the wire (bytes or parsed), against its type's envelope schema."""
    doc = body if isinstance(body, dict) else json.loads(body)
    name = f"{event_type or doc.get('type')}Envelope"
    if name not in document()["components"]["schemas"]:
        return [f"no schema {name}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(doc)]


def header_errors(headers: dict[str, str]) -> list[str]:
    return [e.message for e in validator("FastStreamHeaders").iter_errors(headers)]


# --- sample instances -------------------------------------------------------------------


def sample(model: type[BaseModel], *, non_finite: bool = False) -> BaseModel:
    """An instance of `model` with every field set (optional ones too), valid by its
    constraints. With `non_finite`, each float takes the non-finite value its bounds allow
    (NaN when unbounded), so the instance exercises the "NaN"/"Infinity" wire strings."""
    return model.model_validate({name: _value(f.annotation, f, non_finite) for name, f in model.model_fields.items()})


def _bounds(field: FieldInfo | None) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in field.metadata if field else ():
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo = m.gt + 1
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi = m.lt - 1
    return lo, hi


def _pattern(field: FieldInfo | None) -> str | None:
    for m in field.metadata if field else ():
        if getattr(m, "pattern", None):
            return m.pattern
    return None


def _value(tp: Any, field: FieldInfo | None, non_finite: bool) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        return get_args(tp)[0]
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _value(options[0], field, non_finite)
    if origin is dict:
        return {"k": _value(get_args(tp)[1], None, non_finite)}
    if origin is list:
        return [_value(get_args(tp)[0], None, non_finite)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return sample(tp, non_finite=non_finite).model_dump()
    lo, hi = _bounds(field)
    if tp is bool:
        return True
    if tp is int:
        return int(lo) if lo is not None else 3
    if tp is float:
        if non_finite:
            if lo is None and hi is None:
                return math.nan
            if hi is None:
                return math.inf
            if lo is None:
                return -math.inf
        return float(lo) if lo is not None else 0.5
    if tp is str:
        pattern = _pattern(field)
        if pattern == r"^[0-9a-f]{64}$":
            return "0" * 64
        if pattern == r"^\d+\.\d+$":
            return "1.0"
        assert pattern is None, f"no sample for pattern {pattern}"
        return "text é"
    if tp is datetime:
        return datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    if tp is uuid.UUID:
        return uuid.UUID("0b9f1c7e-2f7a-4c59-9a53-3f1e8d1f6b2a")
    if tp is Any:
        return {"any": [1, "two"]}
    raise AssertionError(f"no sample value for {tp!r}")
