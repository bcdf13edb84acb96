"""TrainingConfig: YAML + flags, validation of impossible settings, and the paper presets."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from perft.cli import build_parser
from perft.cli.train import config_from_args
from perft.errors import PerftError
from perft.training import TrainingConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
REQUIRED = {"model": "m", "data": "d.json", "output": "out"}


def parse(argv: list[str]) -> TrainingConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_field_has_a_flag_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: a\ndata: b.json\noutput: o\nlr: 1e-4\nrank: 8\nlayers: [0, 1]\nbf16: false\n")
    cfg = parse(["--config", str(path), "--rank", "4", "--no-train-on-inputs", "--resume"])
    assert (cfg.lr, cfg.rank, cfg.layers, cfg.bf16, cfg.resume) == (1e-4, 4, [0, 1], "false", "latest")
    options = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainingConfig)} <= options
    flags_only = parse(["--model", "m", "--data", "d", "--output", "o", "--normalize-top-k", "true", "--layers", "1"])
    assert flags_only.normalize_top_k is True and flags_only.layers == [1] and flags_only.config is None


def test_yaml_errors_are_one_line_and_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: a\nlearning_rat: 1e-4\n")
    with pytest.raises(PerftError, match="unknown setting 'learning_rat'"):
        TrainingConfig.from_yaml(bad)
    bad.write_text("model: a\nmicro_bach_size: 2\n")
    with pytest.raises(PerftError, match="did you mean 'micro_batch_size'"):
        TrainingConfig.from_yaml(bad)
    bad.write_text("model: [a\n")
    with pytest.raises(PerftError, match="not valid YAML at line"):
        TrainingConfig.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(PerftError, match="must hold a mapping"):
        TrainingConfig.from_yaml(bad)
    with pytest.raises(PerftError, match="does not exist"):
        TrainingConfig.from_yaml(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ({"model": None}, 1, "no --model given"),
        ({"top_k": 5, "num_experts": 4}, 1, "top_k=5 is larger than num_experts=4"),
        ({"rank": 0}, 1, "rank must be an integer >= 1, got 0"),
        ({"micro_batch_size": 32, "batch_size": 16}, 1, "micro_batch_size=32 is larger than batch_size=16"),
        ({"micro_batch_size": 5, "batch_size": 16}, 1, "batch_size=16 is not divisible by micro_batch_size=5"),
        ({"micro_batch_size": 4, "batch_size": 12}, 2, "micro_batch_size=4 x 2 process"),
        ({"lr": 0.0}, 1, "lr must be a finite number > 0"),
        ({"lr": "fast"}, 1, "lr must be a number"),
        ({"epochs": -1}, 1, "epochs must be a finite number > 0"),
        ({"variant": "sparse"}, 1, "unknown variant 'sparse'"),
        ({"report_to": "mlflow"}, 1, "unknown report_to 'mlflow'"),
        ({"save_steps": 50, "eval_steps": 80}, 1, "save_steps=50 is not a multiple of eval_steps=80"),
        ({"method": "lora-experts", "dropout": 0.05}, 1, "does not support dropout"),
        ({"dropout": 1.5}, 1, "dropout must be a number in"),
        ({"cutoff_len": 0}, 1, "cutoff_len must be an integer >= 2"),
    ],
)
def test_impossible_settings_are_refused(overrides, world, message):
    with pytest.raises(PerftError, match=message.replace("(", r"\(")):
        TrainingConfig.from_dict({**REQUIRED, **overrides}).validate(world)


def test_derived_sizes():
    cfg = TrainingConfig.from_dict({**REQUIRED, "batch_size": 16})
    assert cfg.micro_batch_size_for(1) == 16 and cfg.grad_accumulation(1) == 1
    assert cfg.micro_batch_size_for(4) == 4 and cfg.grad_accumulation(4) == 1
    cfg = TrainingConfig.from_dict({**REQUIRED, "batch_size": 16, "micro_batch_size": 2})
    assert cfg.grad_accumulation(2) == 4
    cfg.validate(2)


def test_fingerprint_ignores_where_and_how_it_is_shown():
    a = TrainingConfig.from_dict({**REQUIRED, "logging_steps": 3, "micro_batch_size": 2})
    b = TrainingConfig.from_dict({**REQUIRED, "logging_steps": 7, "micro_batch_size": 4, "output": "elsewhere",
                                  "report_to": "none"})
    c = TrainingConfig.from_dict({**REQUIRED, "lr": 3e-5})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_presets_cover_the_paper_and_validate():
    names = {p.stem for p in CONFIGS}
    for model in ("olmoe", "mixtral"):
        for task in ("commonsense", "math"):
            for method in ("perft-r", "perft-e", "perft-d", "perft-s", "lora", "esft-gate", "esft-token",
                           "perft-r-lora-attn"):
                assert f"{model}-{task}-{method}" in names
    for path in CONFIGS:
        cfg = TrainingConfig.from_yaml(path)
        cfg.validate(1)
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw["lr"], float), f"{path.name}: lr must parse as a YAML float"
        mixtral = path.name.startswith("mixtral")
        coef = 0.02 if mixtral else 0.01
        assert cfg.base_router_aux_loss_coef == coef
        if cfg.variant == "routed" and cfg.method in ("perft", "perft+lora-attn"):
            assert cfg.router_aux_loss_coef == coef
        else:  # no adapter router: left unset (it would take the family's default, unused)
            assert cfg.router_aux_loss_coef is None
        assert (cfg.cutoff_len, cfg.val_set_size, cfg.split_seed, cfg.train_on_inputs) == (256, 120, 42, True)
        assert (cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm, cfg.lr_scheduler) == (100, 0.0, 1.0, "linear")
        assert (cfg.epochs, cfg.batch_size, cfg.eval_steps, cfg.save_steps, cfg.save_total_limit) == (3, 16, 80, 80, 3)
        assert cfg.load_best_at_end and (cfg.alpha == 2 * cfg.rank or cfg.method.startswith("esft"))
        if cfg.method == "lora-attn" and not mixtral:
            assert cfg.lr == (2e-5 if "commonsense" in path.name else 1e-5)
        else:
            assert cfg.lr == (2e-5 if mixtral else 1e-5)


def test_parser_help_builds():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--variant", "nope"])
    assert isinstance(parser, argparse.ArgumentParser)
