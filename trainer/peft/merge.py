"""`kubetune merge --base DIR --adapter DIR --out DIR`: fold a PEFT adapter into its base model.

The base is loaded from disk in its own dtype (never from an NF4 copy: merging into
dequantized 4-bit weights would bake the quantization error into the result), the adapter in
float32; each merged weight is computed in float32 and stored in the base's dtype. The output
is a plain Hugging Face folder (config.json + safetensors + the base's tokenizer files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from kubetune.errors import KubetuneError
from kubetune.trainer.peft.adapter import check_adapter_fits, load_adapter, read_adapter
from kubetune.trainer.peft.lora import merge_adapter

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(hf_config: dict) -> torch.dtype:
    """The dtype the base checkpoint was saved in (config.json `dtype` / `torch_dtype`); float32 if unknown."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return _DTYPE_NAMES.get(str(name).removeprefix("torch."), torch.float32)


def merge_to_dir(
    base: str | Path, adapter: str | Path, out: str | Path, dtype: Optional[torch.dtype] = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Load base + adapter, merge, write the merged model to `out` (atomically); returns `out`."""
    from kubetune.trainer.checkpoint import load_model_args, load_pretrained, resolve_model_dir, save_pretrained

    base_dir = resolve_model_dir(str(base))
    out = Path(out)
    for name, path in (("--base", base_dir), ("--adapter", Path(adapter))):
        if out.resolve() == Path(path).resolve():
            raise KubetuneError(f"--out {out}: is the same folder as {name}; write the merged model elsewhere")
    weights = read_adapter(adapter)  # fail on a bad adapter before loading a large base
    dtype = dtype or checkpoint_dtype(load_model_args(base_dir).hf_config)
    model = load_pretrained(base_dir, dtype=dtype)
    check_adapter_fits(model, weights, source=str(adapter))
    merged = merge_adapter(load_adapter(model, weights, dtype=torch.float32))
    merged.to(dtype)  # merged weights come out in float32
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else (base_dir if _has_tokenizer(base_dir) else None)
    return save_pretrained(merged, out, tokenizer_dir=tokenizer_dir)


def _has_tokenizer(folder: Path) -> bool:
    from kubetune.trainer.checkpoint.hf import TOKENIZER_FILES

    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def merge_command(args: argparse.Namespace) -> int:
    out = merge_to_dir(args.base, args.adapter, args.out)
    print(f"merged {args.adapter} into {args.base} -> {out}", file=sys.stderr)
    return 0
