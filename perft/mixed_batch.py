"""Mixed batches: several adapters of one MoE block serving their own rows as ONE stacked bank.

With `adapter_names=[...]` each named adapter's `PerftLayer` can adapt only its rows (`rows`),
one hook per adapter and block. On a small model those per-adapter calls (router, gather,
products on one row each) cost as much as the base's own work, so the adapters of one block
that share everything but their weights (same `PerftLayer.stack_key`: variant, adapter kind,
rank, expert count, scaling, activation, router top-k, dtype) run together: their experts are
concatenated into one bank of G*N experts, token t of a row served by adapter a reads experts
a*N .. a*N+N-1, and one hook per block computes every row's delta in one gather
(`selected_products`), its router in one product. Rows of "__base__" or of an adapter outside
the group get an exact zero. Where gathering would read more than the stacked bank (several
tokens a row, e.g. the prompt), gradients are wanted, dropout is on, or routing is recorded, the
group's hook runs each adapter on its own rows instead (the general path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from perft.adapters import autocast_off, route_logits, selected_products, upcast_linear
from perft.arch import MoEBlockInfo
from perft.layer import PerftLayer


class _Bank:
    """The stacked weights of a group, in the shape `Variant.gate` reads a layer (`router`, `experts.down`)."""

    def __init__(self, layers: list[PerftLayer]) -> None:
        first = layers[0]
        with torch.no_grad():
            self.down = torch.cat([layer.experts.down for layer in layers])  # [G*N, r, d]
            self.up = torch.cat([layer.experts.up.transpose(0, 1) for layer in layers], dim=1)  # [d, G*N, r]
            routers = [layer.router for layer in layers if layer.router is not None]
            self.router_weight = torch.cat([r.weight.float() for r in routers]) if routers else None
        self.experts = self  # Variant.gate reads layer.experts.down.dtype
        self.router = self if self.router_weight is not None else None
        self.num_experts, self.scaling, self.act = first.num_experts, first.experts.scaling, first.experts.act
        self.top_k = first.router.top_k if first.router is not None else 0
        self.normalize = first.router.normalize if first.router is not None else False
        self.compute_balance = self.record_routing = False
        self.balance_terms = self.last_routing = None
        self.token_adapter: torch.Tensor | None = None  # [T] the adapter (position in the group) of each token

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router of each token's own adapter (as `AdapterRouter.forward`), from one product."""
        assert self.router_weight is not None and self.token_adapter is not None
        n = self.num_experts
        with autocast_off(x.device.type):
            logits = upcast_linear(x, self.router_weight).view(x.shape[0], -1, n)  # [T, G, N]
            own = self.token_adapter.clamp_min(0).view(-1, 1, 1).expand(-1, 1, n)
            return route_logits(logits.gather(1, own).squeeze(1), self.top_k, self.normalize)

    def mask_for(self, tokens: int) -> None:
        return None


