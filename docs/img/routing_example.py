"""Regenerate docs/img/routing-example.png: the key-memory projection of two trained adapters.

    python docs/img/routing_example.py [--steps 150] [--projection umap]

Uses the embedded tiny pretrained OLMoE (`perft.tiny.default_base_model_path()`) and its
shipped `tiny_commonsense` task; trains a PERFT-R (top-2 of 4) and a PERFT-S adapter for a
few steps with a plain loop, then runs the same analysis as `perft analyze` and copies the
projection figure here. With `--random-model` it uses a randomly initialised tiny OLMoE
instead (no pretrained weights needed; the picture then shows untrained geometry).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from perft import PerftConfig, get_perft_model
from perft.analysis import AnalysisOptions, analyze, write_report
from perft.data.prompts import build_prompt
from perft.loading import load_base_model, load_tokenizer

HERE = Path(__file__).resolve().parent


def base_and_data(random_model: bool, work: Path) -> tuple[str, Path, Path]:
    if random_model:
        from perft.testing import save_tiny_model, save_tiny_tokenizer

        words = "the cat dog sat ran on a mat in big red small house yes no true false answer".split()
        save_tiny_model("olmoe", work / "model", hidden_size=64, intermediate_size=64)
        save_tiny_tokenizer(work / "model", [" ".join(words)])
        records = [{"instruction": " ".join(words[i % 7 : i % 7 + 5]), "input": "", "output": words[i % 18],
                    "task": "a" if i % 2 else "b"} for i in range(64)]
        (work / "data.json").write_text(json.dumps(records))
        return str(work / "model"), work / "data.json", work / "data.json"
    from perft.tiny import default_base_model_path, default_task_dir

    task = default_task_dir() / "tiny_commonsense"
    return str(default_base_model_path()), task / "train.json", task / "test.json"


def train(base, tokenizer, records, config: PerftConfig, steps: int, out: Path) -> None:
    torch.manual_seed(0)
    model = get_perft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    texts = [build_prompt(r["instruction"], r.get("input"), r.get("output") or "") for r in records]
    model.train()
    for step in range(steps):
        chunk = [texts[(step * 8 + i) % len(texts)] for i in range(8)]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.save_pretrained(out)
    model.unload()
    base.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--projection", default="umap", choices=("umap", "pca"))
    parser.add_argument("--random-model", action="store_true")
    parser.add_argument("--keep", default=None, help="also keep the full report in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path, train_file, test_file = base_and_data(args.random_model, work)
        base = load_base_model(model_path, dtype="float32")
        tokenizer = load_tokenizer(model_path)
        records = json.loads(Path(train_file).read_text())
        common = dict(rank=8, dropout=0.0)
        train(base, tokenizer, records, PerftConfig(variant="routed", num_experts=4, top_k=2,
                                                    router_aux_loss_coef=0.01, **common), args.steps, work / "PERFT-R")
        train(base, tokenizer, records, PerftConfig(variant="single", **common), args.steps, work / "PERFT-S")
        options = AnalysisOptions(projection=args.projection, max_samples=64, keys_per_expert=32, progress=False)
        result = analyze(base, tokenizer, test_file, [work / "PERFT-R", work / "PERFT-S"], options,
                         model_name=model_path)
        out = Path(args.keep) if args.keep else work / "report"
        written = write_report(result, out)
        shutil.copyfile(written["projection"], HERE / "routing-example.png")
        print(f"wrote {HERE / 'routing-example.png'} from {model_path}")


if __name__ == "__main__":
    main()
