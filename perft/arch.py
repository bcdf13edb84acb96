"""Model surgery per architecture: where the MoE blocks are and how they route.

transformers v5 gives every MoE block the same shape: a router child (`gate`, or `router`
for gpt-oss) returning `(logits, weights, indices)`, and a fused `experts` child called as
`experts(hidden_states, top_k_index, top_k_weights)` whose output enters the block's output
additively. PERFT needs three facts per block: its expert count, its top-k, and whether it
renormalises the kept weights. A new architecture joins in one `register_architecture`
call; blocks that follow the common `gate` + `experts` shape are found without one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from perft.errors import PerftError


@dataclass(frozen=True)
class MoEArchitecture:
    """How to read one family of MoE blocks.

    block_classes: class names of the MoE block (e.g. `OlmoeSparseMoeBlock`).
    router_attr / experts_attr: names of the router and fused-experts children.
    normalizes_top_k: the block's renormalisation of kept weights when its router does not
        say (`router.norm_topk_prob` wins when present).
    """

    name: str
    block_classes: tuple[str, ...]
    router_attr: str = "gate"
    experts_attr: str = "experts"
    normalizes_top_k: bool = False


@dataclass(frozen=True)
class MoEBlockInfo:
    """One MoE block found in a model."""

    path: str  # module path relative to the base model, e.g. "model.layers.3.mlp"
    layer: int  # decoder-layer index parsed from the path
    module: nn.Module
    arch: MoEArchitecture
    num_experts: int
    top_k: int
    normalizes_top_k: bool
    hidden_size: int

    @property
    def experts(self) -> nn.Module:
        return getattr(self.module, self.arch.experts_attr)

    @property
    def router(self) -> nn.Module:
        return getattr(self.module, self.arch.router_attr)


_REGISTRY: dict[str, MoEArchitecture] = {}


def register_architecture(arch: MoEArchitecture) -> MoEArchitecture:
    """Teach perft a new MoE block family (a few lines per architecture)."""
    for cls_name in arch.block_classes:
        _REGISTRY[cls_name] = arch
    return arch


for _arch in (
    MoEArchitecture("olmoe", ("OlmoeSparseMoeBlock",)),
    MoEArchitecture("mixtral", ("MixtralSparseMoeBlock",), normalizes_top_k=True),
    MoEArchitecture("qwen2_moe", ("Qwen2MoeSparseMoeBlock",)),
    MoEArchitecture("qwen3_moe", ("Qwen3MoeSparseMoeBlock",)),
    MoEArchitecture("deepseek_v2", ("DeepseekV2Moe",)),
    MoEArchitecture("deepseek_v3", ("DeepseekV3MoE",)),
    MoEArchitecture("gpt_oss", ("GptOssMLP",), router_attr="router", normalizes_top_k=True),
):
    register_architecture(_arch)

_AUTO = MoEArchitecture("auto", ())
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


def _looks_like_moe_block(module: nn.Module) -> MoEArchitecture | None:
    """Auto-discovery: a `gate`/`router` child beside a fused `experts` child."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module) or _int_attr(experts, "num_experts") is None:
        return None
    for router_attr in ("gate", "router"):
        router = getattr(module, router_attr, None)
        if isinstance(router, nn.Module) and _int_attr(router, "top_k") is not None:
            return MoEArchitecture("auto", (type(module).__name__,), router_attr=router_attr)
    return None


def _int_attr(module: nn.Module, name: str) -> int | None:
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _first_int(modules: list[nn.Module], names: tuple[str, ...]) -> int | None:
    for module in modules:
        for name in names:
            value = _int_attr(module, name)
            if value is not None:
                return value
    return None


def find_moe_blocks(model: nn.Module, *, module_filter: Callable[[str], bool] | None = None) -> list[MoEBlockInfo]:
    """All MoE blocks of `model`, in order, with their routing facts."""
    config = getattr(model, "config", None)
    hidden_size = getattr(config, "hidden_size", None)
    blocks: list[MoEBlockInfo] = []
    for order, (path, module) in enumerate(model.named_modules()):
        if f".{path}.".find(".perft_adapter.") >= 0:
            continue  # PERFT's own adapter experts look like an MoE block but are not the base model's
        arch = _REGISTRY.get(type(module).__name__) or _looks_like_moe_block(module)
        if arch is None or (module_filter is not None and not module_filter(path)):
            continue
        router = getattr(module, arch.router_attr, None)
        experts = getattr(module, arch.experts_attr, None)
        if router is None or experts is None:
            raise PerftError(
                f"MoE block {path} ({type(module).__name__}) has no `{arch.router_attr}`/`{arch.experts_attr}` "
                "children; this transformers version lays the block out differently: "
                "register its layout with perft.arch.register_architecture"
            )
        num_experts = _first_int([experts, router], ("num_experts", "num_local_experts"))
        top_k = _first_int([router, module], ("top_k", "num_experts_per_tok"))
        if num_experts is None or top_k is None:
            raise PerftError(f"cannot read the expert count / top-k of MoE block {path} ({type(module).__name__})")
        norm = getattr(router, "norm_topk_prob", None)
        normalizes = bool(norm) if isinstance(norm, bool) else arch.normalizes_top_k
        match = _LAYER_INDEX.search(path)
        layer = int(match.group(1)) if match else order
        weight = getattr(router, "weight", None)
        d = _int_attr(router, "hidden_dim") or _int_attr(experts, "hidden_dim") or (
            weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else hidden_size
        )
        if d is None:
            raise PerftError(f"cannot read the hidden size of MoE block {path}")
        blocks.append(MoEBlockInfo(path, layer, module, arch, num_experts, top_k, normalizes, int(d)))
    return blocks


def require_moe_blocks(model: nn.Module) -> list[MoEBlockInfo]:
    """Like `find_moe_blocks`, but a model without MoE blocks is a clear error."""
    blocks = find_moe_blocks(model)
    if not blocks:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PerftError(
            f"no Mixture-of-Experts block found in this {model_type} model: PERFT adapts MoE models "
            "(OLMoE, Mixtral, Qwen-MoE, DeepSeek-V2/V3, gpt-oss, ...). For a dense model use plain LoRA "
            "(perft.baselines.get_lora_baseline); for an unsupported MoE layout use perft.arch.register_architecture"
        )
    return blocks
