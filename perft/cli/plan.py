"""`perft plan`: parameter counts and memory per device of a fine-tuning run, from config.json alone.

    perft plan --model allenai/OLMoE-1B-7B-0924 --variant routed --num-experts 4 --top-k 2 --rank 16
    perft plan --config configs/mixtral-commonsense-perft-r.yaml --gpus 4 --strategy fsdp
    perft plan --model DIR --config configs/mixtral-commonsense-perft-r.yaml --load-in-4bit

The method flags are `perft train`'s own (same names, same defaults, a YAML config works too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

# The `perft train` settings that change what the plan says.
PLAN_FIELDS = {"model", "config", "model_dtype", "trust_remote_code", "cutoff_len", "batch_size", "micro_batch_size",
               "bf16", "strategy", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type"}


def register(subparsers: Any) -> None:
    from perft.cli.train import add_config_flags
    from perft.training.args import TrainingConfig

    parser = subparsers.add_parser(
        "plan",
        help="parameter counts and memory per device of a run, before renting hardware",
        description="Build the model from its config.json on the meta device (no weights are read), attach the "
        "method and print exact parameter counts and per-device memory (exact or estimated, each figure says "
        "which). Same method flags as `perft train`. See README.md, 'Scaling up'.",
        argument_default=argparse.SUPPRESS,
    )
    method_fields = {f.name for f in dataclasses.fields(TrainingConfig) if f.metadata.get("group") == "method"}
    add_config_flags(parser, PLAN_FIELDS | method_fields)
    layout = parser.add_argument_group("layout")
    layout.add_argument("--gpus", type=int, default=1, help="devices (processes) of the run (default: 1)")
    layout.add_argument("--json", dest="json_out", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def _check_positive(name: str, value: Any, minimum: int) -> None:
    from perft.errors import PerftError

    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PerftError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")


def run(args: argparse.Namespace) -> int:
    from perft.cli.train import config_from_args
    from perft.errors import PerftError
    from perft.planning import format_plan, load_model_config, plan_memory

    gpus = getattr(args, "gpus", 1)
    settings = config_from_args(args)
    if not settings.model:
        raise PerftError("no --model given: a model directory or hub name (only its config.json is read)")
    _check_positive("gpus", gpus, 1)
    _check_positive("cutoff_len", settings.cutoff_len, 2)
    _check_positive("batch_size", settings.batch_size, 1)
    if settings.micro_batch_size is not None:
        _check_positive("micro_batch_size", settings.micro_batch_size, 1)
    if settings.method == "perft":
        settings.perft_config()  # PerftConfig's own checks, with its messages
    config = load_model_config(str(settings.model), trust_remote_code=settings.trust_remote_code)
    plan = plan_memory(config, settings, gpus=gpus)
    print(json.dumps(plan.to_dict(), indent=1) if getattr(args, "json_out", False) else format_plan(plan))
    return 0
