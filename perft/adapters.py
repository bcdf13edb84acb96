"""The adapter math: N stacked adapter experts and the PERFT-R router.

All N experts live in two stacked tensors and run as two matrix products over the
concatenated expert axis (`[T, d] x [d, N*r]` then `[T, N*r] x [N*r, d]`), with the
per-token expert weights applied to the small `[T, N, r]` middle activation. Unselected
experts get weight 0, so routed, embedded, dense and single all share one code path and
no Python loop over experts ever runs. For the rank/expert counts PERFT uses, the middle
activation is tiny next to the frozen experts' own work.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from perft.adapter_kinds import Activation, AdapterKind, adapter_kind
from perft.dropout import dropout_multiplier


class AdapterExperts(nn.Module):
    """N adapter experts of one registered kind (perft/adapter_kinds.py): `up_n f(down_n x)`.

    Stored as `down` [N, r, d] and `up` [N, d, r] (named by the kind in the save format, e.g.
    `lora_A`/`lora_B`). `up` starts at zero, so the experts start as an exact no-op.
    """

    def __init__(
        self,
        kind: str | AdapterKind,
        num_experts: int,
        hidden_size: int,
        rank: int,
        *,
        scaling: float = 1.0,
        activation: str = "silu",
        dropout: float = 0.0,
        init: str = "normal",
        dropout_at: str | None = None,
        dropout_masks: str = "shared",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.spec = adapter_kind(kind) if isinstance(kind, str) else kind
        self.kind = self.spec.name
        self.num_experts, self.hidden_size, self.rank = num_experts, hidden_size, rank
        self.scaling = self.spec.scaling(scaling)
        self.act = self.spec.activation(activation)
        self.dropout_p = float(dropout)
        self.dropout_site = dropout_at or self.spec.dropout_site
        self.dropout_masks = dropout_masks
        self.init = init
        self.dropout_keys: Any = None  # a perft.dropout.DropoutKeys, set by keyed_dropout
        self.dropout_salt = 0
        factory = {"dtype": dtype, "device": device}
        self.down = nn.Parameter(torch.empty(num_experts, rank, hidden_size, **factory))
        # `up` has shape [N, d, r] but lives in memory as [d, N, r] (a transposed view), so the
        # second product reads it as one [d, N*r] matrix without copying it on every forward.
        self.up = nn.Parameter(torch.zeros(hidden_size, num_experts, rank, **factory).transpose(0, 1))
        self.reset_parameters()

    @property
    def down_name(self) -> str:
        return self.spec.down_name

    @property
    def up_name(self) -> str:
        return self.spec.up_name

    def reset_parameters(self) -> None:
        """`down` by the init scheme (the released N(0, 2/r) by default), `up` zero: an exact no-op."""
        with torch.no_grad():
            self.spec.init_down(self.down, self.init)
            self.up.zero_()

    def _dropout_on(self) -> bool:
        return self.training and self.dropout_p > 0

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over experts of `weights[:, n] * expert_n(x)`; `weights=None` means all ones.

        x: [T, d] in any float dtype (computed in the adapter dtype, returned in x's dtype);
        weights: [T, N] (zeros for unselected experts).
        """
        n, r, d = self.num_experts, self.rank, self.hidden_size
        out_dtype = x.dtype
        mask = None
        if self._dropout_on():
            dtype, tokens = self.down.dtype, x.shape[0]
            if self.dropout_site == "input" and self.dropout_masks == "per_expert":
                return self._forward_per_expert_input_masks(x, weights).to(out_dtype)
            if self.dropout_site == "input":
                x = x.to(dtype) * dropout_multiplier(self, tokens, d, self.dropout_p, dtype, x.device)
            else:  # on each expert's own r units: one mask per expert
                mask = dropout_multiplier(self, tokens, n * r, self.dropout_p, dtype, x.device)
        args = (x, self.down.reshape(n * r, d), self.up_matrix(), weights, mask, self.scaling, self.act, n, r)
        if _wants_grad(x, self.down, self.up, weights):
            y = _StackedExperts.apply(*args)
        else:  # inference: the same products, without the autograd Function's bookkeeping
            y = _stacked_products(*args)[0]
        return y.to(out_dtype)

    def _forward_per_expert_input_masks(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Input dropout with one mask per expert (`dropout_masks="per_expert"`, as released).

        The measurement path, not the fast one: each expert's down projection reads its own
        masked copy of x ([T, N, d], one einsum) under plain autograd, instead of the single
        stacked product. Masks are one [T, N*d] draw, keyed per sample inside perft train.
        """
        n, r, d = self.num_experts, self.rank, self.hidden_size
        dtype, tokens = self.down.dtype, x.shape[0]
        mask = dropout_multiplier(self, tokens, n * d, self.dropout_p, dtype, x.device).view(tokens, n, d)
        h = torch.einsum("tnd,nrd->tnr", x.to(dtype).unsqueeze(1) * mask, self.down).reshape(tokens, n * r)
        return F.linear(_weighted_middle(h, weights, self.scaling, self.act, n, r), self.up_matrix())

    def forward_selected(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward(x, dense weights)` for a sparse routing, reading only the selected experts.

        index / weights: [T, k] expert ids and their weights (ids >= N are dropped). For a few
        tokens (decoding) reading all N experts' tensors would dominate: this gathers the T*k
        selected ones instead, without a data-dependent shape or a host sync. Same result as the
        dense path up to the summation order.
        """
        n = self.num_experts
        tokens = index.shape[0]
        if self._dropout_on():  # masks are drawn over all experts' units: take the dense path
            dense = torch.zeros(tokens, n + 1, dtype=weights.dtype, device=weights.device)
            dense.scatter_add_(1, torch.where(index < n, index, torch.full_like(index, n)), weights)
            return self.forward(x, dense[:, :n])
        return selected_products(x, self.down, self.up.transpose(0, 1), index, weights, self.scaling, self.act)

    def prefers_selected(self, x: torch.Tensor, top_k: int) -> bool:
        """Whether `forward_selected` should serve these tokens: no gradient is wanted and the
        T*k selected experts are no more than the N stacked ones."""
        return x.shape[0] * top_k <= self.num_experts and not _wants_grad(x, self.down, self.up)

    def up_matrix(self) -> torch.Tensor:
        """`up` as the [d, N*r] matrix of the second product: a view while `up` keeps its
        [d, N, r] memory layout (a copy only if something replaced it with another layout)."""
        n, r, d = self.num_experts, self.rank, self.hidden_size
        return self.up.transpose(0, 1).reshape(d, n * r)


def selected_products(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, index: torch.Tensor,
                      weights: torch.Tensor, scaling: float, act: Activation | None) -> torch.Tensor:
    """`sum_j weights[t, j] * scaling * up_e act(down_e x_t)` over e = index[t, j], reading only those experts.

    down [M, r, d], up [d, M, r] (any M stacked experts, e.g. several adapters' banks side by side);
    ids >= M are dropped. Returns [T, d] in x's dtype.
    """
    m, r, d = down.shape
    tokens, k = index.shape
    out_dtype = x.dtype
    valid = index < m
    x = x.to(down.dtype)
    ids = torch.where(valid, index, torch.zeros_like(index)).reshape(-1)
    w = weights.to(x.dtype) * valid
    w = w * scaling if scaling != 1.0 else w
    h = torch.matmul(down.index_select(0, ids).view(tokens, k * r, d), x.unsqueeze(-1)).view(tokens, k, r)
    if act is not None:
        h = act(h)
    h = (h * w.unsqueeze(-1)).view(tokens, k * r)
    up = up.index_select(1, ids).view(d, tokens, k * r)  # [d, T, k*r]
    if tokens == 1:
        y = F.linear(h, up.view(d, k * r))
    else:
        y = torch.matmul(up.permute(1, 0, 2), h.unsqueeze(-1)).squeeze(-1)
    return y.to(out_dtype)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None when autocast is off."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_like(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Re-enter, in backward, the autocast state that forward ran under."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class _StackedExperts(torch.autograd.Function):
    """`y = up @ (s * w * act(m * (down @ x)))` over the stacked experts, with a lean backward.

    m is the optional [T, N*r] dropout multiplier of the `hidden` dropout site.

    The same products autograd would run, but what is kept for backward is only the input x
    in its own dtype (the frozen model holds it anyway) and the [T, N*r] middle: the
    adapter-dtype copy of x (bf16 base, fp32 adapters) and the weighted middle are rebuilt
    in backward instead of living through the whole forward pass. Autocast is honoured in
    both directions, as autograd would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None,
                mask: torch.Tensor | None, scaling: float, act: Activation | None, n: int, r: int) -> torch.Tensor:
        ctx.device_type = x.device.type
        ctx.amp = _autocast_dtype(ctx.device_type)
        y, h = _stacked_products(x, down, up, weights, mask, scaling, act, n, r)
        ctx.save_for_backward(x, down, up, h, weights, mask)
        ctx.scaling, ctx.act, ctx.n, ctx.r = scaling, act, n, r
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, down, up, h, weights, mask = ctx.saved_tensors
        scaling, act, n, r = ctx.scaling, ctx.act, ctx.n, ctx.r
        need_x, need_down, need_up, need_w = ctx.needs_input_grad[:4]
        g_x = g_down = g_up = g_w = None
        with _autocast_like(ctx.device_type, ctx.amp):
            gy = gy.to(h.dtype)
            a = act(h) if act is not None else h
            if need_up:
                g_up = gy.t().mm(_weighted_middle(h, weights, scaling, act, n, r, a=a)).to(up.dtype)
            gz = gy.mm(up)  # [T, N*r]
            if weights is not None:
                w = weights.to(h.dtype)
                w = w * scaling if scaling != 1.0 else w
                gz3 = gz.view(-1, n, r)
                if need_w:
                    g_w = (gz3 * a.view(-1, n, r)).sum(-1)
                    g_w = (g_w * scaling if scaling != 1.0 else g_w).to(weights.dtype)
                ga = (gz3 * w.unsqueeze(-1)).view(-1, n * r)
            else:
                ga = gz * scaling if scaling != 1.0 else gz
            del gz
            if act is not None:
                with torch.enable_grad():
                    leaf = h.detach().requires_grad_(True)
                    (gh,) = torch.autograd.grad(act(leaf), leaf, ga)
            else:
                gh = ga
            if mask is not None:
                gh = gh * mask.to(gh.dtype)
            if need_down:
                g_down = gh.t().mm(x.to(h.dtype)).to(down.dtype)
            if need_x:
                g_x = gh.mm(down).to(x.dtype)
        return g_x, g_down, g_up, g_w, None, None, None, None, None


def _stacked_products(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor | None,
                      mask: torch.Tensor | None, scaling: float, act: Activation | None, n: int,
                      r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward products of the stacked experts: (y in x's dtype, the [T, N*r] middle h)."""
    h = F.linear(x.to(down.dtype), down)  # [T, N*r]
    if mask is not None:
        h = h * mask.to(h.dtype)
    y = F.linear(_weighted_middle(h, weights, scaling, act, n, r), up).to(x.dtype)
    return y, h


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients of any of these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _weighted_middle(h: torch.Tensor, weights: torch.Tensor | None, scaling: float, act: Activation | None,
                     n: int, r: int, a: torch.Tensor | None = None) -> torch.Tensor:
    """`scale * weights * act(h)` over [T, N*r]; the scale rides on the [T, N] weights."""
    if a is None:
        a = act(h) if act is not None else h
    if weights is None:
        return a * scaling if scaling != 1.0 else a
    w = weights.to(h.dtype)
    w = w * scaling if scaling != 1.0 else w
    return (a.view(-1, n, r) * w.unsqueeze(-1)).view(-1, n * r)


class _UpcastLinear(torch.autograd.Function):
    """`F.linear(x.to(weight.dtype), weight)` that keeps x in its own dtype for backward.

    For a bf16 x and an fp32 weight, autograd would keep the fp32 copy of x alive from forward
    to backward; this rebuilds it in backward instead. Same products, same results.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.device_type = x.device.type
        ctx.amp = _autocast_dtype(ctx.device_type)
        out = F.linear(x.to(weight.dtype), weight)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        g_x = g_w = None
        with _autocast_like(ctx.device_type, ctx.amp):
            grad = grad.to(weight.dtype) if ctx.amp is None else grad
            if ctx.needs_input_grad[0]:
                g_x = grad.mm(weight).to(x.dtype)
            if ctx.needs_input_grad[1]:
                g_w = grad.t().mm(x.to(weight.dtype)).to(weight.dtype)
        return g_x, g_w


def upcast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x.to(weight.dtype), weight)` without keeping the upcast copy of x for backward."""
    if x.dtype == weight.dtype or x.dim() != 2 or not _wants_grad(x, weight):
        return F.linear(x.to(weight.dtype), weight)
    return _UpcastLinear.apply(x, weight)


class AdapterRouter(nn.Module):
    """The PERFT-R router: `softmax(W_r x)` in fp32, top-k kept, optionally renormalised."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        top_k: int,
        *,
        normalize: bool,
        init_std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (probs [T, N] fp32, dense kept weights [T, N] fp32, top-k indices [T, k]).

        fp32 even under bf16/fp16 autocast (which would otherwise run the linear in bf16); logits
        that overflow to +-inf are clamped to the fp32 range, so softmax keeps them finite
        (one-hot) instead of turning them into NaN.
        """
        with autocast_off(x.device.type):
            return route_logits(upcast_linear(x, self.weight.float()), self.top_k, self.normalize)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for `device_type` (the router runs in fp32 whatever autocast says)."""
    if torch.amp.autocast_mode.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def route_logits(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PERFT-R router past its linear: fp32 logits [T, N] -> (probs, dense kept weights, top-k index)."""
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits, nan=float("nan"), posinf=big, neginf=-big)
    probs = torch.softmax(logits, dim=-1)
    top_values, top_index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_values = top_values / top_values.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(probs).scatter(-1, top_index, top_values)
    return probs, dense, top_index


def dense_routing_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter a base router's (indices, weights) into a dense [T, E] matrix.

    Indices equal to `num_experts` (transformers' "masked / other rank" slot under expert
    parallelism) are dropped.
    """
    tokens = top_k_index.shape[0]
    dense = top_k_weights.new_zeros(tokens, num_experts + 1)
    dense.scatter_add_(-1, top_k_index.long(), top_k_weights)
    return dense[:, :num_experts]


def switch_balance_terms(
    probs: torch.Tensor, top_index: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert (dispatch counts, probability sums, token count) of one layer.

    Summed over layers, these give the Switch load-balance loss exactly as transformers
    computes it over all layers at once: `N * sum_n (count_n / T) * (prob_n / T)`.
    """
    one_hot = F.one_hot(top_index, probs.shape[-1]).sum(dim=1).to(probs.dtype)  # [T, N]
    if mask is not None:
        keep = mask.to(probs.dtype).unsqueeze(-1)
        return (one_hot * keep).sum(0), (probs * keep).sum(0), keep.sum()
    return one_hot.sum(0), probs.sum(0), probs.new_tensor(float(probs.shape[0]))
