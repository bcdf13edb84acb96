"""The evaluation tasks: the paper's benchmarks plus any task a user registers.

A task says how its answers look (one of a fixed set of words, or a number), what the
response is pre-filled with, and how many tokens a generation may add. The paper's tasks
are built in; a project's own suites are declared with a `task.json` sidecar next to their
`test.json` (see `load_task_file`) or with `register_task` from Python.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from perft.errors import PerftError

# The shipped tiny suites' files (written by perft.tiny.tasks; read here without importing the demo model)
SHIPPED_TASK_DIR = Path(__file__).resolve().parents[1] / "assets" / "tasks" / "dataset"

AnswerType = Literal["choice", "number"]

#: What the paper pre-fills the response of every commonsense task with.
COMMONSENSE_PREFILL = "the correct answer is"
COMMONSENSE_NEW_TOKENS = 4
ARITHMETIC_NEW_TOKENS = 256
SIDECAR_NAME = "task.json"
NUMBER_REGEX = r"-?\d+\.?\d*"


@dataclass(frozen=True)
class TaskSpec:
    """How one task is prompted, decoded and scored.

    `choices` are the answer words of a "choice" task; the first of them found in the
    response is the prediction. `prefill` is appended to the prompt before generation (and
    is the context the options are scored after under the log-likelihood protocol).
    `loglik` says whether log-likelihood scoring of the choices makes sense for the task.
    """

    name: str
    answer_type: AnswerType
    choices: tuple[str, ...] = ()
    prefill: str = ""
    max_new_tokens: int = COMMONSENSE_NEW_TOKENS
    aliases: tuple[str, ...] = ()
    family: str = "custom"
    loglik: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.answer_type not in ("choice", "number"):
            raise PerftError(f"task {self.name!r}: answer_type must be 'choice' or 'number', not {self.answer_type!r}")
        if self.answer_type == "choice":
            if not self.choices or any(not isinstance(c, str) or not c for c in self.choices):
                raise PerftError(f"task {self.name!r}: a choice task needs a non-empty list of non-empty answer words")
            if len(set(self.choices)) != len(self.choices):
                raise PerftError(f"task {self.name!r}: its answer words {list(self.choices)} contain duplicates")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise PerftError(f"task {self.name!r}: max_new_tokens must be a positive integer")

    @property
    def supports_loglik(self) -> bool:
        return self.answer_type == "choice" and self.loglik


def _commonsense(name: str, choices: list[str], aliases: list[str]) -> TaskSpec:
    return TaskSpec(
        name=name,
        answer_type="choice",
        choices=tuple(choices),
        prefill=COMMONSENSE_PREFILL,
        max_new_tokens=COMMONSENSE_NEW_TOKENS,
        aliases=tuple(aliases),
        family="commonsense",
    )


def _arithmetic(name: str, aliases: list[str]) -> TaskSpec:
    return TaskSpec(
        name=name,
        answer_type="number",
        max_new_tokens=ARITHMETIC_NEW_TOKENS,
        aliases=tuple(aliases),
        family="arithmetic",
        loglik=False,
    )


_ANSWERS_5 = [f"answer{i}" for i in range(1, 6)]

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    _commonsense("boolq", ["true", "false"], []),
    _commonsense("piqa", ["solution1", "solution2"], []),
    _commonsense("social_i_qa", _ANSWERS_5, ["siqa", "social-i-qa", "socialiqa"]),
    _commonsense("hellaswag", [f"ending{i}" for i in range(1, 5)], []),
    _commonsense("winogrande", ["option1", "option2"], []),
    _commonsense("ARC-Easy", _ANSWERS_5, ["arc_easy", "arc-e", "arce"]),
    _commonsense("ARC-Challenge", _ANSWERS_5, ["arc_challenge", "arc-c", "arcc"]),
    _commonsense("openbookqa", _ANSWERS_5, ["obqa"]),
    _arithmetic("gsm8k", []),
    _arithmetic("SVAMP", []),
    # AQuA's gold is an option letter; the reference takes the first capital A-E of the response.
    TaskSpec(
        name="AQuA",
        answer_type="choice",
        choices=("A", "B", "C", "D", "E"),
        max_new_tokens=ARITHMETIC_NEW_TOKENS,
        family="arithmetic",
        loglik=False,
        description="first capital letter A-E in the response",
    ),
    _arithmetic("mawps", []),
    _arithmetic("MultiArith", ["multi_arith"]),
    _arithmetic("AddSub", ["add_sub"]),
    _arithmetic("SingleEq", ["single_eq"]),
)

COMMONSENSE_TASKS = tuple(t.name for t in BUILTIN_TASKS if t.family == "commonsense")
ARITHMETIC_TASKS = tuple(t.name for t in BUILTIN_TASKS if t.family == "arithmetic")

_REGISTRY: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make `spec` known by its name and aliases (case-insensitive)."""
    keys = [spec.name.lower(), *(a.lower() for a in spec.aliases)]
    for key in keys:
        owner = _ALIASES.get(key)
        if owner is not None and owner != spec.name and not replace:
            raise PerftError(f"task name {key!r} is already taken by task {owner!r}; pick another name")
    if spec.name in _REGISTRY and not replace:
        raise PerftError(f"task {spec.name!r} is already registered; pass replace=True to redefine it")
    if spec.name in _REGISTRY:
        old = _REGISTRY[spec.name]
        for key in [old.name.lower(), *(a.lower() for a in old.aliases)]:
            _ALIASES.pop(key, None)
    _REGISTRY[spec.name] = spec
    for key in keys:
        _ALIASES[key] = spec.name
    return spec


