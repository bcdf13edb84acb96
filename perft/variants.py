"""PERFT variants as registered classes: how many adapter experts, where the hook attaches, what gates them.

A variant answers three questions for `PerftLayer`: its expert count N (`num_experts`),
whether it hooks the MoE block or the block's fused `experts` module (`hooks_experts`:
only the experts' inputs carry the base router's top-k choice and weights), and which
weights gate the N experts for a batch of tokens (`gate`). Adding one is one subclass and
one `register_variant` call; `PerftConfig.variant` and the CLI's `--variant` accept every
registered name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from perft.adapters import dense_routing_weights, switch_balance_terms
from perft.errors import PerftError

if TYPE_CHECKING:
    from perft.config import PerftConfig
    from perft.layer import PerftLayer


class Gating:
    """How a variant gates its experts for T tokens: `dense` [T, N] weights, or a top-k `index`/`weights`
    pair [T, k] (the layer then reads only the selected experts when that is cheaper); all None: every
    expert with weight 1."""

    __slots__ = ("dense", "index", "weights")

    def __init__(self, dense: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> None:
        self.dense, self.index, self.weights = dense, index, weights


class Variant:
    """Base class of a PERFT variant; subclasses set `name` and override what differs."""

    name: ClassVar[str] = ""
    hooks_experts: ClassVar[bool] = False  # True: hook the fused experts module and see the base top-k
    has_router: ClassVar[bool] = False  # True: the layer gets its own AdapterRouter (PERFT-R)
    description: ClassVar[str] = ""

    def num_experts(self, config: PerftConfig, base_num_experts: int) -> int:
        """N, the number of adapter experts in one block."""
        return config.num_experts

    def validate(self, config: PerftConfig) -> None:
        """Raise PerftError for a setting this variant cannot use."""

    def gate(self, layer: PerftLayer, x: torch.Tensor, base_index: torch.Tensor | None,
             base_weights: torch.Tensor | None) -> Gating:
        """The gating of the layer's experts for flat tokens x [T, d]."""
        return Gating()

    def expert_output(self, layer: PerftLayer, x: torch.Tensor, gating: Gating) -> torch.Tensor:
        """The adapter output for flat tokens x [T, d] (x's dtype) under `gating`: the stacked
        products of `layer.experts`, reading only the selected experts when that is cheaper.
        Override to compute the same experts another way (benchmarks/models.py's per-expert loop)."""
        experts = layer.experts
        if gating.index is not None and experts.prefers_selected(x, gating.index.shape[1]):
            return experts.forward_selected(x, gating.index, gating.weights)  # decoding: only the chosen experts
        weights = gating.dense
        if weights is None and gating.index is not None:
            weights = dense_routing_weights(gating.index, gating.weights, layer.num_experts)
        # The experts cast x to the adapter dtype themselves, so that copy is not kept for backward.
        return experts(x, weights).to(x.dtype)


_VARIANTS: dict[str, Variant] = {}


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Register a Variant subclass under `cls.name` (usable as a decorator); re-registering a name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise PerftError(f"register_variant takes a Variant subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise PerftError(f"a variant needs a `name` that is a plain identifier, got {cls.name!r}")
    _VARIANTS[cls.name] = cls()
    return cls


def get_variant(name: str) -> Variant:
    """The registered variant called `name`, or a PerftError listing the registered ones."""
    try:
        return _VARIANTS[name]
    except (KeyError, TypeError):
        raise PerftError(f"unknown variant {name!r}; choose one of: {', '.join(variant_names())}") from None


def variant_names() -> tuple[str, ...]:
    return tuple(_VARIANTS)


@register_variant
class Routed(Variant):
    """PERFT-R: N adapter experts behind their own top-k router."""

    name = "routed"
    has_router = True
    description = "routed (R): own router, top_k of num_experts"

    def validate(self, config: PerftConfig) -> None:
        if config.top_k > config.num_experts:
            raise PerftError(
                f"top_k={config.top_k} is larger than num_experts={config.num_experts}; "
                "a router cannot pick more experts than it has: lower top_k or raise num_experts"
            )

    def gate(self, layer: PerftLayer, x: torch.Tensor, base_index: torch.Tensor | None,
             base_weights: torch.Tensor | None) -> Gating:
        assert layer.router is not None
        dtype = layer.experts.down.dtype
        # The router works in fp32 whatever it is given; it sees x rounded to the adapter dtype.
        probs, weights, top_index = layer.router(x if dtype in (x.dtype, torch.float32) else x.to(dtype))
        if layer.compute_balance:
            layer.balance_terms = switch_balance_terms(probs, top_index, layer.mask_for(x.shape[0]))
        if layer.record_routing:
            layer.last_routing = {"probs": probs.detach(), "index": top_index.detach()}
        return Gating(dense=weights, index=top_index, weights=weights.gather(1, top_index))


@register_variant
class Embedded(Variant):
    """PERFT-E: one adapter per base expert, gated by the frozen base router's own top-k weights."""

    name = "embedded"
    hooks_experts = True
    description = "embedded (E): one adapter per base expert, gated by the base router"

    def num_experts(self, config: PerftConfig, base_num_experts: int) -> int:
        return base_num_experts

    def gate(self, layer: PerftLayer, x: torch.Tensor, base_index: torch.Tensor | None,
             base_weights: torch.Tensor | None) -> Gating:
        assert base_index is not None and base_weights is not None
        return Gating(index=base_index, weights=base_weights.to(layer.experts.down.dtype))


@register_variant
class Dense(Variant):
    """PERFT-D: num_experts adapters, always all active."""

    name = "dense"
    description = "dense (D): num_experts always active"


@register_variant
class Single(Variant):
    """PERFT-S: one always-active adapter."""

    name = "single"
    description = "single (S): one always-active adapter"

    def num_experts(self, config: PerftConfig, base_num_experts: int) -> int:
        return 1
