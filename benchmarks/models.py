"""The benchmarked models and methods: the frozen bases (one OLMoE layer, the small model) and
every compared method built on a weight-sharing copy of one base."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perft.methods import get_method
from perft.training import TrainingConfig
from perft.variants import Gating, Routed, register_variant

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The PERFT settings benchmarked (the paper's typical ones for OLMoE): LoRA-form adapters,
# rank 16, alpha 32, no dropout (PEFT's expert LoRA cannot use dropout, so no method does).
# num_experts/top_k of E and S are not used by those variants (E: the base's experts, S: 1).
# loop-r is PERFT-R computed by the registered "routed_loop" variant below.
PERFT_SETTINGS: dict[str, dict[str, Any]] = {
    "perft-r": {"variant": "routed", "num_experts": 8, "top_k": 2, "rank": 16},
    "perft-e": {"variant": "embedded", "num_experts": 4, "top_k": 2, "rank": 16},
    "perft-d": {"variant": "dense", "num_experts": 4, "top_k": 2, "rank": 16},
    "perft-s": {"variant": "single", "num_experts": 4, "top_k": 2, "rank": 16},
    "loop-r": {"variant": "routed_loop", "num_experts": 8, "top_k": 2, "rank": 16},
}
# The benchmark's names of the PEFT LoRA baselines -> the registered method names.
LORA_METHODS = {"lora-qv": "lora-attn", "lora-experts": "lora-experts"}
ALL_METHODS = ("base", "perft-r", "perft-e", "perft-d", "perft-s", "lora-qv", "lora-experts", "loop-r")
# Extra methods, run on request: PERFT with adapter_dtype="auto" (adapters in the base dtype
# instead of the default fp32), e.g. `perft-e-auto`.
EXTRA_METHODS = tuple(f"{name}-auto" for name in PERFT_SETTINGS if name != "loop-r")
PERFT_LIKE = ("perft-r", "perft-e", "perft-d", "perft-s", "loop-r", "perft-r-auto", "perft-e-auto", "perft-d-auto",
              "perft-s-auto")


# ---------------------------------------------------------------------------- models
def olmoe_layer_config(*, quick: bool, vocab_size: int = 1024, backend: str = "grouped_mm") -> Any:
    """One decoder layer with OLMoE-1B-7B's shapes (or a tiny stand-in with `quick`)."""
    from transformers import OlmoeConfig

    if quick:
        sizes = dict(hidden_size=64, intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                     num_attention_heads=4, num_key_value_heads=4)
    else:
        sizes = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                     num_attention_heads=16, num_key_value_heads=16)
    cfg = OlmoeConfig(**sizes, num_hidden_layers=1, vocab_size=vocab_size, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg._experts_implementation = backend
    return cfg


def layer_model(*, quick: bool, backend: str = "grouped_mm", causal_lm: bool = False) -> tuple[nn.Module, str]:
    """(one-layer OLMoE with OLMoE-1B-7B's shapes, description); `causal_lm` adds the LM head."""
    from transformers import OlmoeForCausalLM, OlmoeModel

    cfg = olmoe_layer_config(quick=quick, backend=backend)
    torch.manual_seed(0)
    cls = OlmoeForCausalLM if causal_lm else OlmoeModel
    last = "vocab {vocab_size}" if causal_lm else "{num_attention_heads} heads"
    desc = (f"1-layer {cls.__name__}, hidden {{hidden_size}}, {{num_experts}} experts top-{{num_experts_per_tok}}, "
            f"expert width {{intermediate_size}}, {last}").format(**cfg.to_dict())
    return cls(cfg), desc


def base_for(target: str, dtype: torch.dtype, *, quick: bool, backend: str,
             causal_lm: bool = False) -> tuple[nn.Module, str]:
    """A benchmark's frozen base in eval mode: target "layer" (`layer_model`) or the small model."""
    if target == "layer":
        model, desc = layer_model(quick=quick, backend=backend, causal_lm=causal_lm)
    else:
        model, desc = small_model(quick=quick, backend=backend)
    return model.to(dtype).eval(), desc


def small_model(*, quick: bool, backend: str = "grouped_mm") -> tuple[nn.Module, str]:
    """The embedded small model if it has been built, else an OLMoE of the same recipe.

    Returns (causal LM, description).
    """
    from transformers import AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM

    path = None if quick else installed_small_model()
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(str(path), experts_implementation=backend)
        c = model.config
        rel = os.path.relpath(str(path), os.getcwd()) if str(path).startswith(os.getcwd()) else str(path)
        return model, (f"embedded small model {rel}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                       f"{c.num_experts} experts top-{c.num_experts_per_tok}, expert width {c.intermediate_size}, "
                       f"vocab {c.vocab_size}")
    if quick:
        sizes = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_experts=8, num_experts_per_tok=2, vocab_size=128)
    else:  # the defaults of perft.tiny.pretrain.PretrainConfig
        sizes = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_experts=8, num_experts_per_tok=2, vocab_size=2048)
    cfg = OlmoeConfig(**sizes, num_key_value_heads=sizes["num_attention_heads"], max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      norm_topk_prob=False)
    cfg._experts_implementation = backend
    torch.manual_seed(0)
    desc = ("random OLMoE, hidden {hidden_size}, {num_hidden_layers} layers, {num_experts} experts top-"
            "{num_experts_per_tok}, expert width {intermediate_size}, vocab {vocab_size}").format(**sizes)
    return OlmoeForCausalLM(cfg), desc


