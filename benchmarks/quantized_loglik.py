"""How far quantizing the experts moves the embedded tiny model's log-likelihood of the shipped test sets.

    python benchmarks/quantized_loglik.py

Scores each test record's reference response given its prompt (the training template) with
the fp32 base and with its fused experts stored in int8, NF4 and FP4 (attention, embeddings
and routers stay fp32), and prints the mean log-likelihood per response token and the change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "perft" / "assets"
BASES = {"fp32": {}, "int8": {"load_in_8bit": True}, "nf4": {"load_in_4bit": True},
         "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}}
SUITES = ("tiny_commonsense", "tiny_math")


def mean_token_loglik(model, tokenizer, records: list[dict]) -> float:
    from perft.data.prompts import build_prompt
    from perft.evaluation.loglik import score_continuations

    pairs = [(build_prompt(r["instruction"], r.get("input") or None), r["output"]) for r in records]
    with torch.no_grad():
        scores = score_continuations(model, tokenizer, pairs, batch_size=48)
    return sum(s.logprob for s in scores) / sum(s.num_tokens for s in scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from perft.loading import load_base_model, load_tokenizer

    model_dir = str(ASSETS / "tiny-olmoe")
    tokenizer = load_tokenizer(model_dir)
    data = {s: json.loads((ASSETS / "tasks" / "dataset" / s / "test.json").read_text()) for s in SUITES}
    results = {}
    for name, flags in BASES.items():
        model = load_base_model(model_dir, dtype="float32", **flags).eval()
        results[name] = {s: mean_token_loglik(model, tokenizer, records) for s, records in data.items()}
    print("mean log-likelihood per response token (nats) of the shipped test sets, tiny-olmoe base\n")
    print("| experts | " + " | ".join(f"{s} | change" for s in SUITES) + " |")
    print("|---|" + "---|---|" * len(SUITES))
    for name, row in results.items():
        cells = [f"{row[s]:.4f} | {row[s] - results['fp32'][s]:+.4f}" for s in SUITES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
