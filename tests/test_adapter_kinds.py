"""Adapter kinds are registered classes: a toy kind defined in this file alone becomes a
`PerftConfig` / `perft train --adapter` choice, computes its own formula, saves under its own
names and trains; the docs' worked example runs as written. The default initialisation is the
released PERFT code's (down ~ N(0, 2/r), up = 0)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perft.adapter_kinds as kinds
from perft import AdapterKind, PerftConfig, PerftError, get_perft_model, register_adapter_kind
from perft.adapters import AdapterExperts

REPO = Path(__file__).resolve().parents[1]


class ToyKind(AdapterKind):
    """`3 * up(relu(down x))`, with `down` filled with a constant: easy to check by hand."""

    name, down_name, up_name = "toy", "toy_down", "toy_up"
    dropout_site = "hidden"

    def scaling(self, scaling: float) -> float:
        return 3.0

    def activation(self, name: str):
        return torch.relu

    def init_down(self, down: torch.Tensor, scheme: str) -> None:
        down.fill_(0.25)


@pytest.fixture
def toy_kind():
    register_adapter_kind(ToyKind)
    yield ToyKind
    kinds._KINDS.pop(ToyKind.name, None)


def test_toy_kind_is_a_choice_everywhere(toy_kind):
    from perft.cli import build_parser

    assert "toy" in kinds.adapter_kinds()
    PerftConfig(adapter="toy")  # accepted
    parser = build_parser()
    args = parser.parse_args(["train", "--adapter", "toy"])
    assert args.adapter == "toy"
    kinds._KINDS.pop("toy")
    with pytest.raises(PerftError, match="unknown adapter 'toy'; choose one of: lora, parallel"):
        PerftConfig(adapter="toy")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--adapter", "toy"])


def test_toy_kind_computes_its_formula(toy_kind):
    torch.manual_seed(0)
    ex = AdapterExperts("toy", 2, 6, 3, scaling=99.0, activation="silu")
    assert (ex.down == 0.25).all() and (ex.up == 0).all() and ex.down_name == "toy_down"
    with torch.no_grad():
        ex.up.normal_()
    x, w = torch.randn(5, 6), torch.rand(5, 2)
    expected = sum(w[:, n:n + 1] * 3.0 * torch.relu(x @ ex.down[n].T) @ ex.up[n].T for n in range(2))
    torch.testing.assert_close(ex(x, w), expected)


def test_toy_kind_trains_one_step_and_saves_under_its_names(toy_kind, tmp_path):
    from perft.training import train
    from tests.helpers.training import adapter_tensors, config, make_workspace

    ws = make_workspace(tmp_path / "ws", n_records=20)
    result = train(config(ws, tmp_path / "run", adapter="toy", max_steps=1, val_set_size=0, dropout=0.1,
                         warmup_steps=0))
    tensors = adapter_tensors(result.adapter_dir)
    names = {k.rsplit(".", 1)[-1] for k in tensors}
    assert names == {"toy_down", "toy_up", "router"}
    ups = [v for k, v in tensors.items() if k.endswith("toy_up")]
    assert all(v.abs().max() > 0 for v in ups)  # one AdamW step moved every zero-initialised up
    assert PerftConfig.load(result.adapter_dir).adapter == "toy"


def test_docs_example_runs_as_written(tmp_path):
    """The worked example of docs/extending.md, "Adding an adapter kind", in a fresh interpreter."""
    text = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    section = text.split("## Adding an adapter kind", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    expected = re.findall(r"^# (\[.*\])$", code, re.M)[-1]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("rank", [4, 16])
def test_default_init_is_the_released_one(rank, tmp_path):
    """Saved lora_A std within 15% of sqrt(2/r); lora_B exactly zero; the base's logits unchanged."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from perft.testing import save_tiny_model

    path = save_tiny_model("olmoe", tmp_path / "base", hidden_size=64)
    base = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    torch.manual_seed(rank)
    model = get_perft_model(base, PerftConfig(rank=rank, num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a = torch.cat([v.flatten() for k, v in tensors.items() if k.endswith("lora_A")])
    b = [v for k, v in tensors.items() if k.endswith("lora_B")]
    assert a.numel() == 2 * 4 * rank * 64
    assert abs(a.std().item() / math.sqrt(2 / rank) - 1) < 0.15
    assert b and all(torch.count_nonzero(v) == 0 for v in b)
    assert PerftConfig.load(tmp_path / "adapter").init == "normal"


def test_kaiming_init_by_name_and_old_configs(tmp_path):
    torch.manual_seed(0)
    ex = AdapterExperts("lora", 4, 256, 16, init="kaiming")
    bound = 1 / math.sqrt(256)
    assert ex.down.abs().max().item() <= bound and ex.down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # A config written before `init` existed reads as the scheme those adapters were created with.
    old = {k: v for k, v in PerftConfig().to_dict().items() if k not in ("init", "dropout_at")}
    cfg = PerftConfig.from_dict(old)
    assert (cfg.init, cfg.dropout_at) == ("kaiming", "input")
    with pytest.raises(PerftError, match="unknown init 'xavier'; choose one of: normal, kaiming"):
        PerftConfig(init="xavier")
