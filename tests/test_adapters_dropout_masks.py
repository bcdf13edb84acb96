"""LoRA input dropout with one mask per expert (`dropout_masks="per_expert"`) vs one shared mask."""

from __future__ import annotations

import pytest
import torch

from perft.adapters import AdapterExperts
from perft.config import PerftConfig
from perft.dropout import dropout_multiplier, keyed_dropout
from perft.errors import PerftError


def _pair(dropout: float) -> tuple[AdapterExperts, AdapterExperts]:
    torch.manual_seed(0)
    shared = AdapterExperts("lora", 4, 16, 8, dropout=dropout, scaling=2.0).train()
    per_expert = AdapterExperts("lora", 4, 16, 8, dropout=dropout, scaling=2.0, dropout_masks="per_expert").train()
    with torch.no_grad():
        shared.up.normal_()
        per_expert.load_state_dict(shared.state_dict())
    return shared, per_expert


def _manual(ex: AdapterExperts, x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_n w[t, n] * s * B_n A_n (m_n * x_t), written out per expert."""
    h = torch.einsum("nrd,tnd->tnr", ex.down, x.unsqueeze(1) * mask)
    return torch.einsum("ndr,tnr->td", ex.up, h * w.unsqueeze(-1) * ex.scaling)


def test_without_dropout_both_options_give_the_same_outputs_and_gradients():
    shared, per_expert = _pair(0.0)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    grads = []
    for ex in (shared, per_expert):
        x.grad = None
        y = ex(x, w)
        (y * torch.arange(16.0)).sum().backward()
        grads.append((y.detach(), x.grad.clone(), ex.down.grad.clone(), ex.up.grad.clone()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert grads[0][0].abs().max() > 0.1  # `up` is non-zero: the experts do contribute


def test_per_expert_masks_differ_across_experts_with_torch_dropout():
    _, ex = _pair(0.5)
    x, w = torch.randn(6, 16), torch.rand(6, 4)
    torch.manual_seed(3)
    y = ex(x, w)
    torch.manual_seed(3)  # outside perft train: torch's generator, one [T, N*d] draw
    mask = dropout_multiplier(ex, 6, 4 * 16, 0.5, torch.float32, x.device).view(6, 4, 16)
    assert not torch.equal(mask[:, 0], mask[:, 1]) and not torch.equal(mask[:, 2], mask[:, 3])
    torch.testing.assert_close(y, _manual(ex, x, w, mask))
    # The same experts with expert 0's mask shared by all give another output.
    assert (y - _manual(ex, x, w, mask[:, :1])).abs().max() > 1e-2


def test_per_expert_masks_are_keyed_per_sample_and_expert_inside_perft_train():
    _, ex = _pair(0.5)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.rand(6, 4)
    with keyed_dropout(ex, seed=1, step=0, sample_ids=[0, 1], attention_mask=torch.ones(2, 3)):
        mask = ex.dropout_keys.keep_mask(ex.dropout_salt, 4 * 16, 0.5, torch.float32, x.device).view(6, 4, 16)
        y, y_again = ex(x, w), ex(x, w)
    assert torch.equal(y, y_again)
    assert not torch.equal(mask[:, 0], mask[:, 1])
    expected = _manual(ex, x, w, mask)
    torch.testing.assert_close(y, expected)
    g_y = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    g_down, g_x = torch.autograd.grad(y, (ex.down, x), g_y)
    e_down, e_x = torch.autograd.grad(expected, (ex.down, x), g_y)
    torch.testing.assert_close(g_down, e_down)
    torch.testing.assert_close(g_x, e_x)


def test_dropout_masks_is_saved_and_old_configs_read_as_shared(tmp_path):
    cfg = PerftConfig(dropout_masks="per_expert")
    assert PerftConfig.from_dict(cfg.to_dict()).dropout_masks == "per_expert"
    old = cfg.to_dict()
    del old["dropout_masks"]
    assert PerftConfig.from_dict(old).dropout_masks == "shared"
    with pytest.raises(PerftError, match="dropout_masks"):
        PerftConfig(dropout_masks="per-expert")


def test_the_model_builds_per_expert_experts_and_saves_the_choice(tmp_path):
    from transformers import AutoModelForCausalLM

    from perft import get_perft_model
    from perft.testing import save_tiny_model

    base = AutoModelForCausalLM.from_pretrained(save_tiny_model("olmoe", tmp_path / "base"))
    model = get_perft_model(base, PerftConfig(num_experts=4, top_k=2, rank=4, dropout_masks="per_expert"))
    experts = [m for m in model.modules() if isinstance(m, AdapterExperts)]
    assert experts and all(e.dropout_masks == "per_expert" for e in experts)
    model.save_pretrained(tmp_path / "adapter")
    assert PerftConfig.load(tmp_path / "adapter").dropout_masks == "per_expert"
