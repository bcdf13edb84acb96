"""Config validation, incompatible adapters, the PERFT-R balance loss, layer selection, discovery."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from perft import PerftConfig, PerftError, PerftModel, find_moe_blocks, get_perft_model
from perft.testing import save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe"))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral"))


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(variant="sparse"), "unknown variant 'sparse'"),
        (dict(adapter="ia3"), "unknown adapter"),
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer"),
        (dict(top_k=5, num_experts=4), "top_k=5 is larger than num_experts=4"),
        (dict(dropout=1.0), "dropout must be"),
        (dict(router_aux_loss_coef=-1), "router_aux_loss_coef"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(layers=[]), "layers is empty"),
        (dict(layers="all"), "layers must be a list"),
        (dict(activation="swish"), "unknown activation"),
        (dict(format_version=99), "newer perft"),
    ],
)
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(PerftError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        PerftConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(["routed", "embedded", "dense", "single", "other"]),
    rank=st.integers(-2, 64),
    num_experts=st.integers(-1, 16),
    top_k=st.integers(-1, 16),
    dropout=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
)
def test_config_validation_property(variant, rank, num_experts, top_k, dropout):
    """Either the config is valid and round-trips through JSON, or it raises PerftError."""
    try:
        cfg = PerftConfig(variant=variant, rank=rank, num_experts=num_experts, top_k=top_k, dropout=dropout)
    except PerftError as err:
        assert str(err)
        return
    assert variant != "other" and rank >= 1 and num_experts >= 1 and 0 <= dropout < 1
    assert variant != "routed" or top_k <= num_experts
    assert PerftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_config_field_is_named():
    with pytest.raises(PerftError, match="unknown PERFT config field.*'rnak'"):
        PerftConfig.from_dict({"rnak": 4})


def test_alpha_defaults_to_twice_rank():
    assert PerftConfig(rank=8).alpha == 16.0 and PerftConfig(rank=8).scaling == 2.0


def test_dense_model_is_a_clear_error():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    dense = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(PerftError, match="no Mixture-of-Experts block found in this llama model"):
        get_perft_model(dense, PerftConfig())


def test_attaching_twice_is_refused(olmoe):
    model = get_perft_model(load(olmoe), PerftConfig(rank=2))
    with pytest.raises(PerftError, match="already has PERFT adapters"):
        get_perft_model(model.base_model, PerftConfig(rank=2))


def test_layer_selection(olmoe):
    model = get_perft_model(load(olmoe), PerftConfig(rank=2, layers=[1]))
    assert list(model.perft_layers) == ["model.layers.1.mlp"]
    with pytest.raises(PerftError, match=r"layers \[5\] have no MoE block; this model's MoE layers are \[0, 1\]"):
        get_perft_model(load(olmoe), PerftConfig(rank=2, layers=[5]))


def test_adapter_for_another_model_type_is_refused(olmoe, mixtral, tmp_path):
    get_perft_model(load(olmoe), PerftConfig(rank=2)).save_pretrained(tmp_path)
    with pytest.raises(PerftError, match="trained on a olmoe model.*not on this mixtral model"):
        PerftModel.from_pretrained(load(mixtral), tmp_path)


def test_adapter_for_other_shapes_is_refused(olmoe, tmp_path):
    get_perft_model(load(olmoe), PerftConfig(rank=2)).save_pretrained(tmp_path)
    wider = save_tiny_model("olmoe", tmp_path / "wider", hidden_size=48)
    with pytest.raises(PerftError, match="built for hidden_size=32 but the base model has hidden_size=48"):
        PerftModel.from_pretrained(load(wider), tmp_path)
    deeper_cfg = tiny_config("olmoe", num_hidden_layers=1)
    shallow = AutoModelForCausalLM.from_config(deeper_cfg)
    with pytest.raises(PerftError, match="no MoE block at"):
        PerftModel.from_pretrained(shallow, tmp_path)


def test_damaged_adapter_files(olmoe, tmp_path):
    model = get_perft_model(load(olmoe), PerftConfig(rank=2))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PerftError, match="not a readable safetensors file"):
        PerftModel.from_pretrained(load(olmoe), tmp_path)
    weights.unlink()
    with pytest.raises(PerftError, match="no adapter_model.safetensors"):
        PerftModel.from_pretrained(load(olmoe), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PerftError, match="not valid JSON"):
        PerftModel.from_pretrained(load(olmoe), tmp_path)
    with pytest.raises(PerftError, match="does not exist"):
        PerftModel.from_pretrained(load(olmoe), tmp_path / "missing")


def test_tensor_shape_mismatch_is_named(olmoe, tmp_path):
    get_perft_model(load(olmoe), PerftConfig(rank=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PerftError, match=r"lora_A has shape \(4, 2, 32\) but this model needs \(4, 3, 32\)"):
        PerftModel.from_pretrained(load(olmoe), tmp_path)


def test_pickle_files_are_refused(tmp_path):
    from perft.io import load_safetensors

    (tmp_path / "adapter.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(PerftError, match="pickle-based files can run arbitrary code"):
        load_safetensors(tmp_path / "adapter.bin")


def test_router_balance_loss_matches_transformers(mixtral):
    """The PERFT-R balance loss equals transformers' Switch loss on the adapter router's logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = PerftConfig(variant="routed", num_experts=4, top_k=2, rank=2, router_aux_loss_coef=0.5)
    model = get_perft_model(load(mixtral), cfg)
    inputs = {}
    for path in model.perft_layers:
        block = model.base_model.get_submodule(path)
        block.register_forward_pre_hook(lambda m, a, path=path: inputs.__setitem__(path, a[0].reshape(-1, a[0].shape[-1])))
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    logits = tuple(inputs[p] @ layer.router.weight.T for p, layer in model.perft_layers.items())
    expected = load_balancing_loss_func(logits, 4, 2, mask)
    torch.testing.assert_close(out.perft_aux_loss, expected)
    with model.disable_adapters():
        plain = model.base_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(out.loss, plain + 0.5 * expected)
    out.loss.backward()
    assert all(layer.router.weight.grad is not None for layer in model.perft_layers.values())


