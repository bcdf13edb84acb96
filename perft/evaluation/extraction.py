"""Answer extraction, exactly as the paper's released evaluation reads a generation.

- The response is the text after the last "### Response:".
- Choice tasks (the commonsense tasks, AQuA, custom choice tasks): the first occurrence of
  any of the task's answer words, case-sensitive, anywhere in the response (also inside
  other words: AQuA's rule takes the first capital A-E, so "All" yields "A"), compared
  exactly with the gold answer.
- Number tasks: commas removed, the last match of `-?\\d+\\.?\\d*`, correct when within
  0.001 of the gold number.
A response with no match has no prediction (`None`) and counts as wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from perft.data.prompts import response_of
from perft.errors import PerftError
from perft.evaluation.tasks import NUMBER_REGEX, TaskSpec

NUMBER_PATTERN = re.compile(NUMBER_REGEX)
NUMBER_TOLERANCE = 1e-3


@lru_cache(maxsize=256)
def _choice_pattern(choices: tuple[str, ...]) -> re.Pattern[str]:
    # Longer words first, so that a custom choice that is a prefix of another ("opt", "option")
    # cannot shadow it; for the paper's word sets no word is a prefix of another, so the
    # order does not change which word is found.
    ordered = sorted(choices, key=len, reverse=True)
    return re.compile("|".join(re.escape(c) for c in ordered))


def extract_choice(response: str, choices: Sequence[str]) -> str | None:
    """The first of `choices` that occurs in `response`, or None."""
    match = _choice_pattern(tuple(choices)).search(response.strip())
    return match.group(0) if match else None


def extract_number(response: str) -> float | None:
    """The last number in `response` (commas removed), or None."""
    found = NUMBER_PATTERN.findall(response.replace(",", ""))
    if not found:
        return None
    return float(found[-1])


def parse_gold_number(value: object) -> float:
    """A number task's gold answer as a float; raises ValueError when it is not a number."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.replace(",", "").strip())
    else:
        raise ValueError(f"{value!r} is not a number")
    if math.isnan(number):
        raise ValueError("gold answer is NaN")
    return number


def extract(task: TaskSpec, response: str) -> str | float | None:
    """The prediction of `task`'s rule in a response (already cut after "### Response:")."""
    if task.answer_type == "choice":
        return extract_choice(response, task.choices)
    if task.answer_type == "number":
        return extract_number(response)
    raise PerftError(f"task {task.name!r} has an unknown answer type {task.answer_type!r}")


def extract_from_text(task: TaskSpec, text: str) -> str | float | None:
    """Extraction from a whole decoded sequence: the part after the last "### Response:"."""
    return extract(task, response_of(text))


def is_correct(task: TaskSpec, predicted: str | float | None, gold: object) -> bool:
    """Whether a prediction matches the gold answer under the task's rule."""
    if predicted is None:
        return False
    if task.answer_type == "number":
        try:
            return abs(parse_gold_number(gold) - float(predicted)) <= NUMBER_TOLERANCE
        except (TypeError, ValueError):
            return False
    return str(predicted) == str(gold).strip()
