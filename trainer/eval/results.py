"""Eval results: `results.json` (written atomically), per-sample files and a table for stdout. Torch-free."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional


def write_text_atomic(path: Path, text: str) -> None:
    """Write into a temp file in the same folder, fsync, rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def format_table(tasks: dict[str, dict[str, Any]]) -> str:
    """A readable table: one row per (task, metric), with stderr and sample count."""
    header = ("Task", "Type", "Metric", "Value", "Stderr", "N")
    rows = [
        (name, str(task["type"]), metric, _fmt(m["value"]), _fmt(m["stderr"]), str(task["n"]))
        for name, task in tasks.items()
        for metric, m in task["metrics"].items()
    ]
    widths = [max(len(str(col)) for col in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def main_metric(tasks: dict[str, dict[str, Any]]) -> Optional[str]:
    """`task/metric=value` of the first task's headline metric, for `kubectl get evj`."""
    for name, task in tasks.items():
        for metric, m in task["metrics"].items():
            if m["value"] is not None:
                return f"{name}/{metric}={m['value']:.4g}"
    return None


def flat_metrics(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"{name}/{metric}": m["value"] for name, task in tasks.items() for metric, m in task["metrics"].items()}
