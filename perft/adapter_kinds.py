"""Adapter kinds: what one adapter expert computes, registered by name.

An adapter expert is `up(f(down(x)))` with `down`: d -> r and `up`: r -> d. A kind says
what f is (a scale for LoRA, an activation for the parallel adapter), what its two tensors
are called in the save format, how `down` starts, and where dropout applies by default.
`AdapterExperts` (perft/adapters.py) runs every kind through the same stacked products, so
a new kind is one subclass of `AdapterKind` and one `register_adapter_kind` call
(docs/extending.md, "Adding an adapter kind").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from perft.errors import PerftError

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

#: How `down` starts. `normal`: the released PERFT code's N(0, 2/r) (std sqrt(2/r), r the
#: bottleneck width); `kaiming`: PEFT's LoRA A, Kaiming-uniform with a=sqrt(5) (std 1/sqrt(3d)).
INIT_SCHEMES = ("normal", "kaiming")
#: Where dropout applies: `input` (on x, one mask shared by the experts of a block) or
#: `hidden` (on down(x), one mask per expert, since each expert owns its r units).
DROPOUT_SITES = ("input", "hidden")
#: Masks of the `input` site: `shared` (one per block, the stacked product) or `per_expert`
#: (one per expert, on a masked copy of the input per expert: the measurement path, docs/training.md).
DROPOUT_MASKS = ("shared", "per_expert")


class AdapterKind:
    """One kind of adapter expert. Subclass, set the class attributes, register.

    name: the `adapter` value in PerftConfig and `perft train --adapter`.
    down_name / up_name: tensor names in the save format (`<block>.<down_name>`).
    uses_scaling: whether `alpha / rank` multiplies the expert's output.
    uses_activation: whether `PerftConfig.activation` is applied between the products.
    dropout_site: where dropout applies unless `PerftConfig.dropout_at` says otherwise.
    """

    name: str = ""
    down_name: str = ""
    up_name: str = ""
    uses_scaling: bool = False
    uses_activation: bool = False
    dropout_site: str = "input"

    def scaling(self, scaling: float) -> float:
        """The scale applied to the expert's output, given the config's alpha/rank."""
        return scaling if self.uses_scaling else 1.0

    def activation(self, name: str) -> Activation | None:
        """The function between the two products (None: none)."""
        return ACTIVATIONS[name] if self.uses_activation else None

    def init_down(self, down: torch.Tensor, scheme: str) -> None:
        """Fill `down` [N, r, d] in place; `up` is always zero, so the expert starts as a no-op."""
        rank, hidden = down.shape[-2], down.shape[-1]
        if scheme == "normal":
            down.normal_(0.0, math.sqrt(2.0 / rank))
        elif scheme == "kaiming":
            bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform_(a=sqrt(5)) on an [r, d] matrix
            down.uniform_(-bound, bound)
        else:
            raise PerftError(f"unknown init {scheme!r}; choose one of: {', '.join(INIT_SCHEMES)}")


_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: type[AdapterKind]) -> type[AdapterKind]:
    """Make an adapter kind available by its name (usable as a class decorator)."""
    if not kind.name or not kind.down_name or not kind.up_name or kind.down_name == kind.up_name:
        raise PerftError(f"adapter kind {kind.__name__} needs a name and two different tensor names "
                         "(name, down_name, up_name)")
    if kind.dropout_site not in DROPOUT_SITES:
        raise PerftError(f"adapter kind {kind.name!r}: dropout_site must be one of {', '.join(DROPOUT_SITES)}")
    _KINDS[kind.name] = kind()
    return kind


def adapter_kind(name: str) -> AdapterKind:
    """The registered kind called `name`; a PerftError listing the known ones otherwise."""
    if name not in _KINDS:
        raise PerftError(f"unknown adapter {name!r}; choose one of: {', '.join(adapter_kinds())}")
    return _KINDS[name]


def adapter_kinds() -> tuple[str, ...]:
    """Names of every registered adapter kind, in registration order."""
    return tuple(_KINDS)


@register_adapter_kind
class LoRAKind(AdapterKind):
    """LoRA: `(alpha / r) B A drop(x)`, as PEFT's LoRA and the released PERFT code."""

    name, down_name, up_name = "lora", "lora_A", "lora_B"
    uses_scaling = True
    dropout_site = "input"


@register_adapter_kind
class ParallelKind(AdapterKind):
    """Parallel adapter: `W2 act(drop(W1 x))`, dropout after the down projection as released."""

    name, down_name, up_name = "parallel", "adapter_down", "adapter_up"
    uses_activation = True
    dropout_site = "hidden"
