"""`PerftLayer`: the PERFT adapter experts of one MoE block, and the hooks that attach them.

The layer is registered as a child (`perft_adapter`, or `perft_adapter_<name>` for a named
adapter) of the frozen MoE block, so it moves, shards (FSDP) and checkpoints with its
decoder layer, and a forward hook adds its output to the block's output. The variant
(`perft.variants`) says where the hook goes: PERFT-E gates its experts with exactly the
weights the base block applies, so it hooks the fused `experts` module, whose inputs are
`(hidden_states, top_k_index, top_k_weights)` after the router's own normalisation.

Mixed batches: with `rows` set (a bool [B] tensor), the layer adapts only those batch rows,
so several adapters on one base each serve their own rows of one forward; adapters of one block
with equal `stack_key` run there as one stacked bank instead (perft/mixed_batch.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from perft.adapters import AdapterExperts, AdapterRouter
from perft.arch import MoEBlockInfo, require_moe_blocks
from perft.config import PerftConfig
from perft.errors import PerftError
from perft.model_io import base_shapes
from perft.variants import get_variant

ATTR_NAME = "perft_adapter"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PerftLayer(nn.Module):
    """Adapter experts (+ router for PERFT-R) beside one MoE block."""

    def __init__(self, config: PerftConfig, block: MoEBlockInfo, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.variant = config.variant
        self.variant_spec = get_variant(config.variant)
        self.num_experts = self.variant_spec.num_experts(config, block.num_experts)
        self.experts = AdapterExperts(
            config.adapter,
            self.num_experts,
            block.hidden_size,
            config.rank,
            scaling=config.scaling,
            activation=config.activation,
            dropout=config.dropout,
            init=config.init, dropout_at=config.dropout_at, dropout_masks=config.dropout_masks,
            dtype=dtype,
            device=device,
        )
        self.router: AdapterRouter | None = None
        if self.variant_spec.has_router:
            normalize = block.normalizes_top_k if config.normalize_top_k is None else config.normalize_top_k
            self.router = AdapterRouter(
                self.num_experts,
                block.hidden_size,
                config.top_k,
                normalize=normalize,
                init_std=config.router_init_std,
                dtype=dtype,
                device=device,
            )
        self.compute_balance = self.variant_spec.has_router and config.router_aux_loss_coef > 0
        # Layers of one block with equal keys differ only in their weights: a mixed batch stacks them.
        self.stack_key = (config.variant, self.experts.kind, config.rank, self.num_experts, self.experts.scaling,
                          config.activation, dtype, None if self.router is None else
                          (self.router.top_k, self.router.normalize))
        self.enabled = True
        # Transient, per forward pass (not parameters, never saved):
        self.rows: torch.Tensor | None = None  # [B] bool: adapt only these batch rows (mixed batches)
        self.token_mask: torch.Tensor | None = None  # [T] attention mask of the current batch
        self.balance_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_routing: dict[str, torch.Tensor] | None = None  # set when record_routing is on
        self.record_routing = False

    # ------------------------------------------------------------------ math
    def delta(self, x: torch.Tensor, base_index: torch.Tensor | None = None, base_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter output for flat tokens x [T, d] (same dtype as x)."""
        gating = self.variant_spec.gate(self, x, base_index, base_weights)
        return self.variant_spec.expert_output(self, x, gating)

    def mask_for(self, tokens: int) -> torch.Tensor | None:
        """The attention mask of the current tokens, flat, when it covers exactly them."""
        mask = self.token_mask
        if mask is None or mask.numel() != tokens or self.rows is not None:
            return None  # e.g. cached generation, where the mask also covers past tokens
        return mask.reshape(-1)

    _mask_for = mask_for  # the earlier private name

    def _added(self, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
        """y + delta(x) over flat tokens, only on the selected batch rows when `rows` is set."""
        if self.rows is None:
            return y + self.delta(x, index, weights).view_as(y)
        rows = self.rows.to(x.device)
        if x.shape[0] % rows.numel():
            raise PerftError(f"adapter_names names {rows.numel()} rows but the batch has {x.shape[0]} tokens, "
                             "not a multiple: give one adapter name per input row (beam search and "
                             "num_return_sequences > 1 are not supported with adapter_names)")
        selected = rows.repeat_interleave(x.shape[0] // rows.numel()).nonzero().squeeze(1)
        part = self.delta(x[selected], None if index is None else index[selected],
                          None if weights is None else weights[selected])
        flat = y.reshape(-1, y.shape[-1])
        return flat.index_add(0, selected, part.to(flat.dtype)).view_as(y)

    # ------------------------------------------------------------------ hooks
    def block_hook(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the MoE block: y += delta(x) (routed, dense, single)."""
        if not self.enabled:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        y = self._added(y, x.reshape(-1, x.shape[-1]))
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def experts_hook(self, experts: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        """Forward hook on the fused experts: y += sum_i g_i delta_i(x) over the base top-k (embedded)."""
        if not self.enabled:
            return None
        values = list(args) + list(kwargs.values())
        x, index, weights = values[0], values[1], values[2]
        if self.record_routing:
            self.last_routing = {"index": index.detach(), "weights": weights.detach()}
        return self._added(output, x, index, weights)


def num_adapter_experts(config: PerftConfig, base_num_experts: int) -> int:
    """N in the formulas: base expert count for embedded, 1 for single (as the variant says)."""
    return get_variant(config.variant).num_experts(config, base_num_experts)


def attach(config: PerftConfig, block: MoEBlockInfo, dtype: torch.dtype,
           attr_name: str = ATTR_NAME) -> tuple[PerftLayer, list]:
    """Create the layer as child `attr_name` of the block and register its hook; returns (layer, handles)."""
    device = next(block.module.parameters()).device
    layer = PerftLayer(config, block, dtype=dtype, device=device)
    block.module.add_module(attr_name, layer)
    if layer.variant_spec.hooks_experts:
        handle = block.experts.register_forward_hook(layer.experts_hook, with_kwargs=True)
    else:
        handle = block.module.register_forward_hook(layer.block_hook, with_kwargs=True)
    return layer, [handle]


def attach_all(config: PerftConfig, base_model: nn.Module, blocks: list[MoEBlockInfo],
               attr_name: str) -> tuple[dict[str, PerftLayer], list]:
    """Attach one adapter to the blocks `config.layers` selects (filling in `config`'s base facts).

    Returns (block path -> layer, hook handles); out of memory, it removes what it attached and
    raises a PerftError.
    """
    blocks = _select_layers(blocks, config.layers)
    _fill_base_facts(config, base_model, blocks)
    dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype != "auto" else next(base_model.parameters()).dtype
    layers: dict[str, PerftLayer] = {}
    handles: list = []
    try:
        for block in blocks:
            layer, block_handles = attach(config, block, dtype, attr_name)
            layers[block.path] = layer
            handles.extend(block_handles)
    except (RuntimeError, MemoryError) as err:
        for handle in handles:
            handle.remove()
        for block in blocks:
            if hasattr(block.module, attr_name):
                delattr(block.module, attr_name)
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        raise PerftError(
            f"cannot allocate the adapter weights (rank={config.rank}, num_experts={config.num_experts} on "
            f"{len(blocks)} MoE blocks of hidden size {blocks[0].hidden_size}): out of memory; "
            "lower rank or num_experts"
        ) from None
    return layers, handles


def _select_layers(blocks: list[MoEBlockInfo], layers: list[int] | None) -> list[MoEBlockInfo]:
    if layers is None:
        return blocks
    available = [b.layer for b in blocks]
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise PerftError(f"layers {unknown} have no MoE block; this model's MoE layers are {available}")
    return [b for b in blocks if b.layer in set(layers)]


def _fill_base_facts(config: PerftConfig, base_model: nn.Module, blocks: list[MoEBlockInfo]) -> None:
    base_config = getattr(base_model, "config", None)
    name = getattr(base_config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    config.base_model_name_or_path = config.base_model_name_or_path or (str(name) if name else None)
    config.model_type = getattr(base_config, "model_type", None)
    config.base_shapes = base_shapes(base_model, require_moe_blocks(base_model))
    config.base_shapes["adapted_blocks"] = [b.path for b in blocks]
    from perft.fingerprint import base_fingerprint

    fingerprint = base_fingerprint(name) if name else None  # content, not path (perft.fingerprint)
    if fingerprint:
        config.base_shapes["fingerprint"] = fingerprint

