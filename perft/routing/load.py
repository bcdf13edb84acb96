"""PERFT-R router load over a window of steps: the figure `perft train` logs.

Per routed layer, the share of the top-K routing slots that each adapter expert received
over the non-padding tokens of the window, summarised as `max_load_x_n` (largest share
times N: 1 = perfectly balanced, N = one expert takes all) and `load_cv` (coefficient of
variation of the shares), each averaged over layers. The counts are plain lists so that a
checkpoint can store a half-filled window and a resumed run logs what an uninterrupted one
would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

AllReduce = Callable[[list[float]], list[float]]


def routed_layers(model: Any) -> dict[str, Any]:
    """The adapted layers of `model` that have their own router (PERFT-R), by block path."""
    layers = getattr(model, "perft_layers", None) or {}
    return {path: layer for path, layer in layers.items() if layer.router is not None}


class RouterLoad:
    """Top-K slot counts per adapter expert of each routed layer, accumulated until `take()`."""

    def __init__(self, layers: Mapping[str, Any], counts: dict[str, list[float]] | None = None) -> None:
        self.layers = dict(layers)
        # Shared, not copied: a training loop keeps these counts in its checkpointed logging window.
        self.counts: dict[str, list[float]] = {} if counts is None else counts

    def count(self, mask: torch.Tensor) -> None:
        """Add the routing each layer recorded in the last forward pass (padding left out by `mask`)."""
        keep = mask.reshape(-1).bool()
        for path, layer in self.layers.items():
            routing = layer.last_routing
            if routing is None:
                continue
            index = routing["index"]
            if index.shape[0] == keep.shape[0]:
                index = index[keep]
            c = torch.bincount(index.reshape(-1).cpu(), minlength=layer.num_experts).double()
            previous = self.counts.get(path)
            self.counts[path] = (c + torch.tensor(previous, dtype=torch.float64) if previous else c).tolist()
            layer.last_routing = None

    def take(self, all_reduce: AllReduce = lambda x: x) -> dict[str, list[float]] | None:
        """Shares per layer since the last call (summed over processes by `all_reduce`); resets the counts."""
        if not self.layers:
            return None
        totals = self._summed(all_reduce)
        self.counts.clear()
        loads = {}
        for path, row in totals.items():
            total = sum(row)
            if total > 0:
                loads[path] = [c / total for c in row]
        return loads or None

    def consolidate(self, all_reduce: AllReduce, keep: bool) -> dict[str, list[float]]:
        """The counts summed over processes (for a checkpoint): kept whole where `keep` (the main process),
        dropped elsewhere, so the next `take` sums to the same shares."""
        if not self.layers:
            return {}
        totals = self._summed(all_reduce)
        self.counts.clear()
        if keep:
            self.counts.update(totals)
        return totals

    def _summed(self, all_reduce: AllReduce) -> dict[str, list[float]]:
        paths = sorted(self.layers)
        n = max(layer.num_experts for layer in self.layers.values())
        flat = [0.0] * (len(paths) * n)
        for i, path in enumerate(paths):
            if path in self.counts:
                flat[i * n:i * n + len(self.counts[path])] = self.counts[path]
        flat = all_reduce(flat)
        return {path: flat[i * n:(i + 1) * n][:self.layers[path].num_experts] for i, path in enumerate(paths)}


def load_summary(loads: Mapping[str, list[float]]) -> dict[str, float]:
    """max load x N (1 = perfectly balanced) and coefficient of variation, averaged over layers."""
    ratios, cvs = [], []
    for row in loads.values():
        n = len(row)
        mean = 1.0 / n
        ratios.append(max(row) * n)
        cvs.append(math.sqrt(sum((x - mean) ** 2 for x in row) / n) / mean)
    return {"max_load_x_n": sum(ratios) / len(ratios), "load_cv": sum(cvs) / len(cvs)}


def format_load(loads: Mapping[str, list[float]], more_in: str) -> str:
    """A few printable lines: the summary, then each layer's shares (first and last four layers)."""
    summary = load_summary(loads)
    n = len(next(iter(loads.values())))
    lines = [f"PERFT-R router load (share of top-K slots per adapter expert; balanced = {1 / n:.3f}): "
             f"max x N {summary['max_load_x_n']:.2f}, CV {summary['load_cv']:.2f}"]
    rows = list(loads.items())
    shown = rows if len(rows) <= 8 else rows[:4] + rows[-4:]
    for path, row in shown:
        lines.append(f"  {path}: " + " ".join(f"{x:.3f}" for x in row))
    if len(rows) > len(shown):
        lines.insert(5, f"  ... {len(rows) - len(shown)} more layers in {more_in}")
    return "\n".join(lines)


def load_record(loads: Mapping[str, list[float]] | None) -> dict[str, Any]:
    """The metrics-record fields of a window's load (`router_max_load_x_n`, ..., `router_load`); {} if none."""
    if not loads:
        return {}
    return {**{f"router_{k}": v for k, v in load_summary(loads).items()}, "router_load": dict(loads)}
