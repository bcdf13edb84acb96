"""Local tiny models, tokenizers and test files for the evaluation tests (nothing is downloaded)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from perft.data.prompts import build_prompt

TEMPLATE_TEXTS = [
    build_prompt("Please answer the question with true or false.", output="the correct answer is true"),
    build_prompt("How many apples are left?", input="Some context.", output="The answer is 12"),
    "Answer format: true/false option1/option2 solution1/solution2 answer1/answer2/answer3 ending1",
    "the correct answer is false the correct answer is option1 the correct answer is option2",
    " ".join(str(i) for i in range(50)),
]

COLOURS_A = ["red", "orange", "yellow", "pink"]
COLOURS_B = ["blue", "green", "purple", "grey"]
FILLER = ["tree", "house", "river", "stone", "cloud", "bird", "chair", "road", "lamp", "book", "cup", "door"]


def make_tokenizer(directory: Path, texts: list[str] | None = None, vocab_size: int = 400) -> Any:
    """A byte-level BPE (exact decode round-trip) with <pad>, <s>, </s>, saved and loaded back."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (texts or []) + TEMPLATE_TEXTS * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def make_model(directory: Path, vocab_size: int, *, arch: str = "olmoe", seed: int = 0, hidden: int = 64) -> Any:
    """A tiny randomly initialised causal LM, saved with save_pretrained and loaded back."""
    from transformers import LlamaConfig, OlmoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if arch == "olmoe":
        config = OlmoeConfig(**common, intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    else:
        config = LlamaConfig(**common, intermediate_size=128)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    model.eval()
    return model


def write_task(data_dir: Path, name: str, records: list[Any], sidecar: dict | None = None) -> Path:
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    if sidecar is not None:
        (folder / "task.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return folder / "test.json"


def boolq_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        answer = rng.choice(["true", "false"])
        question = f"is the {rng.choice(FILLER)} number {i} near the {rng.choice(FILLER)}?"
        out.append({
            "instruction": f"Please answer the following question with true or false, question: {question}\n\n"
                           "Answer format: true/false",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        })
    return out


def math_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append({"instruction": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                    "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}", "answer": str(a + b)})
    return out


def keyword_records(n: int, seed: int) -> list[dict[str, str]]:
    """A trivially learnable two-way task: a warm colour word means option1, a cold one option2."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        warm = rng.random() < 0.5
        colour = rng.choice(COLOURS_A if warm else COLOURS_B)
        words = rng.sample(FILLER, 4)
        words.insert(rng.randint(0, 4), colour)
        answer = "option1" if warm else "option2"
        out.append({
            "instruction": "Please choose the correct answer to fill in the blank: " + " ".join(words)
                           + "\n\nOption1: warm Option2: cold\n\nAnswer format: option1/option2",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        })
    return out
