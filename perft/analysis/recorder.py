"""Forward hooks that gather routing statistics in one batched pass.

Per MoE block three hooks cooperate: the frozen router's output gives its logits, the
fused experts' inputs `(hidden_states, top_k_index, top_k_weights)` give the base top-k
exactly as the experts apply it (any variant, any architecture), and the block's output
hook closes the block: it adds the base counts and, for PERFT-R, runs the adapter router
on the block input (the same module, the same input, so the same choice the adapter
made) and adds the adapter counts and the adapter-vs-base co-occurrence. Nothing but
per-expert counts survives a batch, so a 7B model is recorded in the memory of its
forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perft.arch import MoEBlockInfo, find_moe_blocks
from perft.errors import PerftError
from perft.layer import ATTR_NAME, PerftLayer
from perft.routing.stats import DEFAULT_BINS, CoOccurrence, RoutingCounts


@dataclass
class LayerRecord:
    """What is recorded for one MoE block."""

    block: MoEBlockInfo
    base: RoutingCounts
    adapter_routing: str  # "router" (PERFT-R), "base" (PERFT-E), "none" (S/D), "absent" (no adapter)
    perft_layer: PerftLayer | None = None
    adapter: RoutingCounts | None = None
    cooccurrence: CoOccurrence | None = None
    pending: dict[str, Any] = field(default_factory=dict)


def base_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PerftModel (or the model itself)."""
    return getattr(model, "base_model", model) if hasattr(model, "perft_layers") else model


def select_blocks(model: nn.Module, layers: Iterable[int] | None = None) -> list[MoEBlockInfo]:
    """The MoE blocks of `model` at the given decoder-layer indices (all when None)."""
    # A PERFT-R layer (`router` + `experts` children) looks like an MoE block itself: skip it.
    blocks = [b for b in find_moe_blocks(base_model_of(model)) if not isinstance(b.module, PerftLayer)]
    if not blocks:
        raise PerftError("no Mixture-of-Experts block found in this model: routing analysis needs an MoE model")
    if layers is None:
        return blocks
    wanted = sorted(set(layers))
    unknown = [i for i in wanted if i not in {b.layer for b in blocks}]
    if unknown:
        raise PerftError(f"layers {unknown} have no MoE block; this model's MoE layers are {[b.layer for b in blocks]}")
    return [b for b in blocks if b.layer in wanted]


