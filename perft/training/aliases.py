"""transformers' `TrainingArguments` names that users bring to a perft YAML file, read as ours.

A user moving from `transformers.Trainer` writes `learning_rate` or `num_train_epochs`; each
such name is renamed to perft's field with a one-line note, and the names with no one-to-one
field get an error saying what to write instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from perft.errors import PerftError

# transformers' `TrainingArguments` names that users bring to a YAML file, and the field each one
# means here; read as aliases (with a one-line note naming the mapping).
TRANSFORMERS_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "lr_scheduler_type": "lr_scheduler",
    "output_dir": "output",
    "load_best_model_at_end": "load_best_at_end",
    "model_name_or_path": "model",
    "max_seq_length": "cutoff_len",
    "max_length": "cutoff_len",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
}
# transformers' names with no one-to-one field here, and what to write instead.
TRANSFORMERS_INSTEAD = {
    "eval_strategy": "evaluation runs every eval_steps steps: set eval_steps",
    "evaluation_strategy": "evaluation runs every eval_steps steps: set eval_steps",
    "save_strategy": "checkpoints are written every save_steps steps: set save_steps",
    "logging_strategy": "training metrics are logged every logging_steps steps: set logging_steps",
    "fp16": "perft trains in fp32 or with bf16 autocast: set bf16 (auto, true or false)",
    "optim": "perft uses AdamW: set lr, weight_decay, adam_beta1, adam_beta2, adam_epsilon",
    "resume_from_checkpoint": "set resume (latest, auto or a checkpoint folder)",
    "logging_dir": "logs go to <output>/logs: set output",
}
# Names that are the same in both (warmup_steps, weight_decay, max_grad_norm, adam_beta1/2,
# adam_epsilon, max_steps, seed, bf16, gradient_checkpointing, eval_steps, save_steps,
# save_total_limit, logging_steps, report_to, run_name, overwrite_output_dir) need no alias.


def translate_aliases(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`data` with transformers' training-argument names renamed to ours, each rename noted on stderr.

    `gradient_accumulation_steps` has no field of its own: the global batch is `batch_size`, so
    it becomes `batch_size = per_device_train_batch_size x gradient_accumulation_steps x
    processes` (WORLD_SIZE), exactly the global batch transformers would use.
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    keys = {str(k).replace("-", "_"): k for k in data}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        target = TRANSFORMERS_ALIASES.get(name)
        if target is None:
            out[key] = value
            continue
        if target in keys or target.replace("_", "-") in keys or target in out:
            raise PerftError(
                f"{source} sets both {name!r} (transformers' name) and {target!r}; keep only {target!r}"
            )
        out[target] = value
        notes.append(f"{name} -> {target}")
    accumulation_key = keys.get("gradient_accumulation_steps")
    if accumulation_key is not None:
        accumulation = out.pop(accumulation_key)
        micro = out.get("micro_batch_size")
        if "batch_size" in out or micro is None:
            raise PerftError(
                f"{source} sets gradient_accumulation_steps: perft sets the global batch instead, "
                "batch_size = micro_batch_size x accumulation x processes; write batch_size (and "
                "micro_batch_size or per_device_train_batch_size) and drop gradient_accumulation_steps"
            )
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise PerftError(f"gradient_accumulation_steps in {source} must be a positive integer, got {accumulation!r}")
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise PerftError(f"micro_batch_size in {source} must be a positive integer, got {micro!r}")
        try:
            processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            processes = 1
        out["batch_size"] = micro * accumulation * processes
        notes.append(
            f"gradient_accumulation_steps -> batch_size: {out['batch_size']} "
            f"(= {micro} per process x {accumulation} accumulation x {processes} processes)"
        )
    if notes:
        print(f"perft: {source} uses transformers' names, read as: {'; '.join(notes)}", file=sys.stderr)
    return out
