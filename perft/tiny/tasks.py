"""The shipped downstream suites, in the LLM-Adapters layout.

- `tiny_commonsense`: three-way multiple-choice questions about facts of `perft.tiny.world`
  in the style of LLM-Adapters' commonsense items ("Please choose the correct answer to the
  question: ... Options: a, b, c. ... Answer format: one of the options", output "the correct
  answer is b"). The answer is the option's text, not its number: picking the number of the
  option that matches a recalled fact is an in-context skill a 4-layer base does not have
  (docs/tiny-model.md). Train and test ask about disjoint facts, so a fine-tuned model must
  use what the base model learnt in pretraining, not memorise answers.
- `tiny_math`: small-number arithmetic word problems (add, subtract, multiply, two steps)
  with a short worked solution ending in "The answer is N"; `answer` is the number.

Records are `{"instruction", "input", "output", "answer"}`. Every item is new to the
pretraining text: the corpus never asks a question or uses the prompt format, and it is
generated with the word problems of both math splits excluded (`problem_keys`);
`check_no_leak` verifies both facts on a corpus.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perft.io import atomic_write_text
from perft.tiny.corpus import choice_head
from perft.tiny.world import (  # noqa: F401 - TASK_SEED, TEST_FACT_SHARE, split_facts: part of this module's API
    MATH_OPS,
    TASK_SEED,
    TEST_FACT_SHARE,
    Problem,
    World,
    relation_values,
    sample_problem,
    split_facts,
)

TASKS = ("tiny_commonsense", "tiny_math")
NUM_OPTIONS = 3
SIZES = {"tiny_commonsense": (2000, 240), "tiny_math": (2000, 240)}  # (train, test)

_MC_QUESTIONS = {
    ("person", "town"): ("Which town does {s} live in?", "Where is the home of {s}?"),
    ("person", "pet"): ("What kind of pet does {s} have?", "Which animal does {s} keep at home?"),
    ("person", "job"): ("What does {s} do for a living?", "Which job does {s} have?"),
    ("person", "colour"): ("Which colour does {s} like best?", "What is the favourite colour of {s}?"),
    ("person", "food"): ("What food does {s} like most?", "Which food does {s} enjoy eating?"),
    ("town", "place"): ("What is the town of {s} next to?", "Where was {s} built?"),
    ("town", "famous"): ("What is {s} famous for?", "What do people buy in {s}?"),
    ("common", "habitat"): ("Where does a {s} live?", "Where would you find a {s}?"),
    ("common", "use"): ("What is a {s} used for?", "Why would someone need a {s}?"),
    ("common", "feel"): ("Which word describes {s}?", "What is {s} like?"),
    ("common", "colour"): ("What colour is the {s}?", "Which colour does a {s} have?"),
    ("common", "sound"): ("What does a {s} do?", "Which sound does a {s} make?"),
}


def task_info(task: str) -> dict[str, Any]:
    """How to score a task: `kind` (multiple_choice or arithmetic) and, for MC, its answer words."""
    if task == "tiny_commonsense":
        # Every value a question can have; each record also lists its own three "choices",
        # which the log-likelihood protocol scores.
        return {
            "task": task,
            "kind": "multiple_choice",
            "answer_words": answer_values(),
            "prefill": "the correct answer is",
            "max_new_tokens": 8,
        }
    if task == "tiny_math":
        return {"task": task, "kind": "arithmetic", "answer_pattern": r"-?\d+\.?\d*"}
    raise ValueError(f"unknown task {task!r}; shipped tasks: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------- commonsense
def answer_values() -> list[str]:
    """Every value of every relation the multiple-choice questions ask about, sorted."""
    return sorted({v for kind, relation in _MC_QUESTIONS for v in relation_values(kind, relation)})


def mc_record(
    rng: random.Random, fact: tuple, position: int, num_options: int = NUM_OPTIONS
) -> dict[str, Any]:
    """One multiple-choice record about `fact` = (kind, subject, relation, value), correct at `position`."""
    kind, subject, relation, value = fact
    pool = [v for v in relation_values(kind, relation) if v != value]
    options = rng.sample(pool, num_options - 1)
    options.insert(position, value)
    question = rng.choice(_MC_QUESTIONS[(kind, relation)]).format(s=subject)
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n"
        f"Options: {', '.join(options)}.\n\nAnswer format: one of the options"
    )
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {value}",
        "answer": value,
        "choices": options,
    }


def commonsense_split(world: World, split: str, size: int, seed: int = TASK_SEED) -> list[dict[str, Any]]:
    train_facts, test_facts = split_facts(world, seed)
    facts = train_facts if split == "train" else test_facts
    rng = random.Random(f"mc-{split}-{seed}")
    # Cycle through the facts in shuffled rounds so every fact is asked about evenly.
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    deck: list[int] = []
    while len(records) < size:
        order = facts[:]
        rng.shuffle(order)
        for fact in order:
            # Positions come from shuffled decks, so each answer word is right equally often.
            if not deck:
                deck = list(range(NUM_OPTIONS)) * 4
                rng.shuffle(deck)
            record = mc_record(rng, fact, deck[-1])
            if record["instruction"] not in seen:
                deck.pop()
                seen.add(record["instruction"])
                records.append(record)
            if len(records) == size:
                break
    return records


# ---------------------------------------------------------------------------- math
def ask_problem(rng: random.Random, p: Problem) -> str:
    """The task's wording of a word problem: present tense, ending in a question."""
    n, o, obj, x = p.name, p.other, p.obj, p.numbers
    if p.op == "add":
        return f"{n} has {x[0]} {obj}. {o} gives {n} {x[1]} more {obj}. How many {obj} does {n} have now?"
    if p.op == "sub":
        return f"{n} has {x[0]} {obj} and gives {x[1]} of them to {o}. How many {obj} does {n} have left?"
    if p.op == "mul":
        return f"{n} has {x[0]} bags. Each bag holds {x[1]} {obj}. How many {obj} does {n} have in total?"
    return (
        f"{n} has {x[0]} {obj}. {o} gives {n} {x[1]} more, and then {n} loses {x[2]} of them. "
        f"How many {obj} does {n} have now?"
    )


