"""Packing: several samples in one max_seq_len sequence, with the boundaries kept.

Each pack carries `segment_ids` (1, 2, ... per document; 0 for the padding at the end) so
the model attends only within a document, and `position_ids` that restart at 0 for each
document, so a packed sample sees exactly what it would see alone. Torch-free.
"""
from __future__ import annotations

from kubetune.trainer.data.formats import IGNORE_INDEX

PAD_SEGMENT = 0


def pack_samples(samples: list[dict[str, list[int]]], max_seq_len: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Greedy, in order: a sample goes into the current pack if it fits, else starts the next one.

    Order is kept so packs are deterministic; samples are already truncated to max_seq_len."""
    packs: list[dict[str, list[int]]] = []
    current = _empty_pack()
    for sample in samples:
        length = len(sample["input_ids"])
        if length > max_seq_len:
            raise ValueError(f"sample of {length} tokens is longer than max_seq_len={max_seq_len}; truncate first")
        if len(current["input_ids"]) + length > max_seq_len:
            packs.append(_pad_pack(current, max_seq_len, pad_id))
            current = _empty_pack()
        segment = current["segment_ids"][-1] + 1 if current["segment_ids"] else 1
        current["input_ids"] += sample["input_ids"]
        current["labels"] += sample["labels"]
        current["position_ids"] += list(range(length))
        current["segment_ids"] += [segment] * length
    if current["input_ids"]:
        packs.append(_pad_pack(current, max_seq_len, pad_id))
    return packs


def _empty_pack() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}


def _pad_pack(pack: dict[str, list[int]], max_seq_len: int, pad_id: int) -> dict[str, list[int]]:
    missing = max_seq_len - len(pack["input_ids"])
    return {
        "input_ids": pack["input_ids"] + [pad_id] * missing,
        "labels": pack["labels"] + [IGNORE_INDEX] * missing,
        "position_ids": pack["position_ids"] + list(range(missing)),
        "segment_ids": pack["segment_ids"] + [PAD_SEGMENT] * missing,
    }
