"""Routing statistics from streamed counts: what fraction of the work each expert does.

Counts are accumulated per batch (integer `bincount`s on the model's device, then added
to float64/int64 NumPy arrays on the CPU), so memory stays O(groups x experts) however
many tokens pass, as it must on a 7B model. The numbers are computed from the counts
only, by the plain formulas below, so the same code serves the analysis command, the
live `PerftModel.routing_stats()` and the training-loop summary.

Definitions (per MoE layer, over the non-padding tokens T, with E experts and top-k k):
- `load[e]`: fraction of tokens that send work to expert e (sums to k).
- `utilisation[e]`: share of all T*k routing assignments that go to e (sums to 1).
- `utilisation_entropy`: H(utilisation) / log E; 1 = perfectly even use, 0 = one expert.
- `token_entropy`: mean over tokens of H(router probabilities) / log E (router confidence).
- `balance_coef`: Switch Transformer's `E * sum_e utilisation[e] * mean_prob[e]`; 1 when
  balanced, E when all tokens go to one expert with certainty. (transformers' and
  PerftModel's balance *loss* sums the dispatch fractions over the k slots, so it equals
  k times this coefficient.)
- `dead_experts`: experts that received no token at all.
- top-k weights: the kept routing weights sorted per token (slot 0 = largest), as mean and
  histogram.
- co-occurrence (PERFT-R): `C[a, e]` counts (adapter expert a, base expert e) pairs chosen
  for the same token (each token adds k_adapter x k_base pairs); its mutual information
  says how much the adapter router's choice follows the frozen router's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

DEFAULT_BINS = 20


class RoutingCounts:
    """Streaming counts of one router (one MoE layer) split into `num_groups` groups."""

    def __init__(
        self, num_experts: int, top_k: int, *, num_groups: int = 1, bins: int = DEFAULT_BINS, weight_range: float = 1.0
    ) -> None:
        self.num_experts, self.top_k, self.num_groups = num_experts, top_k, num_groups
        self.bins, self.weight_range = bins, float(weight_range)
        g, e, k = num_groups, num_experts, top_k
        self.tokens = np.zeros(g, dtype=np.int64)
        self.counts = np.zeros((g, e), dtype=np.int64)
        self.prob_tokens = np.zeros(g, dtype=np.int64)  # tokens whose full router distribution was seen
        self.prob_sum = np.zeros((g, e), dtype=np.float64)
        self.entropy_sum = np.zeros(g, dtype=np.float64)
        self.weight_tokens = np.zeros(g, dtype=np.int64)
        self.weight_sum = np.zeros((g, k), dtype=np.float64)
        self.weight_hist = np.zeros((g, k, bins + 1), dtype=np.int64)  # last bin: above weight_range

    @torch.no_grad()
    def update(
        self,
        index: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: index [T, k] of chosen experts, optional kept weights [T, k],
        full router probabilities [T, E], token mask [T] (True = count it) and group ids [T]."""
        index = index.reshape(-1, index.shape[-1]).long()
        keep = _keep(index.shape[0], mask, index.device)
        index = index[keep]
        gid = _group_ids(groups, keep, index.shape[0], index.device)
        g, e = self.num_groups, self.num_experts
        self.tokens += _to_np(torch.bincount(gid, minlength=g))
        # Expert id `e` (== num_experts) is transformers' "not on this rank" slot: dropped.
        flat = (gid.unsqueeze(1) * (e + 1) + index.clamp(0, e)).reshape(-1)
        self.counts += _to_np(torch.bincount(flat, minlength=g * (e + 1)).view(g, e + 1)[:, :e])
        if probs is not None:
            p = probs.reshape(-1, probs.shape[-1])[keep].float()
            self.prob_tokens += _to_np(torch.bincount(gid, minlength=g))
            self.prob_sum += _to_np(p.new_zeros(g, e).index_add_(0, gid, p), np.float64)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            ent = ent / math.log(e) if e > 1 else torch.zeros_like(ent)
            self.entropy_sum += _to_np(ent.new_zeros(g).index_add_(0, gid, ent), np.float64)
        if weights is not None:
            w = weights.reshape(-1, weights.shape[-1])[keep].float()
            w = torch.sort(w, dim=-1, descending=True).values
            k = w.shape[1]
            if k != self.top_k:
                raise ValueError(f"expected {self.top_k} routing weights per token, got {k}")
            self.weight_tokens += _to_np(torch.bincount(gid, minlength=g))
            self.weight_sum += _to_np(w.new_zeros(g, k).index_add_(0, gid, w), np.float64)
            scaled = w / self.weight_range
            bin_id = (scaled * self.bins).floor().long().clamp(0, self.bins - 1)
            bin_id = torch.where(scaled > 1.0 + 1e-6, torch.full_like(bin_id, self.bins), bin_id)
            slot = torch.arange(k, device=w.device).expand_as(bin_id)
            flat = ((gid.unsqueeze(1) * k + slot) * (self.bins + 1) + bin_id).reshape(-1)
            hist = torch.bincount(flat, minlength=g * k * (self.bins + 1)).view(g, k, self.bins + 1)
            self.weight_hist += _to_np(hist)

    def summary(self, group: int | None = None) -> dict[str, Any]:
        """The statistics of one group, or of all groups together (`group=None`)."""
        pick = slice(None) if group is None else slice(group, group + 1)
        return routing_summary(
            counts=self.counts[pick].sum(0),
            tokens=int(self.tokens[pick].sum()),
            top_k=self.top_k,
            prob_sum=self.prob_sum[pick].sum(0) if self.prob_tokens[pick].sum() else None,
            prob_tokens=int(self.prob_tokens[pick].sum()),
            entropy_sum=float(self.entropy_sum[pick].sum()),
            weight_sum=self.weight_sum[pick].sum(0) if self.weight_tokens[pick].sum() else None,
            weight_hist=self.weight_hist[pick].sum(0) if self.weight_tokens[pick].sum() else None,
            weight_tokens=int(self.weight_tokens[pick].sum()),
            weight_range=self.weight_range,
        )


