"""Answer extraction on hand-written generations, task by task, and the task registry."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perft.data.prompts import build_prompt
from perft.errors import PerftError
from perft.evaluation.extraction import extract, extract_from_text, extract_number, is_correct
from perft.evaluation.tasks import (
    ARITHMETIC_TASKS,
    COMMONSENSE_TASKS,
    TaskSpec,
    load_task_file,
    register_task,
    resolve_task,
    unregister_task,
)

# task: (gold, a wrong answer word, another wrong one)
COMMONSENSE_CASES = {
    "boolq": ("true", "false", "false"),
    "piqa": ("solution2", "solution1", "solution1"),
    "social_i_qa": ("answer3", "answer1", "answer2"),
    "hellaswag": ("ending4", "ending2", "ending1"),
    "winogrande": ("option1", "option2", "option2"),
    "ARC-Easy": ("answer2", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer3", "answer5"),
    "openbookqa": ("answer4", "answer1", "answer2"),
}


def score(task: str, response: str, gold: object) -> tuple[object, bool]:
    spec = resolve_task(task)
    predicted = extract(spec, response)
    return predicted, is_correct(spec, predicted, gold)


def test_every_paper_task_is_covered():
    assert set(COMMONSENSE_CASES) == set(COMMONSENSE_TASKS)
    assert set(ARITHMETIC_TASKS) == {"gsm8k", "SVAMP", "AQuA", "mawps", "MultiArith", "AddSub", "SingleEq"}


@pytest.mark.parametrize("task", sorted(COMMONSENSE_CASES))
def test_commonsense_right_wrong_malformed_several(task):
    gold, wrong, other = COMMONSENSE_CASES[task]
    # Right: the pre-filled response plus the 4 new tokens the model wrote.
    assert score(task, f"the correct answer is {gold}", gold) == (gold, True)
    # Wrong.
    assert score(task, f"the correct answer is {wrong}", gold) == (wrong, False)
    # Malformed: no answer word at all, a truncated word, an upper-cased word (the rule is case-sensitive).
    assert score(task, "the correct answer is", gold) == (None, False)
    assert score(task, f"the correct answer is {gold[:-1]}", gold) == (None, False)
    assert score(task, f"the correct answer is {gold.upper()}", gold) == (None, False)
    # Several candidates: the first one in the response counts.
    assert score(task, f"the correct answer is {wrong} or {gold}", gold) == (wrong, False)
    assert score(task, f"the correct answer is {gold}, not {other}", gold) == (gold, True)
    # Attached to other text (the reference's regex is unanchored).
    assert score(task, f"the correct answer is{gold}.", gold) == (gold, True)


def test_commonsense_reads_only_after_the_last_response_marker():
    spec = resolve_task("winogrande")
    prompt = build_prompt("Fill the blank.\n\nOption1: a Option2: b\n\nAnswer format: option1/option2")
    # The instruction lists option1 first; only the response counts.
    assert extract_from_text(spec, prompt + "the correct answer is option2") == "option2"
    assert extract_from_text(spec, prompt + "### Response:\nthe correct answer is option1") == "option1"
    assert extract_from_text(spec, prompt + "no idea") is None


NUMBER_TASKS = ["gsm8k", "SVAMP", "mawps", "MultiArith", "AddSub", "SingleEq"]


@pytest.mark.parametrize("task", NUMBER_TASKS)
def test_arithmetic_last_number_within_tolerance(task):
    # Right, with commas and a decimal gold written as text.
    assert score(task, "3 + 4 = 7. 7 * 1,000 = 7,000. The answer is 7,000.", "7000.0") == (7000.0, True)
    # Wrong: an earlier number matches the gold, the last one does not.
    assert score(task, "The answer is 18. Then 18 - 2 = 16", "18") == (16.0, False)
    # Several candidates: the last one counts, negatives and decimals included.
    assert score(task, "from 4 down by 7.5 gives -3.5", -3.5) == (-3.5, True)
    # Tolerance 0.001, inclusive.
    assert score(task, "The answer is 2.0005", "2")[1] is True
    assert score(task, "The answer is 2.002", "2")[1] is False
    # Malformed: no number.
    assert score(task, "The answer is seven", "7") == (None, False)
    assert score(task, "", "7") == (None, False)
    # "5." is a number for the reference pattern.
    assert score(task, "It costs 5.", "5") == (5.0, True)


def test_aqua_first_capital_letter():
    assert score("AQuA", "The answer is C", "C") == ("C", True)
    assert score("AQuA", "The answer is D", "C") == ("D", False)
    assert score("AQuA", "the answer is unknown", "C") == (None, False)
    assert score("AQuA", "B or D", "D") == ("B", False)
    # The reference rule takes the first capital A-E anywhere, even inside a word.
    assert score("AQuA", "Answer: C", "C") == ("A", False)
    assert score("AQuA", "Each box holds 3, so E", "E") == ("E", True)


@given(st.integers(min_value=-10**9, max_value=10**9), st.text(alphabet="abc xyz.:=", max_size=20))
def test_last_number_survives_thousands_separators(n, prefix):
    assert extract_number(f"{prefix} {n:,}") == float(n)


def test_task_names_and_aliases_are_case_insensitive():
    assert resolve_task("BOOLQ").name == "boolq"
    assert resolve_task("arc-e").name == "ARC-Easy"
    assert resolve_task("Arc_Challenge").name == "ARC-Challenge"
    assert resolve_task("SIQA").name == "social_i_qa"
    assert resolve_task("obqa").name == "openbookqa"
    assert resolve_task("svamp").name == "SVAMP"
    assert resolve_task("aqua").name == "AQuA"


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(PerftError) as info:
        resolve_task("boolk", tmp_path)
    message = str(info.value)
    assert "boolk" in message and "boolq" in message and "ARC-Challenge" in message and "task.json" in message


def test_paper_protocol_settings_per_task():
    for name in COMMONSENSE_TASKS:
        spec = resolve_task(name)
        assert spec.prefill == "the correct answer is" and spec.max_new_tokens == 4 and spec.supports_loglik
    for name in ARITHMETIC_TASKS:
        spec = resolve_task(name)
        assert spec.prefill == "" and spec.max_new_tokens == 256 and not spec.supports_loglik


def test_sidecar_choice_and_number_tasks(tmp_path):
    (tmp_path / "mytask").mkdir()
    side = tmp_path / "mytask" / "task.json"
    side.write_text(json.dumps({"answer_type": "choice", "choices": "opt|option|(c)", "prefill": "so"}))
    spec = resolve_task("MyTask", tmp_path)
    assert spec.name == "mytask" and spec.choices == ("opt", "option", "(c)") and spec.prefill == "so"
    # A choice that is a prefix of another cannot shadow it; special characters are literal.
    assert extract(spec, "so option") == "option"
    assert extract(spec, "so opt") == "opt"
    assert extract(spec, "so (c)") == "(c)"
    assert extract(spec, "so c") is None

    side.write_text(json.dumps({"kind": "arithmetic", "answer_pattern": r"-?\d+\.?\d*", "max_new_tokens": 32}))
    spec = load_task_file(side)
    assert spec.answer_type == "number" and spec.max_new_tokens == 32 and not spec.supports_loglik


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"choices": ["a", "b"]}, "answer_type"),
        ({"answer_type": "choice"}, "non-empty list"),
        ({"answer_type": "choice", "choices": ["a", "a"]}, "duplicates"),
        ({"answer_type": "number", "choices": ["a"]}, "no 'choices'"),
        ({"answer_type": "words"}, "'choice' or 'number'"),
        ({"answer_type": "number", "answer_pattern": r"\d+"}, "answer_pattern"),
        ({"answer_type": "number", "colour": 1}, "unknown fields"),
        ({"answer_type": "number", "max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_sidecars_say_what_to_fix(tmp_path, content, needle):
    path = tmp_path / "t" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    with pytest.raises(PerftError, match=needle):
        load_task_file(path)
    path.write_text("{not json")
    with pytest.raises(PerftError, match="cannot read task file"):
        load_task_file(path)


def test_register_task_from_python():
    spec = register_task(TaskSpec(name="yesno_test", answer_type="choice", choices=("yes", "no"), aliases=("yn_test",)))
    try:
        assert resolve_task("YN_TEST") is spec
        with pytest.raises(PerftError, match="already"):
            register_task(TaskSpec(name="other_test", answer_type="number", aliases=("yesno_test",)))
        with pytest.raises(PerftError, match="already"):
            register_task(TaskSpec(name="boolq", answer_type="number"))
    finally:
        unregister_task("yesno_test")
    with pytest.raises(PerftError):
        resolve_task("yn_test")
