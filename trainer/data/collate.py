"""Samples -> a batch of tensors for the model's forward and the loss."""
from __future__ import annotations

import torch

from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.data.packing import PAD_SEGMENT


def collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample in the batch.

    Every batch gets `attention_mask` (1 = token, 0 = pad: the HF convention the model takes;
    the model skips the padding's compute). Packed samples are all max_seq_len long and also
    bring `position_ids` and `segment_ids`; their padding is the segment PAD_SEGMENT.
    Preference pairs become 2 x len(samples) rows: every chosen response, then every rejected one
    (pair i is rows i and len(samples) + i), so one forward pass scores both."""
    if "chosen_input_ids" in samples[0]:
        samples = [{"input_ids": s[f"{side}_input_ids"], "labels": s[f"{side}_labels"]}
                   for side in ("chosen", "rejected") for s in samples]
    longest = max(len(s["input_ids"]) for s in samples)
    batch = {
        "input_ids": _pad([s["input_ids"] for s in samples], longest, pad_id),
        "labels": _pad([s["labels"] for s in samples], longest, IGNORE_INDEX),
    }
    if "segment_ids" in samples[0]:
        batch["position_ids"] = _pad([s["position_ids"] for s in samples], longest, 0)
        batch["segment_ids"] = _pad([s["segment_ids"] for s in samples], longest, PAD_SEGMENT)
        batch["attention_mask"] = (batch["segment_ids"] != PAD_SEGMENT).long()
    else:
        batch["attention_mask"] = _pad([[1] * len(s["input_ids"]) for s in samples], longest, 0)
    return batch


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)
