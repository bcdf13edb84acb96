"""PerftModel on every supported architecture x variant x adapter type.

Each tiny model is saved with `save_pretrained` once and loaded back with
`AutoModelForCausalLM.from_pretrained`, the path a user takes with a real checkpoint.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from perft import PerftConfig, PerftModel, get_perft_model
from perft.testing import TINY_ARCHITECTURES, save_tiny_model

VARIANTS = ("routed", "embedded", "dense", "single")
ADAPTERS = ("lora", "parallel")
CASES = list(itertools.product(TINY_ARCHITECTURES, VARIANTS, ADAPTERS))
IDS = [f"{a}-{v}-{k}" for a, v, k in CASES]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in TINY_ARCHITECTURES}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path)


def make_config(variant: str, adapter: str, **kw) -> PerftConfig:
    return PerftConfig(variant=variant, adapter=adapter, num_experts=4, top_k=2, rank=4, alpha=8, dropout=0.0, **kw)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_steps(model, steps: int = 6, lr: float = 2e-2) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = batch(1)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch,variant,adapter", CASES, ids=IDS)
def test_init_noop_train_and_roundtrip(checkpoints, tmp_path, arch, variant, adapter):
    path = checkpoints[arch]
    base = load(path).eval()
    data = batch()
    with torch.no_grad():
        reference = base(input_ids=data["input_ids"]).logits
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    torch.manual_seed(0)  # the adapter initialisation
    model = get_perft_model(base, make_config(variant, adapter))
    # 1. an exact no-op at initialisation, in eval and in train mode
    for mode in (False, True):
        model.train(mode)
        with torch.no_grad():
            assert torch.equal(model(input_ids=data["input_ids"]).logits, reference)

    # 2. trainable parameters are exactly the adapter tensors, and their count is the formula
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".perft_adapter." in n for n in trainable)
    layers = model.perft_layers
    d = next(iter(layers.values())).experts.hidden_size
    n = next(iter(layers.values())).num_experts
    per_layer = n * 2 * d * 4 + (n * d if variant == "routed" else 0)
    assert model.get_nb_trainable_parameters()[0] == per_layer * len(layers)
    expected_n = {"embedded": model.perft_config.base_shapes["num_experts"], "single": 1}.get(variant, 4)
    assert n == expected_n

    # 3. training lowers the loss and changes only adapter tensors
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 1e-3, losses
    for name, value in base.state_dict().items():
        if ".perft_adapter." not in name:
            assert torch.equal(value, base_state[name]), f"base tensor {name} changed"
    ups = [layer.experts.up for layer in layers.values()]
    assert any(u.abs().sum() > 0 for u in ups), "adapters did not train"

    with torch.no_grad():
        tuned = model(input_ids=data["input_ids"]).logits
        assert not torch.allclose(tuned, reference)
        with model.disable_adapters():
            assert torch.equal(model(input_ids=data["input_ids"]).logits, reference)

    # 4. save -> load onto a freshly loaded base reproduces the outputs exactly
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = PerftModel.from_pretrained(load(path), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=data["input_ids"]).logits, tuned)
    assert reloaded.get_nb_trainable_parameters()[0] == 0  # inference unless is_trainable

    # 5. unload gives back the untouched base model
    restored = model.unload()
    assert not any("perft_adapter" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        assert torch.equal(restored(input_ids=data["input_ids"]).logits, reference)


def _block_io(model: PerftModel, block_path: str, input_ids: torch.Tensor):
    """Capture the input and output of one MoE block, with adapters on and off."""
    block = model.base_model.get_submodule(block_path)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["y"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
            x, y_on = seen["x"], seen["y"]
            with model.disable_adapters():
                block(x)  # the same block input, without adapters
            y_off = seen["y"]
    finally:
        handle.remove()
    return x.reshape(-1, x.shape[-1]), (y_on - y_off).reshape(-1, x.shape[-1]), block


def _base_gates(block, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    router = getattr(block, "gate", None) or block.router
    _, weights, index = router(x)
    gates = torch.zeros(x.shape[0], num_experts, dtype=torch.float32)
    return gates.scatter_add(1, index, weights.float())


@pytest.mark.parametrize("arch,variant,adapter", CASES, ids=IDS)
def test_delta_matches_formula_from_saved_tensors(checkpoints, tmp_path, arch, variant, adapter):
    """Recompute each variant's delta with plain torch from the saved file, following the paper."""
    torch.manual_seed(0)  # the adapter initialisation
    model = get_perft_model(load(checkpoints[arch]).eval(), make_config(variant, adapter, normalize_top_k=False))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the adapters non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2, generator=generator)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    scale = config["alpha"] / config["rank"]
    ids = batch(3)["input_ids"]
    for path in model.perft_layers:
        x, delta, block = _block_io(model, path, ids)
        if adapter == "lora":
            A, B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
            per_expert = scale * torch.einsum("ndr,nrk,tk->tnd", B, A, x)  # [T, N, d]
        else:
            D, U = tensors[f"{path}.adapter_down"], tensors[f"{path}.adapter_up"]
            per_expert = torch.einsum("ndr,tnr->tnd", U, torch.nn.functional.silu(torch.einsum("nrk,tk->tnr", D, x)))
        N = per_expert.shape[1]
        if variant == "routed":
            probs = torch.softmax(x @ tensors[f"{path}.router"].T, dim=-1)
            top_values, top_index = probs.topk(config["top_k"], dim=-1)
            gates = torch.zeros_like(probs).scatter(1, top_index, top_values)
        elif variant == "embedded":
            gates = _base_gates(block, x, N)
        else:
            gates = torch.ones(x.shape[0], N)
        expected = (gates.unsqueeze(-1) * per_expert).sum(1)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_generate_with_kv_cache(checkpoints, arch):
    torch.manual_seed(0)  # the adapter initialisation
    model = get_perft_model(load(checkpoints[arch]).eval(), make_config("routed", "lora"))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=generator)
    ids = batch(5)["input_ids"][:, :6]
    # min_new_tokens: all 6 new tokens are compared, whatever the random weights make of EOS.
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
        with model.disable_adapters():
            base_out = model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base_out)


def test_bf16_base_with_fp32_adapters(checkpoints):
    base = AutoModelForCausalLM.from_pretrained(checkpoints["olmoe"], dtype=torch.bfloat16).eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    torch.manual_seed(0)  # the adapter initialisation
    model = get_perft_model(base, make_config("routed", "lora"))
    layer = next(iter(model.perft_layers.values()))
    assert layer.experts.down.dtype == torch.float32 and layer.router.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
    losses = train_steps(model, steps=4)
    assert losses[-1] < losses[0]
    auto = get_perft_model(load(checkpoints["mixtral"]).to(torch.bfloat16), make_config("dense", "lora", adapter_dtype="auto"))
    assert next(iter(auto.perft_layers.values())).experts.down.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_gradients(checkpoints, variant):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        aux = 0.1 if variant == "routed" else 0.0  # the balance loss takes the padding-masked path
        model = get_perft_model(load(checkpoints["olmoe"]), make_config(variant, "lora", router_aux_loss_coef=aux))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=generator)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        data = batch(2)
        data["attention_mask"][1, 7:] = 0
        model(**data).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
