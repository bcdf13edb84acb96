"""Padding-aware batching: dynamic padding per micro-batch and a deterministic batch plan.

The batch plan is a pure function of (seed, epoch, lengths), so every process of a
distributed run, and a resumed run, computes the same global batches without talking to
each other; the data position in a checkpoint is then just (epoch, step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from perft.data.dataset import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """Right-pad `input_ids` with the pad id and `labels` with -100, to the longest in the batch.

    Works on a list of examples (`{"input_ids", "labels"}`), so it also serves as a
    `data_collator` for `transformers.Trainer`.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(num_examples: int, *, seed: int, epoch: int, lengths: Sequence[int] | None = None,
                group_size: int = 0) -> list[int]:
    """The example order of one epoch: a seeded permutation, optionally grouped by length.

    Grouping (as `transformers`' LengthGroupedSampler): the permutation is cut into
    mega-batches of `group_size` examples, each sorted longest first, so the micro-batches
    cut from a global batch hold similar lengths and carry little padding.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is None or group_size <= 1:
        return order
    grouped: list[int] = []
    for start in range(0, num_examples, group_size):
        chunk = order[start:start + group_size]
        grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))
    return grouped


def global_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Cut an epoch's order into global batches (the last one may be smaller)."""
    return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def micro_batches_for_rank(batch: Sequence[int], micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Split a global batch into micro-batches and deal them round-robin to ranks.

    The split does not depend on the world size, so 1 process with accumulation sees the
    same micro-batches (same padding) as N processes with less accumulation.
    """
    micro = [list(batch[i:i + micro_batch_size]) for i in range(0, len(batch), micro_batch_size)]
    return micro[rank::world_size]


def num_micro_batches(batch_len: int, micro_batch_size: int) -> int:
    return (batch_len + micro_batch_size - 1) // micro_batch_size
