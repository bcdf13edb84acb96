"""Many named adapters on one frozen base, PEFT's names and semantics, mixed-batch inference."""

from __future__ import annotations

import pytest
import torch

from perft import PerftConfig, PerftError, PerftModel, get_perft_model
from perft.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe") / "model")


def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def randomise(model: PerftModel, adapter: str, seed: int) -> None:
    """Give one adapter non-zero weights (a fresh adapter is an exact no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.adapter_state_dict(adapter).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


@pytest.fixture
def two(model_dir):
    """A base with "default" (PERFT-R) and "emb" (PERFT-E, parallel) adapters, both non-trivial."""
    torch.manual_seed(0)
    model = get_perft_model(base(model_dir), PerftConfig(rank=4, dropout=0.0))
    model.add_adapter("emb", PerftConfig(variant="embedded", adapter="parallel", rank=4, dropout=0.0))
    randomise(model, "default", 1)
    randomise(model, "emb", 2)
    return model.eval()


IDS = torch.tensor([[5, 9, 17, 33, 8, 41], [7, 7, 90, 12, 3, 60], [11, 23, 5, 77, 102, 4]])


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_set_adapter_switches_outputs_and_only_the_active_adapter_trains(two):
    assert two.active_adapter == "default" and two.active_adapters == ["default"]
    default = logits(two)
    two.set_adapter("emb")
    emb = logits(two)
    with two.disable_adapter():
        plain = logits(two)
    assert (default - emb).abs().max() > 1e-2 and (emb - plain).abs().max() > 1e-2
    trainable = {n for n, p in two.named_parameters() if p.requires_grad}
    assert trainable and all("perft_adapter_emb" in n for n in trainable)
    two.set_adapter("default")
    assert torch.allclose(logits(two), default, atol=0, rtol=0)
    with pytest.raises(PerftError, match="no adapter named 'nope'"):
        two.set_adapter("nope")


def test_mixed_batch_rows_equal_single_runs_and_generate_the_same_tokens(two):
    names = ["emb", "__base__", "default"]
    mixed = logits(two, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with two.disable_adapter():
                alone = logits(two, IDS[row:row + 1])
        else:
            two.set_adapter(name)
            alone = logits(two, IDS[row:row + 1])
        assert (mixed[row] - alone[0]).abs().max() < 1e-5
    two.set_adapter("default")
    # the rows really differ by adapter: the same input under three adapters gives three outputs
    same = logits(two, IDS[[0, 0, 0]], adapter_names=names)
    assert (same[0] - same[1]).abs().max() > 1e-2 and (same[1] - same[2]).abs().max() > 1e-2

    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed_tokens = two.generate(IDS, adapter_names=names, **gen)
    for row, name in enumerate(names):
        if name == "__base__":
            with two.disable_adapter():
                alone = two.generate(IDS[row:row + 1], **gen)
        else:
            two.set_adapter(name)
            alone = two.generate(IDS[row:row + 1], **gen)
        n = alone.shape[1]  # a row that ended early (EOS) is padded in the batch
        assert torch.equal(mixed_tokens[row, :n], alone[0]) and not mixed_tokens[row, n:].any()
    with pytest.raises(PerftError, match="one adapter name per row"):
        logits(two, adapter_names=["emb"])
    with pytest.raises(PerftError, match="unknown adapters"):
        logits(two, adapter_names=["emb", "x", "default"])


def test_named_adapters_save_in_peft_layout_and_load_back(two, model_dir, tmp_path):
    two.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "emb" / "adapter_config.json").is_file()
    two.save_pretrained(tmp_path / "only", selected_adapters=["emb"])
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["emb"]
    loaded = PerftModel.from_pretrained(base(model_dir), tmp_path / "emb", adapter_name="emb")
    loaded.load_adapter(tmp_path, adapter_name="r")
    assert loaded.active_adapter == "emb" and sorted(loaded.peft_config) == ["emb", "r"]
    assert loaded.peft_config["r"].variant == "routed"
    two.set_adapter("emb")
    assert (logits(loaded) - logits(two)).abs().max() == 0.0
    loaded.set_adapter("r")
    two.set_adapter("default")
    assert (logits(loaded) - logits(two)).abs().max() == 0.0
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT does
    loaded.delete_adapter("r")
    assert loaded.active_adapter == "emb" and not any("perft_adapter_r" in n for n, _ in loaded.named_modules())
    with pytest.raises(PerftError, match="already a PerftModel"):
        PerftModel.from_pretrained(loaded, tmp_path)
    with pytest.raises(PerftError, match="only adapter"):
        loaded.delete_adapter("emb")


def test_peft_only_calls_explain_themselves(two):
    two.enable_adapters()  # PEFT habits that apply simply work
    assert two.active_adapters == ["default"] and two.get_base_model() is two.base_model
    with pytest.raises(PerftError, match="read the MoE block's input"):
        two.merge_and_unload()
    with pytest.raises(PerftError, match="cannot be merged"):
        two.merge_adapter()
    with pytest.raises(PerftError, match="adapter_state_dict"):
        two.get_adapter_state_dict()
    with pytest.raises(PerftError, match="safetensors"):
        two.save_pretrained("unused", safe_serialization=False)
    with pytest.raises(PerftError, match="already loaded"):
        two.add_adapter("emb", PerftConfig())
    with pytest.raises(PerftError, match="PerftConfig"):
        two.add_adapter("x", {"r": 8})
    with pytest.raises(PerftError, match="use_reentrant"):
        get_perft_model(two.unload(), PerftConfig(rank=2, router_aux_loss_coef=0.1)).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": True})


def test_reentrant_checkpointing_without_balance_loss_is_allowed(model_dir):
    model = get_perft_model(base(model_dir), PerftConfig(rank=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.base_model.is_gradient_checkpointing
