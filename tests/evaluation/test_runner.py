"""The evaluation runner end to end on a tiny random OLMoE: files, resume, summary, table, CLI, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from perft.cli import main
from perft.data.prompts import response_of
from perft.errors import PerftError
from perft.evaluation import (
    DecodingSettings,
    EvalSettings,
    Evaluation,
    extract,
    format_comparison,
    format_table,
    generate_batch,
    is_correct,
    prepare_tasks,
)
from tests.helpers.evaluation import boolq_records, make_model, make_tokenizer, math_records, write_task

N_BOOLQ, N_MATH = 6, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_runner")
    data = root / "dataset"
    boolq, math = boolq_records(N_BOOLQ), math_records(N_MATH)
    write_task(data, "boolq", boolq)
    write_task(data, "gsm8k", math)
    model_dir = root / "model"
    tokenizer = make_tokenizer(model_dir, [r["instruction"] + " " + r["output"] for r in boolq + math])
    model = make_model(model_dir, len(tokenizer))
    return {"root": root, "data": data, "model_dir": model_dir, "model": model, "tok": tokenizer}


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def settings(**kw):
    return EvalSettings(**{"max_new_tokens": 6, "batch_size": 4, **kw})


def test_generate_run_writes_rows_summary_and_table(world, tmp_path):
    tasks = prepare_tasks(["boolq", "gsm8k"], world["data"])
    summary = Evaluation(tasks, tmp_path, settings()).run(world["model"], world["tok"], progress=False)
    for task, n in (("boolq", N_BOOLQ), ("gsm8k", N_MATH)):
        rows = read_rows(tmp_path / f"{task}.jsonl")
        assert sorted(r["index"] for r in rows) == list(range(n))
        spec = tasks[0 if task == "boolq" else 1].spec
        for row in rows:
            assert set(row) >= {"prompt", "generation", "extracted", "gold", "correct"}
            # The stored verdict is the extraction rule applied to the stored generation.
            assert row["response"] == response_of(row["prompt"] + row["generation"])
            assert row["extracted"] == extract(spec, row["response"])
            assert row["correct"] == is_correct(spec, row["extracted"], row["gold"])
        if task == "boolq":
            assert all(r["prompt"].endswith("### Response:\nthe correct answer is") for r in rows)
        else:
            assert all(r["prompt"].endswith("### Response:\n") for r in rows)
        entry = summary["tasks"][task]
        assert entry["n"] == n and entry["accuracy"] == sum(r["correct"] for r in rows) / n
    assert summary["average"]["accuracy"] == pytest.approx(
        (summary["tasks"]["boolq"]["accuracy"] + summary["tasks"]["gsm8k"]["accuracy"]) / 2
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = format_table(summary)
    assert table.splitlines()[0].startswith("protocol: generate") and "4-beam search" in table
    assert "differs from the paper" in table  # max_new_tokens was overridden
    assert "boolq" in table and "gsm8k" in table and "average" in table
    paper = EvalSettings()
    assert "(the paper's protocol)" in paper.describe()


def test_resume_skips_written_samples(world, tmp_path, monkeypatch):
    tasks = prepare_tasks(["boolq"], world["data"])
    first = Evaluation(tasks, tmp_path / "a", settings(batch_size=1)).run(world["model"], world["tok"], progress=False)
    rows = read_rows(tmp_path / "a" / "boolq.jsonl")

    # An interrupted run: two rows written, the third cut short mid-line.
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "boolq.jsonl").read_text().splitlines(keepends=True)
    shutil.copy(tmp_path / "a" / "run.json", tmp_path / "b" / "run.json")
    (tmp_path / "b" / "boolq.jsonl").write_text("".join(lines[:2]) + lines[2][:25])

    seen = []
    original = world["model"].generate

    def counting_generate(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(world["model"], "generate", counting_generate)
    resumed = Evaluation(tasks, tmp_path / "b", settings(batch_size=1))
    assert resumed.pending(tasks[0]) == list(range(2, N_BOOLQ))
    second = resumed.run(world["model"], world["tok"], progress=False)
    assert sum(seen) == N_BOOLQ - 2
    assert second["tasks"] == first["tasks"]
    by_index = {r["index"]: r for r in read_rows(tmp_path / "b" / "boolq.jsonl")}
    assert [by_index[i]["generation"] for i in range(N_BOOLQ)] == [r["generation"] for r in rows]

    # Everything written: nothing to do; fewer samples: the summary covers only those.
    seen.clear()
    again = Evaluation(prepare_tasks(["boolq"], world["data"], max_samples=3), tmp_path / "b", settings(batch_size=1))
    summary = again.run(world["model"], world["tok"], progress=False)
    assert seen == [] and summary["tasks"]["boolq"]["n"] == 3


def test_left_padded_batches_match_single_prompts(world):
    prompts = [prepare_tasks(["boolq"], world["data"])[0].prompt(i) for i in range(3)]
    prompts[1] += " and some more words to make it longer"
    greedy = DecodingSettings(greedy=True)
    batched = generate_batch(world["model"], world["tok"], prompts, max_new_tokens=5, decoding=greedy)
    single = [generate_batch(world["model"], world["tok"], [p], max_new_tokens=5, decoding=greedy)[0] for p in prompts]
    assert batched == single
    assert world["tok"].padding_side == "right"  # restored after generation


def test_loglik_run_scores_each_option(world, tmp_path):
    tasks = prepare_tasks(["boolq"], world["data"], protocol="loglik")
    summary = Evaluation(tasks, tmp_path, EvalSettings(protocol="loglik", batch_size=3)).run(
        world["model"], world["tok"], progress=False
    )
    rows = read_rows(tmp_path / "boolq.jsonl")
    assert len(rows) == N_BOOLQ and summary["metrics"] == ["accuracy", "accuracy_norm"]
    model, tok = world["model"], world["tok"]
    for row in rows[:2]:
        assert row["choices"] == ["true", "false"]
        # Recompute each option's log-probability unbatched, without padding.
        for choice, logprob in zip(row["choices"], row["logprobs"]):
            ctx = tok(row["prompt"])["input_ids"]
            full = tok(row["prompt"] + " " + choice)["input_ids"]
            assert full[: len(ctx)] == ctx
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
            expected = sum(logits[p - 1, full[p]].item() for p in range(len(ctx), len(full)))
            assert logprob == pytest.approx(expected, abs=1e-4)
        best = max(range(2), key=lambda i: row["logprobs"][i])
        assert row["extracted"] == row["choices"][best]
        assert row["correct"] == (row["extracted"] == row["gold"])
    assert summary["tasks"]["boolq"]["accuracy"] == sum(r["correct"] for r in rows) / N_BOOLQ
    table = format_table(summary)
    assert table.startswith("protocol: loglik") and "acc_norm" in table


def test_loglik_uses_the_options_the_instruction_offers(world, tmp_path):
    records = [
        {"instruction": "Pick one.\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3",
         "input": "", "answer": "answer2"},
        {"instruction": "Pick one with no format line.", "answer": "answer5"},
    ]
    write_task(tmp_path, "social_i_qa", records)
    task = prepare_tasks(["siqa"], tmp_path, protocol="loglik")[0]
    assert task.choices(0) == ["answer1", "answer2", "answer3"]
    assert task.choices(1) == [f"answer{i}" for i in range(1, 6)]


def test_compare_prints_runs_side_by_side(world, tmp_path):
    gen = Evaluation(prepare_tasks(["boolq", "gsm8k"], world["data"]), tmp_path / "gen", settings())
    s1 = gen.run(world["model"], world["tok"], progress=False)
    ll = Evaluation(prepare_tasks(["boolq"], world["data"], protocol="loglik"), tmp_path / "ll",
                    EvalSettings(protocol="loglik"))
    s2 = ll.run(world["model"], world["tok"], progress=False)
    text = format_comparison([tmp_path / "gen", tmp_path / "ll" / "summary.json"])
    header, _, boolq_line, gsm_line, _, avg_line, *notes = text.splitlines()
    assert "gen generate" in header and "ll loglik" in header and "ll loglik-norm" in header
    assert boolq_line.split()[1:] == [f"{100 * s1['tasks']['boolq']['accuracy']:.2f}",
                                      f"{100 * s2['tasks']['boolq']['accuracy']:.2f}",
                                      f"{100 * s2['tasks']['boolq']['accuracy_norm']:.2f}"]
    assert gsm_line.split()[0] == "gsm8k" and gsm_line.split()[2:] == ["-", "-"]
    assert avg_line.startswith("average (1 common)")
    assert any("only the 1 tasks every run has" in n for n in notes)
    with pytest.raises(PerftError, match="no summary.json"):
        format_comparison([tmp_path / "missing"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "records, needle",
    [
        ([{"instruction": "q", "answer": "true"}, {"instruction": "q"}], "record 1 has no 'answer'"),
        ([{"answer": "true"}], "record 0 has no 'instruction'"),
        ([{"instruction": "q", "answer": "yes"}], "not one of true|false"),
        ([{"instruction": "q", "answer": "true"}, "text", 3], r"record 1 is not a JSON object \(1 more"),
        ([], "holds no records"),
    ],
)
def test_bad_records_fail_before_any_work(tmp_path, records, needle):
    write_task(tmp_path, "boolq", records)
    with pytest.raises(PerftError, match=needle):
        prepare_tasks(["boolq"], tmp_path)


def test_bad_inputs_name_the_problem(tmp_path):
    write_task(tmp_path, "gsm8k", [{"instruction": "q", "answer": "twelve"}])
    with pytest.raises(PerftError, match="not a number"):
        prepare_tasks(["gsm8k"], tmp_path)
    with pytest.raises(PerftError, match=r"looked for .*piqa/test\.json"):
        prepare_tasks(["piqa"], tmp_path)
    with pytest.raises(PerftError, match="unknown task 'piqq'.*known tasks: boolq, piqa"):
        prepare_tasks(["piqq"], tmp_path)
    write_task(tmp_path, "boolq", [{"instruction": "q", "answer": "true"}])
    with pytest.raises(PerftError, match="listed twice"):
        prepare_tasks(["boolq", "BoolQ"], tmp_path)
    write_task(tmp_path, "AddSub", [{"instruction": "q", "answer": "3"}])
    with pytest.raises(PerftError, match="--protocol generate"):
        prepare_tasks(["boolq", "AddSub"], tmp_path, protocol="loglik")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test.json").write_text('{"a": 1}')
    (tmp_path / "broken" / "task.json").write_text('{"answer_type": "number"}')
    with pytest.raises(PerftError, match="holds a JSON object, not a list of records"):
        prepare_tasks(["broken"], tmp_path)


def test_output_folder_of_another_run_is_refused(world, tmp_path):
    tasks = prepare_tasks(["boolq"], world["data"], max_samples=1)
    Evaluation(tasks, tmp_path, settings()).run(world["model"], world["tok"], progress=False)
    with pytest.raises(PerftError, match="different settings"):
        Evaluation(tasks, tmp_path, settings(decoding=DecodingSettings(greedy=True)))
    Evaluation(tasks, tmp_path / "x", settings(), run_info={"model": "a"}).run(
        world["model"], world["tok"], progress=False
    )
    with pytest.raises(PerftError, match="different model"):
        Evaluation(tasks, tmp_path / "x", settings(), run_info={"model": "b"})
    other = tmp_path.parent / (tmp_path.name + "_data")
    write_task(other, "boolq", [{"instruction": "another question", "answer": "true"}])
    with pytest.raises(PerftError, match="different test data"):
        Evaluation(prepare_tasks(["boolq"], other), tmp_path, settings())


# ----------------------------------------------------------------------------- CLI
def test_cli_runs_and_compares(world, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(world["model_dir"]), "--tasks", "boolq,GSM8K", "--data-dir", str(world["data"]),
                 "--output", str(out), "--max-samples", "2", "--max-new-tokens", "4", "--batch-size", "2",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "protocol: generate" in printed and "boolq" in printed and "gsm8k" in printed
    assert (out / "table.txt").read_text().strip() == printed.strip()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["boolq"]["n"] == 2 and summary["model"] == str(world["model_dir"].resolve())
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    compared = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("boolq") for line in compared) == 1  # one row per task
    # The protocol line states each task's own budget (the --max-new-tokens override here).
    assert "new tokens: 4," in printed


def test_cli_bad_input_is_one_line_before_loading(world, tmp_path, capsys, monkeypatch):
    import perft.loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(perft.loading, "load_base_model", no_load)
    base = ["eval", "--model", str(world["model_dir"]), "--data-dir", str(world["data"]), "--output", str(tmp_path)]
    cases = [
        (["--tasks", "boolq,hellaswagg"], "unknown task 'hellaswagg'"),
        (["--tasks", "piqa"], "no test file for task piqa"),
        (["--tasks", "gsm8k", "--protocol", "loglik"], "--protocol generate"),
        (["--tasks", "boolq", "--adapter", str(tmp_path / "nope")], "adapter directory"),
        ([], "nothing to evaluate"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_cli_with_perft_adapter_and_foreign_adapter(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from perft import PerftConfig, get_perft_model

    base = AutoModelForCausalLM.from_pretrained(str(world["model_dir"]))
    adapter = tmp_path / "adapter"
    get_perft_model(base, PerftConfig(variant="routed", num_experts=2, top_k=1, rank=4)).save_pretrained(adapter)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(world["model_dir"]), "--adapter", str(adapter), "--tasks", "boolq",
            "--data-dir", str(world["data"]), "--output", str(out), "--max-samples", "2", "--no-progress"]
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["adapter"] == str(adapter.resolve())
    capsys.readouterr()

    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["model_type"] = "mixtral"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    args[args.index(str(adapter))] = str(foreign)
    args[args.index(str(out))] = str(tmp_path / "eval2")
    assert main(args) == 2
    assert "trained on a mixtral model" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()
