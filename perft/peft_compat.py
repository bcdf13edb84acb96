"""PEFT calls that cannot apply to PERFT, answered with a PerftError saying why, and TRL's forward patch.

PEFT users reach for `merge_and_unload` and transformers' PEFT-integration methods; a
PerftModel would otherwise pass them to the wrapped model, which fails with messages about
PEFT. `is_fused_lm_head_patch` recognises TRL's `add_fused_lm_head`, which PerftModel runs on
the wrapped causal LM (see perft/model.py).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from perft.errors import PerftError

NOT_MERGEABLE = (
    "PERFT adapters cannot be merged into the base weights: they are extra experts that read the MoE block's "
    "input (gated by their own router or the base router), not a low-rank change of any existing weight. Serve "
    "with the adapter attached (PerftModel.from_pretrained(base, adapter_dir)), and call unload() to get the "
    "untouched base model back"
)
TRANSFORMERS_PEFT_ONLY = {"get_adapter_state_dict": "adapter_state_dict(adapter_name)",
                          "enable_peft_hotswap": None, "load_adapter_hotswap": None}


def transformers_peft_refusal(name: str) -> PerftError | None:
    """The error for a transformers PEFT-integration method PerftModel does not manage, else None."""
    if name not in TRANSFORMERS_PEFT_ONLY:
        return None
    hint = TRANSFORMERS_PEFT_ONLY[name]
    return PerftError(f"{name} belongs to transformers' PEFT integration, which does not manage PERFT adapters; "
                      + (f"use PerftModel.{hint}" if hint else "PERFT has no equivalent"))


class NotMergeableMixin:
    """PEFT's merge methods, each refusing with the reason."""

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise PerftError(f"merge_and_unload: {NOT_MERGEABLE}")

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise PerftError(f"merge_adapter: {NOT_MERGEABLE}")

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise PerftError("unmerge_adapter: nothing is ever merged; PERFT adapters always run beside the base model")


def is_fused_lm_head_patch(value: Any, model: nn.Module) -> bool:
    """A forward bound to `model` that takes TRL's `fused_lm_head` switch (trl.trainer.utils.add_fused_lm_head)."""
    func = getattr(value, "__func__", None)
    return (isinstance(value, types.MethodType) and value.__self__ is model and func is not None
            and "fused_lm_head" in func.__code__.co_varnames[: func.__code__.co_argcount + func.__code__.co_kwonlyargcount])
