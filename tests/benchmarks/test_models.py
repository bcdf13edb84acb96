"""benchmarks/models.py: the compared methods come from the method registry with pinned settings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from perft import PerftConfig

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "models.py"


@pytest.fixture(scope="module")
def models():
    spec = importlib.util.spec_from_file_location("benchmark_models", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# What the benchmarks measured when they built PerftConfig by hand (PerftConfig defaults for the rest).
MEASURED = {
    "perft-r": PerftConfig(variant="routed", num_experts=8, top_k=2, rank=16, alpha=32.0, dropout=0.0),
    "perft-e": PerftConfig(variant="embedded", rank=16, alpha=32.0, dropout=0.0),
    "perft-d": PerftConfig(variant="dense", num_experts=4, rank=16, alpha=32.0, dropout=0.0),
    "perft-s": PerftConfig(variant="single", rank=16, alpha=32.0, dropout=0.0),
    "perft-e-auto": PerftConfig(variant="embedded", rank=16, alpha=32.0, dropout=0.0, adapter_dtype="auto"),
}


@pytest.mark.parametrize("name", list(MEASURED))
def test_training_config_gives_the_measured_perft_config(models, name):
    cfg = models.perft_training_config(name)
    assert cfg.method == "perft"
    assert cfg.perft_config() == MEASURED[name]


def test_loop_r_is_the_registered_loop_variant_with_perft_r_tensors_and_output(models):
    base, _ = models.small_model(quick=True, backend="eager")
    base = base.eval()
    stacked = models.build_method("perft-r", base, seed=3)
    loop = models.build_method("loop-r", base, seed=3)
    assert stacked.trainable == loop.trainable == 16_896
    layer_s = next(iter(stacked.model.perft_layers.values()))
    layer_l = next(iter(loop.model.perft_layers.values()))
    assert type(layer_l.variant_spec).__name__ == "RoutedLoop" and layer_l.variant == "routed_loop"
    assert type(layer_s.variant_spec).__name__ == "Routed"
    for (name, p), (_, q) in zip(layer_s.named_parameters(), layer_l.named_parameters()):
        assert torch.equal(p, q), name
    x = torch.randn(40, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = layer_s.delta(x), layer_l.delta(x)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
