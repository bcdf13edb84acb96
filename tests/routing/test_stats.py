"""Routing statistics on a tiny OLMoE whose routing is set by hand.

Attention and expert outputs are zeroed, so every layer's MoE input is the token's
embedding; each used token's embedding is one basis direction, and the routers' columns
for that direction are chosen below. Which experts each token reaches, and with what
probabilities, is therefore known, and every statistic is checked against numbers
worked out here from those choices alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from perft import PerftConfig, PerftError, get_perft_model
from perft.analysis import (
    CoOccurrence,
    RoutingCounts,
    RoutingRecorder,
    last_routing_stats,
    record_routing,
    routing_summary,
    summarize_last_routing,
)
from perft.analysis.geometry import base_key_vectors, up_projection_rows
from perft.routing.stats import mutual_information
from perft.testing import TINY_ARCHITECTURES, tiny_config

D, E = 32, 8
PAD = 0
FEATURE = {10: 0, 11: 1, 12: 2, PAD: 3}  # token id -> the basis direction of its embedding
# layer -> feature -> {expert: logit}; unnamed experts get logit 0
BASE_LOGITS = {
    0: {0: {0: 5.0, 1: 4.0}, 1: {2: 5.0, 3: 4.0}, 2: {0: 5.0, 4: 3.0}, 3: {6: 5.0, 7: 4.0}},
    1: {0: {7: 6.0, 5: 2.0}, 1: {7: 6.0, 5: 1.0}, 2: {5: 6.0, 7: 5.0}, 3: {1: 5.0, 2: 4.0}},
}
ADAPTER_LOGITS = {0: {0: 4.0}, 1: {1: 4.0}, 2: {0: 4.0}, 3: {3: 4.0}}  # 4 adapter experts, top-1
IDS = torch.tensor([[10, 10, 11, 12], [11, 12, PAD, PAD]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
TOKENS = [10, 10, 11, 12, 11, 12]  # the non-padding tokens


def known_model(variant: str = "routed"):
    torch.manual_seed(0)
    config = tiny_config("olmoe")
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        emb = base.model.embed_tokens.weight
        for token, feature in FEATURE.items():
            emb[token].zero_()
            emb[token, feature] = math.sqrt(D)  # RMS 1: the norm below maps it to e_feature / sqrt(1 + eps)
        for index, layer in enumerate(base.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.post_attention_layernorm.weight.fill_(1 / math.sqrt(D))
            _set_columns(layer.mlp.gate.weight, BASE_LOGITS[index])
    model = get_perft_model(base, PerftConfig(variant=variant, num_experts=4, top_k=1, rank=2, dropout=0.0))
    for layer in model.perft_layers.values():
        if layer.router is not None:
            with torch.no_grad():
                _set_columns(layer.router.weight, ADAPTER_LOGITS)
    return model, config.rms_norm_eps


def _set_columns(weight: torch.Tensor, columns: dict[int, dict[int, float]]) -> None:
    weight.zero_()
    for feature, logits in columns.items():
        for expert, value in logits.items():
            weight[expert, feature] = value


def probs_of(logits: dict[int, float], n: int, eps: float) -> list[float]:
    """softmax over n experts of the given logits (others 0), scaled as the RMS norm scales them."""
    z = [logits.get(i, 0.0) / math.sqrt(1 + eps) for i in range(n)]
    top = max(z)
    w = [math.exp(v - top) for v in z]
    return [v / sum(w) for v in w]


def entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def recorded(variant: str = "routed", groups=None, num_groups: int = 1):
    model, eps = known_model(variant)
    recorder = RoutingRecorder(model, num_groups=num_groups)
    batch = {"input_ids": IDS, "attention_mask": MASK}
    if groups is not None:
        batch["groups"] = torch.tensor(groups)
    recorder.run(model, [batch], progress=False)
    return recorder, eps


# ---------------------------------------------------------------------- base routing, every variant
@pytest.mark.parametrize("variant", ["routed", "embedded", "dense", "single"])
def test_base_routing_counts_are_exact_for_every_variant(variant):
    recorder, _ = recorded(variant)
    stats = recorder.layer_stats()
    layer0, layer1 = stats["0"]["base"], stats["1"]["base"]
    assert layer0["tokens"] == layer1["tokens"] == 6  # padding left out
    # layer 0: 10 -> {0, 1}, 11 -> {2, 3}, 12 -> {0, 4}; the padding's {6, 7} must not count
    assert layer0["counts"] == [4, 2, 2, 2, 2, 0, 0, 0]
    assert layer0["dead_experts"] == [5, 6, 7] and layer0["num_dead"] == 3
    assert layer0["utilisation"] == pytest.approx([4 / 12, 2 / 12, 2 / 12, 2 / 12, 2 / 12, 0, 0, 0])
    assert layer0["load"] == pytest.approx([4 / 6, 2 / 6, 2 / 6, 2 / 6, 2 / 6, 0, 0, 0])
    # layer 1: every token -> {5, 7}
    assert layer1["counts"] == [0, 0, 0, 0, 0, 6, 0, 6]
    assert layer1["dead_experts"] == [0, 1, 2, 3, 4, 6]
    assert layer1["utilisation_entropy"] == pytest.approx(math.log(2) / math.log(8))
    expected = {"routed": "router", "embedded": "base", "dense": "none", "single": "none"}[variant]
    assert stats["0"]["adapter_routing"] == expected
    assert (stats["0"]["adapter"] is not None) == (variant == "routed")


def test_entropies_balance_and_topk_weights_match_hand_computation():
    recorder, eps = recorded()
    for layer in (0, 1):
        got = recorder.layer_stats()[str(layer)]["base"]
        per_token = [probs_of(BASE_LOGITS[layer][FEATURE[t]], E, eps) for t in TOKENS]
        mean_prob = [sum(p[e] for p in per_token) / 6 for e in range(E)]
        assert got["mean_router_prob"] == pytest.approx(mean_prob, abs=1e-6)
        assert got["token_entropy"] == pytest.approx(sum(entropy(p) for p in per_token) / 6 / math.log(E), abs=1e-6)
        util = [c / 12 for c in got["counts"]]
        assert got["balance_coef"] == pytest.approx(E * sum(u * p for u, p in zip(util, mean_prob)), abs=1e-6)
        assert got["utilisation_entropy"] == pytest.approx(entropy([u for u in util if u]) / math.log(E))
        top2 = [sorted(p, reverse=True)[:2] for p in per_token]  # OLMoE keeps the raw probabilities
        assert got["topk_weight_mean"] == pytest.approx([sum(t[0] for t in top2) / 6, sum(t[1] for t in top2) / 6], abs=1e-6)
        hist = np.asarray(got["topk_weight_hist"])
        assert hist.shape == (2, 21) and hist.sum(1).tolist() == [6, 6]
        for slot in range(2):
            bins = [min(int(t[slot] * 20), 19) for t in top2]
            assert hist[slot].tolist() == np.bincount(bins, minlength=21).tolist()
    # layer 0, by hand: utilisation (1/3, 1/6 x 4) -> entropy / log 8
    layer0 = recorder.layer_stats()["0"]["base"]
    assert layer0["utilisation_entropy"] == pytest.approx(
        -(1 / 3 * math.log(1 / 3) + 4 / 6 * math.log(1 / 6)) / math.log(8)
    )
    assert layer0["max_utilisation_ratio"] == pytest.approx(8 / 3)


def test_adapter_routing_cooccurrence_and_mutual_information():
    recorder, eps = recorded()
    stats = recorder.layer_stats()
    for layer in ("0", "1"):
        adapter = stats[layer]["adapter"]
        assert adapter["counts"] == [4, 2, 0, 0]  # 10, 12 -> adapter 0; 11 -> adapter 1; padding (-> 3) left out
        assert adapter["dead_experts"] == [2, 3]
        per_token = [probs_of(ADAPTER_LOGITS[FEATURE[t]], 4, eps) for t in TOKENS]
        mean_prob = [sum(p[e] for p in per_token) / 6 for e in range(4)]
        assert adapter["balance_coef"] == pytest.approx(4 * (4 / 6 * mean_prob[0] + 2 / 6 * mean_prob[1]), abs=1e-6)
        assert adapter["topk_weight_mean"] == pytest.approx([sum(max(p) for p in per_token) / 6], abs=1e-6)
    # layer 0: adapter 0 <-> base {0, 1} (token 10) and {0, 4} (token 12); adapter 1 <-> base {2, 3}
    co0 = stats["0"]["cooccurrence"]
    assert co0["counts"] == [
        [4, 2, 0, 0, 2, 0, 0, 0],
        [0, 0, 2, 2, 0, 0, 0, 0],
        [0] * 8,
        [0] * 8,
    ]
    # the base choice determines the adapter choice: MI = H(adapter) = H(2/3, 1/3)
    h_adapter = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert co0["mutual_information"] == pytest.approx(h_adapter)
    assert co0["normalized_mutual_information"] == pytest.approx(1.0)
    assert co0["p_base_given_adapter"][0] == pytest.approx([0.5, 0.25, 0, 0, 0.25, 0, 0, 0])
    # layer 1: every token reaches base {5, 7} whatever the adapter picks: independent, MI = 0
    co1 = stats["1"]["cooccurrence"]
    assert co1["counts"][0][5] == co1["counts"][0][7] == 4 and co1["counts"][1][5] == co1["counts"][1][7] == 2
    assert co1["mutual_information"] == pytest.approx(0.0, abs=1e-12)


def test_statistics_split_by_group():
    recorder, _ = recorded(groups=[0, 1], num_groups=2)
    stats = recorder.layer_stats(["a", "b"])
    groups = stats["0"]["base"]["groups"]
    assert groups["a"]["counts"] == [3, 2, 1, 1, 1, 0, 0, 0]  # tokens 10, 10, 11, 12
    assert groups["b"]["counts"] == [1, 0, 1, 1, 1, 0, 0, 0]  # tokens 11, 12 (padding left out)
    assert stats["0"]["base"]["counts"] == [4, 2, 2, 2, 2, 0, 0, 0]
    assert stats["0"]["adapter"]["groups"]["b"]["counts"] == [1, 1, 0, 0]
    assert stats["0"]["cooccurrence"]["groups"]["a"]["counts"][0][0] == 3
    with pytest.raises(PerftError):
        recorder.layer_stats(["only-one-name"])


def test_live_routing_stats_and_training_summary():
    model, _ = known_model()
    with pytest.raises(PerftError, match="record_routing"):
        model.routing_stats()
    record_routing(model)
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    stats = model.routing_stats()
    assert set(stats) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert stats["model.layers.0.mlp"]["counts"] == [4, 2, 0, 2]  # no mask given: padding (-> 3) counts
    masked = last_routing_stats(model, MASK)
    assert masked["model.layers.1.mlp"]["counts"] == [4, 2, 0, 0]
    logged = summarize_last_routing(model, MASK)
    assert logged["routing/dead_experts"] == 4.0  # adapters 2 and 3 in both layers
    util = [4 / 6, 2 / 6]
    assert logged["routing/utilisation_entropy"] == pytest.approx(entropy(util) / math.log(4))
    assert set(logged) >= {"routing/balance_coef", "routing/token_entropy", "routing/max_utilisation_ratio"}
    record_routing(model, False)
    assert summarize_last_routing(model) == {}


def test_live_stats_of_embedded_follow_the_base_router():
    model, _ = known_model("embedded")
    record_routing(model)
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    stats = last_routing_stats(model, MASK)
    assert stats["model.layers.0.mlp"]["counts"] == [4, 2, 2, 2, 2, 0, 0, 0]
    assert stats["model.layers.0.mlp"]["variant"] == "embedded"
    dense, _ = known_model("dense")  # no adapter routing: nothing to log, no error in a training loop
    record_routing(dense)
    with torch.no_grad():
        dense(input_ids=IDS, attention_mask=MASK)
    assert dense.routing_stats() == {} and summarize_last_routing(dense) == {}


# ---------------------------------------------------------------------- formulas and edge cases
def test_summary_formulas_on_hand_counts():
    out = routing_summary(counts=np.array([3, 1, 0, 0]), tokens=2, top_k=2,
                          prob_sum=np.array([1.0, 0.6, 0.4, 0.0]), prob_tokens=2, entropy_sum=1.0)
    assert out["utilisation"] == [0.75, 0.25, 0.0, 0.0]
    assert out["load"] == [1.5, 0.5, 0.0, 0.0]
    assert out["balance_coef"] == pytest.approx(4 * (0.75 * 0.5 + 0.25 * 0.3))
    assert out["token_entropy"] == 0.5
    assert out["dead_experts"] == [2, 3]
    empty = routing_summary(counts=np.zeros(4, dtype=np.int64), tokens=0, top_k=2)
    assert empty["utilisation"] is None and empty["utilisation_entropy"] is None and empty["dead_experts"] == []
    mi, h_rows, h_cols = mutual_information(np.array([[1, 0], [0, 1]]))
    assert mi == pytest.approx(math.log(2)) and h_rows == pytest.approx(math.log(2))
    assert mutual_information(np.array([[1, 1], [1, 1]]))[0] == pytest.approx(0.0)


def test_counts_drop_the_other_rank_slot_and_check_shapes():
    counts = RoutingCounts(3, 2)
    counts.update(torch.tensor([[0, 3], [1, 2]]))  # 3 == num_experts: an expert on another rank
    assert counts.summary()["counts"] == [1, 1, 1]
    co = CoOccurrence(2, 3)
    co.update(torch.tensor([[1], [0]]), torch.tensor([[2, 3], [0, 1]]))
    assert co.summary()["counts"] == [[1, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError):
        counts.update(torch.tensor([[0, 1]]), mask=torch.tensor([1, 1]))


# ---------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_recorder_on_every_architecture(arch):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    model = get_perft_model(base, PerftConfig(variant="routed", num_experts=3, top_k=2, rank=2, dropout=0.0))
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    recorder = RoutingRecorder(model)
    recorder.run(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    stats = recorder.layer_stats()
    assert len(stats) == len(model.perft_layers) and all(e["path"] in model.perft_layers for e in stats.values())
    tokens = int(mask.sum())
    for entry in stats.values():
        k = entry["base"]["top_k"]
        assert entry["base"]["tokens"] == tokens and sum(entry["base"]["counts"]) == tokens * k
        assert sum(entry["adapter"]["counts"]) == tokens * 2
        assert entry["cooccurrence"]["pairs"] == tokens * 2 * k
        assert 0.0 <= entry["base"]["token_entropy"] <= 1.0


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_key_memory_rows_are_the_up_projection(arch):
    """x @ rows.T must equal the 'up' half of the experts' fused gate/up output."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch))
    experts = base.model.layers[0].mlp.experts
    x = torch.randn(5, D)
    rows = up_projection_rows(experts, D)  # [E, I, d]
    for e in range(rows.shape[0]):
        if arch == "gpt_oss":  # [d, 2I], gate/up interleaved
            up = (x @ experts.gate_up_proj[e])[:, 1::2]
        else:  # [2I, d], [gate; up]
            up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)[1]
        torch.testing.assert_close(x @ rows[e].T, up)
    block = [b for b in RoutingRecorder(base).records][0].block
    keys, ids = base_key_vectors(block, per_expert=3, seed=1)
    assert keys.shape == (rows.shape[0] * 3, D) and ids.tolist() == np.repeat(np.arange(rows.shape[0]), 3).tolist()
    assert any(np.allclose(keys[0], r) for r in rows[0].detach().numpy())