class RoutingRecorder:
    """Accumulates routing statistics of every forward pass while attached.

    >>> with RoutingRecorder(model, num_groups=2) as rec:
    ...     rec.run(model, batches)           # or: rec.set_batch(mask, groups); model(...)
    >>> rec.layer_stats(["task-a", "task-b"])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Iterable[int] | None = None,
        num_groups: int = 1,
        bins: int = DEFAULT_BINS,
    ) -> None:
        if num_groups < 1:
            raise PerftError("num_groups must be at least 1")
        self.num_groups = num_groups
        self.records: list[LayerRecord] = []
        for block in select_blocks(model, layers):
            scale = getattr(block.router, "routed_scaling_factor", 1.0)
            scale = float(scale) if isinstance(scale, (int, float)) and scale > 0 else 1.0
            base = RoutingCounts(block.num_experts, block.top_k, num_groups=num_groups, bins=bins, weight_range=scale)
            layer = getattr(block.module, ATTR_NAME, None)
            layer = layer if isinstance(layer, PerftLayer) else None
            record = LayerRecord(block, base, _adapter_routing(layer), perft_layer=layer)
            if record.adapter_routing == "router":
                assert layer is not None and layer.router is not None
                record.adapter = RoutingCounts(layer.num_experts, layer.router.top_k, num_groups=num_groups, bins=bins)
                record.cooccurrence = CoOccurrence(layer.num_experts, block.num_experts, num_groups=num_groups)
            self.records.append(record)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._groups: torch.Tensor | None = None
        self.batches = 0

    # ------------------------------------------------------------------ hooks
    def attach(self) -> RoutingRecorder:
        """Register the hooks (after the PERFT hooks, so the block output includes the adapter)."""
        if self._handles:
            return self
        for record in self.records:
            block = record.block
            self._handles.append(block.router.register_forward_hook(_router_hook(record)))
            self._handles.append(block.experts.register_forward_pre_hook(_experts_hook(record), with_kwargs=True))
            self._handles.append(block.module.register_forward_hook(self._block_hook(record), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for record in self.records:
            record.pending.clear()

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def set_batch(self, attention_mask: torch.Tensor | None, groups: torch.Tensor | None = None) -> None:
        """Tell the hooks which tokens count (mask [B, S]) and each sample's group ([B])."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        if groups is None:
            self._groups = None
        else:
            groups = torch.as_tensor(groups).long().reshape(-1)
            if attention_mask is None:
                raise PerftError("per-sample groups need the attention mask to know each sample's length")
            if groups.numel() != attention_mask.shape[0] or (groups.numel() and int(groups.max()) >= self.num_groups):
                raise PerftError(f"groups must give one id < {self.num_groups} per sample")
            self._groups = groups.to(attention_mask.device)[:, None].expand(attention_mask.shape).reshape(-1)

    def _block_hook(self, record: LayerRecord):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pending, record.pending = record.pending, {}
            self._close_block(record, pending, args[0] if args else kwargs["hidden_states"])

        return hook

    @torch.no_grad()
    def _close_block(self, record: LayerRecord, pending: dict[str, Any], x: torch.Tensor) -> None:
        index, weights = pending.get("index"), pending.get("weights")
        if index is None:  # the experts module was not called through its forward: use the router's top-k
            index, weights = pending.get("router_index"), pending.get("router_weights")
        if index is None:
            raise PerftError(
                f"no routing was seen in MoE block {record.block.path}: its router/experts are not called as "
                "transformers v5 blocks are; register the layout with perft.arch.register_architecture"
            )
        tokens = index.shape[0]
        mask, groups = self._mask, self._groups
        if mask is not None and mask.numel() != tokens:
            raise PerftError(
                f"block {record.block.path} routed {tokens} tokens but the batch has {mask.numel()} positions; "
                "record full forward passes (no cached generation)"
            )
        probs = _router_probs(record.block, pending.get("logits"), tokens)
        record.base.update(index, weights=weights, probs=probs, mask=mask, groups=groups)
        layer = record.perft_layer
        if record.adapter is not None and layer is not None and layer.enabled:
            assert layer.router is not None and record.cooccurrence is not None
            h = x.reshape(-1, x.shape[-1]).to(layer.router.weight.dtype)
            a_probs, dense, a_index = layer.router(h)
            a_weights = dense.gather(-1, a_index)
            record.adapter.update(a_index, weights=a_weights, probs=a_probs, mask=mask, groups=groups)
            record.cooccurrence.update(a_index, index, mask=mask, groups=groups)

    # ------------------------------------------------------------------ driving
    @torch.no_grad()
    def run(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], *, total: int | None = None,
            progress: bool = True, description: str = "routing") -> None:
        """One forward pass per batch (`input_ids`, `attention_mask`, optional `groups`), with a progress bar."""
        from tqdm.auto import tqdm

        base = base_model_of(model)
        device = _input_device(base)
        forward = _decoder_of(base)
        was_training = model.training
        model.eval()
        self.attach()
        try:
            for batch in tqdm(batches, total=total, desc=description, unit="batch", disable=not progress):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                self.set_batch(mask, batch.get("groups"))
                forward(input_ids=ids, attention_mask=mask, use_cache=False)
                self.batches += 1
        finally:
            self.detach()
            self.set_batch(None)
            model.train(was_training)

    # ------------------------------------------------------------------ results
    def layer_stats(self, group_names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per layer index: base / adapter / co-occurrence statistics, overall and per group."""
        names = group_names or [str(i) for i in range(self.num_groups)]
        if len(names) != self.num_groups:
            raise PerftError(f"{len(names)} group names for {self.num_groups} groups")
        split = self.num_groups > 1
        out: dict[str, dict[str, Any]] = {}
        for record in self.records:
            entry: dict[str, Any] = {"path": record.block.path, "adapter_routing": record.adapter_routing}
            for key in ("base", "adapter", "cooccurrence"):
                counts = getattr(record, key)
                if counts is None:
                    entry[key] = None
                    continue
                entry[key] = counts.summary()
                if split:
                    entry[key]["groups"] = {name: counts.summary(i) for i, name in enumerate(names)}
            out[str(record.block.layer)] = entry
        return out


# ---------------------------------------------------------------------- hook factories
def _router_hook(record: LayerRecord):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(logits, torch.Tensor) and logits.shape[-1] == record.block.num_experts:
            record.pending["logits"] = logits.detach()
        if isinstance(output, (tuple, list)) and len(output) >= 3 and "index" not in record.pending:
            # fallback when the experts module is bypassed: (logits, weights, index)
            record.pending["router_weights"], record.pending["router_index"] = output[1], output[2]

    return hook


def _experts_hook(record: LayerRecord):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + list(kwargs.values())
        if len(values) >= 3 and isinstance(values[1], torch.Tensor):
            index, weights = values[1].detach(), values[2].detach()
            if "index" in record.pending:  # called more than once per block (chunked): concatenate
                index = torch.cat([record.pending["index"], index])
                weights = torch.cat([record.pending["weights"], weights])
            record.pending["index"], record.pending["weights"] = index, weights

    return hook


def _router_probs(block: MoEBlockInfo, logits: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The router's distribution over experts: softmax of its logits, or the normalised sigmoid
    scores of sigmoid routers (DeepSeek-V3 style, which carry `e_score_correction_bias`)."""
    if logits is None:
        return None
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if logits.shape[0] != tokens:
        return None
    if hasattr(block.router, "e_score_correction_bias"):
        scores = torch.sigmoid(logits)
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.softmax(logits, dim=-1)


def _adapter_routing(layer: PerftLayer | None) -> str:
    if layer is None:
        return "absent"
    return {"routed": "router", "embedded": "base"}.get(layer.variant, "none")


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _decoder_of(model: nn.Module):
    """The decoder stack without the LM head: routing needs no vocabulary-sized logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) else model
