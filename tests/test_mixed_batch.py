"""Mixed batches with stacked adapter banks: each row equals running it alone, on every path."""

from __future__ import annotations

import pytest
import torch

import perft.mixed_batch as mixed_batch
from perft import PerftConfig, PerftModel, get_perft_model
from perft.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe") / "model")


def build(model_dir, adapters: dict[str, PerftConfig]) -> PerftModel:
    """A tiny OLMoE base carrying the named adapters, each with its own non-zero weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    items = list(adapters.items())
    model = get_perft_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(), items[0][1], adapter_name=items[0][0])
    for name, config in items[1:]:
        model.add_adapter(name, config)
    for seed, name in enumerate(adapters):
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for tensor in model.adapter_state_dict(name).values():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts the stacked gathers a mixed group runs (its fast path)."""
    calls = []
    real = mixed_batch.selected_products

    def counting(x, down, *args):
        calls.append(down.shape[0])  # G*N experts in the bank
        return real(x, down, *args)

    monkeypatch.setattr(mixed_batch, "selected_products", counting)
    return calls


def alone(model: PerftModel, name: str, ids: torch.Tensor, *, generate: dict | None = None) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model.generate(ids, **generate) if generate else model(input_ids=ids).logits
        model.set_adapter(name)
        return model.generate(ids, **generate) if generate else model(input_ids=ids).logits


def check_rows(model: PerftModel, names: list[str], ids: torch.Tensor) -> None:
    """Logits and greedy tokens of every row equal the row run alone with its adapter."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        assert (mixed[row] - alone(model, name, ids[row:row + 1])[0]).abs().max() < 1e-5, (row, name)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = model.generate(ids, adapter_names=names, **gen)
    for row, name in enumerate(names):
        assert torch.equal(tokens[row], alone(model, name, ids[row:row + 1], generate=gen)[0]), (row, name)


G = torch.Generator().manual_seed(3)
SHORT = torch.randint(3, 100, (6, 1), generator=G)  # one token a row: the stacked gather serves the prompt too
LONG = torch.randint(3, 100, (6, 7), generator=G)  # many tokens: the group runs each adapter on its rows


def test_routed_adapters_share_one_bank_and_rows_match_single_runs(model_dir, stacked_calls):
    routed = PerftConfig(rank=4, num_experts=4, top_k=2, dropout=0.0)
    model = build(model_dir, {"a": routed, "b": routed, "c": routed})
    names = ["b", "__base__", "a", "c", "a", "__base__"]
    before = [(layer.enabled, layer.rows) for layer in model._all_layers()]
    check_rows(model, names, SHORT)
    assert stacked_calls and set(stacked_calls) == {12}  # 3 adapters x 4 experts, one bank per block
    stacked_calls.clear()
    check_rows(model, names, LONG)  # prompt by the general path, every decoding step stacked
    assert len(stacked_calls) == 2 * 5  # 2 MoE blocks x the 5 cached decoding steps after the prompt
    same = LONG[[0, 0, 0, 0]]
    with torch.no_grad():
        out = model(input_ids=same[:, :1], adapter_names=["a", "b", "c", "__base__"]).logits
    assert min((out[i] - out[j]).abs().max() for i in range(4) for j in range(i)) > 1e-3  # 4 different outputs
    model.set_adapter("a")
    assert [(layer.enabled, layer.rows) for layer in model._all_layers()] == before  # all put back


def test_different_variants_form_separate_banks(model_dir, stacked_calls):
    emb = PerftConfig(variant="embedded", adapter="parallel", rank=4, dropout=0.0)
    dense = PerftConfig(variant="dense", num_experts=2, rank=4, dropout=0.0)
    routed = PerftConfig(rank=4, num_experts=4, top_k=2, dropout=0.0)
    model = build(model_dir, {"e1": emb, "d1": dense, "r1": routed, "e2": emb, "d2": dense, "r2": routed})
    names = ["e2", "d1", "r1", "e1", "__base__", "d2", "r2"]
    check_rows(model, names, torch.cat([SHORT, SHORT[:1]]))
    assert set(stacked_calls) == {16, 4, 8}  # embedded 2 x 8 base experts, dense 2 x 2, routed 2 x 4


def test_adapters_of_different_ranks_fall_back_to_the_general_path(model_dir, stacked_calls):
    model = build(model_dir, {"r4": PerftConfig(rank=4, dropout=0.0), "r8": PerftConfig(rank=8, dropout=0.0),
                              "s4": PerftConfig(rank=4, num_experts=2, top_k=1, dropout=0.0)})
    serving = {name: layers[next(iter(layers))] for name, layers in model._adapters.items()}
    assert mixed_batch.mixed_groups(serving, ["r4", "r8", "s4"]) == []  # no two share a stack key
    check_rows(model, ["r8", "r4", "__base__", "s4"], SHORT[:4])
    assert stacked_calls == []


def test_a_group_with_the_balance_loss_on_runs_each_adapter_and_reports_it(model_dir, stacked_calls):
    balanced = PerftConfig(rank=4, router_aux_loss_coef=0.1, dropout=0.0)
    model = build(model_dir, {"b1": balanced, "b2": balanced})
    model.set_adapter("b1")
    with torch.no_grad():
        out = model(input_ids=SHORT[:3], adapter_names=["b2", "b1", "b1"])
        model.set_adapter("b1")
        b1_alone = model(input_ids=SHORT[1:3])["perft_aux_loss"]
    assert stacked_calls == []
    assert abs(out["perft_aux_loss"].item() - b1_alone.item()) < 1e-6  # the active adapter's loss over its rows
    check_rows(model, ["b2", "b1", "__base__"], SHORT[:3])


def test_gradients_take_the_general_path_and_reach_only_each_rows_adapter(model_dir, stacked_calls):
    routed = PerftConfig(rank=4, num_experts=4, top_k=2, dropout=0.0)
    model = build(model_dir, {"a": routed, "b": routed})
    for param in model.parameters():
        param.requires_grad_(False)
    for name, param in model.named_parameters():
        if "perft_adapter" in name:
            param.requires_grad_(True)
    loss = model(input_ids=SHORT[:2], adapter_names=["a", "__base__"]).logits.square().sum()
    loss.backward()
    assert stacked_calls == []
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "perft_adapter_b" not in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "perft_adapter_b" in n)
