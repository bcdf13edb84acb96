"""Evaluate a model on `dataset/<task>/test.json` files: per-sample JSONL, summary, table.

Everything that can be wrong with the input (task names, files, records, an output folder
written by another run) is checked when an `Evaluation` is built, before a model is
loaded; `Evaluation.run` then only computes. Runs are resumable: samples already in
`<output>/<task>.jsonl` are skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from perft.data.dataset import encodable, load_records
from perft.data.prompts import build_prompt, response_of
from perft.errors import PerftError
from perft.evaluation.extraction import extract, is_correct, parse_gold_number
from perft.evaluation.generation import DecodingSettings, generate_batch
from perft.evaluation.loglik import choice_continuation, rank_choices, score_continuations
from perft.evaluation.tasks import TaskSpec, find_task_dir, resolve_task
from perft.io import atomic_write_text

Protocol = Literal["generate", "loglik"]
PROTOCOLS: tuple[str, ...] = ("generate", "loglik")
TEST_FILE = "test.json"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


@dataclass
class TaskData:
    """One task's validated test records (the first `max_samples` of its file)."""

    spec: TaskSpec
    path: Path
    records: list[dict[str, Any]]
    total: int
    prompt_style: str = "clean"  # perft.data.prompts.PROMPT_STYLES; `released`: the released evaluation strings

    def prompt(self, index: int) -> str:
        """The model's input for record `index`: the training template plus the task's pre-fill."""
        record = self.records[index]
        return build_prompt(record["instruction"], record.get("input") or None, style=self.prompt_style,
                            for_eval=True) + self.spec.prefill

    def gold(self, index: int) -> str | float:
        value = self.records[index]["answer"]
        if self.spec.answer_type == "number":
            return parse_gold_number(value)
        return str(value).strip()

    def choices(self, index: int) -> list[str]:
        """The options scored under the log-likelihood protocol for record `index`.

        A record's own "choices" list wins; otherwise the task's words that the instruction's
        "Answer format: a/b/c" line offers (SIQA has 3 options, ARC 3 to 5); otherwise all
        of the task's words.
        """
        record = self.records[index]
        if isinstance(record.get("choices"), list) and record["choices"]:
            return [str(c) for c in record["choices"]]
        match = _ANSWER_FORMAT.search(record["instruction"])
        if match:
            offered = {w for w in re.split(r"[\s/,|]+", match.group(1)) if w}
            subset = [c for c in self.spec.choices if c in offered]
            if len(subset) >= 2 and self.gold(index) in subset:
                return subset
        return list(self.spec.choices)


def _record_problem(spec: TaskSpec, record: Any) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return "has no 'instruction' text"
    if record.get("input") is not None and not isinstance(record.get("input"), str):
        return "has an 'input' that is not text"
    for key in ("instruction", "input", "answer"):  # a lone surrogate ("\ud800") no tokenizer can take
        value = record.get(key)
        if isinstance(value, str) and not encodable(value):
            return f"has an '{key}' that is not valid Unicode text (an unpaired surrogate such as \\ud800)"
    if "answer" not in record or record["answer"] is None or str(record["answer"]).strip() == "":
        return "has no 'answer'"
    answer = record["answer"]
    if spec.answer_type == "number":
        try:
            parse_gold_number(answer)
        except ValueError:
            return f"has answer {answer!r}, which is not a number"
    elif str(answer).strip() not in spec.choices:
        return f"has answer {answer!r}, not one of {'|'.join(spec.choices)}"
    return None


def load_task_data(
    spec: TaskSpec, data_dir: str | Path, *, max_samples: int | None = None, protocol: str = "generate"
) -> TaskData:
    """Find, read and validate one task's test file."""
    data_dir = Path(data_dir)
    if protocol == "loglik" and not spec.supports_loglik:
        kind = "numeric answers" if spec.answer_type == "number" else "answers that follow a worked solution"
        raise PerftError(
            f"task {spec.name} has {kind}, so option log-likelihoods do not score it; "
            "evaluate it with --protocol generate"
        )
    task_dir = find_task_dir(data_dir, spec.name, spec.aliases)
    path = (task_dir or data_dir / spec.name) / TEST_FILE
    if not path.is_file():
        raise PerftError(
            f"no test file for task {spec.name}: looked for {path}; "
            f"put the LLM-Adapters file there or point --data-dir at the folder holding {spec.name}/{TEST_FILE}"
        )
    raw = load_records(path)
    if not raw:
        raise PerftError(f"{path} holds no records")
    problems = [(i, p) for i, rec in enumerate(raw) if (p := _record_problem(spec, rec)) is not None]
    if problems:
        first_index, first = problems[0]
        more = f" ({len(problems) - 1} more records have problems)" if len(problems) > 1 else ""
        raise PerftError(f"{path}: record {first_index} {first}{more}; fix the file")
    if max_samples is not None:
        if max_samples < 1:
            raise PerftError("--max-samples must be at least 1")
        raw = raw[:max_samples]
    return TaskData(spec=spec, path=path, records=raw, total=len(raw))


