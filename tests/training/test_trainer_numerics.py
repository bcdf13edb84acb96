"""Numerical safety: the PERFT-R router runs in fp32 even under bf16 autocast and stays finite
for huge activations; the NaN/Inf guard stops a run before a bad update and keeps the last
good checkpoint (here: an Inf gradient behind a finite loss, under bf16 autocast).

The NaN-loss case of the guard is in tests/training/test_trainer.py; this file does not repeat it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perft.adapters import AdapterRouter
from perft.errors import PerftError
from tests.helpers.training import adapter_tensors, config, make_workspace, max_abs_diff, one_thread


def router(num_experts: int = 4, hidden: int = 16, top_k: int = 2, seed: int = 0) -> AdapterRouter:
    torch.manual_seed(seed)
    return AdapterRouter(num_experts, hidden, top_k, normalize=True, init_std=0.5)


def test_router_is_fp32_under_bf16_autocast_and_matches_the_fp32_result():
    r = router()
    x = torch.randn(64, 16).to(torch.bfloat16)
    expected = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x)
    for want, have in zip(expected, got):
        assert have.dtype == want.dtype
        assert torch.equal(want, have)  # bit for bit: autocast did not move the router to bf16
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_router_tells_apart_logits_that_bf16_would_merge():
    r = AdapterRouter(2, 2, 1, normalize=False)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[300.0, 300.25]])  # 300.25 needs more than bf16's 8 bits of mantissa
    bf16_probs = torch.softmax(F.linear(x.bfloat16(), r.weight.bfloat16()), dim=-1)
    assert bf16_probs[0, 0] == bf16_probs[0, 1]  # what a bf16 router would see: a tie
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, dense, index = r(x)
    assert index.item() == 1 and probs[0, 1] > probs[0, 0]
    assert torch.allclose(probs, torch.softmax(torch.tensor([[300.0, 300.25]]), dim=-1))


@pytest.mark.parametrize("scale", [1e4, 1e18, 3e38])
def test_huge_activations_give_finite_routing_weights(scale):
    r = router()
    with torch.no_grad():
        r.weight.abs_()  # every row positive: logits grow (to +inf in fp32 for the largest scales)
        r.weight[0] *= 2
    x = torch.full((8, 16), scale).to(torch.bfloat16)  # finite in bf16
    assert torch.isfinite(x).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, dense, index = r(x)
    assert torch.isfinite(probs).all() and torch.isfinite(dense).all()
    assert torch.allclose(probs.sum(-1), torch.ones(8))
    assert torch.allclose(dense.sum(-1), torch.ones(8))  # normalised top-k weights


def test_a_bf16_model_with_perft_r_routes_in_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    from perft import PerftConfig, get_perft_model
    from perft.testing import save_tiny_model

    path = save_tiny_model("olmoe", tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = get_perft_model(base, PerftConfig(rank=4, num_experts=4, top_k=2, adapter_dtype="bfloat16"))
    layers = list(model.perft_layers.values())
    for layer in layers:
        layer.record_routing = True
        with torch.no_grad():
            layer.experts.up.normal_()  # a trained-looking adapter, not the zero start
            layer.router.weight.mul_(1e3)  # sharp routing logits
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    for layer in layers:
        probs = layer.last_routing["probs"]
        assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))


def test_an_inf_gradient_behind_a_finite_loss_stops_bf16_training_with_the_last_checkpoint(tmp_path):
    from perft.training import NonFiniteLoss, train
    from perft.training import checkpoint as ckpt

    ws = make_workspace(tmp_path / "ws", n_records=24)
    out = tmp_path / "out"
    seen: dict[str, object] = {}

    def poison(info):
        if info["step"] == 2:  # right after checkpoint-2: the gradient of step 3 becomes Inf
            layer = next(iter(info["model"].perft_layers.values()))
            seen["model"] = info["model"]
            layer.experts.down.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    with one_thread(), pytest.raises(NonFiniteLoss) as err:
        train(config(ws, out, max_steps=6, save_steps=2, eval_steps=2, val_set_size=4, save_total_limit=1,
                     bf16="true"), callbacks=[poison])
    message = str(err.value)
    assert isinstance(err.value, PerftError)
    assert "the gradient norm became inf at step 3" in message and f"{out / 'checkpoint-2'}" in message
    assert "stopped without applying that update" in message
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    kept = adapter_tensors(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in kept.values())
    in_memory = {k: v.detach() for k, v in seen["model"].adapter_state_dict().items()}
    assert max_abs_diff(in_memory, kept) == 0.0  # step 3 was never applied
    assert not (out / "adapter").exists() and not list(out.glob(".tmp-*"))
