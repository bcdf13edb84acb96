"""Variants are registered classes: a toy one registered here trains, and the docs' example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from perft import PerftConfig, PerftError, get_perft_model
from perft.testing import save_tiny_model
from perft.variants import Gating, Routed, Variant, get_variant, register_variant, variant_names

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@register_variant
class FirstHalf(Variant):
    """Toy: N always-active adapters, only expert 0 gates (weight 1), the rest get weight 0."""

    name = "toy_first"

    def gate(self, layer, x, base_index, base_weights):
        weights = torch.zeros(x.shape[0], layer.num_experts, dtype=layer.experts.down.dtype)
        weights[:, 0] = 1.0
        return Gating(dense=weights)


@register_variant
class DoubledRouted(Routed):
    """Toy: PERFT-R's gating, its expert output computed the default way and doubled."""

    name = "toy_doubled"

    def expert_output(self, layer, x, gating):
        return 2 * super().expert_output(layer, x, gating)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe") / "model")


def test_a_toy_variant_registered_in_a_test_file_builds_and_trains_one_step(model_dir):
    from transformers import AutoModelForCausalLM

    assert "toy_first" in variant_names() and isinstance(get_variant("toy_first"), FirstHalf)
    torch.manual_seed(0)
    model = get_perft_model(AutoModelForCausalLM.from_pretrained(model_dir), PerftConfig(variant="toy_first", rank=4))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(iter(model.perft_layers.values()))
    # only expert 0 is gated, so only expert 0 receives a gradient
    assert layer.experts.up.grad[0].abs().sum() > 0 and layer.experts.up.grad[1:].abs().sum() == 0
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4


def test_a_variant_can_compute_its_expert_output_itself(model_dir):
    """PerftLayer.delta = the variant's gate, then the variant's expert_output (benchmarks' loop-r uses this)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_perft_model(AutoModelForCausalLM.from_pretrained(model_dir), PerftConfig(variant="routed", rank=4, dropout=0.0))
    layer = next(iter(model.perft_layers.values()))
    with torch.no_grad():
        layer.experts.up.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(6, layer.experts.down.shape[-1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stacked = layer.delta(x)
        layer.variant_spec = get_variant("toy_doubled")
        doubled = layer.delta(x)
    assert stacked.abs().max() > 1e-3
    torch.testing.assert_close(doubled, 2 * stacked)


def test_unknown_variant_lists_the_registered_ones():
    with pytest.raises(PerftError, match="toy_first"):
        PerftConfig(variant="nope")


def test_the_adding_a_variant_example_in_docs_runs(capsys, model_dir):
    from transformers import AutoModelForCausalLM

    section = DOC.read_text(encoding="utf-8").split("## Adding a variant", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 1
    exec(compile(code[0], str(DOC), "exec"), {"__name__": "docs_extending"})
    assert "averaged" in variant_names()
    printed = capsys.readouterr().out
    assert re.search(r"averaged: loss \d+\.\d{4}, \d+ trainable parameters", printed)
    # and "averaged" is what it says: the dense variant's output divided by N
    torch.manual_seed(0)
    model = get_perft_model(AutoModelForCausalLM.from_pretrained(model_dir), PerftConfig(variant="dense", rank=4, dropout=0.0))
    layer = next(iter(model.perft_layers.values()))
    with torch.no_grad():
        layer.experts.up.normal_(generator=torch.Generator().manual_seed(1))
        x = torch.randn(5, layer.experts.hidden_size, generator=torch.Generator().manual_seed(2))
        summed = layer.delta(x)
        layer.variant_spec = get_variant("averaged")
        averaged = layer.delta(x)
    assert summed.abs().max() > 1e-2 and torch.allclose(averaged, summed / 4, atol=1e-6)
