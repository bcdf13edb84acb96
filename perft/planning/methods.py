"""The model skeleton on the meta device, and each method's trainable parameters on it.

A method joins the planner with one `register_method_planner(name, fn)` call: `fn(skeleton,
settings)` attaches the method to the meta-device skeleton (or reasons about it without
attaching) and returns a `TrainableEstimate`. PERFT and the PEFT LoRA baselines attach for
real, so their counts are exact. A method whose trainable set depends on data (ESFT picks
experts by their routing scores on the task data) returns an estimate from its budget
instead (e.g. the top-p share of experts per layer) with `exact=False`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from perft.errors import PerftError


@dataclass
class TrainableEstimate:
    """What a method trains: the count, its bytes per parameter, and how sure the count is."""

    trainable: int
    bytes_per_param: int  # of the trainable weights (and their gradients and Adam moments)
    exact: bool
    description: str
    model: nn.Module | None = None  # the skeleton with the method attached, when it was attached


MethodPlanner = Callable[[nn.Module, Any], TrainableEstimate]
_PLANNERS: dict[str, MethodPlanner] = {}


def register_method_planner(name: str, planner: MethodPlanner) -> MethodPlanner:
    """Teach the planner a training method (`name` as in `perft train --method`)."""
    _PLANNERS[name] = planner
    return planner


def trainable_estimate(skeleton: nn.Module, settings: Any) -> TrainableEstimate:
    """The trainable parameters of `settings.method` (a `TrainingConfig`) on the meta skeleton."""
    planner = _PLANNERS.get(settings.method)
    if planner is None:
        raise PerftError(f"perft plan knows no method {settings.method!r}; known: {', '.join(sorted(_PLANNERS))}")
    return planner(skeleton, settings)


def load_model_config(model: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of `model` (a directory or hub name); nothing else is read."""
    from transformers import AutoConfig

    from perft.loading import check_local_path, first_line

    check_local_path(str(model))
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise PerftError(f"cannot read the config of model {model!r}: {first_line(err)}") from None
    return config


def meta_model(config: Any, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of a transformers config on the meta device, in `dtype`: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError) as err:
        raise PerftError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config: {err}") from None


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plan_perft(skeleton: nn.Module, settings: Any) -> TrainableEstimate:
    from perft.model import get_perft_model

    cfg = settings.perft_config()
    model = get_perft_model(skeleton, cfg)
    first = next(iter(model.perft_layers.values()))
    name = {"routed": "PERFT-R", "embedded": "PERFT-E", "dense": "PERFT-D", "single": "PERFT-S"}[cfg.variant]
    shape = f"{first.num_experts} experts" + (f" top-{cfg.top_k}" if cfg.variant == "routed" else "")
    desc = f"{name} ({cfg.adapter}, {shape}, r{cfg.rank}) on {len(model.perft_layers)} MoE blocks"
    return TrainableEstimate(_count(model), first.experts.down.element_size(), True, desc, model)


def _plan_lora(target: str) -> MethodPlanner:
    def plan(skeleton: nn.Module, settings: Any) -> TrainableEstimate:
        from perft.baselines import get_lora_baseline

        model = get_lora_baseline(skeleton, target, rank=settings.rank, alpha=settings.alpha,
                                  dropout=0.0 if target == "experts" else settings.dropout)
        where = "attention q,v" if target == "attention" else "the fused expert tensors"
        bytes_per = next(p for p in model.parameters() if p.requires_grad).element_size()
        return TrainableEstimate(_count(model), bytes_per, True, f"PEFT LoRA r{settings.rank} on {where}", model)

    return plan


register_method_planner("perft", _plan_perft)
register_method_planner("lora-attn", _plan_lora("attention"))
register_method_planner("lora-experts", _plan_lora("experts"))
