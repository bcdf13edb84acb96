"""`perft train`: fine-tune PERFT adapters (or a LoRA baseline) from a YAML config and/or flags.

    perft train --config configs/olmoe-commonsense-perft-r.yaml
    perft train --model M --data commonsense_170k.json --variant routed --num-experts 4 --top-k 2 ...
    torchrun --nproc-per-node 8 -m perft train --config ...

One flag per `TrainingConfig` field; flags given on the command line override the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from typing import Any

_TYPES: dict[str, Any] = {
    "str": str, "str | None": str, "int": int, "int | None": int, "float": float, "float | None": float,
}


def _bool_or_auto(text: str) -> bool | None:
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    if value in ("auto", "none", "null"):
        return None
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune PERFT adapters on instruction data",
        description="Fine-tune PERFT adapter experts (or a PEFT LoRA baseline) on LLM-Adapters-style data. "
        "Settings come from --config YAML and/or flags (flags win). See docs/training.md.",
        argument_default=argparse.SUPPRESS,
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


def add_config_flags(parser: argparse.ArgumentParser, names: Any = None) -> None:
    """One flag per `TrainingConfig` field (only `names`, when given), as `perft train` has them."""
    from perft.training.args import TrainingConfig

    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingConfig):
        if names is not None and f.name not in names:
            continue
        group_name = f.metadata.get("group", "other")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and f.type != "bool":
            help_text += f" (default: {default})"
        if f.name == "resume":
            group.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", help=help_text)
        elif f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text + f" (default: {default})")
        elif f.type == "bool | None":
            group.add_argument(flag, type=_bool_or_auto, metavar="{true,false,auto}", help=help_text)
        elif f.type == "list[int] | None":
            group.add_argument(flag, type=int, nargs="+", metavar="I", help=help_text)
        else:
            group.add_argument(flag, type=_TYPES[f.type], choices=f.metadata.get("choices"), help=help_text)


def config_from_args(args: argparse.Namespace) -> Any:
    """A `TrainingConfig` from the YAML file (if any) overlaid with the flags actually given."""
    from perft.training.args import TrainingConfig

    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    given = {k: v for k, v in vars(args).items() if k in known}
    path = given.pop("config", None)
    if path:
        return TrainingConfig.from_yaml(path, overrides=given)
    return TrainingConfig.from_dict(given, source="the command line")


def run(args: argparse.Namespace) -> int:
    from perft.training import train

    config = config_from_args(args)
    if config.progress is False:  # also no "Loading weights" bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = train(config)
    if result.status == "interrupted":
        return 128 + int(result.signal or signal.SIGINT)
    return 0

