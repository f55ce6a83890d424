"""YAML configs with dotted `key=value` overrides, validated by the recipe's config model."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.safe_yaml import read_user_text, safe_load
from kubetune.trainer.config.base import ConfigError, format_validation_error

BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def builtin_config_path(name: str) -> Path | None:
    candidate = BUILTIN_CONFIG_DIR / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def load_config(path_or_name: str | Path) -> dict[str, Any]:
    """Read a config file, or a built-in config by name (see `kubetune ls`)."""
    path = Path(path_or_name)
    if not path.is_file():
        builtin = builtin_config_path(str(path_or_name))
        if builtin is None:
            raise ConfigError(
                f"--config {path_or_name}: no such file and no built-in config of that name; "
                "`kubetune ls` lists the built-in configs"
            )
        path = builtin
    try:
        data = safe_load(read_user_text(path, ConfigError), str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`optimizer.lr=1e-4` -> (["optimizer", "lr"], 0.0001); values are parsed as YAML scalars."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optimizer.lr=1e-4")
        try:
            value = safe_load(raw, f"override {key}") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deep_copy(data)
    for keys, value in parse_overrides(overrides):
        node = merged
        for part in keys[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(keys)}: '{part}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return merged


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def import_object(dotted: str) -> Any:
    """'pkg.module:Name' -> the object."""
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def validate_config(model_cls: type[BaseModel], data: dict[str, Any], prefix: str = "") -> BaseModel:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls, prefix)) from None


def resolve_config(recipe: str, config: str | Path | dict[str, Any] | None, overrides: list[str] | None = None) -> BaseModel:
    """The validated config a recipe runs with: file or built-in, then overrides, then the model."""
    from kubetune.trainer.registry import get_recipe

    info = get_recipe(recipe)
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, dict):
        data = config
    else:
        data = load_config(config)
    data = apply_overrides(data, overrides or [])
    data.pop("recipe", None)  # built-in configs name their recipe for `kubetune ls`
    return validate_config(import_object(info.config_model), data)