class CoOccurrence:
    """Streaming (adapter expert, base expert) pair counts of one layer, per group."""

    def __init__(self, adapter_experts: int, base_experts: int, *, num_groups: int = 1) -> None:
        self.adapter_experts, self.base_experts, self.num_groups = adapter_experts, base_experts, num_groups
        self.counts = np.zeros((num_groups, adapter_experts, base_experts), dtype=np.int64)

    @torch.no_grad()
    def update(
        self,
        adapter_index: torch.Tensor,
        base_index: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        a = adapter_index.reshape(-1, adapter_index.shape[-1]).long()
        b = base_index.reshape(-1, base_index.shape[-1]).long().to(a.device)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"adapter routing has {a.shape[0]} tokens but base routing has {b.shape[0]}")
        keep = _keep(a.shape[0], mask, a.device)
        a, b = a[keep], b[keep]
        gid = _group_ids(groups, keep, a.shape[0], a.device)
        n, e = self.adapter_experts, self.base_experts + 1  # + the dropped "other rank" slot
        pair = (gid[:, None, None] * n + a[:, :, None]) * e + b.clamp(0, e - 1)[:, None, :]
        hist = torch.bincount(pair.reshape(-1), minlength=self.num_groups * n * e).view(self.num_groups, n, e)
        self.counts += _to_np(hist[:, :, : self.base_experts])

    def summary(self, group: int | None = None) -> dict[str, Any]:
        matrix = self.counts.sum(0) if group is None else self.counts[group]
        return cooccurrence_summary(matrix)


