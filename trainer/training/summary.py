"""The one-line JSON summary a run leaves for Kubernetes (the operator copies it into
`status.result`; docs/architecture.md "Trainer run contract")."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def termination_log_path() -> Optional[Path]:
    """$KUBETUNE_TERMINATION_LOG, else /dev/termination-log when it exists and is writable
    (it does in a pod; on a laptop it does not, and nothing is written)."""
    explicit = os.environ.get("KUBETUNE_TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_TERMINATION_LOG)
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def run_summary(
    final_loss: Optional[float],
    eval_loss: Optional[float],
    steps: int,
    checkpoint: Optional[str],
    tokens_per_second: float,
    adapter: Optional[str] = None,
) -> dict:
    return {
        "finalLoss": _finite_or_none(final_loss),
        "evalLoss": _finite_or_none(eval_loss),
        "steps": int(steps),
        "checkpoint": checkpoint,
        "adapter": adapter,
        "tokensPerSecond": float(tokens_per_second),
    }


def write_termination_log(summary: dict) -> Optional[Path]:
    """Write the summary as one JSON line; returns the path written, or None when there is none.

    Never raises: failing to report must not turn a finished run into a failed one."""
    path = termination_log_path()
    if path is None:
        return None
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(summary, sort_keys=True) + "\n")
    except OSError:
        return None
    return path


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None
