"""The adapter kernels: the stacked experts' hand-written backward equals autograd on the plain formula,
and the decoding path that reads only the selected experts equals the dense path.

`AdapterExperts` runs through a custom autograd Function that keeps less for backward; these
tests pin it to the straightforward autograd computation: gradcheck in float64, and bit-for-bit
equal outputs and gradients for bf16 inputs, fp32 / bf16 adapters, under autocast, with dropout.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from perft.adapters import AdapterExperts
from perft.dropout import dropout_multiplier


def plain(ex: AdapterExperts, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The adapter formula with autograd doing the backward (the pre-Function implementation)."""
    n, r, d = ex.num_experts, ex.rank, ex.hidden_size
    p, dtype = (ex.dropout_p if ex.training else 0.0), ex.down.dtype
    x_in = x.to(dtype)
    if p and ex.dropout_site == "input":
        x_in = x_in * dropout_multiplier(ex, x.shape[0], d, p, dtype, x.device)
    h = F.linear(x_in, ex.down.reshape(n * r, d))
    if p and ex.dropout_site == "hidden":  # after the down projection, one mask per expert
        h = h * dropout_multiplier(ex, x.shape[0], n * r, p, dtype, x.device).to(h.dtype)
    if ex.act is not None:
        h = ex.act(h)
    if weights is not None:
        w = weights.to(h.dtype) * ex.scaling
        h = (h.view(-1, n, r) * w.unsqueeze(-1)).view(-1, n * r)
    else:
        h = h * ex.scaling
    return F.linear(h, ex.up.transpose(0, 1).reshape(d, n * r)).to(x.dtype)


@pytest.mark.parametrize("kind,activation,with_weights",
                         [("lora", "silu", True), ("lora", "silu", False), ("parallel", "silu", True),
                          ("parallel", "gelu", False), ("parallel", "tanh", True), ("parallel", "identity", True)])
def test_gradcheck_float64(kind, activation, with_weights):
    torch.manual_seed(0)
    ex = AdapterExperts(kind, 3, 6, 2, scaling=1.5, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        ex.up.normal_()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 3, dtype=torch.float64, requires_grad=True) if with_weights else None

    assert torch.autograd.gradcheck(lambda x, w: ex(x, w), (x, w))
    assert torch.autograd.gradcheck(lambda d, u: _with_params(ex, d, u, x.detach(), w),
                                    (ex.down.detach().clone().requires_grad_(),
                                     ex.up.detach().clone().requires_grad_()))


def _with_params(ex: AdapterExperts, down: torch.Tensor, up: torch.Tensor, x: torch.Tensor,
                 w: torch.Tensor | None) -> torch.Tensor:
    """ex(x, w) as a function of its (down, up) tensors."""
    params = {"down": down, "up": up}
    return torch.func.functional_call(ex, params, (x, w))


KINDS = (("lora", None), ("parallel", None), ("lora", "hidden"), ("parallel", "input"))
CASES = list(itertools.product(KINDS, (torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16),
                               (False, True), (True, False), (1, 4), (0.0, 0.1)))


@pytest.mark.parametrize("kind,x_dtype,adapter_dtype,autocast,with_weights,n,dropout", CASES)
def test_bit_for_bit_equal_to_autograd(kind, x_dtype, adapter_dtype, autocast, with_weights, n, dropout):
    kind, site = kind
    torch.manual_seed(0)
    ex = AdapterExperts(kind, n, 32, 4, scaling=2.0, dropout=dropout, dropout_at=site, dtype=adapter_dtype).train()
    with torch.no_grad():
        ex.up.normal_(0, 0.5)
    x0 = torch.randn(10, 32).to(x_dtype)
    w0 = torch.rand(10, n) if with_weights else None
    gy = torch.randn(10, 32).to(x_dtype)
    results = []
    for impl in (ex, lambda x, w: plain(ex, x, w)):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True) if with_weights else None
        torch.manual_seed(1)  # the same dropout mask for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = impl(x, w)
        y.backward(gy)
        grads = [x.grad, ex.down.grad, ex.up.grad] + ([w.grad] if with_weights else [])
        results.append((y.detach(), [g.clone() for g in grads]))
        ex.zero_grad(set_to_none=True)
    (y1, g1), (y2, g2) = results
    assert y1.dtype == x_dtype and torch.equal(y1, y2)
    if dropout == 0.0:  # the inference path (no autograd Function) runs the very same products
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(ex(x0, w0), y1)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_up_is_read_without_a_copy_and_saves_contiguously(tmp_path):
    ex = AdapterExperts("lora", 8, 64, 4)
    assert ex.up.shape == (8, 64, 4)
    assert ex.up_matrix().data_ptr() == ex.up.data_ptr()  # a view: no per-forward copy
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        ex.up.normal_()
    save_file({"up": ex.up.detach().contiguous()}, str(tmp_path / "a.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["up"], ex.up.detach())


@pytest.mark.parametrize("kind", ["lora", "parallel"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_selected_experts_path_matches_the_dense_path(kind, x_dtype):
    """Decoding reads only the chosen experts; same result, sentinel ids (>= N) dropped."""
    from perft.adapters import dense_routing_weights

    torch.manual_seed(0)
    n, k = 8, 2
    ex = AdapterExperts(kind, n, 32, 4, scaling=2.0).eval()
    with torch.no_grad():
        ex.up.normal_()
    for tokens in (1, 3):
        x = torch.randn(tokens, 32).to(x_dtype)
        index = torch.stack([torch.randperm(n)[:k] for _ in range(tokens)])
        index[0, 1] = n  # the expert-parallel "elsewhere" slot
        weights = torch.rand(tokens, k)
        with torch.no_grad():
            assert ex.prefers_selected(x, k)
            dense = ex(x, dense_routing_weights(index, weights, n))
            selected = ex.forward_selected(x, index, weights)
        assert selected.dtype == x_dtype
        torch.testing.assert_close(selected, dense, rtol=1e-5, atol=1e-6) if x_dtype == torch.float32 else \
            torch.testing.assert_close(selected.float(), dense.float(), rtol=2e-2, atol=2e-2)
    assert not ex.prefers_selected(torch.randn(5, 32), k)  # 10 selected > 8 stacked: dense is cheaper
    ex.train()
    assert not ex.prefers_selected(torch.randn(1, 32), k)  # training wants gradients: the dense path


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("autocast", [False, True])
def test_upcast_linear_equals_autograd(x_dtype, autocast):
    """The router's fp32 product keeps x in its own dtype for backward; results are unchanged."""
    from perft.adapters import upcast_linear

    torch.manual_seed(0)
    x0, w0, gy = torch.randn(7, 12).to(x_dtype), torch.randn(5, 12), torch.randn(7, 5)
    results = []
    for fn in (upcast_linear, lambda x, w: F.linear(x.to(w.dtype), w)):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, w)
        y.backward(gy.to(y.dtype))
        results.append((y.detach(), x.grad, w.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
