"""A tiny model fine-tuned on a trivially learnable task scores far above chance under both protocols.

The task: a warm colour word somewhere in the question means option1, a cold one option2
(chance: 50%). A random-initialised tiny model is fully fine-tuned on the LLM-Adapters
format for a few seconds, then evaluated exactly as `perft eval` does.
"""

from __future__ import annotations

import random

import torch

from perft.data.prompts import build_prompt
from perft.evaluation import EvalSettings, Evaluation, prepare_tasks, register_task, unregister_task
from perft.evaluation.tasks import TaskSpec
from tests.helpers.evaluation import keyword_records, make_model, make_tokenizer, write_task

TASK = TaskSpec(name="warm_cold_test", answer_type="choice", choices=("option1", "option2"),
                prefill="the correct answer is")


def fine_tune(model, tokenizer, records, steps: int, batch_size: int = 16, lr: float = 3e-3) -> list[float]:
    """Plain causal-LM training on prompt + response; the loss covers the response only, to learn fast."""
    examples = []
    for r in records:
        prompt_ids = tokenizer(build_prompt(r["instruction"]))["input_ids"]
        full = tokenizer(build_prompt(r["instruction"], output=r["output"]))["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + full[len(prompt_ids):]
        examples.append((full, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(0)
    losses = []
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_fine_tuned_model_beats_chance_under_both_protocols(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = keyword_records(400, seed=1), keyword_records(40, seed=2)
    write_task(tmp_path / "dataset", TASK.name, test)
    tokenizer = make_tokenizer(tmp_path / "model", [r["instruction"] + " " + r["output"] for r in train])
    model = make_model(tmp_path / "model", len(tokenizer), arch="olmoe")
    register_task(TASK)
    try:
        before = Evaluation(prepare_tasks([TASK.name], tmp_path / "dataset", protocol="loglik"),
                            tmp_path / "before", EvalSettings(protocol="loglik")).run(model, tokenizer, progress=False)
        losses = fine_tune(model, tokenizer, train, steps=80)
        assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

        results = {}
        for protocol in ("generate", "loglik"):
            tasks = prepare_tasks([TASK.name], tmp_path / "dataset", protocol=protocol)
            summary = Evaluation(tasks, tmp_path / protocol, EvalSettings(protocol=protocol)).run(
                model, tokenizer, progress=False
            )
            results[protocol] = summary["tasks"][TASK.name]
    finally:
        unregister_task(TASK.name)
    # Paper protocol (4-beam search, 4 new tokens after the pre-fill) and option log-likelihoods.
    assert results["generate"]["n"] == 40 and results["generate"]["accuracy"] >= 0.85, results
    assert results["loglik"]["accuracy"] >= 0.85 and results["loglik"]["accuracy_norm"] >= 0.85, results
    # The untrained model was not already that good.
    assert before["tasks"][TASK.name]["accuracy"] < 0.85
