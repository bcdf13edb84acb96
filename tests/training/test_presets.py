"""What each paper-scale preset in configs/ trains, counted on meta-device models of OLMoE-1B-7B and
Mixtral-8x7B built from their published config fields (no weights, no download).

Run with `-s` to see the table. ESFT's count depends on the data (which experts it selects); it
is printed for two stated assumptions: uniform routing (every expert's share 1/E, so the
selection keeps the fewest experts reaching top-p: ceil(top_p * E) of them) and the upper bound
of every expert trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perft.arch import require_moe_blocks
from perft.esft import fused_expert_tensors, select_experts
from perft.methods import get_method
from perft.training import TrainingConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Published config fields (the models' config.json on the hub).
PUBLISHED = {
    "olmoe": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                  vocab_size=50304, max_position_embeddings=4096, norm_topk_prob=False, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000, max_position_embeddings=32768, tie_word_embeddings=False),
}
TOTAL = {"olmoe": 6_919_161_856, "mixtral": 46_702_792_704}  # the models' published sizes (6.9B, 46.7B)

# (preset, trainable parameters): PERFT/LoRA counts exact; ESFT under uniform routing.
EXPECTED = {
    "olmoe-commonsense-perft-r": 16 * 4 * (2 * 2048 * 16 + 2048),  # 4,325,376
    "olmoe-commonsense-perft-e": 67_108_864,  # 16 x 64 x 2 x 2048 x 16
    "olmoe-commonsense-perft-s": 1_048_576,
    "olmoe-commonsense-perft-d": 4_194_304,
    "olmoe-commonsense-lora": 2_097_152,  # 16 x 2 x 2 x 2048 x 16
    "olmoe-commonsense-perft-r-lora-attn": 16 * 4 * (2 * 2048 * 16 + 2048) + 2_097_152,
    "olmoe-commonsense-esft-gate": 16 * 7 * 3 * 2048 * 1024,  # ceil(0.1 x 64) = 7 experts per layer
    "olmoe-commonsense-esft-token": 16 * 13 * 3 * 2048 * 1024,  # ceil(0.2 x 64) = 13
    "mixtral-commonsense-perft-r": 32 * 8 * (2 * 4096 * 8 + 4096),
    "mixtral-commonsense-perft-s": 32 * 2 * 4096 * 16,
    "mixtral-commonsense-perft-d": 32 * 4 * 2 * 4096 * 16,
    "mixtral-commonsense-perft-e": 32 * 8 * 2 * 4096 * 8,
    "mixtral-commonsense-lora": 32 * (8 * (4096 + 4096) + 8 * (4096 + 1024)),  # v_proj: 8 KV heads x 128
    "mixtral-commonsense-perft-r-lora-attn": 32 * 8 * (2 * 4096 * 8 + 4096) + 32 * 8 * (8192 + 5120),
    "mixtral-commonsense-esft-gate": 32 * 1 * 3 * 4096 * 14336,  # ceil(0.1 x 8) = 1 expert per layer
    "mixtral-commonsense-esft-token": 32 * 2 * 3 * 4096 * 14336,  # ceil(0.2 x 8) = 2
}


def meta_model(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(PUBLISHED[family])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def esft_counts(model: torch.nn.Module, top_p: float) -> tuple[int, int]:
    """(uniform-routing selection, every expert) trainable weights of ESFT on `model`."""
    uniform = full = 0
    for block in require_moe_blocks(model):
        per_expert = sum(getattr(block.experts, n)[0].numel() for n in fused_expert_tensors(block))
        uniform += per_expert * len(select_experts([1 / block.num_experts] * block.num_experts, top_p))
        full += per_expert * block.num_experts
    return uniform, full


def preset_count(path: Path) -> tuple[int, str]:
    cfg = TrainingConfig.from_yaml(path)
    family = path.name.split("-")[0]
    model = meta_model(family)
    if cfg.method.startswith("esft"):
        uniform, full = esft_counts(model, cfg.esft_top_p)
        return uniform, f"uniform routing; every expert: {full:,d}"
    torch.manual_seed(0)
    built = get_method(cfg.method).build(model, cfg)
    return get_method(cfg.method).parameter_count(built)[0], "exact"


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_meta_models_have_the_published_sizes(family):
    assert sum(p.numel() for p in meta_model(family).parameters()) == TOTAL[family]


def test_every_preset_count_printed_and_pinned(capsys):
    rows = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        if "-math-" in path.name:
            continue  # the math presets train what the commonsense ones do (same method settings)
        count, how = preset_count(path)
        family = path.name.split("-")[0]
        rows.append(f"{path.stem:<40} {count:>15,d}  {100 * count / TOTAL[family]:8.4f}%  ({how})")
        if path.stem in EXPECTED:
            assert count == EXPECTED[path.stem], path.name
    with capsys.disabled():
        print("\npreset                                   trainable params  of base")
        print("\n".join(rows))
    assert len(rows) == len(list(CONFIGS.glob("*-commonsense-*.yaml")))


def test_math_presets_train_what_the_commonsense_ones_do():
    method_keys = ("method", "variant", "adapter", "num_experts", "top_k", "rank", "alpha", "lora_attn_rank",
                   "esft_top_p", "esft_sample_tokens")
    for path in sorted(CONFIGS.glob("*-math-*.yaml")):
        twin = path.with_name(path.name.replace("-math-", "-commonsense-"))
        a, b = TrainingConfig.from_yaml(path).to_dict(), TrainingConfig.from_yaml(twin).to_dict()
        assert {k: a[k] for k in method_keys} == {k: b[k] for k in method_keys}, path.name
