"""With the default (released-code) initialisation, PERFT-R at the paper's learning rate learns
as fast as the released code's own init, written here in a few lines of torch; PEFT's
Kaiming-uniform (the old default) moves about a sixth as far in the same budget."""

from __future__ import annotations

import math

import pytest
import torch

from perft import PerftConfig, get_perft_model
from perft.data.collate import PaddingCollator
from perft.data.dataset import prepare_data
from perft.loading import load_tokenizer
from perft.tiny import SHIPPED_TASKS, default_base_model_path

STEPS, BATCH, LR, RANK = 40, 16, 1e-5, 16


@pytest.fixture(scope="module")
def setup():
    path = default_base_model_path()
    tokenizer = load_tokenizer(str(path))
    data = prepare_data(SHIPPED_TASKS / "tiny_commonsense" / "train.json", tokenizer, cutoff_len=96, val_set_size=48,
                        split_seed=0, train_on_inputs=True, max_train_samples=STEPS * BATCH)
    collate = PaddingCollator(tokenizer.pad_token_id)

    def batch(ds, rows):
        rows = ds[list(rows)]
        return collate([{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])])

    train = [batch(data.train, range(s * BATCH, (s + 1) * BATCH)) for s in range(STEPS)]
    val = batch(data.val, range(len(data.val)))
    return path, train, val


def released_init(model, generator: torch.Generator) -> None:
    """The released PERFT code's init (utils.py, init_trainable_parameters), from scratch:
    A ~ N(0, 2/r), B ~ 1e-6 * N(0, 1)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("experts.down"):
                param.copy_(torch.randn(param.shape, generator=generator) * math.sqrt(2.0 / RANK))
            elif name.endswith("experts.up"):
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-6)


def held_out_drop(setup, init: str, reference: bool = False) -> float:
    from transformers import AutoModelForCausalLM

    path, train, val = setup
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path)
    model = get_perft_model(base, PerftConfig(rank=RANK, num_experts=4, top_k=2, dropout=0.0, init=init))
    if reference:
        released_init(model, torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**val).loss.item()

    before = val_loss()
    model.train()
    for b in train:
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before - val_loss()


@pytest.mark.slow
def test_default_init_learns_as_fast_as_the_released_code(setup):
    torch.set_num_threads(1)
    ours = held_out_drop(setup, "normal")
    reference = held_out_drop(setup, "normal", reference=True)
    # Measured: held-out loss falls 1.59 (ours), 1.55 (the released init, other random draws)
    # and 0.26 with PEFT's Kaiming-uniform (init="kaiming", the old default), which fails this.
    assert ours >= 0.9 * reference, (ours, reference)
    assert reference > 1.0  # the reference itself learns: the budget is not too small to tell
