"""benchmarks/full_model.py: adapters start as the step-0 no-op, so every method sees the base's routing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def full_model():
    sys.path.insert(0, str(ROOT))  # full_model imports its siblings (measure, models)
    try:
        spec = importlib.util.spec_from_file_location("benchmark_full_model", ROOT / "full_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT))


def test_step_zero_adapters_keep_the_base_routing_and_random_ones_change_it(full_model):
    cfg = full_model.model_config("olmoe", small=True, qwen3_layers=0)
    base = full_model.build_base(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids, output_router_logits=True, use_cache=False)
    for name in ("perft-r", "perft-s"):
        model, _ = full_model.build(name, base)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        assert torch.equal(out.logits, reference.logits), name
        assert all(torch.equal(a, b) for a, b in zip(out.router_logits, reference.router_logits)), name
        noisy, _ = full_model.build(name, base, random_adapters=True)
        with torch.no_grad():
            moved = noisy(input_ids=ids, use_cache=False).logits
        assert not torch.equal(moved, reference.logits), name
    hit = full_model.experts_hit(base, ids, cfg.num_experts_per_tok)
    # by hand: distinct top-2 experts per layer, averaged over the 2 layers
    by_hand = sum(len(set(layer.topk(2, -1).indices.flatten().tolist())) for layer in reference.router_logits) / 2
    assert hit == by_hand and 2 <= hit <= cfg.num_experts


def test_perft_e_auto_keeps_its_adapters_in_the_base_dtype(full_model):
    cfg = full_model.model_config("olmoe", small=True, qwen3_layers=0)
    base = full_model.build_base(cfg)
    default, n_default = full_model.build("perft-e", base)
    auto, n_auto = full_model.build("perft-e-auto", base)
    dtypes = lambda m: {p.dtype for p in m.parameters() if p.requires_grad}  # noqa: E731
    assert dtypes(default) == {torch.float32} and dtypes(auto) == {torch.bfloat16}
    assert n_auto == n_default == full_model.planner_figures(cfg, "perft-e-auto", 32)["trainable"] == 2 * 8 * 2 * 16 * 64
