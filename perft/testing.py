"""Tiny MoE checkpoints and tokenizers for tests and examples, built locally (no downloads).

Each builder returns a transformers config small enough to run in milliseconds on a CPU;
`save_tiny_model` writes it with `save_pretrained` so tests load it back through the same
`from_pretrained` path a user takes with a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 128


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A tiny config of one supported MoE architecture (olmoe, mixtral, qwen2_moe, qwen3_moe, deepseek_v3, gpt_oss)."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=16, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=16, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=32, moe_intermediate_size=16, num_key_value_heads=2,
                                shared_expert_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=16, num_key_value_heads=2,
                                head_dim=8, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
                                mlp_only_layers=[], norm_topk_prob=True)
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**common, "num_hidden_layers": 3}, intermediate_size=32, moe_intermediate_size=16,
                                  num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                  topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                  routed_scaling_factor=2.5, norm_topk_prob=True)
    elif arch == "gpt_oss":
        cfg = tf.GptOssConfig(**common, intermediate_size=16, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=16)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


TINY_ARCHITECTURES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


def save_tiny_model(arch: str, directory: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Build a randomly initialised tiny model of `arch` and `save_pretrained` it (safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    _spread_router_bias(model)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def _spread_router_bias(model: torch.nn.Module) -> None:
    """Give DeepSeek-style correction biases non-zero values so tests exercise them."""
    generator = torch.Generator().manual_seed(1)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.1)


def save_tiny_tokenizer(directory: str | Path, texts: list[str] | None = None, vocab_size: int = TINY_VOCAB) -> Path:
    """A small word-level tokenizer (pad=0, bos=1, eos=2, unk=3) saved with `save_pretrained`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 ### Instruction: Response:"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    directory = Path(directory)
    fast.save_pretrained(directory)
    return directory
