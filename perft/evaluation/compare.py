"""`perft eval --compare runA runB ...`: several runs' accuracies side by side, as in the paper's tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perft.errors import PerftError
from perft.evaluation.runner import SUMMARY_FILE


def load_summary(run: str | Path) -> dict[str, Any]:
    """A run's summary, given its output folder or its summary file."""
    path = Path(run)
    if path.is_dir():
        path = path / SUMMARY_FILE
    if not path.is_file():
        raise PerftError(f"no {SUMMARY_FILE} in {run}; run `perft eval ... --output {run}` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON
        raise PerftError(f"{path} is not a readable summary ({err}); re-run the evaluation") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise PerftError(f"{path} is not a perft evaluation summary (no 'tasks'); re-run the evaluation")
    metrics = summary.get("metrics") or ["accuracy"]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise PerftError(f"{path}: 'metrics' is damaged ({metrics!r}); re-run the evaluation")
    for task, entry in summary["tasks"].items():
        if not isinstance(entry, dict):
            raise PerftError(f"{path}: task {task!r} is damaged (not an object); re-run the evaluation")
        for metric in metrics:
            value = entry.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise PerftError(f"{path}: task {task!r} has {metric} {value!r}, not a fraction in [0, 1]; "
                                 "re-run the evaluation")
    for key in ("protocol", "protocol_description"):
        if summary.get(key) is not None and not isinstance(summary[key], str):
            raise PerftError(f"{path}: {key} {summary[key]!r} is damaged; re-run the evaluation")
    return summary


def _label(run: str | Path) -> str:
    path = Path(run)
    if path.name == SUMMARY_FILE:
        path = path.parent
    # "runs/olmoe-r16/eval" reads better as "olmoe-r16/eval" than as "eval".
    parts = path.parts[-2:] if path.name in ("eval", "evaluation") else path.parts[-1:]
    return "/".join(parts) or str(run)


def compare_runs(runs: Sequence[str | Path]) -> tuple[list[str], list[tuple[str, list[float | None]]], list[str]]:
    """Columns (one per run and metric), rows (task, values) and notes; the last row is the average."""
    if len(runs) < 1:
        raise PerftError("--compare needs at least one run folder")
    summaries = [load_summary(r) for r in runs]
    columns: list[str] = []
    cells: list[tuple[dict[str, Any], str]] = []
    notes: list[str] = []
    for run, summary in zip(runs, summaries):
        metrics = summary.get("metrics") or ["accuracy"]
        for metric in metrics:
            suffix = f" {summary.get('protocol', '?')}" + ("-norm" if metric == "accuracy_norm" else "")
            columns.append(_label(run) + suffix)
            cells.append((summary, metric))
        notes.append(f"{_label(run)}: {summary.get('protocol_description') or summary.get('protocol')}")
    tasks: list[str] = []
    for summary in summaries:
        tasks.extend(t for t in summary["tasks"] if t not in tasks)
    common = [t for t in tasks if all(t in s["tasks"] for s in summaries)]
    rows: list[tuple[str, list[float | None]]] = []
    for task in tasks:
        rows.append((task, [s["tasks"].get(task, {}).get(m) for s, m in cells]))
    averages: list[float | None] = []
    for summary, metric in cells:
        values = [summary["tasks"][t].get(metric) for t in common]
        values = [v for v in values if v is not None]
        averages.append(sum(values) / len(values) if values and len(values) == len(common) else None)
    label = "average" if common == tasks else f"average ({len(common)} common)"
    rows.append((label, averages))
    if common != tasks:
        notes.append(f"averages cover only the {len(common)} tasks every run has: {', '.join(common) or 'none'}")
    return columns, rows, notes


def format_comparison(runs: Sequence[str | Path]) -> str:
    """The side-by-side table (accuracy in %), tasks as rows and runs as columns."""
    columns, rows, notes = compare_runs(runs)
    first = max(len("task"), *(len(name) for name, _ in rows))
    widths = [max(8, len(c)) for c in columns]
    header = f"{'task':<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for i, (name, values) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(header))
        lines.append(
            f"{name:<{first}}"
            + "".join(f"  {'-' if v is None else f'{100 * v:.2f}':>{w}}" for v, w in zip(values, widths))
        )
    lines.append("")
    lines.extend(notes)
    return "\n".join(lines)
