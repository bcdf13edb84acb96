"""`perft train` with no method flags trains with the paper's recipe, and docs/training.md's
table of (setting, paper, perft default) matches the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from perft.training.args import TrainingConfig, paper_aux_coef
from tests.helpers.training import make_workspace

REPO = Path(__file__).resolve().parents[2]


def test_perft_train_without_method_flags_writes_the_paper_recipe(tmp_path):
    from perft.cli import main

    ws = make_workspace(tmp_path / "ws", n_records=12)
    out = tmp_path / "run"
    code = main(["train", "--model", str(ws["model"]), "--data", str(ws["data"]), "--output", str(out),
                 "--max-steps", "1", "--val-set-size", "4", "--batch-size", "4", "--rank", "2",
                 "--report-to", "none", "--no-progress"])
    assert code == 0
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["train_on_inputs"] is True
    assert saved["router_aux_loss_coef"] == 0.01 and saved["base_router_aux_loss_coef"] == 0.01  # OLMoE
    assert saved["init"] == "normal" and saved["prompt_style"] == "clean"
    adapter = yaml.safe_load((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["router_aux_loss_coef"] == 0.01 and adapter["init"] == "normal"


def test_family_coefficients():
    assert (paper_aux_coef("olmoe"), paper_aux_coef("mixtral"), paper_aux_coef("qwen3_moe")) == (0.01, 0.02, 0.01)
    cfg = TrainingConfig()
    cfg.apply_family_defaults("mixtral", has_router_loss=True)
    assert (cfg.router_aux_loss_coef, cfg.base_router_aux_loss_coef) == (0.02, 0.02)
    cfg = TrainingConfig(base_router_aux_loss_coef=0.0)  # explicitly off stays off
    cfg.apply_family_defaults("olmoe", has_router_loss=False)
    assert (cfg.router_aux_loss_coef, cfg.base_router_aux_loss_coef) == (0.01, 0.0)
    cfg = TrainingConfig()  # a base without a balance loss: the base coefficient stays unset
    cfg.apply_family_defaults("deepseek_v3", has_router_loss=False)
    assert cfg.base_router_aux_loss_coef is None


def _table_rows() -> list[list[str]]:
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## Method and optimisation: the paper's recipe", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ")]
    assert rows[0] == ["setting", "paper", "perft default", "same"]
    return rows[1:]


def test_docs_table_matches_the_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
    rows = _table_rows()
    named = {re.fullmatch(r"`(\w+)`", r[0]).group(1) for r in rows if re.fullmatch(r"`(\w+)`", r[0])}
    assert {"train_on_inputs", "router_aux_loss_coef", "base_router_aux_loss_coef", "init", "dropout",
            "dropout_at", "load_best_at_end", "prompt_style", "lr", "batch_size"} <= named
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    differences = text.split("The differences, and why:", 1)[1].split("\n## ", 1)[0]
    for setting, _paper, default, same in rows:
        assert same in ("yes", "no"), setting
        if same == "no":  # every deviation is named, with its reason, under the table
            assert f"- **{setting}**" in differences, setting
        match = re.fullmatch(r"`(\w+)`", setting)
        if not match:
            continue
        documented = re.match(r"`([^`]*)`", default).group(1)
        value = defaults[match.group(1)]
        if isinstance(value, float):
            assert float(documented) == value, setting
        else:
            assert yaml.safe_load(documented) == value, setting
