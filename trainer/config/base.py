"""Shared pieces of every recipe config: strict models and readable validation errors."""
from __future__ import annotations

import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin

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


# pydantic error types that mean "the value has the wrong type" (not a violated constraint).
_TYPE_ERROR_SUFFIXES = ("_type", "_parsing", "_from_float")


def _annotation_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, int]:
    """The annotation of the field at `loc` and how many parts of `loc` name fields.

    Walks through nested sections; stops at the first part that is not a field name (a tuple
    index, a list position, a union branch tag)."""
    current: Any = model_cls
    annotation: Any = None
    depth = 0
    for part in loc:
        model = _unwrap(current)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            break
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = current = field.annotation
        depth += 1
    return annotation, depth


def describe_type(annotation: Any) -> str:
    """A type as users write it in YAML: 'an integer', 'one of auto, cpu, cuda', 'a section'."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        options = [describe_type(arg) for arg in args if arg is not type(None)]
        text = " or ".join(options)
        return f"{text} or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) if isinstance(arg, str) else str(arg) for arg in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if origin in (list, tuple):
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a section with keys {', '.join(annotation.model_fields)}"
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def describe_error(error: dict[str, Any], model_cls: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as a line that names the dotted field and what to do about it."""
    loc = tuple(error["loc"])
    dotted = prefix + ".".join(str(p) for p in loc)
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(model_cls, loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        nearest = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{prefix}{'.'.join(str(p) for p in loc[:-1] + (nearest[0],))}'?" if nearest else (
            f"valid keys here: {', '.join(valid)}" if valid else "remove it"
        )
        return f"{dotted}: unknown key; {hint}"
    annotation, depth = _annotation_at(model_cls, loc)
    if depth and depth < len(loc):
        # An error inside a value (a tuple item, a list item): name the field and its whole type.
        field = prefix + ".".join(str(p) for p in loc[:depth])
        return f"{field}: expected {describe_type(annotation)}; fix the value at {dotted}"
    if kind == "missing":
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            required = [f"{dotted}.{name}" for name, f in annotation.model_fields.items() if f.is_required()]
            return f"{dotted}: required section missing; set {', '.join(required) or dotted}"
        return f"{dotted}: required but missing; set it in the config or as {dotted}=VALUE"
    if kind.endswith(_TYPE_ERROR_SUFFIXES) or kind in ("literal_error", "enum"):
        expected = describe_type(annotation) if depth else error["msg"]
        return f"{dotted}: expected {expected}, got {given!r} ({type(given).__name__})"
    return f"{dotted}: {error['msg']} (got {given!r})"


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> str:
    lines = [describe_error(e, model_cls, prefix) for e in err.errors()]
    return "invalid config:\n  " + "\n  ".join(lines)
