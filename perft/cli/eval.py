"""`perft eval`: the paper's benchmarks under its protocol, log-likelihood scoring, lm-eval tasks.

Every input is checked (task names, test files, records, the output folder, the adapter's
base model, lm-eval task names) before the model is loaded, so a typo costs seconds, not a
model load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from perft.cli.device import check_device
from perft.data.prompts import PROMPT_STYLES
from perft.errors import PerftError
from perft.quantization import add_quantization_arguments, quantization_kwargs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model (+ PERFT adapter) on the paper's benchmarks or lm-eval tasks",
        description=(
            "Evaluate on LLM-Adapters test files (dataset/<task>/test.json) with the paper's protocol "
            "(training prompt, 'the correct answer is' pre-fill, 4-beam search, rule-based extraction) or "
            "option log-likelihoods; or on lm-evaluation-harness tasks. See docs/evaluation.md."
        ),
    )
    parser.add_argument("--model", help="base model: a local folder or a hub name")
    parser.add_argument("--adapter", help="PERFT adapter folder, or a `perft train` run folder (its adapter/ is used); "
                        "omit to evaluate the base model")
    parser.add_argument("--tasks", default="", help="comma-separated tasks, e.g. boolq,piqa or gsm8k,AQuA")
    parser.add_argument("--data-dir", default="dataset", help="folder holding <task>/test.json (default: dataset)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", help="folder for per-sample JSONL, summary.json and table.txt (resumable)")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="if --output holds files perft did not write, move that folder aside first")
    parser.add_argument("--protocol", choices=("generate", "loglik"), default="generate",
                        help="generate: the paper's protocol (default); loglik: option log-likelihoods")
    parser.add_argument("--num-beams", type=int, default=4, help="beam width (default 4, as the paper)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override the per-task budget (paper: 4 commonsense, 256 arithmetic)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples per task")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="clean",
                        help="prompt template: clean (default, as perft train's default) or released (the released "
                        "evaluation script's exact strings, for adapters trained with the released code)")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="print finished runs side by side and exit")
    parser.add_argument("--lm-eval-tasks", default="", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--lm-eval-include", action="append", default=None, metavar="DIR",
                        help="extra folder of lm-eval task YAMLs (repeatable)")
    parser.add_argument("--lm-eval-fewshot", type=int, default=None, help="lm-eval num_fewshot (task default if unset)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    add_quantization_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (perft's, transformers' and lm-eval's)")
    parser.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _where(name_or_path: str) -> str:
    """A local path in absolute form (so `./m` and `m` resume the same run); a hub name as given."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else str(name_or_path)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:

    from perft.loading import load_base_model, load_tokenizer

    model = load_base_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            **quantization_kwargs(args))
    if args.adapter:
        from perft.methods import load_adapted

        model = load_adapted(model, args.adapter)
    device = check_device(args.device)
    if getattr(model, "hf_device_map", None) is None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as err:
            raise PerftError(f"cannot place the model on {device} ({err}); pass another --device") from None
    model.eval()
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    from perft.evaluation.compare import format_comparison

    if args.compare:
        print(format_comparison(args.compare))
        return 0

    from perft.evaluation.generation import DecodingSettings
    from perft.evaluation.runner import EvalSettings, Evaluation, prepare_tasks

    tasks = _split(args.tasks)
    lm_tasks = _split(args.lm_eval_tasks)
    if not args.model:
        raise PerftError("--model is required (a base model folder or hub name), or use --compare RUN ...")
    if not args.output:
        raise PerftError("--output is required: the folder for results (an existing one resumes)")
    if not tasks and not lm_tasks:
        raise PerftError("nothing to evaluate: pass --tasks (e.g. boolq,piqa) and/or --lm-eval-tasks")
    if args.greedy and args.num_beams not in (1, 4):
        raise PerftError("--greedy and --num-beams contradict each other; pass only one of them")

    # ---- every check before the model load
    if args.adapter:
        from perft.evaluation.adapter_dirs import resolve_adapter_dir

        args.adapter = resolve_adapter_dir(args.adapter)
    from perft.output_dir import check_output

    legacy = any((Path(args.output) / name).is_file() for name in ("run.json", "summary.json"))
    check_output(args.output, "eval", overwrite=args.overwrite_output_dir, legacy=legacy)  # before reading it
    evaluation = None
    if tasks:
        settings = EvalSettings(
            protocol=args.protocol,
            decoding=DecodingSettings(num_beams=args.num_beams, greedy=args.greedy),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        loaded = prepare_tasks(tasks, args.data_dir, protocol=args.protocol, max_samples=args.max_samples,
                               prompt_style=args.prompt_style)
        run_info = {"model": _where(args.model), "adapter": _where(args.adapter) if args.adapter else None}
        evaluation = Evaluation(loaded, args.output, settings, run_info=run_info)
    manager = None
    if lm_tasks:
        from perft.evaluation.lm_eval_bridge import check_tasks, manager_for

        manager = manager_for(lm_tasks, args.lm_eval_include)
        lm_tasks = check_tasks(lm_tasks, manager)
    if args.adapter:
        from perft.methods import check_adapter_matches

        check_adapter_matches(args.model, args.adapter, command="perft eval")
    from perft.output_dir import OutputFolder

    check_device(args.device)
    with OutputFolder(args.output, "eval", overwrite=args.overwrite_output_dir, legacy=legacy) as output:
        return _evaluate(args, evaluation, lm_tasks, manager, output)


def _evaluate(args: argparse.Namespace, evaluation: Any, lm_tasks: list[str], manager: Any, output: Any) -> int:
    """The model load and the evaluation itself, in a claimed and locked output folder."""
    if args.no_progress:  # also no "Loading weights" bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from perft.evaluation.runner import format_table

    model, tokenizer = _load(args)
    output.begin()

    if evaluation is not None:
        summary = evaluation.run(model, tokenizer, progress=not args.no_progress)
        table = format_table(summary)
        from perft.io import atomic_write_text

        atomic_write_text(Path(args.output) / "table.txt", table + "\n")
        print(table)
    if lm_tasks:
        from perft.evaluation.lm_eval_bridge import evaluate_with_lm_eval, format_results
        from perft.io import atomic_write_text

        results = evaluate_with_lm_eval(
            model,
            tokenizer,
            lm_tasks,
            include_path=args.lm_eval_include,
            batch_size=args.batch_size,
            limit=args.max_samples,
            num_fewshot=args.lm_eval_fewshot,
            manager=manager,
            progress=not args.no_progress,
        )
        keep = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples") if k in results}
        atomic_write_text(
            Path(args.output) / "lm_eval_results.json", json.dumps(keep, indent=2, default=str) + "\n"
        )
        print("lm-evaluation-harness (its own prompts and metrics):", file=sys.stdout)
        print(format_results(results))
    return 0
