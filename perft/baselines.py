"""The paper's MoE-agnostic baseline: plain LoRA through Hugging Face PEFT.

`attention` puts LoRA on `q_proj` and `v_proj` (the paper's baseline). `experts` puts LoRA
on the fused expert tensors of every MoE block through PEFT's `target_parameters` (one
low-rank update per expert weight tensor), a stronger MoE-aware baseline. Both return a
`peft.PeftModel`, saved and loaded the PEFT way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from perft.errors import PerftError

TARGETS = ("attention", "experts")
ATTENTION_MODULES = ["q_proj", "v_proj"]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Suffixes (`experts.<tensor>`) of the fused expert weight tensors of the model's MoE blocks."""
    from perft.arch import require_moe_blocks

    block = require_moe_blocks(model)[0]
    experts = block.experts
    names = [name for name, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    if not names:
        raise PerftError(
            f"the experts of {block.path} have no fused 3-D weight tensors for PEFT's target_parameters; "
            "use target='attention'"
        )
    return [f"{block.arch.experts_attr}.{name}" for name in names]


def get_lora_baseline(
    base: nn.Module,
    target: str = "attention",
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.05,
) -> Any:
    """Freeze `base` and add PEFT LoRA on attention q,v (`attention`) or on the fused experts (`experts`)."""
    from peft import LoraConfig, get_peft_model

    if target not in TARGETS:
        raise PerftError(f"unknown LoRA target {target!r}; choose one of: {', '.join(TARGETS)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PerftError(f"rank must be an integer >= 1, got {rank!r}")
    alpha = float(2 * rank if alpha is None else alpha)
    # A causal LM gets PEFT's causal-LM wrapper (generate, labels); a bare decoder stack (the
    # benchmarks' one-layer OlmoeModel) the plain one, which PEFT's CAUSAL_LM wrapper cannot hold.
    task_type = "CAUSAL_LM" if hasattr(base, "prepare_inputs_for_generation") else None
    if target == "attention":
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        missing = [m for m in ATTENTION_MODULES if m not in names]
        if missing:
            raise PerftError(f"the model has no {missing} modules for the q,v LoRA baseline; use target='experts'")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(ATTENTION_MODULES),
                            bias="none", task_type=task_type)
    else:
        if dropout:
            raise PerftError("LoRA on fused expert tensors (PEFT target_parameters) does not support dropout: use 0")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=[],
                            target_parameters=expert_parameter_names(base), bias="none", task_type=task_type)
    return get_peft_model(base, config)
