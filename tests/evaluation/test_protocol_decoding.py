"""What reaches `generate` under the paper's protocol: 4 beams, no sampling, the documented budgets.

A spy replaces transformers' `generate` (recording its arguments and answering EOS at once), so
the test pins the decoding settings themselves, which no accuracy test would notice changing.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.utils import GenerationMixin

from perft.cli import main
from perft.data.prompts import build_prompt
from tests.helpers.evaluation import boolq_records, make_model, make_tokenizer, math_records, write_task


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    boolq, math = boolq_records(3, seed=1), math_records(3, seed=1)
    write_task(root / "dataset", "boolq", boolq)
    write_task(root / "dataset", "gsm8k", math)
    write_task(root / "dataset", "AQuA", [{"instruction": "Pick one. Answer Choices: (A) 1 (B) 2", "answer": "B"}])
    tokenizer = make_tokenizer(root / "model", [r["instruction"] + " " + r["output"] for r in boolq + math])
    make_model(root / "model", len(tokenizer), seed=5)
    return {"root": root, "boolq": boolq, "math": math}


@pytest.fixture()
def calls(monkeypatch):
    seen: list[dict] = []

    def spy(self, input_ids=None, attention_mask=None, **kwargs):
        seen.append({"input_ids": input_ids, **kwargs})
        eos = torch.full((input_ids.shape[0], 1), kwargs["eos_token_id"], dtype=input_ids.dtype)
        return torch.cat([input_ids, eos], dim=1)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return seen


def decoding(call: dict) -> dict:
    return {k: call.get(k) for k in ("num_beams", "do_sample", "max_new_tokens", "num_return_sequences",
                                     "repetition_penalty", "length_penalty", "no_repeat_ngram_size")}


PAPER = {"num_beams": 4, "do_sample": False, "num_return_sequences": 1, "repetition_penalty": 1.0,
         "length_penalty": 1.0, "no_repeat_ngram_size": 0}


def test_perft_eval_default_is_the_papers_decoding_for_every_task_family(world, calls, tmp_path, capsys):
    code = main(["eval", "--model", str(world["root"] / "model"), "--tasks", "boolq,gsm8k,AQuA",
                 "--data-dir", str(world["root"] / "dataset"), "--output", str(tmp_path / "eval"),
                 "--batch-size", "8", "--no-progress"])
    assert code == 0
    assert len(calls) == 3  # one batch per task, in the order given
    assert [decoding(c) for c in calls] == [{**PAPER, "max_new_tokens": n} for n in (4, 256, 256)]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "boolq.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [
        build_prompt(r["instruction"], r["input"]) + "the correct answer is" for r in world["boolq"]
    ]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "gsm8k.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [build_prompt(r["instruction"], r["input"]) for r in world["math"]]
    printed = capsys.readouterr().out
    assert "4-beam search" in printed and "new tokens: 4 (boolq), 256 (gsm8k, AQuA)" in printed
    assert "(the paper's protocol)" in printed


def test_greedy_and_budget_overrides_reach_generate_and_are_labelled(world, calls, tmp_path, capsys):
    code = main(["eval", "--model", str(world["root"] / "model"), "--tasks", "boolq",
                 "--data-dir", str(world["root"] / "dataset"), "--output", str(tmp_path / "eval"),
                 "--greedy", "--max-new-tokens", "7", "--no-progress"])
    assert code == 0
    assert decoding(calls[0])["num_beams"] == 1 and calls[0]["max_new_tokens"] == 7
    assert calls[0]["do_sample"] is False
    assert "(differs from the paper's protocol)" in capsys.readouterr().out
