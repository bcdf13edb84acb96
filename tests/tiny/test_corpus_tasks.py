"""The embedded default's corpus and shipped tasks: deterministic, well-formed, leak-free."""

from __future__ import annotations

import json
import re

import pytest

from perft.evaluation.extraction import extract_choice
from perft.tiny import SHIPPED_TASKS, default_task_dir
from perft.tiny.corpus import DOMAINS, Document, choice_head, generate_corpus, tell_problem
from perft.tiny.tasks import (
    NUM_OPTIONS,
    SIZES,
    TASKS,
    build_tasks,
    check_no_leak,
    math_problems,
    problem_keys,
    split_facts,
    task_info,
    write_task_files,
)
from perft.tiny.world import World


@pytest.fixture(scope="module")
def tasks():
    return build_tasks()


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(4000, seed=0, exclude=problem_keys())


def test_corpus_is_deterministic_and_covers_all_domains(corpus):
    again = generate_corpus(4000, seed=0, exclude=problem_keys())
    assert corpus == again
    assert generate_corpus(50, seed=1) != corpus[:50]
    assert {d.domain for d in corpus} == set(DOMAINS)
    assert all(d.text.strip() for d in corpus)


def test_corpus_states_the_world_facts(corpus):
    world = World()
    text = " ".join(d.text for d in corpus if d.domain in ("world", "records"))
    # Every person is talked about, and what is said matches the world.
    for name, props in world.people.items():
        assert name in text
        for match in re.finditer(rf"\b{name} has a pet (\w+)\.", text):
            assert match.group(1) == props["pet"]
        for match in re.finditer(rf"\b{name} lives in (\w+)\.", text):
            assert match.group(1) == props["town"]


def test_no_task_item_or_format_in_the_corpus(corpus, tasks):
    check_no_leak([d.text for d in corpus], [d.key for d in corpus], tasks)
    told = {d.key for d in corpus if d.key}
    assert told and not told & problem_keys()


def test_leak_check_catches_leaks(tasks):
    problem = math_problems()["test"][0]
    import random

    leaked = Document("arithmetic", tell_problem(random.Random(0), problem), problem.key)
    with pytest.raises(AssertionError, match="word problems"):
        check_no_leak([leaked.text], [leaked.key], tasks)
    record = tasks["tiny_commonsense"]["test"][0]
    with pytest.raises(AssertionError, match="format marker"):
        check_no_leak([record["instruction"]], [], tasks)
    test_fact = split_facts(World())[1][0]
    leaked_choice = generate_corpus(200, seed=0, choice_facts=[test_fact])
    with pytest.raises(AssertionError, match="choice record about a test fact"):
        check_no_leak([d.text for d in leaked_choice], [], tasks)


def test_choice_records_use_train_facts_only(corpus):
    train_facts, test_facts = split_facts(World())
    heads = [d.text.split(":", 1)[0] for d in corpus if d.text.startswith("choose for")]
    assert len(heads) > 20
    assert set(heads) <= {choice_head(*f[:3]) for f in train_facts}
    assert not set(heads) & {choice_head(*f[:3]) for f in test_facts}


def test_tasks_are_deterministic_and_sized(tasks):
    assert build_tasks() == tasks
    for task in TASKS:
        n_train, n_test = SIZES[task]
        assert len(tasks[task]["train"]) == n_train and len(tasks[task]["test"]) == n_test
        for split in ("train", "test"):
            instructions = [r["instruction"] for r in tasks[task][split]]
            assert len(set(instructions)) == len(instructions)
        train = {r["instruction"] for r in tasks[task]["train"]}
        assert not train & {r["instruction"] for r in tasks[task]["test"]}


def test_records_are_well_formed(tasks):
    for task in TASKS:
        for record in tasks[task]["train"] + tasks[task]["test"]:
            text_fields = {"instruction", "input", "output", "answer"}
            assert set(record) == (text_fields | {"choices"} if task == "tiny_commonsense" else text_fields)
            assert all(isinstance(record[k], str) for k in text_fields)
            assert record["instruction"] and record["output"] and record["answer"]


def test_multiple_choice_answers_match_the_world(tasks):
    world = World()
    info = task_info("tiny_commonsense")
    words = info["answer_words"]
    assert len(words) == len(set(words)) > 50
    train_facts, test_facts = split_facts(world)
    assert not {f[1:3] for f in train_facts} & {f[1:3] for f in test_facts}
    test_subjects = {(f[1], f[3]) for f in test_facts}
    positions = [0] * NUM_OPTIONS
    for record in tasks["tiny_commonsense"]["test"]:
        ins, options, answer = record["instruction"], record["choices"], record["answer"]
        assert ins.endswith(f"Options: {', '.join(options)}.\n\nAnswer format: one of the options")
        assert record["output"] == f"the correct answer is {answer}"
        assert len(set(options)) == NUM_OPTIONS and set(options) <= set(words) and answer in options
        positions[options.index(answer)] += 1
        # The correct option is the value of a test fact about a subject named in the question.
        assert any(s in ins and v == answer for s, v in test_subjects)
        # The paper's rule (first answer word in the response) reads every option back as itself.
        for option in options:
            assert extract_choice(f"the correct answer is {option}", words) == option
    assert len(set(positions)) == 1  # every option position is right equally often


def test_math_outputs_are_correct(tasks):
    for record in tasks["tiny_math"]["train"] + tasks["tiny_math"]["test"]:
        assert record["output"].endswith(f"The answer is {record['answer']}")
        assert record["instruction"].endswith("?")
        for a, sign, b, r in re.findall(r"(\d+) ([+x-]) (\d+) = (\d+)", record["output"]):
            a, b, r = int(a), int(b), int(r)
            assert {"+": a + b, "-": a - b, "x": a * b}[sign] == r
        numbers = re.findall(r"-?\d+\.?\d*", record["output"])
        assert float(numbers[-1]) == float(record["answer"]) >= 0
    problems = math_problems()
    assert not {p.key for p in problems["train"]} & {p.key for p in problems["test"]}


def test_shipped_task_files_match_the_generators(tmp_path):
    written = write_task_files(tmp_path)
    assert default_task_dir() == SHIPPED_TASKS
    for task in TASKS:
        for name in ("train.json", "test.json", "task.json"):
            shipped = json.loads((SHIPPED_TASKS / task / name).read_text())
            assert shipped == json.loads((written / task / name).read_text()), f"{task}/{name} is stale"


def test_missing_assets_are_built_into_the_cache(tmp_path, monkeypatch):
    import perft.tiny as tiny
    import perft.tiny.pretrain as recipe

    monkeypatch.setenv("PERFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "SHIPPED_TASKS", tmp_path / "missing-tasks")
    monkeypatch.setattr(tiny, "SHIPPED_MODEL", tmp_path / "missing-model")
    built = tiny.default_task_dir()
    assert built == tmp_path / "cache" / "tasks" / "dataset"
    assert json.loads((built / "tiny_math" / "test.json").read_text()) == build_tasks()["tiny_math"]["test"]

    calls = []

    def fake_pretrain(cfg):  # the real recipe takes minutes; check what it is asked to build
        calls.append(cfg)
        out = tmp_path / "cache" / "tiny-olmoe"
        out.mkdir(parents=True)
        for name in tiny.MODEL_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(recipe, "pretrain", fake_pretrain)
    path = tiny.default_base_model_path()
    assert path == tmp_path / "cache" / "tiny-olmoe"
    assert (
        len(calls) == 1 and calls[0].output == str(path) and calls[0].steps == recipe.PretrainConfig().steps
    )
    assert tiny.default_base_model_path() == path and len(calls) == 1  # cached: built once
