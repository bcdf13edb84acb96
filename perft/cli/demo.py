"""`perft demo`: the embedded default end to end (see perft/demo.py)."""

from __future__ import annotations

import argparse

from perft.comparison import run_all_variants
from perft.demo import DemoConfig, run_demo
from perft.quantization import add_quantization_arguments, quantization_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune PERFT-R on the embedded tiny MoE and compare it with the frozen base",
        description="Evaluate the frozen embedded tiny OLMoE on the shipped suites, fine-tune one PERFT-R "
        "adapter per suite, evaluate each on its suite, print the table and write a loss curve and a "
        "routing picture. "
        "--all-variants runs every method side by side over several seeds (table + plot).",
    )
    parser.add_argument("--output", default="runs/demo", help="where runs, tables and figures go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=None, help="training epochs per suite (default 3)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each suite's training after N optimiser steps")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate only the first N per task")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the numbers depend on it; README.md says when "
                        "the table reproduces)")
    parser.add_argument("--all-variants", action="store_true", help="every method (PERFT-R/E/D/S, LoRA q,v and on the "
                        "experts, ESFT gate/token, the hybrid), each over --seeds")
    parser.add_argument("--seeds", default="0,1,2", help="seeds for --all-variants (comma-separated)")
    parser.add_argument("--jobs", type=int, default=1, help="--all-variants: run this many (method, seed) pairs at "
                        "once, each in its own process with --threads threads (scores do not change; times do)")
    parser.add_argument("--results", default=None, help="markdown file for the --all-variants table "
                        "(e.g. docs/results-tiny.md)")
    parser.add_argument("--no-progress", action="store_true")
    add_quantization_arguments(parser)
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="if --output holds files perft did not write, move that folder aside first")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    cfg = DemoConfig(output=args.output, seed=args.seed, max_eval_samples=args.max_eval_samples, max_steps=args.max_steps,
                     threads=args.threads, progress=not args.no_progress, base_quantization=quantization_kwargs(args))
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.lr is not None:
        cfg.lr = args.lr
    _check_numbers(args)
    from pathlib import Path

    from perft.output_dir import OutputFolder

    legacy = (Path(cfg.output) / "base").is_dir()
    with OutputFolder(cfg.output, "demo", overwrite=args.overwrite_output_dir, legacy=legacy) as output:
        output.begin()
        return _run(args, cfg)


def _check_numbers(args: argparse.Namespace) -> None:
    """Every number a user can pass, before anything is loaded or written."""
    import math

    from perft.errors import PerftError

    if args.epochs is not None and not (math.isfinite(args.epochs) and 0 < args.epochs <= 10_000):
        raise PerftError(f"--epochs must be a number in (0, 10000], got {args.epochs!r}")
    if args.lr is not None and not (math.isfinite(args.lr) and 0 < args.lr <= 10):
        raise PerftError(f"--lr must be a number in (0, 10], got {args.lr!r}")
    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--max-eval-samples", args.max_eval_samples, 1),
                             ("--threads", args.threads, 1), ("--jobs", args.jobs, 1), ("--seed", args.seed, 0)):
        if value is not None and not low <= value <= (2**32 - 1 if flag == "--seed" else 10**9):
            raise PerftError(f"{flag} must be an integer >= {low} (and not absurdly large), got {value!r}")


def _run(args: argparse.Namespace, cfg: DemoConfig) -> int:
    from perft.errors import PerftError

    if args.all_variants:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise PerftError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not seeds:
            raise PerftError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
        run_all_variants(cfg, seeds, args.results, jobs=args.jobs)
    else:
        run_demo(cfg)
    return 0