def unregister_task(name: str) -> None:
    """Forget a task registered with `register_task` (tests use this to stay independent)."""
    spec = _REGISTRY.pop(canonical_name(name))
    for key in [spec.name.lower(), *(a.lower() for a in spec.aliases)]:
        _ALIASES.pop(key, None)


for _spec in BUILTIN_TASKS:
    register_task(_spec)


def known_tasks() -> list[str]:
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    if key not in _ALIASES:
        raise KeyError(name)
    return _ALIASES[key]


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f]")
_KIND_SYNONYMS = {"multiple_choice": "choice", "choice": "choice", "arithmetic": "number", "number": "number"}
_FIELD_SYNONYMS = {"kind": "answer_type", "answer_words": "choices", "task": "name"}


def task_from_dict(raw: dict[str, Any], *, name: str | None = None, source: str = "task description") -> TaskSpec:
    """A `TaskSpec` from a plain description (the sidecar's JSON object).

    Fields: "answer_type" ("choice" or "number"; "kind" with "multiple_choice"/"arithmetic"
    is read too); for choice tasks "choices" (or "answer_words") as a list or an
    "option1|option2|..." string; optional "prefill", "max_new_tokens", "aliases",
    "loglik", "description", and "name" (or "task").
    """
    if not isinstance(raw, dict):
        raise PerftError(f"{source} must be a JSON object with at least 'answer_type'")
    allowed = {"name", "answer_type", "choices", "prefill", "max_new_tokens", "aliases", "loglik", "description",
               "answer_pattern", "sizes", "seed", *_FIELD_SYNONYMS}  # sizes/seed: generator metadata, ignored
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PerftError(f"{source} has unknown fields {unknown}; allowed: {sorted(allowed)}")
    raw = {_FIELD_SYNONYMS.get(k, k): v for k, v in raw.items()}
    if "answer_type" not in raw:
        raise PerftError(f"{source} lacks 'answer_type'; set it to 'choice' or 'number'")
    answer_type = _KIND_SYNONYMS.get(str(raw["answer_type"]), raw["answer_type"])
    pattern = raw.get("answer_pattern")
    if pattern is not None and (answer_type != "number" or pattern != NUMBER_REGEX):
        raise PerftError(
            f"{source}: 'answer_pattern' may only restate the number rule {NUMBER_REGEX!r}; remove it"
        )
    choices = raw.get("choices", ())
    if isinstance(choices, str):
        choices = [c.strip() for c in choices.split("|")]
    if not isinstance(choices, (list, tuple)):
        raise PerftError(f"{source}: 'choices' must be a list or an 'a|b|c' string")
    if answer_type == "number" and choices:
        raise PerftError(f"{source}: a number task takes no 'choices'; remove them or use answer_type 'choice'")
    default_tokens = ARITHMETIC_NEW_TOKENS if answer_type == "number" else COMMONSENSE_NEW_TOKENS
    aliases = raw.get("aliases", ())
    if isinstance(aliases, str):
        aliases = [aliases]
    task_name = str(raw.get("name") or name or "")
    if not task_name:
        raise PerftError(f"{source} needs a 'name'")
    if _UNSAFE_NAME.search(task_name) or task_name.startswith(".") or len(task_name) > 128:
        # The name becomes a file name (<output>/<name>.jsonl): it must not lead anywhere else.
        raise PerftError(
            f"{source}: task name {task_name!r} is not a plain file name (no '/', '\\', leading '.', "
            "control characters, at most 128 characters)"
        )
    try:
        return TaskSpec(
            name=task_name,
            answer_type=answer_type,
            choices=tuple(str(c) for c in choices),
            prefill=str(raw.get("prefill", "")),
            max_new_tokens=raw.get("max_new_tokens", default_tokens),
            aliases=tuple(str(a) for a in aliases),
            family="custom",
            loglik=bool(raw.get("loglik", answer_type == "choice")),
            description=str(raw.get("description", "")),
        )
    except PerftError as err:
        raise PerftError(f"{source}: {err}") from None


