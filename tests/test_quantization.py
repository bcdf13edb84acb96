"""Quantized fused experts (perft.quantization) under PERFT adapters, on every tiny architecture."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from perft import PerftConfig, PerftError, PerftModel, get_perft_model, quantize_moe_experts
from perft.arch import find_moe_blocks
from perft.quantization import (
    FUSED_WEIGHT_NAMES,
    QuantizedExpertWeights,
    expert_storage_bytes,
    expert_store_bytes_per_param,
    quantized_expert_stores,
)
from perft.testing import TINY_ARCHITECTURES, save_tiny_model

pytest.importorskip("bitsandbytes")

SETTINGS = ((4, "nf4"), (4, "fp4"), (8, "nf4"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-q")
    return {arch: save_tiny_model(arch, root / arch) for arch in TINY_ARCHITECTURES}


def load(path, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", **kw)
    return model.eval()


def batch(seed: int = 0):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def dequantized_copy(path, quantized):
    """The reference: the same model with each store replaced by its dequantized weights as plain parameters."""
    reference = load(path)
    for ref_block, q_block in zip(find_moe_blocks(reference), find_moe_blocks(quantized)):
        for name in FUSED_WEIGHT_NAMES:
            store = getattr(q_block.experts, name, None)
            if isinstance(store, QuantizedExpertWeights):
                getattr(ref_block.experts, name).data.copy_(store.dequantize())
    return reference


@pytest.mark.parametrize("arch,setting", list(itertools.product(TINY_ARCHITECTURES, SETTINGS)),
                         ids=[f"{a}-{b}{q}" for a, (b, q) in itertools.product(TINY_ARCHITECTURES, SETTINGS)])
def test_quantized_forward_equals_dequantize_then_reference(checkpoints, arch, setting):
    bits, quant_type = setting
    base = load(checkpoints[arch])
    quantized = quantize_moe_experts(load(checkpoints[arch]), bits, quant_type)
    stores = quantized_expert_stores(quantized)
    assert stores and all(s.bits == bits for s in stores)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in quantized.named_parameters())
    reference = dequantized_copy(checkpoints[arch], quantized)
    data = batch()
    with torch.no_grad():
        got, want, full = (m(input_ids=data["input_ids"]).logits for m in (quantized, reference, base))
    assert torch.equal(got, want)
    moved = (got - full).abs().max().item()
    assert 0 < moved < (0.1 if bits == 4 else 0.01)  # quantization changed something, and not much


def test_only_router_selected_experts_are_dequantized(checkpoints, monkeypatch):
    model = quantize_moe_experts(load(checkpoints["olmoe"]), 4)
    block = find_moe_blocks(model)[0]
    seen, selected = [], []
    monkeypatch.setattr(QuantizedExpertWeights, "dequantize_expert",
                        lambda self, e, _orig=QuantizedExpertWeights.dequantize_expert: seen.append(e) or _orig(self, e))
    block.experts.register_forward_pre_hook(lambda mod, args: selected.append(args[1].unique().tolist()))
    ids = torch.tensor([[5, 6]])
    with torch.no_grad():
        model(input_ids=ids)
    first_layer_calls = seen[: 2 * len(selected[0])]  # gate_up and down of each selected expert
    assert sorted(set(first_layer_calls)) == selected[0]
    assert len(selected[0]) < block.num_experts  # 2 tokens x top-2 of 8 experts: some stay quantized


def test_storage_after_4bit_is_at_most_0_3x_bf16(checkpoints):
    bf16 = load(checkpoints["mixtral"], dtype=torch.bfloat16)
    before = expert_storage_bytes(bf16)
    after4 = expert_storage_bytes(quantize_moe_experts(load(checkpoints["mixtral"], dtype=torch.bfloat16), 4))
    after8 = expert_storage_bytes(quantize_moe_experts(load(checkpoints["mixtral"], dtype=torch.bfloat16), 8))
    assert after4 <= 0.3 * before
    # int8: one byte per value plus an fp32 scale per row (rows of 16 and 32 values here)
    assert after8 == sum(s.shape.numel() * expert_store_bytes_per_param(8, row_length=s.shape[2])
                         for s in quantized_expert_stores(quantize_moe_experts(load(checkpoints["mixtral"]), 8)))
    stores = quantized_expert_stores(quantize_moe_experts(bf16, 4))
    values = sum(s.shape.numel() for s in stores)
    code_bytes = sum(s.code_bytes.numel() for s in stores)  # the 16-entry NF4 table, once per store
    assert sum(s.storage_bytes() for s in stores) - code_bytes == values * expert_store_bytes_per_param(4)
    assert all(s.dtype == torch.bfloat16 for s in stores)


def test_compute_dtype_follows_model_to(checkpoints):
    model = quantize_moe_experts(load(checkpoints["olmoe"]), 4).to(torch.bfloat16)
    store = quantized_expert_stores(model)[0]
    assert store.dtype == torch.bfloat16 and store[0].dtype == torch.bfloat16
    assert store.scale_bytes.dtype == torch.uint8  # the fp32 scales were not rounded
    with torch.no_grad():
        assert model(**batch()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["routed", "embedded"])
def test_only_adapters_train_on_a_quantized_base(checkpoints, variant):
    base = quantize_moe_experts(load(checkpoints["olmoe"]), 4)
    codes = [s.codes.clone() for s in quantized_expert_stores(base)]
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        before = base(**batch()).logits
    config = PerftConfig(variant=variant, num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0)
    model = get_perft_model(base, config)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, before)  # adapters start as an exact no-op
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.get_nb_trainable_parameters()[1] == sum(p.numel() for p in load(checkpoints["olmoe"]).parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if "perft_adapter" in n)  # the store counts as its weights
    assert trainable and all("perft_adapter" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    model.train()
    for _ in range(5):
        loss = model(**batch(1)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(a, s.codes) for a, s in zip(codes, quantized_expert_stores(base)))
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        base = quantize_moe_experts(load(checkpoints["qwen3_moe"]), 4)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_perft_model(base, PerftConfig(num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0))
        model.train()
        model(**batch(2)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[1].values())


@pytest.mark.parametrize("direction", ["quantized_to_full", "full_to_quantized"])
def test_adapters_move_between_quantized_and_full_bases(checkpoints, tmp_path, direction):
    path = checkpoints["mixtral"]
    train_on_quantized = direction == "quantized_to_full"
    base = load(path)
    if train_on_quantized:
        quantize_moe_experts(base, 4)
    torch.manual_seed(0)
    model = get_perft_model(base, PerftConfig(num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-trivial adapter
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05, generator=generator)
    model.save_pretrained(tmp_path / "adapter")
    other = load(path)
    if not train_on_quantized:
        quantize_moe_experts(other, 4)
    loaded = PerftModel.from_pretrained(other, tmp_path / "adapter")
    state, loaded_state = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    model.eval()
    with torch.no_grad():
        a, b = model(**batch()).logits, loaded(**batch()).logits
    assert 0 < (a - b).abs().max().item() < 0.1  # only the base's quantization differs


def test_bitsandbytes_config_linears_plus_perft_experts(checkpoints, capsys):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = load(checkpoints["olmoe"], quantization_config=config)
    quantize_moe_experts(model, 4)
    err = capsys.readouterr().err
    assert "bitsandbytes quantized 8 linear layers but skipped the 4 fused expert weights of 2 MoE blocks" in err
    assert len(quantized_expert_stores(model)) == 4
    model.train()  # bitsandbytes' CPU inference path repacks Linear4bit for a GEMM that needs in_features >= 64
    with torch.no_grad():
        assert torch.isfinite(model(**batch()).logits).all()


def test_unsupported_settings_are_clear_errors(checkpoints):
    model = load(checkpoints["olmoe"])
    with pytest.raises(PerftError, match="choose bits=4"):
        quantize_moe_experts(model, 3)
    with pytest.raises(PerftError, match="choose one of nf4, fp4"):
        quantize_moe_experts(model, 4, "int4")
    with pytest.raises(PerftError, match="choose bits=4"):
        expert_store_bytes_per_param(2)


def test_missing_bitsandbytes_is_a_clear_error(checkpoints, monkeypatch):
    model = load(checkpoints["olmoe"])
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(PerftError, match=r"pip install 'perft\[quant\]'"):
        quantize_moe_experts(model, 4)
    assert not quantized_expert_stores(model)


def test_backward_dequantizes_again_instead_of_keeping_full_weights(checkpoints, monkeypatch):
    """Autograd saves (store, expert) for the weights, not the dequantized tensors; gradients stay exact."""
    path = checkpoints["gpt_oss"]  # transposed weights with biases: `x @ W[e]` rather than F.linear
    quantized = quantize_moe_experts(load(path), 4)
    reference = dequantized_copy(path, quantized)
    grads = []
    calls = []
    original = QuantizedExpertWeights.dequantize_expert
    monkeypatch.setattr(QuantizedExpertWeights, "dequantize_expert", lambda self, e: calls.append(e) or original(self, e))
    for base in (quantized, reference):
        torch.manual_seed(0)
        model = get_perft_model(base, PerftConfig(num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad and param.abs().sum() == 0:
                    param.fill_(0.01)  # zero-initialised B: give the base's backward a non-zero path
        loss = model(**batch(3)).loss
        forward_calls = len(calls)
        loss.backward()
        if base is quantized:
            assert len(calls) > forward_calls  # weights were dequantized again for backward
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
