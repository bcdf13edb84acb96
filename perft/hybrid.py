"""Hybrid `perft+lora-attn`: a PERFT variant on the MoE blocks plus PEFT LoRA on attention q,v.

LoRA is injected into the base first (`peft.inject_adapter_in_model`, B = 0 so it starts as a
no-op), then PERFT wraps it; both parts train, nothing else. One artifact: the PERFT files
(`adapter_config.json`, `adapter_model.safetensors`) with the LoRA tensors added to the same
safetensors file under `lora_attn.<module path>`, and `lora_attn_config.json` (the PEFT
`LoraConfig` and the method name), which is how the folder is recognised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from perft.errors import PerftError
from perft.io import atomic_save_safetensors, atomic_write_text, load_safetensors
from perft.methods import Perft, check_adapter_tensors, copy_adapter_tensors, register_method

if TYPE_CHECKING:
    from perft.training.args import TrainingConfig

LORA_CONFIG = "lora_attn_config.json"
PREFIX = "lora_attn."

def inject_attention_lora(base: nn.Module, rank: int, alpha: float | None, dropout: float) -> dict[str, Any]:
    """Add PEFT LoRA to `base`'s q_proj and v_proj in place; returns the LoraConfig as a dict."""
    from peft import LoraConfig, inject_adapter_in_model

    from perft.baselines import ATTENTION_MODULES

    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    if not set(ATTENTION_MODULES) <= names:
        raise PerftError(f"the model has no {ATTENTION_MODULES} modules for LoRA on attention: use --method perft")
    config = LoraConfig(r=rank, lora_alpha=float(2 * rank if alpha is None else alpha), lora_dropout=dropout,
                        target_modules=list(ATTENTION_MODULES), bias="none")
    inject_adapter_in_model(config, base)
    return {"r": rank, "lora_alpha": config.lora_alpha, "lora_dropout": dropout,
            "target_modules": list(ATTENTION_MODULES)}

def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The attention LoRA tensors, keyed by their path in the base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: p for n, p in base.named_parameters() if ".lora_A." in n or ".lora_B." in n}

@register_method
class PerftLoraAttention(Perft):
    """PERFT (any variant, the `--variant` settings) + LoRA on attention q,v (`--lora-attn-rank`)."""

    name = "perft+lora-attn"
    help = "hybrid: a PERFT variant on the MoE blocks + PEFT LoRA on attention q,v"

    def validate(self, cfg: TrainingConfig) -> None:
        super().validate(cfg)
        rank = cfg.lora_attn_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise PerftError(f"lora_attn_rank must be an integer >= 1, got {rank!r}")

    def describe(self, cfg: TrainingConfig) -> str:
        return f"{super().describe(cfg)} + LoRA q,v (r={cfg.lora_attn_rank or cfg.rank})"

    def build(self, base: nn.Module, cfg: TrainingConfig) -> nn.Module:
        from perft.model import get_perft_model

        rank = cfg.lora_attn_rank or cfg.rank
        lora = inject_attention_lora(base, rank, None if cfg.lora_attn_rank else cfg.alpha, cfg.dropout)
        model = get_perft_model(base, cfg.perft_config())  # freezes everything but its own adapters
        return self._mark(model, lora, trainable=True)

    def _mark(self, model: nn.Module, lora: dict[str, Any], trainable: bool) -> nn.Module:
        for param in lora_parameters(model).values():
            param.requires_grad_(trainable)
        model.perft_method = self.name
        model.lora_attn_config = lora
        return model

    def owns(self, model: nn.Module) -> bool:
        return getattr(model, "perft_method", None) == self.name

    def recognises(self, directory: Path) -> bool:
        return (Path(directory) / LORA_CONFIG).is_file()

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = dict(model.adapter_state_dict())
        state.update({PREFIX + n: p for n, p in lora_parameters(model).items()})
        return state

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        lora = lora_parameters(model)
        mine = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        fits = {"prefix": PREFIX, "mismatch": "does not fit this model's attention LoRA: was it saved with another "
                "rank or base model?"}
        check_adapter_tensors(lora, mine, source, **fits)  # before the PERFT part is written
        model.load_adapter_state_dict({k: v for k, v in state.items() if not k.startswith(PREFIX)}, source=source)
        copy_adapter_tensors(lora, mine, source, **fits)

    def save(self, model: nn.Module, directory: Path) -> None:
        from perft.config import WEIGHTS_NAME

        directory = Path(directory)
        model.save_pretrained(directory)  # the PERFT config (and its weights, rewritten below with LoRA's)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state(model).items()}
        metadata = {"format": "pt", "perft_config": json.dumps(model.perft_config.to_dict(), sort_keys=True)}
        atomic_save_safetensors(directory / WEIGHTS_NAME, state, metadata=metadata)
        atomic_write_text(directory / LORA_CONFIG,
                          json.dumps({"perft_method": self.name, **model.lora_attn_config}, indent=1) + "\n")

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from perft.config import WEIGHTS_NAME, PerftConfig
        from perft.model import get_perft_model

        directory = Path(directory)
        try:
            lora = json.loads((directory / LORA_CONFIG).read_text(encoding="utf-8"))
            rank, alpha, dropout = int(lora["r"]), float(lora["lora_alpha"]), float(lora["lora_dropout"])
        except (OSError, ValueError, KeyError, TypeError):
            raise PerftError(f"{directory / LORA_CONFIG} is not a readable hybrid adapter config; "
                             "the adapter was not saved completely") from None
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise PerftError(f"no {WEIGHTS_NAME} in {directory}: the adapter was not saved completely")
        inject_attention_lora(base, rank, alpha, dropout)
        model = self._mark(get_perft_model(base, PerftConfig.load(directory)), lora, trainable=False)
        self.load_adapter_state(model, load_safetensors(weights), str(weights))
        return model.eval().requires_grad_(False)

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove both parts: PERFT's hooks and adapters, then each LoRA layer for the layer it wrapped."""
        from peft.tuners.lora import LoraLayer

        base = model.unload()
        for name, module in list(base.named_modules()):
            if isinstance(module, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent_name) if parent_name else base, child, module.get_base_layer())
        return base

    def parameter_count(self, model: nn.Module) -> tuple[int, int]:
        adapter = sum(v.numel() for v in self.adapter_state(model).values())
        return adapter, sum(p.numel() for p in model.parameters())
