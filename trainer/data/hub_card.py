"""The `configs` of a Hugging Face dataset card: which files make each split of each config, as
the Hub and the `datasets` library read them from the YAML front matter of the repository's
README.md (https://huggingface.co/docs/hub/datasets-manual-configuration):

    ---
    configs:
    - config_name: default          # required
      default: true                 # optional: the config read when none is named
      data_dir: en                  # optional: patterns are relative to it (alone: its usual layout)
      data_files:                   # a pattern, a list of patterns (both: split train), or per split:
      - split: train
        path: data/train-*.jsonl    # a path or glob pattern, or a list of them
      - split: test
        path: [holdout/a.jsonl, holdout/b.jsonl]
    ---

The default config is the only one, else the one named `default`, else the one with
`default: true` (two of them: an error). Of the loading options a config may set, `sep` /
`delimiter` (CSV) are applied; any other that would change the records (`field`, `encoding`,
`column_names`, ...) is refused, naming it, rather than read differently from the Hub;
`features` (the column types) is not applied. Patterns are globs relative to the repository (or
`data_dir`): `*` stops at `/`, `**` crosses folders; hidden files and folders (`.x`) and
`__x` folders match only when the pattern names them; README.md, config.json and the dataset-info
files are never data. Torch-free and I/O-light: the operator's initializer uses the same reading
to download only the files of the config it needs.
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from kubetune.trainer.data.sources import DatasetError

CARD = "README.md"
DEFAULT_SPLIT = "train"  # data_files given without splits
NOT_DATA = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json"}
_SPLIT = re.compile(r"^\w+(\.\w+)*$")  # the Hub's split names (no dashes)
_FORMS = ("data_files: PATTERN | [PATTERN, ...] | [{split: NAME, path: PATTERN or [PATTERN, ...]}, ...]")
_KEYS = {"config_name", "data_files", "data_dir", "default", "features", "description", "version", "sep", "delimiter"}


@dataclass(frozen=True)
class CardConfig:
    name: str
    data_files: Optional[dict[str, list[str]]]  # split -> patterns, in the card's order; None: data_dir's usual layout
    data_dir: Optional[str]
    default: bool
    csv_sep: str = ","  # `sep` (or `delimiter`) of its CSV files


def front_matter(text: str) -> dict[str, Any]:
    """The YAML block between the leading `---` lines ({} without one)."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            break
    else:
        return {}
    data = yaml.safe_load("\n".join(lines[1:end]))
    return data if isinstance(data, dict) else {}


def card_configs(text: str, where: str) -> dict[str, CardConfig]:
    """The configs a card declares, in its order ({} when it declares none). `where` names the
    card in errors."""
    try:
        configs = front_matter(text).get("configs")
    except yaml.YAMLError as err:
        if not re.search(r"^configs\s*:", text, re.MULTILINE):
            return {}  # a README whose leading `---` is Markdown, not a card's front matter
        raise DatasetError(f"{where}: its YAML front matter is not valid YAML: {err}") from None
    if not configs:
        return {}
    if not isinstance(configs, list):
        raise DatasetError(f"{where}: configs must be a list of {{config_name, data_files}} entries")
    out: dict[str, CardConfig] = {}
    for entry in configs:
        if not isinstance(entry, dict) or not isinstance(entry.get("config_name"), str) or not entry["config_name"]:
            raise DatasetError(f"{where}: each entry of configs needs a config_name (a string), got {entry!r}")
        name = entry["config_name"]
        if name in out:
            raise DatasetError(f"{where}: config {name!r} is declared twice")
        data_dir = entry.get("data_dir")
        if data_dir is not None and (not isinstance(data_dir, str) or not _inside(data_dir)):
            raise DatasetError(f"{where}: config {name!r}: data_dir {data_dir!r} must be a folder inside the repository")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise DatasetError(
                f"{where}: config {name!r} sets {', '.join(unknown)}, a loading option kubetune does not apply (it reads "
                "data_files, data_dir and CSV sep/delimiter); convert the files so they need none, or read the dataset "
                "with the `datasets` library"
            )
        sep = entry.get("delimiter", entry.get("sep", ","))
        if not isinstance(sep, str) or len(sep) != 1:
            raise DatasetError(f"{where}: config {name!r}: sep/delimiter must be one character, got {sep!r}")
        files = entry.get("data_files")
        out[name] = CardConfig(name, None if files is None else _split_patterns(files, f"{where}: config {name!r}"),
                               data_dir.strip("/") if data_dir else None, entry.get("default") is True, sep)
    return out


