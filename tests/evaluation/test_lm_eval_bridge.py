"""The lm-evaluation-harness bridge on small local tasks (YAML + JSON on disk, nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.evaluation import make_model, make_tokenizer

pytest.importorskip("lm_eval")

from perft.errors import PerftError  # noqa: E402
from perft.evaluation.lm_eval_bridge import (  # noqa: E402
    check_tasks,
    evaluate_with_lm_eval,
    format_results,
    task_manager,
)
from perft.evaluation.loglik import score_continuations  # noqa: E402

DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0, "answer": "blue"},
    {"question": "Snow is usually", "choices": ["black", "white"], "label": 1, "answer": "white"},
    {"question": "A cat says", "choices": ["meow", "moo", "quack"], "label": 0, "answer": "meow"},
    {"question": "Two plus two is", "choices": ["three", "four", "five"], "label": 1, "answer": "four"},
]

MC_YAML = """task: perft_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """task: perft_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_eval")
    data = root / "docs.json"
    data.write_text(json.dumps(DOCS))
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "mc.yaml").write_text(MC_YAML.format(data=data, cache=root / "hf_cache"))
    (tasks_dir / "gen.yaml").write_text(GEN_YAML.format(data=data, cache=root / "hf_cache"))
    model_dir = root / "model"
    texts = [d["question"] + " " + " ".join(d["choices"]) for d in DOCS]
    tokenizer = make_tokenizer(model_dir, texts)
    model = make_model(model_dir, len(tokenizer))
    manager = task_manager(tasks_dir, include_defaults=False)
    return {"root": root, "tasks": tasks_dir, "model_dir": model_dir, "model": model, "tok": tokenizer,
            "manager": manager}


def loglik_of_samples(results, task):
    """(context, continuation) -> log-likelihood, as lm-eval computed them."""
    out = {}
    for sample in results["samples"][task]:
        for args, resp in zip(sample["arguments"], sample["resps"]):
            out[(args[0], args[1])] = resp[0][0]
    return out


def test_model_object_through_hflm_runs_local_tasks(setup):
    results = evaluate_with_lm_eval(
        setup["model"], setup["tok"], ["perft_local_mc", "perft_local_gen"], manager=setup["manager"],
        batch_size=2, log_samples=True, bootstrap_iters=0,
    )
    mc = results["results"]["perft_local_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and results["n-samples"]["perft_local_mc"]["effective"] == len(DOCS)
    assert "exact_match,none" in results["results"]["perft_local_gen"]
    assert len(results["samples"]["perft_local_gen"]) == len(DOCS)
    # lm-eval's log-likelihoods agree with perft's own scorer on the same (context, continuation) pairs.
    theirs = loglik_of_samples(results, "perft_local_mc")
    assert len(theirs) == sum(len(d["choices"]) for d in DOCS)
    ours = score_continuations(setup["model"], setup["tok"], list(theirs), batch_size=3)
    for (pair, value), score in zip(theirs.items(), ours):
        assert score.logprob == pytest.approx(value, abs=1e-4), pair
    # ... and its accuracy is the share of docs whose gold option has the highest log-likelihood.
    correct = 0
    for doc in DOCS:
        scores = [theirs[(doc["question"], " " + c)] for c in doc["choices"]]
        correct += scores.index(max(scores)) == doc["label"]
    assert mc["acc,none"] == pytest.approx(correct / len(DOCS))
    table = format_results(results)
    assert "perft_local_mc" in table and "acc" in table


def test_registered_perft_model_name_loads_an_adapter(setup, tmp_path):
    import lm_eval
    from transformers import AutoModelForCausalLM

    from perft import PerftConfig, PerftModel, get_perft_model

    base = AutoModelForCausalLM.from_pretrained(str(setup["model_dir"]))
    perft_model = get_perft_model(base, PerftConfig(variant="single", rank=4))
    torch.manual_seed(3)
    with torch.no_grad():  # move the adapter away from its identity initialisation
        for param in perft_model.adapter_state_dict().values():
            param.normal_(0.0, 0.3)
    adapter = tmp_path / "adapter"
    perft_model.save_pretrained(adapter)

    results = lm_eval.simple_evaluate(
        model="perft",
        model_args=f"pretrained={setup['model_dir']},adapter={adapter},device=cpu,dtype=float32",
        tasks=["perft_local_mc"], task_manager=setup["manager"], log_samples=True, bootstrap_iters=0,
    )
    theirs = loglik_of_samples(results, "perft_local_mc")
    reloaded = PerftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(setup["model_dir"])), adapter)
    with_adapter = score_continuations(reloaded, setup["tok"], list(theirs))
    without = score_continuations(setup["model"], setup["tok"], list(theirs))
    assert [s.logprob for s in with_adapter] == pytest.approx(list(theirs.values()), abs=1e-4)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(with_adapter, without)) > 1e-3


def test_unknown_lm_eval_task_fails_with_suggestions(setup):
    with pytest.raises(PerftError, match="did you mean perft_local_mc"):
        check_tasks(["perft_local_mcc"], setup["manager"])
    with pytest.raises(PerftError, match="no lm-eval tasks"):
        check_tasks([" "], setup["manager"])
    with pytest.raises(PerftError, match="does not exist"):
        task_manager(setup["root"] / "missing", include_defaults=False)


def test_cli_runs_local_lm_eval_task_with_the_paper_tasks(setup, tmp_path, capsys):
    from perft.cli import main
    from tests.helpers.evaluation import boolq_records, write_task

    write_task(tmp_path / "dataset", "boolq", boolq_records(2))
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(setup["model_dir"]), "--tasks", "boolq", "--data-dir",
                 str(tmp_path / "dataset"), "--lm-eval-tasks", "perft_local_mc", "--lm-eval-include",
                 str(setup["tasks"]), "--output", str(out), "--max-samples", "3", "--no-progress"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0 and "protocol: generate" in printed and "perft_local_mc" in printed
    assert "%|" not in captured.err, captured.err  # --no-progress: no bar, lm-eval's included
    saved = json.loads((out / "lm_eval_results.json").read_text())
    assert saved["n-samples"]["perft_local_mc"]["effective"] == 3
    assert json.loads((out / "summary.json").read_text())["tasks"]["boolq"]["n"] == 2
