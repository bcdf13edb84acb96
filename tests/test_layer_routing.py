"""PERFT-R with renormalised top-k weights (Mixtral, Qwen3-MoE), on the dense path and the decode fast path.

The formula tests in tests/test_model.py force `normalize_top_k=False`; here the router follows
the base model, which renormalises, and the delta is recomputed from the saved tensors:
`sum_{n in topk(p)} (p_n / sum_{m in topk(p)} p_m) * (alpha/r) B_n A_n x`. The decode fast path
(few tokens: only the selected experts are read) must give the same numbers as the dense path.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from perft import PerftConfig, get_perft_model
from perft.testing import save_tiny_model

NORMALISING = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("renorm")
    out = {}
    for arch in NORMALISING:
        base = AutoModelForCausalLM.from_pretrained(save_tiny_model(arch, root / arch)).eval()
        torch.manual_seed(0)
        model = get_perft_model(base, PerftConfig(variant="routed", num_experts=8, top_k=2, rank=4, alpha=8,
                                                  dropout=0.0))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-trivial adapters, a router that prefers some experts
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        model.save_pretrained(root / f"{arch}-adapter")
        out[arch] = (model, root / f"{arch}-adapter")
    return out


def expected_delta(directory, path: str, x: torch.Tensor) -> torch.Tensor:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    A, B, router = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"], tensors[f"{path}.router"]
    per_expert = config["alpha"] / config["rank"] * torch.einsum("ndr,nrk,tk->tnd", B, A, x)
    probs = torch.softmax(x @ router.T, dim=-1)
    top_values, top_index = probs.topk(config["top_k"], dim=-1)
    kept = top_values / top_values.sum(-1, keepdim=True)  # renormalised, as the base routers do
    gates = torch.zeros_like(probs).scatter(1, top_index, kept)
    return (gates.unsqueeze(-1) * per_expert).sum(1)


@pytest.mark.parametrize("arch", NORMALISING)
def test_routed_delta_with_renormalisation_matches_the_formula(models, arch):
    model, directory = models[arch]
    generator = torch.Generator().manual_seed(2)
    for path, layer in model.perft_layers.items():
        assert layer.router.normalize is True  # followed from the base model (normalize_top_k unset)
        x = torch.randn(12, layer.router.weight.shape[1], generator=generator)
        with torch.no_grad():
            assert not layer.experts.prefers_selected(x, 2)
            delta = layer.delta(x)
        torch.testing.assert_close(delta, expected_delta(directory, path, x), rtol=1e-4, atol=1e-5)
        # Without the renormalisation the numbers differ clearly (the test can tell the two apart).
        unnormalised = layer.router.normalize
        layer.router.normalize = False
        try:
            with torch.no_grad():
                raw = layer.delta(x)
        finally:
            layer.router.normalize = unnormalised
        assert (raw - delta).abs().max() > 1e-2


@pytest.mark.parametrize("arch", NORMALISING)
def test_decode_fast_path_matches_the_dense_path(models, arch):
    model, directory = models[arch]
    generator = torch.Generator().manual_seed(3)
    for path, layer in model.perft_layers.items():
        many = torch.randn(16, layer.router.weight.shape[1], generator=generator)
        with torch.no_grad():
            dense = layer.delta(many)
            for rows in (many[:1], many[5:9]):  # one decoding token; four tokens (T*k = N)
                assert layer.experts.prefers_selected(rows, 2)
                fast = layer.delta(rows)
                start = 0 if rows.shape[0] == 1 else 5
                torch.testing.assert_close(fast, dense[start:start + rows.shape[0]], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(fast, expected_delta(directory, path, rows), rtol=1e-4, atol=1e-5)
