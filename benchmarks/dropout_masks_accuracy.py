"""Shared vs per-expert LoRA input-dropout masks: accuracy of PERFT-R on the tiny suites.

The demo's default method (PERFT-R, 4 experts, top-2, r8), trained exactly as `perft demo`
trains it (perft/demo.py `training_config`) but with dropout 0.05 instead of the demo's 0,
once with `dropout_masks=shared` and once with `per_expert`; each adapter is evaluated on its
suite's test split (greedy generation, at most --max-eval-samples per suite). One JSON line
per (masks, seed) is appended to --results as it finishes, so two processes (one per mask
option) can share the file. `--summarise` prints per-seed accuracies and mean +- sd.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropout_masks_accuracy.py --masks shared --seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropout_masks_accuracy.py --masks per_expert --seeds 0 1 2
    .venv/bin/python benchmarks/dropout_masks_accuracy.py --summarise
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from perft.demo import DEFAULT_METHOD, DemoConfig, prepare_inputs, run_method


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", choices=("shared", "per_expert"), default="shared")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--max-eval-samples", type=int, default=120)
    p.add_argument("--output", default="runs/dropout-masks")
    p.add_argument("--results", default="runs/dropout-masks/results.jsonl")
    p.add_argument("--summarise", action="store_true", help="print the table of what --results holds")
    return p.parse_args(argv)


def summarise(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for masks in ("shared", "per_expert"):
        mine = sorted((r for r in rows if r["masks"] == masks), key=lambda r: r["seed"])
        if not mine:
            continue
        print(f"{masks}:")
        for r in mine:
            acc = r["accuracy"]
            print(f"  seed {r['seed']}: commonsense {100 * acc['tiny_commonsense']:.1f}  "
                  f"math {100 * acc['tiny_math']:.1f}  ({r['seconds']:.0f} s)")
        for task in ("tiny_commonsense", "tiny_math", "average"):
            values = [100 * r["accuracy"][task] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"  {task}: {statistics.mean(values):.1f} +- {sd:.1f} (n={len(values)})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = Path(args.results)
    if args.summarise:
        summarise(results)
        return
    cfg = DemoConfig(output=args.output, max_eval_samples=args.max_eval_samples, progress=False,
                     extra={"dropout": args.dropout, "dropout_masks": args.masks})
    base, tasks = prepare_inputs(cfg)
    results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        out = Path(args.output) / f"{args.masks}-seed{seed}"
        result = run_method(DEFAULT_METHOD, base, tasks, out, cfg, seed)
        row = {"masks": args.masks, "seed": seed, "dropout": args.dropout, "accuracy": result.accuracy,
               "seconds": result.seconds, "max_eval_samples": args.max_eval_samples}
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