def test_streaming_in_batches_equals_one_pass():
    """Accumulating batch by batch (with masks and groups) gives the one-pass numbers."""
    g = torch.Generator().manual_seed(3)
    tokens, experts, k = 50, 6, 2
    probs = torch.softmax(torch.randn(tokens, experts, generator=g) * 2, -1)
    weights, index = probs.topk(k, dim=-1)
    mask = torch.rand(tokens, generator=g) > 0.2
    groups = torch.randint(0, 3, (tokens,), generator=g)
    adapter_index = torch.randint(0, 4, (tokens, 1), generator=g)
    whole, parts = RoutingCounts(experts, k, num_groups=3), RoutingCounts(experts, k, num_groups=3)
    co_whole, co_parts = CoOccurrence(4, experts, num_groups=3), CoOccurrence(4, experts, num_groups=3)
    whole.update(index, weights=weights, probs=probs, mask=mask, groups=groups)
    co_whole.update(adapter_index, index, mask=mask, groups=groups)
    for lo, hi in ((0, 7), (7, 31), (31, 50)):
        parts.update(index[lo:hi], weights=weights[lo:hi], probs=probs[lo:hi], mask=mask[lo:hi], groups=groups[lo:hi])
        co_parts.update(adapter_index[lo:hi], index[lo:hi], mask=mask[lo:hi], groups=groups[lo:hi])
    for group in (None, 0, 1, 2):
        a, b = whole.summary(group), parts.summary(group)
        assert a["counts"] == b["counts"] and a["topk_weight_hist"] == b["topk_weight_hist"]
        assert a["balance_coef"] == pytest.approx(b["balance_coef"]) and a["token_entropy"] == pytest.approx(b["token_entropy"])
        assert co_whole.summary(group)["counts"] == co_parts.summary(group)["counts"]
    # against a direct count of the kept tokens
    kept = index[mask]
    assert whole.summary()["counts"] == np.bincount(kept.reshape(-1).numpy(), minlength=experts).tolist()
    in_group1 = index[mask & (groups == 1)]
    assert whole.summary(1)["tokens"] == in_group1.shape[0]
    assert whole.summary(1)["counts"] == np.bincount(in_group1.reshape(-1).numpy(), minlength=experts).tolist()
