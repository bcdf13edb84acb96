"""Recording the adapter routing of a forward pass, and its statistics.

`PerftLayer.last_routing` holds the adapter routing of the last forward when
`record_routing` is on: the PERFT-R router's probabilities and top-k, or, for PERFT-E, the
base top-k that gates its experts. `recording` switches it on for a block of code (behind
`PerftModel.record_routing()`); the helpers turn it into the same statistics the analysis
command reports (`perft.routing.stats`), cheaply enough to log every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from perft.errors import PerftError
from perft.routing.stats import RoutingCounts

LOG_PREFIX = "routing/"
_LOGGED = ("utilisation_entropy", "token_entropy", "balance_coef", "max_utilisation_ratio")


@contextlib.contextmanager
def recording(layers: Mapping[str, Any]) -> Iterator[None]:
    """Record each of `layers`' routing inside the block; on leaving, recording is off and cleared."""
    for layer in layers.values():
        layer.record_routing = True
    try:
        yield
    finally:
        for layer in layers.values():
            layer.record_routing = False
            layer.last_routing = None


def record_routing(model: nn.Module, enabled: bool = True) -> None:
    """Switch on (or off) keeping each adapted layer's routing of the last forward pass."""
    layers = _layers(model)
    for layer in layers.values():
        layer.record_routing = enabled
        if not enabled:
            layer.last_routing = None


def last_routing_stats(model: nn.Module, attention_mask: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Per adapted block path: statistics of its adapter routing in the last forward pass.

    PERFT-R: the adapter router; PERFT-E: the base top-k its experts follow. Layers of
    PERFT-S/D (no routing) are absent. `attention_mask` ([B, S]) leaves padding out.
    """
    layers = _layers(model)
    if not any(layer.record_routing for layer in layers.values()):
        raise PerftError(
            "routing is not being recorded: run the forward pass inside `with model.record_routing():` "
            "(or call perft.analysis.record_routing(model) first)"
        )
    out: dict[str, dict[str, Any]] = {}
    for path, layer in layers.items():
        routing = layer.last_routing
        if not routing:
            continue
        index = routing["index"]
        mask = None
        if attention_mask is not None and attention_mask.numel() == index.shape[0]:
            mask = attention_mask.reshape(-1).to(index.device)
        if "probs" in routing:  # PERFT-R
            probs = routing["probs"]
            weights = probs.gather(-1, index)
            if layer.router is not None and layer.router.normalize:
                weights = weights / weights.sum(-1, keepdim=True)
            counts = RoutingCounts(layer.num_experts, index.shape[-1])
            counts.update(index, weights=weights, probs=probs, mask=mask)
        else:  # PERFT-E: base routing
            counts = RoutingCounts(layer.num_experts, index.shape[-1], weight_range=_range(routing["weights"]))
            counts.update(index, weights=routing["weights"], mask=mask)
        out[path] = {"variant": layer.variant, **counts.summary()}
    return out


def summarize_last_routing(model: nn.Module, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Flat `{"routing/<stat>": value}` means over layers, for a training logger.

    Returns `{}` when nothing was recorded (recording off, or a variant without routing),
    so a training loop may call it unconditionally.
    """
    try:
        stats = last_routing_stats(model, attention_mask)
    except PerftError:
        return {}
    if not stats:
        return {}
    out: dict[str, float] = {}
    for key in _LOGGED:
        values = [s[key] for s in stats.values() if s.get(key) is not None]
        if values:
            out[LOG_PREFIX + key] = float(np.mean(values))
    out[LOG_PREFIX + "dead_experts"] = float(sum(s["num_dead"] for s in stats.values()))
    return out


def _layers(model: nn.Module) -> dict[str, Any]:
    layers = getattr(model, "perft_layers", None)
    if not isinstance(layers, dict):
        raise PerftError("live routing statistics need a PerftModel (see perft.get_perft_model)")
    return layers


def _range(weights: torch.Tensor) -> float:
    top = float(weights.detach().float().max()) if weights.numel() else 1.0
    return 1.0 if top <= 1.0 else float(np.ceil(top))
