"""A bounded cache of prompt prefixes' K/V, so a prompt that starts like a recent one (a system
prompt, a few-shot block) is not computed again.

Prefixes are cut in blocks of BLOCK tokens. Each stored entry is the K/V of one prompt's whole
blocks; every block boundary of it is indexed by a hash chained over the blocks, so a later prompt
sharing only its first blocks still finds it. The tokens are stored too and compared on a hit (a
hash collision must never hand out another prompt's K/V). Entries are evicted least recently used
first once their tensors exceed `max_bytes`. One cache per adapter index: K/V depend on the adapter.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

BLOCK = 16


@dataclass(eq=False)
class _Entry:
    adapter: int
    tokens: tuple[int, ...]  # the stored prefix (a multiple of BLOCK)
    keys: torch.Tensor  # [layers, kv_heads, len, head_dim]
    values: torch.Tensor
    index_keys: list[int]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def _chain(adapter: int, ids: Sequence[int], blocks: int) -> list[int]:
    """hash of each block-aligned prefix: h_j covers ids[: (j + 1) * BLOCK]."""
    hashes, previous = [], hash(("kubetune-prefix", adapter))
    for j in range(blocks):
        previous = hash((previous, tuple(ids[j * BLOCK : (j + 1) * BLOCK])))
        hashes.append(previous)
    return hashes


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self._index: dict[int, tuple[_Entry, int]] = {}  # prefix hash -> (entry, prefix length)
        self.hits = 0
        self.hit_tokens = 0

    def lookup(self, adapter: int, ids: Sequence[int]) -> Optional[tuple[int, torch.Tensor, torch.Tensor]]:
        """(length, keys, values) of the longest cached prefix of `ids` shorter than ids (one token at
        least must be computed for the next-token logits), or None."""
        blocks = (len(ids) - 1) // BLOCK
        for j, key in reversed(list(enumerate(_chain(adapter, ids, blocks)))):
            found = self._index.get(key)
            if found is None:
                continue
            entry, length = found
            if entry.adapter != adapter or entry.tokens[:length] != tuple(ids[:length]):
                continue  # a hash collision: never serve another prompt's K/V
            self._entries.move_to_end(id(entry))
            self.hits += 1
            self.hit_tokens += length
            return length, entry.keys[:, :, :length], entry.values[:, :, :length]
        return None

    def insert(self, adapter: int, ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the whole blocks of a just-prefilled prompt; keys/values: [layers, kv_heads, >= len, head_dim]."""
        blocks = len(ids) // BLOCK
        if blocks == 0:
            return
        length = blocks * BLOCK
        chain = _chain(adapter, ids, blocks)
        known = self._index.get(chain[-1])
        if known is not None and known[1] == length:
            self._entries.move_to_end(id(known[0]))  # already cached
            return
        entry = _Entry(adapter, tuple(ids[:length]), keys[:, :, :length].clone(), values[:, :, :length].clone(), chain)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[id(entry)] = entry
        self.bytes += entry.nbytes
        for j, key in enumerate(chain):
            self._index[key] = (entry, (j + 1) * BLOCK)  # the newest entry answers for shared blocks
        while self.bytes > self.max_bytes:
            self._evict(next(iter(self._entries.values())))

    def _evict(self, entry: _Entry) -> None:
        del self._entries[id(entry)]
        self.bytes -= entry.nbytes
        for key in entry.index_keys:
            found = self._index.get(key)
            if found is not None and found[0] is entry:
                # an older entry may share this block prefix; it stays usable through its own keys
                del self._index[key]
                for other in reversed(self._entries.values()):
                    if key in other.index_keys:
                        self._index[key] = (other, (other.index_keys.index(key) + 1) * BLOCK)
                        break
