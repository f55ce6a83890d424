"""Samples -> a batch of tensors for the model's forward and the loss."""
from __future__ import annotations

import torch

from kubetune.trainer.data.formats import IGNORE_INDEX


def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample in the batch.

    Unpacked samples get `attention_mask` (1 = token, 0 = pad: the HF convention the model
    takes). Packed samples are all max_seq_len long and bring `position_ids` and
    `segment_ids`; their padding is a segment of its own, so no attention_mask is needed."""
    longest = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": _pad([s["input_ids"] for s in samples], longest, pad_id),
        "labels": _pad([s["labels"] for s in samples], longest, IGNORE_INDEX),
    }
    if "segment_ids" in samples[0]:
        batch["position_ids"] = _pad([s["position_ids"] for s in samples], longest, 0)
        batch["segment_ids"] = _pad([s["segment_ids"] for s in samples], longest, 0)
    else:
        batch["attention_mask"] = _pad([[1] * len(s["input_ids"]) for s in samples], longest, 0)
    return batch


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)
