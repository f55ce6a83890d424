"""Shared pieces of every recipe config: strict models and readable validation errors."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kubetune.errors import KubetuneError


class ConfigError(KubetuneError, ValueError):
    """A config problem a user can fix; the message names the field and the fix."""


class StrictModel(BaseModel):
    """Unknown keys are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _model_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class that holds the field at `loc` (for suggesting valid keys)."""
    current: Any = model_cls
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[Model] / Model | None -> Model, so nested suggestions work through optionals."""
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def describe_error(error: dict[str, Any], model_cls: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as a line that names the dotted field and what to do about it."""
    loc = tuple(error["loc"])
    dotted = prefix + ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model_cls, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        nearest = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(str(p) for p in loc[:-1] + (nearest[0],))}'?" if nearest else (
            f"valid keys here: {', '.join(valid)}" if valid else "remove it"
        )
        return f"{dotted}: unknown key; {hint}"
    if kind == "missing":
        return f"{dotted}: required but missing; set it in the config or as {dotted}=VALUE"
    given = error.get("input")
    return f"{dotted}: {error['msg']} (got {given!r})"


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> str:
    lines = [describe_error(e, model_cls, prefix) for e in err.errors()]
    return "invalid config:\n  " + "\n  ".join(lines)
