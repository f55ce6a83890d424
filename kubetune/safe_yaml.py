"""YAML from users' files (configs, manifests), bounded.

`yaml.safe_load` builds no objects but still trusts the document's size: a few hundred bytes of
nested anchors and aliases (a "billion laughs") parse in microseconds into shared references, and
whatever walks the result next (pydantic, a JSON dump, a deep copy) expands them to billions of
values. So every loader of user files goes through here: the text is capped in size, and the
parsed value is walked once, counting every value as often as aliases repeat it, up to a cap.
Ordinary anchors (`<<: *defaults`) stay allowed. Limits: docs/security.md.
"""
from __future__ import annotations

from typing import Any

import yaml

from kubetune.errors import KubetuneError

MAX_YAML_BYTES = 4 * 2**20  # a config or manifest is a few KiB
MAX_YAML_VALUES = 100_000  # values after expanding aliases

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlLimitError(KubetuneError):
    """A user's YAML file is larger, or expands to more values, than the limits allow."""


def read_user_text(path: Any, error: type[KubetuneError] = KubetuneError) -> str:
    """A user's text file (config, manifest, dataset, task file), or `error` naming the file, line
    and byte where it is not UTF-8 (rather than a UnicodeDecodeError traceback)."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path} line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def safe_load(text: str, source: str = "<yaml>") -> Any:
    """One document, like yaml.safe_load, within the limits."""
    _check_size(text, source)
    return _check_expansion(yaml.load(text, Loader=_LOADER), source)


def safe_load_all(text: str, source: str = "<yaml>") -> list[Any]:
    """Every document, like yaml.safe_load_all, within the limits (counted over all documents)."""
    _check_size(text, source)
    docs = list(yaml.load_all(text, Loader=_LOADER))
    _check_expansion(docs, source)
    return docs


def _check_size(text: str, source: str) -> None:
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"{source}: {len(text)} characters of YAML; the limit is {MAX_YAML_BYTES}")


def _check_expansion(value: Any, source: str) -> Any:
    """Count values as a reader of the data would meet them (an aliased subtree once per alias)."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise YamlLimitError(
                f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values (anchors and aliases "
                "(&name / *name) repeat content); write the values out, or split the file"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value