def solve_problem(p: Problem) -> str:
    """The short worked solution, ending in the number."""
    eqs = ". ".join(f"{a} {sign} {b} = {r}" for a, sign, b, r in p.steps())
    return f"{eqs}. The answer is {p.result}"


def math_record(rng: random.Random, p: Problem) -> dict[str, str]:
    return {
        "instruction": ask_problem(rng, p),
        "input": "",
        "output": solve_problem(p),
        "answer": str(p.result),
    }


def math_problems(seed: int = TASK_SEED) -> dict[str, list[Problem]]:
    """The test and train problems: distinct keys, test first, ops balanced round-robin."""
    rng = random.Random(f"math-{seed}")
    n_train, n_test = SIZES["tiny_math"]
    seen: set[tuple] = set()
    out: dict[str, list[Problem]] = {"test": [], "train": []}
    for split, size in (("test", n_test), ("train", n_train)):
        while len(out[split]) < size:
            p = sample_problem(rng, MATH_OPS[len(out[split]) % len(MATH_OPS)])
            if p.key not in seen:
                seen.add(p.key)
                out[split].append(p)
    return out


def problem_keys(seed: int = TASK_SEED) -> frozenset:
    """Keys of every shipped word problem (train and test): the corpus must never tell these."""
    return frozenset(p.key for ps in math_problems(seed).values() for p in ps)


# ---------------------------------------------------------------------------- all tasks
def build_tasks(
    world: World | None = None, seed: int = TASK_SEED
) -> dict[str, dict[str, list[dict[str, str]]]]:
    """{task: {"train": records, "test": records}} for every shipped task."""
    world = world or World()
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    n_train, n_test = SIZES["tiny_commonsense"]
    out["tiny_commonsense"] = {
        "train": commonsense_split(world, "train", n_train, seed),
        "test": commonsense_split(world, "test", n_test, seed),
    }
    problems = math_problems(seed)
    rng = random.Random(f"math-text-{seed}")
    out["tiny_math"] = {split: [math_record(rng, p) for p in problems[split]] for split in ("train", "test")}
    return out


def check_no_leak(
    texts: Iterable[str], corpus_keys: Iterable[tuple | None], tasks: dict, seed: int = TASK_SEED
) -> None:
    """Raise AssertionError if a task item or its format shows up in the pretraining text, or if a
    "choose" record (fact -> numbered candidates) is about a fact that the test split asks about.

    texts: the corpus documents; corpus_keys: the word-problem keys the corpus told.
    """
    forbidden = problem_keys(seed)
    told = forbidden & set(corpus_keys)
    if told:
        raise AssertionError(
            f"{len(told)} shipped word problems were told in the corpus, e.g. {sorted(told)[0]}"
        )
    markers = ("?", "### ", "Answer format", "answer1", "The answer is", "the correct answer is")
    # Every task instruction contains one of these, so no item can appear verbatim either.
    for record in (r for t in tasks.values() for split in t.values() for r in split):
        if not any(m in record["instruction"] + record["output"] for m in markers):  # pragma: no cover
            raise AssertionError(f"task record without a format marker: {record['instruction'][:80]!r}")
    test_heads = {choice_head(*fact[:3]) + ":" for fact in split_facts(World(), seed)[1]}
    for text in texts:
        for marker in markers:
            if marker in text:
                raise AssertionError(f"corpus text contains the task format marker {marker!r}: {text[:80]!r}")
        if text.startswith("choose for") and text.split(":", 1)[0] + ":" in test_heads:
            raise AssertionError(f"a choice record about a test fact is in the corpus: {text[:80]!r}")


def write_task_files(directory: str | Path, seed: int = TASK_SEED) -> Path:
    """Write `<task>/{train,test,task}.json` for every shipped task under `directory`."""
    root = Path(directory)
    for task, splits in build_tasks(World(), seed).items():
        for split, records in splits.items():
            atomic_write_text(
                root / task / f"{split}.json", json.dumps(records, indent=1, ensure_ascii=False) + "\n"
            )
        info = dict(task_info(task), sizes={s: len(r) for s, r in splits.items()}, seed=seed)
        atomic_write_text(root / task / "task.json", json.dumps(info, indent=1) + "\n")
    return root


if __name__ == "__main__":  # python -m perft.tiny.tasks [DIR]: regenerate the shipped task files
    import sys

    shipped = Path(__file__).resolve().parents[1] / "assets" / "tasks" / "dataset"  # perft.tiny.SHIPPED_TASKS
    print(write_task_files(sys.argv[1] if len(sys.argv) > 1 else shipped))