# ---------------------------------------------------------------------- formulas
def normalized_entropy(p: np.ndarray) -> float | None:
    """H(p) / log(len(p)) for a distribution p (need not be normalised); None if p is all zero."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return None
    if p.size <= 1:
        return 0.0
    q = p[p > 0] / total
    return float(-(q * np.log(q)).sum() / math.log(p.size))


def routing_summary(
    *,
    counts: np.ndarray,
    tokens: int,
    top_k: int,
    prob_sum: np.ndarray | None = None,
    prob_tokens: int = 0,
    entropy_sum: float = 0.0,
    weight_sum: np.ndarray | None = None,
    weight_hist: np.ndarray | None = None,
    weight_tokens: int = 0,
    weight_range: float = 1.0,
) -> dict[str, Any]:
    """Every statistic of one router from its accumulated counts (see the module docstring)."""
    counts = np.asarray(counts, dtype=np.int64)
    e = counts.size
    assignments = int(counts.sum())
    out: dict[str, Any] = {
        "tokens": int(tokens),
        "num_experts": int(e),
        "top_k": int(top_k),
        "counts": counts.tolist(),
        "load": (counts / tokens).tolist() if tokens else None,
        "utilisation": (counts / assignments).tolist() if assignments else None,
        "utilisation_entropy": normalized_entropy(counts),
        "max_utilisation_ratio": float(counts.max() * e / assignments) if assignments else None,
        "dead_experts": [int(i) for i in np.flatnonzero(counts == 0)] if tokens else [],
        "mean_router_prob": None,
        "token_entropy": None,
        "balance_coef": None,
        "topk_weight_mean": None,
        "topk_weight_hist": None,
        "topk_weight_bin_edges": None,
    }
    out["num_dead"] = len(out["dead_experts"])
    if prob_sum is not None and prob_tokens and assignments:
        mean_prob = np.asarray(prob_sum, dtype=np.float64) / prob_tokens
        out["mean_router_prob"] = mean_prob.tolist()
        out["token_entropy"] = float(entropy_sum / prob_tokens)
        out["balance_coef"] = float(e * np.sum((counts / assignments) * mean_prob))
    if weight_sum is not None and weight_hist is not None and weight_tokens:
        hist = np.asarray(weight_hist, dtype=np.int64)
        out["topk_weight_mean"] = (np.asarray(weight_sum, dtype=np.float64) / weight_tokens).tolist()
        out["topk_weight_hist"] = hist.tolist()
        bins = hist.shape[-1] - 1
        out["topk_weight_bin_edges"] = [weight_range * i / bins for i in range(bins + 1)]
    return out


def mutual_information(matrix: np.ndarray) -> tuple[float, float, float]:
    """(MI, H(rows), H(cols)) in nats of the joint distribution proportional to `matrix`."""
    joint = np.asarray(matrix, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    joint = joint / total
    rows, cols = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(rows, cols)[nz])).sum())
    h_rows = float(-(rows[rows > 0] * np.log(rows[rows > 0])).sum())
    h_cols = float(-(cols[cols > 0] * np.log(cols[cols > 0])).sum())
    return max(mi, 0.0), h_rows, h_cols


def cooccurrence_summary(matrix: np.ndarray) -> dict[str, Any]:
    """Counts, conditional P(base | adapter) and mutual information of a co-occurrence matrix."""
    matrix = np.asarray(matrix, dtype=np.int64)
    mi, h_a, h_b = mutual_information(matrix)
    rows = matrix.sum(1, keepdims=True)
    conditional = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    smaller = min(h_a, h_b)
    return {
        "counts": matrix.tolist(),
        "pairs": int(matrix.sum()),
        "p_base_given_adapter": conditional.tolist(),
        "mutual_information": mi,
        "adapter_entropy": h_a,
        "base_entropy": h_b,
        "normalized_mutual_information": mi / smaller if smaller > 0 else 0.0,
    }


# ---------------------------------------------------------------------- helpers
def _keep(tokens: int, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(tokens, dtype=torch.bool, device=device)
    mask = mask.reshape(-1).to(device)
    if mask.numel() != tokens:
        raise ValueError(f"token mask has {mask.numel()} entries for {tokens} routed tokens")
    return mask.bool()


def _group_ids(groups: torch.Tensor | None, keep: torch.Tensor, kept: int, device: torch.device) -> torch.Tensor:
    if groups is None:
        return torch.zeros(kept, dtype=torch.long, device=device)
    groups = groups.reshape(-1).to(device).long()
    if groups.numel() != keep.numel():
        raise ValueError(f"group ids have {groups.numel()} entries for {keep.numel()} routed tokens")
    return groups[keep]


def _to_np(t: torch.Tensor, dtype: Any = np.int64) -> np.ndarray:
    return t.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.int64).numpy().astype(dtype)
