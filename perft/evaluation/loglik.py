"""Log-likelihood multiple-choice scoring: each option's log-probability after the prompt.

This does not depend on the model following the output format: the prediction is the
option the model finds most likely, either by total log-probability ("acc") or by
log-probability per character of the option ("acc_norm", lm-evaluation-harness's
convention, independent of the tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from perft.errors import PerftError
from perft.evaluation.generation import ensure_pad_token, model_device


@dataclass(frozen=True)
class ContinuationScore:
    """Log-probability of a continuation given its context."""

    logprob: float
    num_tokens: int
    is_greedy: bool


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split so the continuation is tokenized in context.

    The whole text is encoded once and cut at the context's length, so a continuation token
    that a tokenizer merges with its leading space (" true") is the one scored; when the
    context's encoding is not a prefix of the whole (a tokenizer that appends a special
    token), the continuation is encoded on its own.
    """
    if not context:
        raise PerftError("log-likelihood scoring needs a non-empty context")
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise PerftError(f"the continuation {continuation!r} encodes to no tokens")
    return ctx, cont


@torch.no_grad()
def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
) -> list[ContinuationScore]:
    """Score every (context, continuation) pair with right-padded batched forward passes."""
    ensure_pad_token(tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    device = model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results: list[ContinuationScore | None] = [None] * len(encoded)
    try:
        for start in range(0, len(order), max(1, batch_size)):
            batch = order[start : start + batch_size]
            seqs = [(encoded[i][0] + encoded[i][1])[:-1] for i in batch]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, : len(seq)] = 1
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            logits = out.logits if hasattr(out, "logits") else out[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                ctx, cont = encoded[i]
                end = len(ctx) + len(cont) - 1  # positions ctx_len-1 .. end-1 predict the continuation
                span = logprobs[row, len(ctx) - 1 : end]
                target = torch.tensor(cont, device=span.device).unsqueeze(-1)
                token_lp = span.gather(-1, target).squeeze(-1)
                greedy = bool((span.argmax(-1) == target.squeeze(-1)).all())
                results[i] = ContinuationScore(float(token_lp.sum()), len(cont), greedy)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return [r for r in results if r is not None]


def choice_continuation(prefill: str, choice: str) -> str:
    """The text scored for one option: after a pre-fill the option follows a space."""
    return f" {choice}" if prefill else choice


def pick(scores: Sequence[float]) -> int:
    """Index of the best score; ties go to the first option (deterministic)."""
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best


def rank_choices(choices: Sequence[str], scores: Sequence[ContinuationScore]) -> tuple[int, int]:
    """The chosen option by total log-probability and by log-probability per character."""
    plain = [s.logprob for s in scores]
    norm = [s.logprob / max(1, len(c)) for s, c in zip(scores, choices)]
    return pick(plain), pick(norm)
