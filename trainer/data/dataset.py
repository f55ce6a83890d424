"""A config's dataset section -> tokenized train and held-out samples, and a batch loader whose
position is part of the training state (exact resume)."""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from kubetune.trainer.data.collate import collate
from kubetune.trainer.data.formats import TokenizerLike, tokenize_records
from kubetune.trainer.data.packing import pack_samples
from kubetune.trainer.data.sources import DatasetError, SourceRecord, has_split, load_records

log = logging.getLogger("kubetune.data")


@dataclass
class DatasetSplits:
    train: list[dict[str, list[int]]]
    eval: Optional[list[dict[str, list[int]]]]  # None: no held-out data configured
    pad_id: int


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None and pad >= 0 else 0


def build_datasets(dataset_cfg: Any, tokenizer: TokenizerLike, max_seq_len: int, seed: int) -> DatasetSplits:
    """Load, hold out, tokenize, mask, truncate and optionally pack, as the config says.

    The held-out set is dataset.eval_split when set (a file of a folder source, or an hf://
    split); otherwise a seeded dataset.eval_fraction of the training records (default 0: none)."""
    text_key = dataset_cfg.column("text")
    records = load_records(dataset_cfg.source, dataset_cfg.split, text_key, dataset_cfg.txt_documents)
    if dataset_cfg.max_samples is not None:
        records = records[: dataset_cfg.max_samples]
    eval_records: Optional[list[SourceRecord]] = None
    if dataset_cfg.eval_split:
        source = dataset_cfg.source
        if not (source.startswith("hf://") or has_split(source, dataset_cfg.eval_split)):
            raise DatasetError(
                f"dataset.eval_split '{dataset_cfg.eval_split}': {source} is not a folder with a file for that "
                "split; remove eval_split to hold out dataset.eval_fraction of the training records instead"
            )
        eval_records = load_records(source, dataset_cfg.eval_split, text_key, dataset_cfg.txt_documents)
    elif dataset_cfg.eval_fraction > 0:
        records, eval_records = hold_out(records, dataset_cfg.eval_fraction, seed)
    if not records:
        raise DatasetError(f"dataset.source {dataset_cfg.source}: no training records in split '{dataset_cfg.split}'")

    def prepare(part: list[SourceRecord]) -> list[dict[str, list[int]]]:
        samples = tokenize_records(
            part, tokenizer, dataset_cfg.format, max_seq_len, dataset_cfg.train_on_input, dataset_cfg.text_field,
            columns=dataset_cfg.columns, prompt_template=dataset_cfg.prompt_template,
        )
        if dataset_cfg.packed and dataset_cfg.format != "preference":
            samples = pack_samples(samples, max_seq_len, pad_id_of(tokenizer))
        return samples

    train = prepare(records)
    if not train:
        raise DatasetError(
            f"dataset.source {dataset_cfg.source}: every sample lost all its trainable tokens to truncation; "
            f"raise max_seq_len (now {max_seq_len}) or shorten the prompts"
        )
    held_out = prepare(eval_records) if eval_records else None
    return DatasetSplits(train=train, eval=held_out or None, pad_id=pad_id_of(tokenizer))


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of the records (at least one, never all) as the held-out set."""
    if len(records) < 2:
        return records, []
    count = min(len(records) - 1, max(1, round(len(records) * fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _batches_per_epoch(samples: int, batch_size: int, world_size: int) -> int:
    """One process keeps the last short batch of an epoch; several drop it (every rank takes a full
    slice of every global batch, so all ranks do the same number of steps)."""
    return math.ceil(samples / batch_size) if world_size == 1 else max(1, samples // (batch_size * world_size))


class BatchLoader:
    """Micro-batches over the samples, epoch after epoch, with a position that can be saved.

    Each epoch is a permutation drawn from (seed, epoch), so the batch at any position is a
    pure function of the position: resuming from a saved `state_dict()` yields exactly the
    batches an uninterrupted run would have seen, without replaying the data. With several
    ranks, each takes its slice of every global batch (and the last short batch is dropped so
    every rank does the same number of steps)."""

    def __init__(
        self,
        samples: list[dict[str, list[int]]],
        batch_size: int,
        pad_id: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not samples:
            raise ValueError("BatchLoader needs at least one sample")
        self.samples, self.batch_size, self.pad_id = samples, batch_size, pad_id
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.batches_per_epoch = _batches_per_epoch(len(samples), batch_size, world_size)
        self.position = 0  # micro-batches handed out so far, over all epochs
        self._order_epoch, self._order = -1, list(range(len(samples)))

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def next_batch(self) -> dict[str, torch.Tensor]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        start = (index * self.world_size + self.rank) * self.batch_size
        batch = [self.samples[i] for i in order[start:start + self.batch_size]]
        self.position += 1
        return collate(batch, self.pad_id)

    def epoch_batches(self, max_batches: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in order without moving the position (for evaluation)."""
        count = self.batches_per_epoch if max_batches is None else min(max_batches, self.batches_per_epoch)
        for index in range(count):
            start = (index * self.world_size + self.rank) * self.batch_size
            yield collate(self.samples[start:start + self.batch_size], self.pad_id)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle and epoch != self._order_epoch:
            self._order = list(range(len(self.samples)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "num_samples": len(self.samples), "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The position counts global batches, so a run may resume with another number of ranks as
        long as the global batch (batch_size x world_size) is the same (e.g. 2 x 2 -> 4 x 1)."""
        saved_global = state["batch_size"] * state.get("world_size", 1)
        if (state["num_samples"], saved_global) != (len(self.samples), self.batch_size * self.world_size):
            raise DatasetError(
                f"cannot resume: the checkpoint was taken with {state['num_samples']} samples in global batches of "
                f"{saved_global} (batch_size {state['batch_size']} x {state.get('world_size', 1)} processes), this run "
                f"has {len(self.samples)} in global batches of {self.batch_size * self.world_size} (batch_size "
                f"{self.batch_size} x {self.world_size}); resume with the same dataset and batch_size x processes, "
                "or set resume: never"
            )
        self.position = state["position"]
        saved_ranks = state.get("world_size", 1)
        if saved_ranks != self.world_size and self.rank == 0:
            saved_epoch = _batches_per_epoch(len(self.samples), state["batch_size"], saved_ranks)
            note = "" if saved_epoch == self.batches_per_epoch else (
                f"; an epoch is {self.batches_per_epoch} batches now, {saved_epoch} before ({len(self.samples)} samples "
                "do not divide the global batch: one process keeps the short last batch, several drop it), so past "
                "an epoch boundary the batches are those of a run with this many processes")
            log.info("the checkpoint was taken with %d process(es) x batch_size %d, this run has %d x %d: the same "
                     "global batch of %d, continuing at data position %d%s", saved_ranks, state["batch_size"],
                     self.world_size, self.batch_size, saved_global, self.position, note)
