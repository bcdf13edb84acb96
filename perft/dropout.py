"""Adapter dropout whose masks do not depend on how a batch is split.

With torch's dropout, a sample's mask depends on everything drawn before it: the
micro-batch it lands in, how many processes share the batch, its padding. Here each mask
entry is a hash of (seed, step, sample index, position among the sample's real tokens,
adapter block, unit): a counter-based generator, so 1 x 16 and 4 x 4 micro-batches, one
or two processes, and a gradient-checkpointed recomputation all draw the same masks.
The hash is a handful of integer operations on the [tokens, units] mask itself.

The trainer opens `keyed_dropout(model, ...)` around each micro-batch's forward and
backward; outside it (a user's own loop, Hugging Face's Trainer) adapters fall back to
torch's own dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (a bijection on [0, 2^32)) on int64 tensors; no overflow."""
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    return (h >> 16) ^ h


def token_keys(seed: int, step: int, sample_ids: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per token [B*S] from (seed, step, sample index, real-token position).

    The position counts only the sample's real tokens, so padding (its amount and its side)
    changes nothing.
    """
    device = attention_mask.device
    head = _mix(torch.tensor((seed & _M32) ^ _mix(torch.tensor(step & _M32)).item(), dtype=torch.int64))
    ids = torch.tensor([int(i) & _M32 for i in sample_ids], dtype=torch.int64, device=device)
    per_sample = _mix(ids ^ head.to(device))  # [B]
    position = attention_mask.long().cumsum(dim=1) - 1  # [B, S]
    return _mix((per_sample.unsqueeze(1) + position * _GOLDEN) & _M32).reshape(-1)


def keyed_keep_mask(keys: torch.Tensor, salt: int, units: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier [T, units]: 0 with probability p, 1 / (1 - p) otherwise."""
    row = _mix((keys ^ _mix(torch.tensor(salt & _M32))) & _M32)  # [T]
    unit = torch.arange(units, dtype=torch.int64, device=keys.device) * _GOLDEN
    h = _mix((row.unsqueeze(1) + unit) & _M32)
    uniform = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 exact bits in [0, 1)
    return (uniform >= p).to(dtype) * (1.0 / (1.0 - p))


def dropout_multiplier(module: nn.Module, tokens: int, units: int, p: float, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """The [tokens, units] dropout multiplier for one adapter module: keyed when a
    `keyed_dropout` context covers these tokens, torch's generator otherwise."""
    keys = getattr(module, "dropout_keys", None)
    if keys is not None and keys.numel() == tokens:
        return keyed_keep_mask(keys, module.dropout_salt, units, p, dtype)
    return torch.empty(tokens, units, dtype=dtype, device=device).bernoulli_(1.0 - p) / (1.0 - p)


@contextlib.contextmanager
def keyed_dropout(model: nn.Module, *, seed: int, step: int, sample_ids: Sequence[int],
                  attention_mask: torch.Tensor) -> Iterator[None]:
    """Within this block, adapter dropout masks are keyed by (seed, step, sample index).

    `sample_ids` are the dataset indices of the batch's rows; every module with a
    `dropout_keys` attribute (the adapter experts) gets the keys and a salt of its own
    (its order among such modules, the same on every process).
    """
    keys = token_keys(seed, step, sample_ids, attention_mask)
    modules = [m for m in model.modules() if hasattr(m, "dropout_keys")]
    for salt, module in enumerate(modules):
        module.dropout_keys, module.dropout_salt = keys, salt
    try:
        yield
    finally:
        for module in modules:
            module.dropout_keys = None
