"""Checkpoints: Hugging Face model folders (hf.py); training state lives with the training loop."""
from kubetune.trainer.checkpoint.hf import (
    CheckpointError,
    load_model_args,
    load_pretrained,
    resolve_local_dir,
    resolve_model_dir,
    save_pretrained,
)

__all__ = [
    "CheckpointError",
    "load_model_args",
    "load_pretrained",
    "resolve_local_dir",
    "resolve_model_dir",
    "save_pretrained",
]