def load_task_file(path: str | Path, *, name: str | None = None) -> TaskSpec:
    """Read a task sidecar (`dataset/<task>/task.json`); the name defaults to its folder's."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or JSON
        raise PerftError(f"cannot read task file {path}: {err}; fix its JSON") from None
    return task_from_dict(raw, name=name or path.parent.name, source=f"task file {path}")


def _shipped_suite(name: str) -> TaskSpec | None:
    """The project's own small suites (perft.tiny) describe themselves in shipped sidecars; use those."""
    sidecar = SHIPPED_TASK_DIR / name / SIDECAR_NAME
    if not sidecar.is_file():
        return None
    try:
        return load_task_file(sidecar, name=name)
    except PerftError:
        return None


def find_task_dir(data_dir: Path, name: str, aliases: tuple[str, ...] = ()) -> Path | None:
    """The directory of a task under `data_dir`: exact name first, then any case-insensitive match."""
    for candidate in (name, *aliases):
        if (data_dir / candidate).is_dir():
            return data_dir / candidate
    if data_dir.is_dir():
        wanted = {n.lower() for n in (name, *aliases)}
        for entry in sorted(data_dir.iterdir()):
            if entry.is_dir() and entry.name.lower() in wanted:
                return entry
    return None


def resolve_task(name: str, data_dir: str | Path | None = None) -> TaskSpec:
    """Look a task up by name or alias; an unknown name may be declared by a sidecar in `data_dir`."""
    try:
        return _REGISTRY[canonical_name(name)]
    except KeyError:
        pass
    if data_dir is not None:
        task_dir = find_task_dir(Path(data_dir), name.strip())
        if task_dir is not None and (task_dir / SIDECAR_NAME).is_file():
            return load_task_file(task_dir / SIDECAR_NAME, name=task_dir.name)
    shipped = _shipped_suite(name.strip())
    if shipped is not None:
        return shipped
    where = f" and no {Path(data_dir) / name / SIDECAR_NAME} declares it" if data_dir is not None else ""
    raise PerftError(
        f"unknown task {name!r}{where}; known tasks: {', '.join(known_tasks())} "
        f"(declare your own with a {SIDECAR_NAME} next to its test.json, see docs/evaluation.md)"
    )