class MixedGroup:
    """Adapters of one block with one `stack_key`, each serving its rows of a mixed batch; one hook."""

    def __init__(self, layers: list[PerftLayer], row_adapter: torch.Tensor) -> None:
        self.layers = layers
        self.row_adapter = row_adapter  # [B] long: position in `layers` of each row's adapter, -1 for none
        self.spec = layers[0].variant_spec
        self.num_experts = layers[0].num_experts
        self._bank: _Bank | None = None
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def attach(self, block: MoEBlockInfo) -> Any:
        """Register the group's hook where its variant's layers hook; returns the handle."""
        module = block.experts if self.spec.hooks_experts else block.module
        hook = self.experts_hook if self.spec.hooks_experts else self.block_hook
        return module.register_forward_hook(hook, with_kwargs=True)

    def block_hook(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        y = self._added(y, x.reshape(-1, x.shape[-1]), None, None)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def experts_hook(self, experts: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        values = list(args) + list(kwargs.values())
        return self._added(output, values[0], values[1], values[2])

    def _added(self, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None,
               weights: torch.Tensor | None) -> torch.Tensor:
        if not self._stackable(x, index):
            for layer in self.layers:  # the general path: each adapter on its own rows
                y = layer._added(y, x, index, weights)
            return y
        per_row = x.shape[0] // self.row_adapter.numel()
        if per_row * self.row_adapter.numel() != x.shape[0]:
            return self.layers[0]._added(y, x, index, weights)  # raises the layer's clear error
        if self._bank is None:
            self._bank = _Bank(self.layers)
        bank = self._bank
        token_adapter, offset = self._tokens(x.shape[0], x.device)
        bank.token_adapter = token_adapter
        gating = self.spec.gate(bank, x, index, weights)  # type: ignore[arg-type]
        n = self.num_experts
        ids, w = gating.index, gating.weights
        if ids is None:  # every expert, with the dense weights (or 1)
            ids = torch.arange(n, device=x.device).expand(x.shape[0], n)
            w = gating.dense if gating.dense is not None else x.new_ones(x.shape[0], n, dtype=bank.down.dtype)
        ids = torch.where(ids < n, ids + offset, len(self.layers) * n)  # past the bank: dropped
        delta = selected_products(x, bank.down, bank.up, ids, w, bank.scaling, bank.act)
        return y + delta.to(y.dtype).view_as(y)

    def _tokens(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([T] each token's adapter position, [T, 1] its first expert in the bank; past the bank if none)."""
        key = (tokens, device)
        if key not in self._token_cache:
            token_adapter = self.row_adapter.to(device).repeat_interleave(tokens // self.row_adapter.numel())
            past = len(self.layers) * self.num_experts
            offset = torch.where(token_adapter >= 0, token_adapter * self.num_experts, past).unsqueeze(1)
            self._token_cache[key] = (token_adapter, offset)
        return self._token_cache[key]

    def _stackable(self, x: torch.Tensor, index: torch.Tensor | None) -> bool:
        """Whether the stacked gather serves these tokens (see the module docstring)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for layer in self.layers
                                                               for p in layer.parameters())):
            return False
        if any(layer.compute_balance or layer.record_routing or (layer.training and layer.experts.dropout_p > 0)
               for layer in self.layers):
            return False
        first = self.layers[0]
        k = first.router.top_k if first.router is not None else self.num_experts
        k = index.shape[1] if index is not None and first.router is None else k
        # One token a row (decoding) gathers what each row alone would; else no more than the bank holds.
        return x.shape[0] <= self.row_adapter.numel() or x.shape[0] * k <= len(self.layers) * self.num_experts


def mixed_groups(serving: dict[str, PerftLayer], names: list[str]) -> list[MixedGroup]:
    """The groups (two or more adapters with one `stack_key`) among one block's serving layers
    (adapter name -> layer) for a batch whose rows are served by `names`."""
    by_key: dict[tuple, list[str]] = {}
    for adapter, layer in serving.items():
        by_key.setdefault(layer.stack_key, []).append(adapter)
    groups = []
    for adapters in by_key.values():
        if len(adapters) < 2:
            continue
        position = {adapter: i for i, adapter in enumerate(adapters)}
        rows = torch.tensor([position.get(name, -1) for name in names], dtype=torch.long)
        groups.append(MixedGroup([serving[a] for a in adapters], rows))
    return groups


def stack_mixed_adapters(blocks: list[MoEBlockInfo], adapters: dict[str, dict[str, PerftLayer]],
                         names: list[str]) -> list:
    """Per block, run the serving adapters (rows already set) that share a `stack_key` as one bank.

    `adapters`: adapter name -> (block path -> layer). Disables the grouped layers' own hooks and
    returns the groups' hook handles (the caller removes them and restores `enabled`).
    """
    handles = []
    for block in blocks:
        serving = {adapter: layers[block.path] for adapter, layers in adapters.items()
                   if block.path in layers and layers[block.path].enabled}
        for group in mixed_groups(serving, names):
            for layer in group.layers:
                layer.enabled = False  # the group's hook serves its rows
            handles.append(group.attach(block))
    return handles
