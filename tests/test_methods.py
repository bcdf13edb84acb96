"""The method registry: PERFT and the LoRA baselines by name, and a new method registered
from this file alone trains a step, checkpoints, resumes and loads like the built-in ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perft.arch import require_moe_blocks
from perft.errors import PerftError
from perft.io import atomic_save_safetensors, atomic_write_text, load_safetensors
from perft.methods import (
    Method,
    check_adapter_matches,
    get_method,
    load_adapted,
    method_for_adapter,
    method_names,
    register_method,
    unregister_method,
)
from tests.helpers.training import config, one_thread


class LastExperts(Method):
    """ESFT-like toy: train the fused expert tensors of the last MoE block only."""

    name = "toy-last-experts"

    def build(self, base, cfg):
        base.requires_grad_(False)
        require_moe_blocks(base)[-1].experts.requires_grad_(True)
        base.perft_method = self.name
        return base

    def save(self, model, directory):
        atomic_save_safetensors(Path(directory) / "adapter_model.safetensors", self.adapter_state(model))
        atomic_write_text(Path(directory) / "adapter_config.json", json.dumps({"perft_method": self.name}))

    def load_adapter_state(self, model, state, source):
        model.load_state_dict(state, strict=False)

    def load(self, base, directory):
        model = self.build(base, None)
        self.load_adapter_state(model, load_safetensors(Path(directory) / "adapter_model.safetensors"), "")
        return model.eval()


@pytest.fixture
def toy():
    register_method(LastExperts)
    yield get_method(LastExperts.name)
    unregister_method(LastExperts.name)


def test_builtin_methods_and_unknown_names():
    assert method_names()[:3] == ("perft", "lora-attn", "lora-experts")
    with pytest.raises(PerftError, match="unknown method 'esft'.*perft, lora-attn, lora-experts"):
        get_method("esft")
    with pytest.raises(PerftError, match="cannot be unregistered"):
        unregister_method("perft")


def test_a_method_registered_here_trains_one_step_checkpoints_and_loads(toy, train_workspace, tmp_path):
    from perft.cli import build_parser
    from perft.loading import load_base_model
    from perft.training import train

    args = build_parser().parse_args(["train", "--method", "toy-last-experts"])  # a --method choice once registered
    assert args.method == "toy-last-experts"
    out = tmp_path / "run"
    with one_thread():
        result = train(config(train_workspace, out, method="toy-last-experts", max_steps=1, val_set_size=0,
                              save_steps=1, dropout=0.0, warmup_steps=0))
    assert (result.status, result.global_step) == ("completed", 1)
    assert method_for_adapter(result.adapter_dir) is toy
    assert check_adapter_matches(train_workspace["model"], result.adapter_dir) is toy
    base = load_base_model(str(train_workspace["model"]))
    tuned = load_adapted(load_base_model(str(train_workspace["model"])), result.adapter_dir)
    after = dict(tuned.named_parameters())
    changed = sorted(n for n, p in base.named_parameters() if not torch.equal(p, after[n]))
    last = require_moe_blocks(base)[-1].path
    assert changed == [f"{last}.experts.down_proj", f"{last}.experts.gate_up_proj"]
    trainable, total = toy.parameter_count(tuned)
    assert 0 < trainable < total
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["method"] == "toy-last-experts"


def test_the_perft_adapter_is_still_recognised_beside_a_registered_method(toy, train_workspace, tmp_path):
    from perft.training import train

    with one_thread():
        result = train(config(train_workspace, tmp_path / "perft", max_steps=1, val_set_size=0, save_steps=1))
    assert method_for_adapter(result.adapter_dir) is get_method("perft")


def test_copy_adapter_tensors_checks_everything_before_writing_anything():
    """A state with one bad shape leaves every target as it was (no half-loaded adapter)."""
    from perft.methods import copy_adapter_tensors

    targets = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(PerftError, match=r"f\.safetensors: x\.b has shape \(5,\), this model needs \(4,\); use the base"):
        copy_adapter_tensors(targets, {"a": torch.ones(2, 3), "b": torch.ones(5)}, "f.safetensors", mismatch="m",
                             prefix="x.")
    assert targets["a"].abs().sum() == 0
    with pytest.raises(PerftError, match=r"f holds other experts \(missing \['b'\], unexpected \['c'\]\)"):
        copy_adapter_tensors(targets, {"a": torch.ones(2, 3), "c": torch.ones(4)}, "f", mismatch="holds other experts")
    copy_adapter_tensors(targets, {"a": torch.full((2, 3), 2.0, dtype=torch.float64), "b": torch.arange(4.0)}, "f",
                         mismatch="m")
    assert targets["a"].dtype == torch.float32 and targets["a"].sum() == 12 and targets["b"].tolist() == [0, 1, 2, 3]
