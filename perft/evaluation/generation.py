"""Batched, left-padded, deterministic generation for the paper's protocol.

Works with any HF-like causal LM (a `transformers` model, a `PerftModel`, a `PeftModel`):
it needs `generate(input_ids=..., attention_mask=..., **kwargs)` and parameters to find
the device on.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from perft.errors import PerftError

PAPER_NUM_BEAMS = 4


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode: the paper's deterministic 4-beam search, or greedy search."""

    num_beams: int = PAPER_NUM_BEAMS
    greedy: bool = False

    @property
    def beams(self) -> int:
        return 1 if self.greedy else self.num_beams

    def describe(self) -> str:
        return "greedy search" if self.beams == 1 else f"{self.beams}-beam search"


def model_device(model: Any) -> torch.device:
    """The device of the model's inputs (its first parameter's device when it has no `.device`)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def ensure_pad_token(tokenizer: Any) -> None:
    """Batched inference needs a pad token; a tokenizer without one pads with its EOS token."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise PerftError("the tokenizer has neither a pad nor an EOS token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token


@contextmanager
def padding_side(tokenizer: Any, side: str):
    """Temporarily pad on `side` (generation pads left, so that every row ends at the prompt's end)."""
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


def _generation_kwargs(tokenizer: Any, max_new_tokens: int, decoding: DecodingSettings) -> dict[str, Any]:
    # Stated explicitly so a model's own generation_config (sampling, penalties) cannot change
    # the protocol: deterministic beam search, the paper's defaults for everything else.
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": decoding.beams,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if decoding.beams > 1:
        kwargs["early_stopping"] = False
        kwargs["length_penalty"] = 1.0
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return kwargs


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    decoding: DecodingSettings = DecodingSettings(),
) -> list[str]:
    """Generate a continuation of each prompt in one left-padded batch; return only the new text.

    The new text is cut from the decoded whole sequence (prompt + new tokens), so that
    tokenizers which drop a word's leading space when a piece is decoded alone (SentencePiece)
    still give "is true", not "istrue".
    """
    if not prompts:
        return []
    ensure_pad_token(tokenizer)
    with padding_side(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = model_device(model)
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **_generation_kwargs(tokenizer, max_new_tokens, decoding),
        )
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    sequences = out.sequences if hasattr(out, "sequences") else out
    width = input_ids.shape[1]
    texts: list[str] = []
    for row in range(len(prompts)):
        prompt_ids = input_ids[row][attention_mask[row].bool()].tolist()
        new_ids = sequences[row, width:].tolist()
        # Everything after the first EOS (or padding) is not part of the generation.
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
        prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full_text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full_text.startswith(prompt_text):
            texts.append(full_text[len(prompt_text):])
        else:
            texts.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return texts
