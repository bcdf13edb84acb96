"""transformers' training-argument names in a YAML file read as perft's own (with a note), or refused clearly."""

from __future__ import annotations

import pytest

from perft.errors import PerftError
from perft.training.args import TrainingConfig


def test_transformers_names_are_read_as_ours_and_noted(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "hf.yaml"
    path.write_text(
        "model: m\nlearning_rate: 3.0e-4\nnum_train_epochs: 2\nper_device_train_batch_size: 4\n"
        "gradient_accumulation_steps: 3\nwarmup_steps: 7\nweight_decay: 0.1\nlr_scheduler_type: cosine\n"
        "output_dir: runs/x\nload_best_model_at_end: false\nper_device_eval_batch_size: 5\n"
    )
    cfg = TrainingConfig.from_yaml(path, overrides={"warmup_steps": 9})
    assert (cfg.lr, cfg.epochs, cfg.micro_batch_size, cfg.batch_size) == (3e-4, 2.0, 4, 12)
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.lr_scheduler, cfg.output) == (9, 0.1, "cosine", "runs/x")
    assert (cfg.load_best_at_end, cfg.eval_batch_size) == (False, 5)
    note = capsys.readouterr().err
    assert "learning_rate -> lr" in note and "num_train_epochs -> epochs" in note
    assert "gradient_accumulation_steps -> batch_size: 12" in note and note.count("\n") == 1
    # The global batch is what transformers would use: per device x accumulation x processes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainingConfig.from_yaml(path).batch_size == 24
    # A flag given by its own name wins over the aliased YAML value.
    assert TrainingConfig.from_yaml(path, overrides={"lr": 1e-3}).lr == 1e-3


def test_alias_conflicts_and_unmappable_accumulation_are_one_line_errors():
    with pytest.raises(PerftError, match="sets both 'learning_rate'.*keep only 'lr'"):
        TrainingConfig.from_dict({"learning_rate": 1e-4, "lr": 1e-5})
    with pytest.raises(PerftError, match="sets gradient_accumulation_steps.*batch_size = micro_batch_size x accumulation"):
        TrainingConfig.from_dict({"gradient_accumulation_steps": 4})
    with pytest.raises(PerftError, match="sets gradient_accumulation_steps"):
        TrainingConfig.from_dict({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "batch_size": 8})
    with pytest.raises(PerftError, match="gradient_accumulation_steps .* positive integer"):
        TrainingConfig.from_dict({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 0})
    with pytest.raises(PerftError, match="'eval_strategy', which perft does not take: .* set eval_steps"):
        TrainingConfig.from_dict({"eval_strategy": "steps"})
    with pytest.raises(PerftError, match="did you mean 'num_train_epochs'"):
        TrainingConfig.from_dict({"num_train_epoch": 3})
