"""Config strings -> torch devices and dtypes (`device: auto|cpu|cuda`, `dtype: fp32|bf16`)."""
from __future__ import annotations

import torch

from kubetune.errors import KubetuneError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available (the local rank's GPU under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise KubetuneError("device: cuda requested but no CUDA GPU is available; use device=cpu or device=auto")
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    raise KubetuneError(f"device: unknown device {name!r}; use auto, cpu or cuda")


def resolve_dtype(name: str = "fp32") -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise KubetuneError(f"dtype: unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None