def installed_small_model() -> str | None:
    """Directory of the embedded small model if it is installed (shipped or already built).

    Never calls `perft.tiny.default_base_model_path()` when the model is missing: that would
    pretrain it (many CPU minutes) in the middle of a benchmark.
    """
    try:
        from perft import tiny
    except ImportError:
        return None
    candidates = [getattr(tiny, "SHIPPED_MODEL", None)]
    if hasattr(tiny, "cache_dir"):
        candidates.append(tiny.cache_dir() / "tiny-olmoe")
    files = getattr(tiny, "MODEL_FILES", ("config.json", "model.safetensors"))
    for directory in candidates:
        if directory is not None and all((directory / name).is_file() for name in files):
            return str(directory)
    return None


def share_weights_copy(base: nn.Module) -> nn.Module:
    """A structural copy of `base` whose parameters are the very same tensors (no memory)."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def moe_blocks(model: nn.Module) -> list[Any]:
    from perft.arch import find_moe_blocks

    return find_moe_blocks(model)


def _lora_rank_for(target: int, per_rank: int) -> int:
    return max(1, round(target / per_rank))


def _qv_params_per_rank(model: nn.Module) -> int:
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in ("q_proj", "v_proj"):
            total += module.in_features + module.out_features
    return total


def _expert_params_per_rank(model: nn.Module) -> int:
    total = 0
    for block in moe_blocks(model):
        for pname in ("gate_up_proj", "down_proj"):
            e, a, b = getattr(block.experts, pname).shape
            total += e * (a + b)
    return total


@dataclass
class Method:
    """One compared method, built on a weight-sharing copy of the base."""

    name: str
    model: nn.Module
    trainable: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def perft_training_config(name: str) -> TrainingConfig:
    """The TrainingConfig of a PERFT method (`perft-r`, `loop-r`, `perft-e-auto`, ...): every adapter
    field explicit, so a changed training default never changes what is measured."""
    settings = PERFT_SETTINGS[name.removesuffix("-auto")]
    return TrainingConfig(
        method="perft", adapter="lora", alpha=2.0 * settings["rank"], dropout=0.0, init="normal", dropout_at=None,
        activation="silu", normalize_top_k=None, router_aux_loss_coef=0.0, layers=None,
        adapter_dtype="auto" if name.endswith("-auto") else "float32", **settings,
    )


def lora_training_config(name: str, rank: int) -> TrainingConfig:
    """The TrainingConfig of a PEFT LoRA baseline at `rank` (alpha 2 x rank, no dropout)."""
    return TrainingConfig(method=LORA_METHODS[name], rank=rank, alpha=2.0 * rank, dropout=0.0)


def build_method(name: str, base: nn.Module, *, perft_r_params: int | None = None, seed: int = 0) -> Method:
    """Build `name` (one of ALL_METHODS) on a copy of the frozen `base`, through the method registry."""
    if "@" in name:  # METHOD@BACKEND: the method on the base run with another experts_implementation
        inner, backend = name.split("@", 1)
        previous = base.config._experts_implementation
        base.config._experts_implementation = backend  # the copy below takes its own config
        try:
            method = build_method(inner, base, perft_r_params=perft_r_params, seed=seed)
        finally:
            base.config._experts_implementation = previous
        method.name, method.note = name, f"{method.note}; experts backend {backend}"
        return method
    model = share_weights_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if name == "base":
        return Method(name, model, 0, "frozen; gradients to the inputs only")
    if name.removesuffix("-auto") in PERFT_SETTINGS and (name in PERFT_SETTINGS or name in EXTRA_METHODS):
        cfg = perft_training_config(name)
        wrapped = get_method("perft").build(model, cfg)
        randomize_adapters(wrapped, seed)
        first = next(iter(wrapped.perft_layers.values()))
        note = f"N={first.num_experts}, " + (f"top-{cfg.top_k}, " if first.variant_spec.has_router else "")
        note += f"r={cfg.rank}"
        if cfg.variant == "embedded":
            note = f"N={first.num_experts} (base top-k), r={cfg.rank}"
        if name.endswith("-auto"):
            note += f"; adapters in {str(first.experts.down.dtype).removeprefix('torch.')} (adapter_dtype=auto)"
        if cfg.variant == RoutedLoop.name:
            note += "; per-expert Python loop"
        return Method(name, wrapped, count_trainable(wrapped), note)
    if name in LORA_METHODS:
        per_rank = _qv_params_per_rank(model) if name == "lora-qv" else _expert_params_per_rank(model)
        default = per_rank * 16 if name == "lora-qv" else per_rank
        rank = _lora_rank_for(perft_r_params or default, per_rank)
        wrapped = get_method(LORA_METHODS[name]).build(model, lora_training_config(name, rank))
        where = "q,v" if name == "lora-qv" else "on fused experts"
        return Method(name, wrapped, count_trainable(wrapped), f"PEFT LoRA {where} r={rank}")
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Give the zero-initialised `up` tensors small random values (a mid-training adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(".up"):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)


@register_variant
class RoutedLoop(Routed):
    """PERFT-R's tensors and router, computed as the paper's reference code does: per adapter
    expert, index its tokens, compute, `index_add_` (the `loop-r` benchmark method)."""

    name = "routed_loop"
    description = "routed, computed by a per-expert Python loop (benchmarks only)"

    def expert_output(self, layer: Any, x: torch.Tensor, gating: Gating) -> torch.Tensor:
        ex = layer.experts
        h = x.to(ex.down.dtype)
        dense, top_index = gating.dense, gating.index
        out = torch.zeros_like(h)
        for n in range(ex.num_experts):
            token, _slot = torch.where(top_index == n)
            if token.numel() == 0:
                continue
            mid = F.linear(h[token], ex.down[n])
            mid = ex.act(mid) if ex.act is not None else mid * ex.scaling
            y = F.linear(mid, ex.up[n]) * dense[token, n].unsqueeze(-1).to(h.dtype)
            out.index_add_(0, token, y)
        return out.to(x.dtype)
