"""`PerftLayer`: the PERFT adapter experts of one MoE block, and the hooks that attach them.

The layer is registered as a child (`perft_adapter`) of the frozen MoE block, so it moves,
shards (FSDP) and checkpoints with its decoder layer, and a forward hook adds its output
to the block's output. PERFT-E gates its experts with exactly the weights the base block
applies, so it hooks the fused `experts` module instead, whose inputs are
`(hidden_states, top_k_index, top_k_weights)` after the router's own normalisation
(softmax, sigmoid with bias correction, grouped top-k: whatever the architecture does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from perft.adapters import AdapterExperts, AdapterRouter, dense_routing_weights, switch_balance_terms
from perft.arch import MoEBlockInfo
from perft.config import PerftConfig

ATTR_NAME = "perft_adapter"


class PerftLayer(nn.Module):
    """Adapter experts (+ router for PERFT-R) beside one MoE block."""

    def __init__(self, config: PerftConfig, block: MoEBlockInfo, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.variant = config.variant
        self.num_experts = num_adapter_experts(config, block.num_experts)
        self.experts = AdapterExperts(
            config.adapter,
            self.num_experts,
            block.hidden_size,
            config.rank,
            scaling=config.scaling,
            activation=config.activation,
            dropout=config.dropout,
            init=config.init, dropout_at=config.dropout_at,
            dtype=dtype,
            device=device,
        )
        self.router: AdapterRouter | None = None
        if config.variant == "routed":
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
        self.compute_balance = config.variant == "routed" and config.router_aux_loss_coef > 0
        self.enabled = True
        # Transient, per forward pass (not parameters, never saved):
        self.token_mask: torch.Tensor | None = None  # [T] attention mask of the current batch
        self.balance_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_routing: dict[str, torch.Tensor] | None = None  # set when record_routing is on
        self.record_routing = False

    # ------------------------------------------------------------------ math
    def delta(self, x: torch.Tensor, base_index: torch.Tensor | None = None, base_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter output for flat tokens x [T, d] (same dtype as x)."""
        dtype = self.experts.down.dtype
        weights = None
        if self.variant == "routed":
            assert self.router is not None
            # The router works in fp32 whatever it is given; it sees x rounded to the adapter dtype.
            probs, weights, top_index = self.router(x if dtype in (x.dtype, torch.float32) else x.to(dtype))
            mask = self._mask_for(x.shape[0])
            if self.compute_balance:
                self.balance_terms = switch_balance_terms(probs, top_index, mask)
            if self.record_routing:
                self.last_routing = {"probs": probs.detach(), "index": top_index.detach()}
            if self.experts.prefers_selected(x, top_index.shape[1]):  # decoding: read only the chosen experts
                return self.experts.forward_selected(x, top_index, weights.gather(1, top_index))
        elif self.variant == "embedded":
            assert base_index is not None and base_weights is not None
            if self.experts.prefers_selected(x, base_index.shape[1]):
                return self.experts.forward_selected(x, base_index, base_weights)
            weights = dense_routing_weights(base_index, base_weights.to(dtype), self.num_experts)
        # The experts cast x to the adapter dtype themselves, so that copy is not kept for backward.
        return self.experts(x, weights).to(x.dtype)

    def _mask_for(self, tokens: int) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or mask.numel() != tokens:
            return None  # e.g. cached generation, where the mask also covers past tokens
        return mask.reshape(-1)

    # ------------------------------------------------------------------ hooks
    def block_hook(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the MoE block: y += delta(x) (routed, dense, single)."""
        if not self.enabled:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        y = y + self.delta(x.reshape(-1, x.shape[-1])).view_as(y)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def experts_hook(self, experts: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        """Forward hook on the fused experts: y += sum_i g_i delta_i(x) over the base top-k (embedded)."""
        if not self.enabled:
            return None
        values = list(args) + list(kwargs.values())
        x, index, weights = values[0], values[1], values[2]
        if self.record_routing:
            self.last_routing = {"index": index.detach(), "weights": weights.detach()}
        return output + self.delta(x, index, weights).view_as(output)


def num_adapter_experts(config: PerftConfig, base_num_experts: int) -> int:
    """N in the formulas: base expert count for embedded, 1 for single."""
    return {"embedded": base_num_experts, "single": 1}.get(config.variant, config.num_experts)


def attach(config: PerftConfig, block: MoEBlockInfo, dtype: torch.dtype) -> tuple[PerftLayer, list]:
    """Create the layer as a child of the block and register its hook; returns (layer, handles)."""
    device = next(block.module.parameters()).device
    layer = PerftLayer(config, block, dtype=dtype, device=device)
    block.module.add_module(ATTR_NAME, layer)
    if config.variant == "embedded":
        handle = block.experts.register_forward_hook(layer.experts_hook, with_kwargs=True)
    else:
        handle = block.module.register_forward_hook(layer.block_hook, with_kwargs=True)
    return layer, [handle]
