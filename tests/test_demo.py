"""A small version of `perft demo` end to end: evaluate base, fine-tune PERFT-R, evaluate, table, figures."""

from __future__ import annotations

import json

import pytest

from perft.comparison import ALL_METHODS, GENERATED_END, GENERATED_START, run_all_variants
from perft.demo import DEMO_TASKS, DemoConfig, Method, plot_loss_curve, run_demo
from perft.errors import PerftError
from perft.testing import save_tiny_model, save_tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tasks = root / "dataset"
    texts = []
    for task in DEMO_TASKS:
        (tasks / task).mkdir(parents=True)
        if task == "tiny_math":
            records = [{"instruction": f"What is {i} plus 1 ?", "input": "", "output": f"The answer is {i + 1}",
                        "answer": str(i + 1)} for i in range(24)]
            info = {"answer_type": "number", "max_new_tokens": 8}
        else:
            records = [{"instruction": f"Is {i} even ? Answer format: answer1/answer2", "input": "",
                        "output": f"the correct answer is answer{1 + i % 2}", "answer": f"answer{1 + i % 2}"}
                       for i in range(24)]
            info = {"answer_type": "choice", "choices": "answer1|answer2", "prefill": "the correct answer is"}
        texts += [r["instruction"] + " " + r["output"] for r in records]
        (tasks / task / "train.json").write_text(json.dumps(records))
        (tasks / task / "test.json").write_text(json.dumps(records[:6]))
        (tasks / task / "task.json").write_text(json.dumps(info))
    model = save_tiny_model("olmoe", root / "model", vocab_size=128)
    save_tiny_tokenizer(model, texts + ["Below is an instruction that describes a task . Write a response that "
                                        "appropriately completes the request . ### Instruction : Response :"])
    return model, tasks


def small(setup, tmp_path, **kw) -> DemoConfig:
    model, tasks = setup
    return DemoConfig(output=str(tmp_path / "out"), base_model=str(model), task_dir=str(tasks), max_steps=4, val_set_size=8,
                      batch_size=8, eval_batch_size=8, progress=False, threads=1, **kw)


def test_demo_end_to_end(setup, tmp_path):
    summary = run_demo(small(setup, tmp_path))
    out = tmp_path / "out"
    for name in ("summary.json", "table.txt", "loss_curve.png", "routing.png"):
        assert (out / name).is_file(), name
    assert set(summary["base"]) == {*DEMO_TASKS, "average"} == set(summary["perft_r"])
    assert 0 < summary["trainable_params"] < summary["total_params"]
    table = (out / "table.txt").read_text()
    assert "PERFT-R" in table and "tiny_math" in table and "trainable parameters" in table
    # One adapter per suite, each trained on its own train split (as the paper trains one per dataset).
    for task in DEMO_TASKS:
        adapter = out / "perft-r" / task / "adapter"
        assert summary["adapters"][task] == str(adapter)
        assert (adapter / "adapter_model.safetensors").is_file()
        assert (out / "perft-r" / task / "eval" / f"{task}.jsonl").is_file()
    routing = json.loads((out / "routing.json").read_text())
    assert list(routing) == list(DEMO_TASKS)
    for task in DEMO_TASKS:  # each suite's adapter analysed on that suite's own test prompts
        assert routing[task]["data"].endswith(f"routing-{task}.json")
        assert [run["name"] for run in routing[task]["runs"]] == [f"PERFT-R on {task}"]


def test_all_variants_writes_the_markdown_table(setup, tmp_path):
    methods = (Method("PERFT-S (r4)", {"variant": "single", "rank": 4}),
               Method("LoRA q,v (PEFT, r2)", {"method": "lora-attn", "rank": 2}))
    results_file = tmp_path / "results.md"
    results_file.write_text(f"notes above\n{GENERATED_START}\nold table\n{GENERATED_END}\nnotes below\n")
    results = run_all_variants(small(setup, tmp_path), seeds=(0, 1), results_file=str(results_file),
                               methods=methods)
    assert len(results) == 4
    text = results_file.read_text()
    assert "| frozen base |" in text and "| PERFT-S (r4) |" in text and "| LoRA q,v (PEFT, r2) |" in text
    assert " ± " in text and "old table" not in text
    assert text.startswith("notes above\n") and text.endswith("notes below\n")  # hand-written notes survive
    assert "](img/results.png)" in text and (tmp_path / "img" / "results.png").stat().st_size > 0
    row = next(line for line in text.splitlines() if line.startswith("| PERFT-S (r4) |")).split(" | ")
    assert row[1] == f"{2 * 2 * 4 * 32:,d}"  # 2dr per layer, d=32, 2 layers ... of the tiny test model
    assert all(r.train_seconds > 0 and r.peak_memory_mib > 0 for r in results)


def test_every_registered_method_is_in_the_comparison():
    from perft.methods import method_names

    compared = {m.settings.get("method", "perft") for m in ALL_METHODS}
    assert compared == set(method_names())
    variants = {m.settings.get("variant") for m in ALL_METHODS if m.settings.get("method", "perft") == "perft"}
    assert variants == {"routed", "embedded", "dense", "single"}


def test_missing_task_files_are_named(setup, tmp_path):
    cfg = small(setup, tmp_path)
    cfg.task_dir = str(tmp_path / "nowhere")
    with pytest.raises(PerftError, match="tiny_commonsense/train.json is missing"):
        run_demo(cfg)


def test_loss_curve_draws_each_suite_and_skips_empty_histories(tmp_path):
    history = [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "lr": 1e-3}, {"step": 2, "val_loss": 1.6}]
    assert plot_loss_curve({"a": history, "b": history[:1]}, tmp_path / "curve.png") == tmp_path / "curve.png"
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert plot_loss_curve({"a": [], "b": []}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"epochs": -1.0}, "epochs must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"max_eval_samples": 0}, "--max-eval-samples must be at least 1"),
])
def test_bad_settings_fail_before_the_base_is_evaluated(setup, tmp_path, change, message):
    cfg = small(setup, tmp_path, **change)
    with pytest.raises(PerftError, match=message):
        run_demo(cfg)
    assert not (tmp_path / "out" / "base").exists()


def test_parallel_jobs_give_the_sequential_scores(setup, tmp_path):
    """--jobs 2 runs (method, seed) pairs in worker processes: same scores, losses and order as one at a time."""
    methods = (Method("PERFT-R (2 experts, top-1, r2)", {"variant": "routed", "num_experts": 2, "top_k": 1, "rank": 2}),
               Method("LoRA q,v (PEFT, r2)", {"method": "lora-attn", "rank": 2}))
    one = run_all_variants(small(setup, tmp_path / "one"), seeds=(0, 1), methods=methods)
    two = run_all_variants(small(setup, tmp_path / "two"), seeds=(0, 1), methods=methods, jobs=2)
    assert [(r.method, r.seed) for r in two] == [(r.method, r.seed) for r in one] == [
        (m.name, s) for m in methods for s in (0, 1)]
    for a, b in zip(one, two):
        assert a.accuracy == b.accuracy and a.trainable == b.trainable
        assert [h.get("loss") for h in a.history["tiny_math"]] == [h.get("loss") for h in b.history["tiny_math"]]
    # seeds differ, so a worker that ignored its seed would show here
    assert [h.get("loss") for h in one[0].history["tiny_math"]] != [h.get("loss") for h in one[1].history["tiny_math"]]
    saved = json.loads((tmp_path / "two" / "out" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved] == [(r.method, r.seed) for r in one]