def read_card(folder: Path) -> dict[str, CardConfig]:
    """The configs of `folder`/README.md ({} without a card or configs)."""
    card = folder / CARD
    if not card.is_file():
        return {}
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{card}: cannot read the dataset card: {err}") from None
    return card_configs(text, str(card))


def default_config(configs: dict[str, CardConfig], where: str) -> Optional[CardConfig]:
    """The config read when none is named (None when the card names none)."""
    found = [c for c in configs.values() if len(configs) == 1 or c.name == "default" or c.default]
    if len(found) > 1:
        raise DatasetError(f"{where}: several default configs ({', '.join(c.name for c in found)}); keep `default: true` on one")
    return found[0] if found else None


def _split_patterns(files: Any, where: str) -> dict[str, list[str]]:
    """data_files in any of its forms -> {split: [pattern, ...]}."""
    if isinstance(files, str):
        return {DEFAULT_SPLIT: [_pattern(files, where)]}
    if not isinstance(files, list) or not files:
        raise DatasetError(f"{where}: data_files must be {_FORMS}")
    if all(isinstance(item, str) for item in files):
        return {DEFAULT_SPLIT: [_pattern(item, where) for item in files]}
    out: dict[str, list[str]] = {}
    for item in files:
        if not (isinstance(item, dict) and set(item) == {"split", "path"} and isinstance(item["split"], str)
                and isinstance(item["path"], (str, list))):
            raise DatasetError(f"{where}: data_files must be {_FORMS}; got the entry {item!r}")
        split = item["split"]
        if not _SPLIT.match(split):
            raise DatasetError(f"{where}: split name {split!r}: letters, digits, _ and . only")
        if split in out:
            raise DatasetError(f"{where}: split {split!r} appears twice in data_files")
        paths = item["path"] if isinstance(item["path"], list) else [item["path"]]
        if not paths or not all(isinstance(p, str) for p in paths):
            raise DatasetError(f"{where}: split {split!r}: path must be a pattern or a list of patterns")
        out[split] = [_pattern(p, where) for p in paths]
    return out


def _inside(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return bool(path) and "://" not in path and not path.startswith("/") and ".." not in parts


def _pattern(pattern: str, where: str) -> str:
    if not _inside(pattern):
        raise DatasetError(f"{where}: data_files pattern {pattern!r}: only paths inside the repository are read (no URLs, no '..')")
    return pattern


def _explicit(matched: str, pattern: str) -> bool:
    """Hidden (`.x`) and special (`__x`) parts count only when the pattern names as many (the
    `datasets` library's rule: `**` never wanders into .git/ or __pycache__/)."""
    def count(path: str, prefix: str, parent: bool) -> int:
        parts = PurePosixPath(path).parent.parts if parent else PurePosixPath(path).parts
        return sum(1 for p in parts if p.startswith(prefix) and set(p) != {"."})

    return count(matched, ".", False) == count(pattern, ".", False) and count(matched, "__", True) == count(pattern, "__", True)


def match_files(base: Path, pattern: str) -> list[Path]:
    """The files `pattern` names under `base`, sorted. (A file two patterns of a split name is
    read twice, as the `datasets` library does.)"""
    found = []
    for rel in sorted(glob.glob(pattern, root_dir=base, recursive=True, include_hidden=True)):
        path = base / rel
        if path.is_file() and path.name not in NOT_DATA - {PurePosixPath(pattern).name} and _explicit(rel, pattern):
            found.append(path)
    return found


def download_patterns(config: CardConfig) -> Optional[list[str]]:
    """fnmatch patterns (huggingface_hub's allow_patterns) covering the config's files, the card
    included; None: the whole repository (a config without data_files or data_dir). fnmatch's `*`
    crosses `/`, so each glob is a superset of itself once its `**/` are dropped."""
    if config.data_files is None:
        return [f"{config.data_dir}/**", CARD] if config.data_dir else None
    prefix = f"{config.data_dir}/" if config.data_dir else ""
    out = [CARD]
    for patterns in config.data_files.values():
        for pattern in patterns:
            for variant in (pattern, pattern.replace("**/", "")):
                if prefix + variant not in out:
                    out.append(prefix + variant)
    return out


def names(configs: dict[str, CardConfig]) -> str:
    return ", ".join(configs) or "none"
