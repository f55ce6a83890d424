"""Built-in configs: list, copy and validate (`kubetune ls`, `kubetune cp`, `kubetune validate`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from kubetune.trainer.config.base import ConfigError
from kubetune.trainer.config.loader import BUILTIN_CONFIG_DIR, builtin_config_path, load_config, resolve_config


def list_builtin_configs() -> dict[str, list[str]]:
    """recipe name -> built-in config names (each built-in config names its recipe)."""
    by_recipe: dict[str, list[str]] = {}
    for path in sorted(BUILTIN_CONFIG_DIR.glob("*.yaml")):
        recipe = load_config(path).get("recipe", "?")
        by_recipe.setdefault(recipe, []).append(path.stem)
    return by_recipe


def copy_builtin_config(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    source = builtin_config_path(name)
    if source is None:
        raise ConfigError(f"no built-in config named '{name}'; `kubetune ls` lists them")
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not overwrite:
        raise ConfigError(f"{dest} exists; pass --force to overwrite it")
    shutil.copyfile(source, dest)
    return dest


def validate_config_file(path: str | Path, recipe: str | None = None) -> str:
    """Validate a config against its recipe's model; returns the recipe name."""
    data = load_config(path)
    recipe = recipe or data.get("recipe")
    if not recipe:
        raise ConfigError(f"{path}: no `recipe:` key; pass --recipe NAME (see `kubetune ls`)")
    if not isinstance(recipe, str):
        raise ConfigError(f"{path}: recipe: must be a recipe name, got {type(recipe).__name__} {recipe!r} (see `kubetune ls`)")
    resolve_config(recipe, data)
    return recipe
