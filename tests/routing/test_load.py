"""The router load `perft train` logs, recorded through `PerftModel.record_routing()`."""

from __future__ import annotations

import pytest
import torch

from perft.routing.load import RouterLoad, format_load, load_record, load_summary, routed_layers
from tests.routing.test_stats import IDS, MASK, known_model


def test_record_routing_context_records_inside_only_and_counts_without_padding():
    model, _ = known_model()
    layers = routed_layers(model)
    assert set(layers) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    load = RouterLoad(layers)
    with torch.no_grad(), model.record_routing():
        assert all(layer.record_routing for layer in model.perft_layers.values())
        model(input_ids=IDS, attention_mask=MASK)
        load.count(MASK)
    assert not any(layer.record_routing or layer.last_routing is not None for layer in model.perft_layers.values())
    # the hand-set routers of known_model: counts [4, 2, 0, 0] over the 6 real tokens x top-1
    assert load.counts["model.layers.1.mlp"] == [4.0, 2.0, 0.0, 0.0]
    loads = load.take()
    assert loads["model.layers.1.mlp"] == pytest.approx([4 / 6, 2 / 6, 0, 0])
    assert load.counts == {} and load.take() is None  # taken: the window starts again


def test_summary_consolidate_and_record():
    loads = {"a": [0.5, 0.5, 0.0, 0.0], "b": [0.25, 0.25, 0.25, 0.25]}
    summary = load_summary(loads)
    assert summary["max_load_x_n"] == pytest.approx((2.0 + 1.0) / 2)
    assert summary["load_cv"] == pytest.approx((1.0 + 0.0) / 2)
    assert set(load_record(loads)) == {"router_max_load_x_n", "router_load_cv", "router_load"}
    assert load_record(None) == {}
    assert format_load(loads, "metrics.jsonl").startswith("PERFT-R router load")

    class Layer:
        num_experts = 2

    counts = {"x": [3.0, 1.0]}
    main = RouterLoad({"x": Layer()}, counts)
    assert main.counts is counts  # shared with a checkpointed logging window
    doubled = main.consolidate(lambda flat: [2 * v for v in flat], keep=True)  # as if two processes
    assert doubled == {"x": [6.0, 2.0]} and counts == {"x": [6.0, 2.0]}
    other = RouterLoad({"x": Layer()}, {"x": [3.0, 1.0]})
    other.consolidate(lambda flat: [2 * v for v in flat], keep=False)
    assert other.counts == {}
