"""Evaluation: the paper's benchmarks under its protocol, log-likelihood scoring, and lm-eval.

`perft eval` (perft/cli/eval.py) is the command-line entry; from Python:

    tasks = prepare_tasks(["boolq", "piqa"], "dataset/")          # validates, no model needed
    evaluation = Evaluation(tasks, "runs/x/eval", EvalSettings())  # checks the output folder
    summary = evaluation.run(model, tokenizer)                     # any HF-like causal LM
    print(format_table(summary))

The lm-eval bridge lives in `perft.evaluation.lm_eval_bridge` (optional dependency).
"""

from perft.evaluation.compare import compare_runs, format_comparison, load_summary
from perft.evaluation.extraction import extract, extract_choice, extract_number, is_correct
from perft.evaluation.generation import DecodingSettings, generate_batch
from perft.evaluation.loglik import ContinuationScore, score_continuations
from perft.evaluation.runner import (
    EvalSettings,
    Evaluation,
    TaskData,
    format_table,
    load_task_data,
    prepare_tasks,
)
from perft.evaluation.tasks import (
    ARITHMETIC_TASKS,
    COMMONSENSE_TASKS,
    TaskSpec,
    known_tasks,
    load_task_file,
    register_task,
    resolve_task,
    unregister_task,
)

__all__ = [
    "ARITHMETIC_TASKS",
    "COMMONSENSE_TASKS",
    "ContinuationScore",
    "DecodingSettings",
    "EvalSettings",
    "Evaluation",
    "TaskData",
    "TaskSpec",
    "compare_runs",
    "extract",
    "extract_choice",
    "extract_number",
    "format_comparison",
    "format_table",
    "generate_batch",
    "is_correct",
    "known_tasks",
    "load_summary",
    "load_task_data",
    "load_task_file",
    "prepare_tasks",
    "register_task",
    "resolve_task",
    "score_continuations",
    "unregister_task",
]
