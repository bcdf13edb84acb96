"""`--adapter` accepts a `perft train` run folder; an adapter recorded for another base model is reported."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from perft import PerftConfig, get_perft_model
from perft.errors import PerftError
from perft.evaluation.adapter_dirs import resolve_adapter_dir
from perft.methods import check_adapter_matches
from perft.testing import save_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model_dir = save_tiny_model("olmoe", root / "olmoe-a")
    torch.manual_seed(0)
    model = get_perft_model(AutoModelForCausalLM.from_pretrained(model_dir), PerftConfig(variant="single", rank=2))
    model.save_pretrained(root / "run" / "adapter")  # the layout `perft train --output run` writes
    return {"root": root, "model": model_dir, "run": root / "run"}


def test_a_run_folder_resolves_to_its_exported_adapter(run):
    assert resolve_adapter_dir(run["run"]) == str(run["run"] / "adapter")
    assert resolve_adapter_dir(run["run"] / "adapter") == str(run["run"] / "adapter")
    (run["root"] / "empty").mkdir(exist_ok=True)
    with pytest.raises(PerftError, match=r"no adapter_config.json in .*empty \(nor in .*empty/adapter\)"):
        resolve_adapter_dir(run["root"] / "empty")
    with pytest.raises(PerftError, match="does not exist"):
        resolve_adapter_dir(run["root"] / "missing")


def test_another_base_of_the_same_shapes_is_warned_about(run, capsys):
    adapter = str(run["run"] / "adapter")
    recorded = json.loads((run["run"] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    check_adapter_matches(recorded, adapter)
    assert capsys.readouterr().err == ""
    other = save_tiny_model("olmoe", run["root"] / "olmoe-b", seed=1)  # same type and shapes, other weights
    capsys.readouterr()
    check_adapter_matches(str(other), adapter)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: adapter" in err and f"not on {other}" in err
    mixtral = save_tiny_model("mixtral", run["root"] / "mixtral")
    with pytest.raises(PerftError, match="trained on a olmoe model"):
        check_adapter_matches(str(mixtral), adapter)


def test_perft_eval_and_analyze_take_the_run_folder(run, tmp_path, capsys):
    from perft.cli import main
    from perft.testing import save_tiny_tokenizer
    from tests.helpers.evaluation import boolq_records, write_task

    save_tiny_tokenizer(run["model"])
    write_task(tmp_path / "dataset", "boolq", boolq_records(2))
    code = main(["eval", "--model", str(run["model"]), "--adapter", str(run["run"]), "--tasks", "boolq",
                 "--data-dir", str(tmp_path / "dataset"), "--output", str(tmp_path / "eval"), "--greedy",
                 "--max-new-tokens", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["adapter"] == str((run["run"] / "adapter").resolve())
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "the quick brown fox", "output": "jumps"}] * 2))
    code = main(["analyze", "--model", str(run["model"]), "--adapter", str(run["run"]), "--data", str(data),
                 "--output", str(tmp_path / "analysis"), "--projection", "none", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert str(run["run"] / "adapter") in json.dumps(analysis)
