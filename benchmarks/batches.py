"""Synthetic training batches the benchmarks share (imported by scripts run as
`python benchmarks/NAME.py`, whose folder is first on sys.path)."""
from __future__ import annotations


def random_batch(vocab_size: int, batch: int, seq: int, padded: bool = False, seed: int = 0):
    """(input_ids, attention_mask, labels), seeded: full rows, or right-padded rows holding
    seq/4..seq real tokens (uniform), like padded instruction data. Padding carries no label."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids, mask, ids.masked_fill(mask == 0, -100)
