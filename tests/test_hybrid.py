"""The hybrid perft+lora-attn (perft/hybrid.py): PERFT adapters and attention LoRA train together,
nothing else does, and the one saved artifact loads back exactly."""

from __future__ import annotations

import pytest
import torch

from perft.errors import PerftError
from perft.hybrid import LORA_CONFIG, PREFIX, lora_parameters
from perft.loading import load_base_model
from perft.methods import get_method, load_adapted, method_for_adapter, method_of
from tests.helpers.training import config, one_thread

IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 15]])


@pytest.fixture(scope="module")
def trained(train_workspace, tmp_path_factory):
    from perft.training import train

    out = tmp_path_factory.mktemp("hybrid") / "run"
    seen = {}
    with one_thread():
        result = train(config(train_workspace, out, method="perft+lora-attn", lora_attn_rank=2, max_steps=4,
                              val_set_size=0, save_steps=2, dropout=0.0, warmup_steps=0),
                       callbacks=[lambda info: seen.update(info)])
    return seen["model"], result


def test_build_trains_exactly_the_perft_adapters_and_the_attention_lora(train_workspace, tmp_path):
    cfg = config(train_workspace, tmp_path, method="perft+lora-attn", lora_attn_rank=2)
    base = load_base_model(str(train_workspace["model"])).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    with one_thread():
        torch.manual_seed(0)
        model = get_method("perft+lora-attn").build(load_base_model(str(train_workspace["model"])), cfg)
    assert method_of(model) is get_method("perft+lora-attn")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    perft = {n for n in trainable if ".perft_adapter." in n}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert perft and lora and trainable == perft | lora
    assert len(lora) == 2 * 2 * len(model.perft_layers)  # per layer: q_proj and v_proj, each an A and a B
    a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
    assert a.shape[0] == 2  # the LoRA rank is --lora-attn-rank, not --rank (4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)  # both parts start as exact no-ops


def test_training_moves_both_parts_and_nothing_else(train_workspace, trained):
    model, result = trained
    assert (result.status, result.global_step) == ("completed", 4)
    base = dict(load_base_model(str(train_workspace["model"])).named_parameters())
    after = dict(model.get_base_model().named_parameters())
    for name, before in base.items():
        key = name.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(
            ".v_proj.weight", ".v_proj.base_layer.weight")
        assert torch.equal(after[key], before), name
    lora_b = [p for n, p in lora_parameters(model).items() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    state = model.adapter_state_dict()
    ups = [v for k, v in state.items() if k.endswith(".lora_B")]  # PERFT's up projections start at zero too
    assert ups and all(v.abs().sum() > 0 for v in ups)


def test_the_artifact_round_trips_exactly(train_workspace, trained):
    model, result = trained
    assert (result.adapter_dir / LORA_CONFIG).is_file()
    method = method_for_adapter(result.adapter_dir)
    assert method is get_method("perft+lora-attn")
    loaded = load_adapted(load_base_model(str(train_workspace["model"])), result.adapter_dir)
    saved, back = method.adapter_state(model), method.adapter_state(loaded)
    assert saved.keys() == back.keys() and any(k.startswith(PREFIX) for k in saved)
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    adapter, total = method.parameter_count(loaded)
    assert adapter == sum(v.numel() for v in saved.values()) < total


def test_a_state_without_the_lora_part_is_refused(trained):
    model, _ = trained
    method = get_method("perft+lora-attn")
    state = {k: v for k, v in method.adapter_state(model).items() if not k.startswith(PREFIX)}
    with pytest.raises(PerftError, match="attention LoRA"):
        method.load_adapter_state(model, state, "x")


def test_analyze_takes_the_hybrid_adapter_and_restores_the_base(train_workspace, trained):
    from perft.analysis.pipeline import AnalysisOptions, analyze
    from perft.loading import load_tokenizer

    _, result = trained
    base = load_base_model(str(train_workspace["model"])).eval()
    names = [n for n, _ in base.named_parameters()]
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    options = AnalysisOptions(projection=None, batch_size=8, progress=False, max_samples=24)
    with one_thread():
        out = analyze(base, load_tokenizer(str(train_workspace["model"])), train_workspace["data"],
                      [result.adapter_dir], options)
    assert [(r["name"], r["method"], r["variant"]) for r in out["runs"]] == [("adapter", "perft+lora-attn", "routed")]
    assert [n for n, _ in base.named_parameters()] == names  # LoRA layers and PERFT adapters gone
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).logits, expected)


def test_a_lora_tensor_of_the_wrong_shape_is_refused_before_anything_is_written(trained):
    model, _ = trained
    method = get_method("perft+lora-attn")
    before = {k: v.clone() for k, v in method.adapter_state(model).items()}
    state = {k: torch.zeros_like(v) for k, v in before.items()}  # would zero the PERFT part if it were written
    bad = next(k for k in state if k.startswith(PREFIX))
    state[bad] = torch.zeros(*state[bad].shape[:-1], state[bad].shape[-1] + 1)
    with pytest.raises(PerftError, match=r"has shape .* this model needs .*; use the base model it was made for"):
        method.load_adapter_state(model, state, "x")
    after = method.adapter_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert any(v.abs().sum() > 0 for k, v in before.items() if not k.startswith(PREFIX))  # the check can fail