def prepare_tasks(
    names: Sequence[str], data_dir: str | Path, *, protocol: str = "generate", max_samples: int | None = None,
    prompt_style: str = "clean",
) -> list[TaskData]:
    """Resolve and validate every requested task before any model work."""
    if protocol not in PROTOCOLS:
        raise PerftError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise PerftError("no tasks given; pass --tasks, e.g. --tasks boolq,piqa")
    specs: list[TaskSpec] = []
    for name in names:
        spec = resolve_task(name, data_dir)
        if spec.name in {s.name for s in specs}:
            raise PerftError(f"task {spec.name} is listed twice in --tasks")
        specs.append(spec)
    build_prompt("", style=prompt_style)  # an unknown style fails here, before any model work
    tasks = [load_task_data(s, data_dir, max_samples=max_samples, protocol=protocol) for s in specs]
    for task in tasks:
        task.prompt_style = prompt_style
    return tasks


@dataclass(frozen=True)
class EvalSettings:
    """The settings that decide a run's numbers (a resumed run must use the same ones)."""

    protocol: Protocol = "generate"
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    max_new_tokens: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise PerftError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.batch_size < 1:
            raise PerftError("--batch-size must be at least 1")
        if self.decoding.num_beams < 1:
            raise PerftError("--num-beams must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise PerftError("--max-new-tokens must be at least 1")

    def fingerprint(self) -> dict[str, Any]:
        if self.protocol == "loglik":
            return {"protocol": "loglik"}
        return {"protocol": "generate", "num_beams": self.decoding.beams, "max_new_tokens": self.max_new_tokens}

    def is_paper_protocol(self) -> bool:
        return self.protocol == "generate" and self.decoding.beams == 4 and self.max_new_tokens is None

    def describe(self, specs: Sequence[TaskSpec] = ()) -> str:
        """The label printed above the table, so numbers are never read under the wrong protocol.

        With the run's task `specs`, it names each task's own token budget and pre-fill (a task
        of one's own, or a shipped tiny suite, may differ from the paper's 4 / 256).
        """
        if self.protocol == "loglik":
            return (
                "loglik: each option's log-probability after the prompt (+ pre-fill); "
                "acc = highest total, acc_norm = highest per character"
            )
        if self.max_new_tokens is not None:
            tokens = str(self.max_new_tokens)
        elif specs:
            tokens = _grouped({spec.name: str(spec.max_new_tokens) for spec in specs})
        else:
            tokens = "commonsense 4 / arithmetic 256"
        if specs:
            prefills = {spec.name: json.dumps(spec.prefill) for spec in specs if spec.prefill}
            prefill = f"pre-fill {_grouped(prefills)}" if prefills else "no pre-fill"
        else:
            prefill = 'commonsense pre-fill "the correct answer is"'
        label = (
            f"generate: training prompt, {prefill}, "
            f"{self.decoding.describe()}, new tokens: {tokens}, rule-based answer extraction"
        )
        return label + (" (the paper's protocol)" if self.is_paper_protocol() else " (differs from the paper's protocol)")


def _grouped(values: dict[str, str]) -> str:
    """{"boolq": "4", "piqa": "4", "gsm8k": "256"} -> "4 (boolq, piqa), 256 (gsm8k)"; one task: "8 (name)"."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    return ", ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def _metric_names(protocol: str) -> list[str]:
    return ["accuracy", "accuracy_norm"] if protocol == "loglik" else ["accuracy"]


class Evaluation:
    """One evaluation run into one output folder (validated on construction, computed by `run`)."""

    def __init__(
        self,
        tasks: Sequence[TaskData],
        output_dir: str | Path,
        settings: EvalSettings = EvalSettings(),
        *,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.run_info = dict(run_info or {})
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise PerftError(f"--output {self.output_dir} is a file; give a folder")
        self._check_previous_run()
        self.done: dict[str, dict[int, dict[str, Any]]] = {t.spec.name: self._load_rows(t) for t in self.tasks}

    # ----------------------------------------------------------------- checks
    def _run_record(self) -> dict[str, Any]:
        return {"settings": self.settings.fingerprint(), **self.run_info}

    def _check_previous_run(self) -> None:
        path = self.output_dir / RUN_FILE
        if not path.is_file():
            return
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise PerftError(f"{path} is unreadable; delete it or choose another --output") from None
        if not isinstance(previous, dict):
            raise PerftError(f"{path} is not a perft run record; delete it or choose another --output")
        current = self._run_record()
        for key, value in current.items():
            if key in previous and previous[key] != value:
                raise PerftError(
                    f"{self.output_dir} holds a run with different {key} ({previous[key]} vs now {value}); "
                    "resuming would mix results: choose another --output or delete that folder"
                )

    def jsonl_path(self, task: TaskData) -> Path:
        return self.output_dir / f"{task.spec.name}.jsonl"

    def _load_rows(self, task: TaskData) -> dict[int, dict[str, Any]]:
        path = self.jsonl_path(task)
        if not path.is_file():
            return {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PerftError(f"{path} is not UTF-8 text; delete the file to re-evaluate {task.spec.name}") from None
        rows: dict[int, dict[str, Any]] = {}
        dropped_tail = False
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index = row["index"]
            except (KeyError, TypeError, ValueError, RecursionError):
                if number == len(lines) - 1:
                    dropped_tail = True  # a line cut short by an interrupted run
                    continue
                raise PerftError(
                    f"{path} line {number + 1} is not a result row; delete the file to re-evaluate {task.spec.name}"
                ) from None
            problem = _row_problem(row)
            if problem:
                raise PerftError(f"{path} line {number + 1} is a damaged result row ({problem}); delete the file to "
                                 f"re-evaluate {task.spec.name}")
            if index < task.total and row.get("prompt") != task.prompt(index):
                raise PerftError(
                    f"{path} was written for different test data (sample {index} has another prompt); "
                    "choose another --output or delete that file"
                )
            rows[index] = row
        if dropped_tail:
            atomic_write_text(path, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in rows))
        return rows

    def pending(self, task: TaskData) -> list[int]:
        done = self.done[task.spec.name]
        return [i for i in range(task.total) if i not in done]

    # ----------------------------------------------------------------- work
    def run(self, model: Any, tokenizer: Any, *, progress: bool = True) -> dict[str, Any]:
        """Evaluate every pending sample, append its row, and write and return the summary."""
        from tqdm.auto import tqdm

        self.output_dir.mkdir(parents=True, exist_ok=True)
        previous = self.output_dir / RUN_FILE
        record = self._run_record()
        if previous.is_file():
            record = {**json.loads(previous.read_text(encoding="utf-8")), **record}
        atomic_write_text(previous, json.dumps(record, indent=2) + "\n")
        total = sum(len(self.pending(t)) for t in self.tasks)
        with tqdm(total=total, desc="perft eval", unit="sample", disable=not progress or total == 0) as bar:
            for task in self.tasks:
                todo = self.pending(task)
                bar.set_postfix_str(task.spec.name)
                for start in range(0, len(todo), self.settings.batch_size):
                    batch = todo[start : start + self.settings.batch_size]
                    rows = self._evaluate_batch(model, tokenizer, task, batch)
                    self._append(task, rows)
                    bar.update(len(batch))
        summary = self.summary()
        atomic_write_text(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary

    def _evaluate_batch(self, model: Any, tokenizer: Any, task: TaskData, batch: list[int]) -> list[dict[str, Any]]:
        if self.settings.protocol == "loglik":
            return self._loglik_batch(model, tokenizer, task, batch)
        prompts = [task.prompt(i) for i in batch]
        max_new = self.settings.max_new_tokens or task.spec.max_new_tokens
        generations = generate_batch(
            model, tokenizer, prompts, max_new_tokens=max_new, decoding=self.settings.decoding
        )
        rows = []
        for i, prompt, generation in zip(batch, prompts, generations):
            response = response_of(prompt + generation)
            predicted = extract(task.spec, response)
            gold = task.gold(i)
            rows.append(
                {
                    "index": i,
                    "prompt": prompt,
                    "generation": generation,
                    "response": response,
                    "extracted": predicted,
                    "gold": gold,
                    "correct": is_correct(task.spec, predicted, gold),
                }
            )
        return rows

    def _loglik_batch(self, model: Any, tokenizer: Any, task: TaskData, batch: list[int]) -> list[dict[str, Any]]:
        pairs: list[tuple[str, str]] = []
        spans: list[tuple[int, list[str]]] = []
        for i in batch:
            choices = task.choices(i)
            spans.append((len(pairs), choices))
            pairs.extend((task.prompt(i), choice_continuation(task.spec.prefill, c)) for c in choices)
        scores = score_continuations(model, tokenizer, pairs, batch_size=self.settings.batch_size)
        rows = []
        for i, (offset, choices) in zip(batch, spans):
            mine = scores[offset : offset + len(choices)]
            best, best_norm = rank_choices(choices, mine)
            gold = task.gold(i)
            rows.append(
                {
                    "index": i,
                    "prompt": task.prompt(i),
                    "choices": choices,
                    "logprobs": [s.logprob for s in mine],
                    "num_tokens": [s.num_tokens for s in mine],
                    "extracted": choices[best],
                    "extracted_norm": choices[best_norm],
                    "gold": gold,
                    "correct": choices[best] == gold,
                    "correct_norm": choices[best_norm] == gold,
                }
            )
        return rows

    def _append(self, task: TaskData, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        path = self.jsonl_path(task)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())
        for row in rows:
            self.done[task.spec.name][row["index"]] = row

    # ----------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        """Per-task accuracy over the selected samples and the unweighted mean over tasks."""
        metrics = _metric_names(self.settings.protocol)
        per_task: dict[str, dict[str, Any]] = {}
        for task in self.tasks:
            rows = [self.done[task.spec.name][i] for i in range(task.total) if i in self.done[task.spec.name]]
            entry: dict[str, Any] = {"n": len(rows), "family": task.spec.family, "file": str(task.path)}
            entry["correct"] = sum(bool(r["correct"]) for r in rows)
            entry["accuracy"] = entry["correct"] / len(rows) if rows else None
            if self.settings.protocol == "loglik":
                correct_norm = sum(bool(r["correct_norm"]) for r in rows)
                entry["accuracy_norm"] = correct_norm / len(rows) if rows else None
            else:
                entry["unanswered"] = sum(r["extracted"] is None for r in rows)
            per_task[task.spec.name] = entry
        average = {}
        for metric in metrics:
            values = [e[metric] for e in per_task.values() if e[metric] is not None]
            average[metric] = sum(values) / len(values) if values else None
        return {
            "protocol": self.settings.protocol,
            "protocol_description": self.settings.describe([task.spec for task in self.tasks]),
            "settings": {**asdict(self.settings), **self.settings.fingerprint()},
            **self.run_info,
            "metrics": metrics,
            "tasks": per_task,
            "average": average,
        }


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table (task, n, accuracy in %) with the unweighted average, labelled with the protocol."""
    metrics = summary.get("metrics") or ["accuracy"]
    tasks = summary["tasks"]
    width = max([len("average"), *(len(t) for t in tasks)])
    header = f"{'task':<{width}}  {'n':>6}" + "".join(f"  {_short(m):>8}" for m in metrics)
    lines = [f"protocol: {summary.get('protocol_description') or summary.get('protocol')}", header, "-" * len(header)]
    for name, entry in tasks.items():
        lines.append(f"{name:<{width}}  {entry['n']:>6}" + "".join(f"  {_pct(entry.get(m)):>8}" for m in metrics))
    lines.append("-" * len(header))
    n_total = sum(e["n"] for e in tasks.values())
    lines.append(
        f"{'average':<{width}}  {n_total:>6}" + "".join(f"  {_pct(summary['average'].get(m)):>8}" for m in metrics)
    )
    lines.append(f"(average: unweighted mean over {len(tasks)} task{'s' if len(tasks) != 1 else ''}; accuracy in %)")
    return "\n".join(lines)


def _short(metric: str) -> str:
    return {"accuracy": "acc", "accuracy_norm": "acc_norm"}.get(metric, metric)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _row_problem(row: Any) -> str | None:
    """What is wrong with a per-sample result row read back from disk, or None (issue 15: by type)."""
    index = row.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"index {index!r} is not a sample number"
    for key in ("correct", "correct_norm"):
        if key in row and not isinstance(row[key], bool):
            return f"{key} {row[key]!r} is not true or false"
    if "correct" not in row:
        return "no 'correct' field"
    return None
