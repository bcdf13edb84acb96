"""Adapter dropout whose masks do not depend on how a batch is split.

With torch's dropout, a sample's mask depends on everything drawn before it: the
micro-batch it lands in, how many processes share the batch, its padding. Here each
sample's masks come from a generator of its own, seeded from (seed, step, sample index,
adapter block), drawn over the sample's real tokens only: 1 x 16 and 4 x 4 micro-batches,
one or two processes, left or right padding and a gradient-checkpointed recomputation all
draw the same masks. The cost is one generator seeding per sample and block; the random
numbers themselves are as many as torch's dropout draws (benchmarks/dropout_cost.py).

The trainer opens `keyed_dropout(model, ...)` around each micro-batch's forward and
backward; outside it (a user's own loop, Hugging Face's Trainer) adapters fall back to
torch's own dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_key(seed: int, step: int, sample: int) -> int:
    """The 64-bit key of one sample's masks at one optimiser step."""
    return _mix64(_mix64(_mix64(seed) ^ step) ^ sample)


@dataclass
class DropoutKeys:
    """Per micro-batch: each row's key and where its real tokens sit in the flat [B*S] tokens."""

    keys: list[int]
    rows: list[torch.Tensor]  # flat token indices of each row's real tokens, in order
    tokens: int  # B * S

    @classmethod
    def build(cls, seed: int, step: int, sample_ids: Sequence[int], attention_mask: torch.Tensor) -> DropoutKeys:
        width = attention_mask.shape[1]
        rows = [torch.nonzero(row, as_tuple=True)[0] + b * width for b, row in enumerate(attention_mask.bool())]
        return cls([sample_key(seed, step, int(i)) for i in sample_ids], rows, attention_mask.numel())

    def keep_mask(self, salt: int, units: int, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The [B*S, units] dropout multiplier of one block: 0 with probability p, 1 / (1 - p)
        otherwise; padding tokens keep every unit (their outputs reach no loss)."""
        uniform = torch.ones(self.tokens, units, device=device)
        for key, index in zip(self.keys, self.rows):
            generator = torch.Generator(device=device)
            generator.manual_seed(_mix64(key ^ _mix64(salt)) & ((1 << 63) - 1))
            draw = torch.rand(index.numel(), units, generator=generator, device=device)
            uniform.index_copy_(0, index.to(device), draw)
        return (uniform >= p).to(dtype) * (1.0 / (1.0 - p))


def dropout_multiplier(module: nn.Module, tokens: int, units: int, p: float, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """The [tokens, units] dropout multiplier for one adapter module: keyed when a
    `keyed_dropout` context covers these tokens, torch's generator otherwise."""
    keys: DropoutKeys | None = getattr(module, "dropout_keys", None)
    if keys is not None and keys.tokens == tokens:
        return keys.keep_mask(module.dropout_salt, units, p, dtype, device)
    return torch.empty(tokens, units, dtype=dtype, device=device).bernoulli_(1.0 - p) / (1.0 - p)


@contextlib.contextmanager
def keyed_dropout(model: nn.Module, *, seed: int, step: int, sample_ids: Sequence[int],
                  attention_mask: torch.Tensor) -> Iterator[None]:
    """Within this block, adapter dropout masks are keyed by (seed, step, sample index).

    `sample_ids` are the dataset indices of the batch's rows; every module with a
    `dropout_keys` attribute (the adapter experts) gets the keys and a salt of its own
    (its order among such modules, the same on every process).
    """
    keys = DropoutKeys.build(seed, step, sample_ids, attention_mask)
    modules = [m for m in model.modules() if hasattr(m, "dropout_keys")]
    for salt, module in enumerate(modules):
        module.dropout_keys, module.dropout_salt = keys, salt
    try:
        yield
    finally:
        for module in modules:
            module.dropout_keys = None