def test_routed_topk_normalisation_follows_base(olmoe, mixtral):
    assert not next(iter(get_perft_model(load(olmoe), PerftConfig(rank=2)).perft_layers.values())).router.normalize
    assert next(iter(get_perft_model(load(mixtral), PerftConfig(rank=2)).perft_layers.values())).router.normalize
    forced = get_perft_model(load(olmoe), PerftConfig(rank=2, normalize_top_k=True))
    assert next(iter(forced.perft_layers.values())).router.normalize


class _Router(nn.Module):
    def __init__(self, d: int, n: int, k: int) -> None:
        super().__init__()
        self.top_k, self.weight = k, nn.Parameter(torch.randn(n, d))

    def forward(self, x):
        weights, index = torch.softmax(x @ self.weight.T, -1).topk(self.top_k, -1)
        return None, weights, index


class _Experts(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.num_experts, self.w = n, nn.Parameter(torch.randn(n, d, d) * 0.1)

    def forward(self, x, index, weights):
        return torch.einsum("tk,tkde,te->td", weights, self.w[index], x)


class _CustomBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.gate, self.experts = _Router(d, 4, 2), _Experts(d, 4)

    def forward(self, h):
        flat = h.reshape(-1, h.shape[-1])
        _, w, i = self.gate(flat)
        return self.experts(flat, i, w).view_as(h)


class _CustomModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_CustomBlock(), nn.Linear(8, 8), _CustomBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_blocks_of_the_common_shape_are_discovered_automatically():
    model = _CustomModel()
    blocks = find_moe_blocks(model)
    assert [(b.path, b.layer, b.num_experts, b.top_k, b.hidden_size) for b in blocks] == [
        ("layers.0", 0, 4, 2, 8),
        ("layers.2", 2, 4, 2, 8),
    ]
    x = torch.randn(2, 3, 8)
    reference = model(x)
    wrapped = get_perft_model(model, PerftConfig(variant="embedded", rank=2))
    assert torch.equal(wrapped(x), reference)


def test_adapters_are_not_mistaken_for_moe_blocks(olmoe):
    model = get_perft_model(load(olmoe), PerftConfig(variant="routed", rank=2))
    assert [b.path for b in find_moe_blocks(model.base_model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
