"""`perft plan --load-in-4bit / --load-in-8bit`: the frozen weights at the quantized store's own size.

The planner sizes each fused expert weight as `quantize_moe_experts` stores it (codes plus
absmax/scales, `perft.quantization.quantized_store_bytes`) without building the store; here
that figure is compared with the bytes a really quantized tiny model holds, and the
Mixtral-8x7B figures the README quotes are pinned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perft.cli import main
from perft.planning import load_model_config, plan_memory
from perft.quantization import (
    expert_storage_bytes,
    expert_store_bytes_per_param,
    quantized_expert_stores,
    quantized_store_bytes,
)
from perft.testing import TINY_ARCHITECTURES, save_tiny_model
from perft.training import TrainingConfig

pytest.importorskip("bitsandbytes")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MIXTRAL = FIXTURES / "mixtral-8x7b-v0.1"
QUANT_FLAGS = {(4, "nf4"): {"load_in_4bit": True}, (4, "fp4"): {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
               (8, "int8"): {"load_in_8bit": True}}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("setting", list(QUANT_FLAGS), ids=lambda s: f"{s[0]}bit-{s[1]}")
def test_frozen_bytes_equal_the_quantized_model_s_storage(tmp_path, arch, setting):
    from perft.loading import load_base_model

    path = save_tiny_model(arch, tmp_path / arch)
    flags = QUANT_FLAGS[setting]
    settings = TrainingConfig(variant="routed", num_experts=2, top_k=1, rank=4, model_dtype="float32", **flags)
    plan = plan_memory(load_model_config(str(path)), settings, micro_batch_size=1)
    model = load_base_model(str(path), dtype="float32", **flags)
    stores = quantized_expert_stores(model)
    assert stores, "the tiny model has fused experts to quantize"
    store_ids = {id(b) for s in stores for b in s.buffers()}
    other_buffers = [b for b in model.buffers() if id(b) not in store_ids]
    measured = expert_storage_bytes(model) + tensor_bytes(model.parameters()) + tensor_bytes(other_buffers)
    frozen = plan.figure("frozen weights")
    assert frozen.value == measured == tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    assert frozen.exact
    # the store is smaller than the fp32 experts it replaced: 4-bit by > 6x, int8 by > 3x
    full = sum(s.shape.numel() for s in stores) * 4
    assert expert_storage_bytes(model) < full / (6 if setting[0] == 4 else 3)


def test_store_bytes_match_the_per_parameter_rate_on_round_shapes():
    # [8, 28672, 4096] (Mixtral's gate_up): 0.5625 bytes a weight + the 64-byte NF4 code table
    n = 8 * 28672 * 4096
    assert quantized_store_bytes((8, 28672, 4096), 4, "nf4") == n * expert_store_bytes_per_param(4) + 64
    assert quantized_store_bytes((8, 28672, 4096), 8) == n * expert_store_bytes_per_param(8, row_length=4096)
    # rounding: 7 values in 4 bits take 4 bytes of codes and one 4-byte absmax per expert
    assert quantized_store_bytes((3, 7, 1), 4, "fp4") == 3 * (4 + 4) + 64


def run_plan(capsys, *argv: str) -> dict:
    assert main(["plan", "--config", str(CONFIGS / "mixtral-commonsense-perft-r.yaml"), "--model", str(MIXTRAL),
                 *argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return {f["name"]: f for f in out["counts"] + out["per_device"] + list(out["totals"].values())} | {"_": out}


def test_mixtral_4bit_and_8bit_frozen_weights(capsys):
    experts = 32 * 8 * 3 * 4096 * 14336  # 32 layers x 8 experts x (gate, up, down) of 4096 x 14336
    assert experts == 45_097_156_608
    rest = 46_702_792_704 - experts  # attention, routers, norms, embeddings, LM head: bf16
    nf4 = run_plan(capsys, "--load-in-4bit")
    store = experts * 9 // 16 + 32 * 2 * 64  # 0.5625 bytes a weight, one code table per fused weight
    frozen = nf4["frozen weights"]
    assert 0 <= frozen["value"] - (store + 2 * rest) < 4096  # + rotary buffers
    assert frozen["kind"] == "exact" and frozen["value"] / 1024**3 == pytest.approx(26.62, abs=0.005)
    assert nf4["trainable parameters"]["value"] == 17_825_792  # counts do not change with the storage
    assert nf4["base parameters"]["value"] == 46_702_792_704
    assert nf4["_"]["quantization"] == "fused experts in 4-bit nf4"
    assert "host memory holds the full-precision base" in nf4["_"]["notes"][0]
    # the paper's micro-batch of 16 with gradient checkpointing fits a 48 GB (44.7 GiB) GPU
    assert nf4["total (checkpointing)"]["value"] < 44 * 1024**3

    int8 = run_plan(capsys, "--load-in-8bit")
    scales = 32 * 8 * (2 * 14336 + 4096) * 4  # one fp32 scale per row of gate_up [28672, 4096] and down [4096, 14336]
    assert 0 <= int8["frozen weights"]["value"] - (experts + scales + 2 * rest) < 4096
    assert int8["total (checkpointing)"]["value"] > 44 * 1024**3  # does not fit one 48 GB GPU

    fsdp = run_plan(capsys, "--load-in-4bit", "--gpus", "4", "--strategy", "fsdp")
    # the store is buffers: FSDP does not shard it, every device holds all of it
    assert fsdp["frozen weights"]["kind"] == "estimated"
    assert store < fsdp["frozen weights"]["value"] < frozen["value"]
    with capsys.disabled():  # the figure the README quotes, shown under `pytest -s`
        print(f"Mixtral-8x7B, 4-bit NF4 experts: frozen weights {frozen['value']:,} bytes "
              f"({frozen['value'] / 1024**3:.2f} GiB, {frozen['kind']}); total with checkpointing "
              f"{nf4['total (checkpointing)']['value'] / 1024**3:.2f} GiB")


@pytest.mark.parametrize("argv, message", [
    (["--load-in-4bit", "--load-in-8bit"], "exclude each other"),
    (["--bnb-4bit-quant-type", "fp4"], "applies only with --load-in-4bit"),
])
def test_bad_quantization_flags_are_one_clear_line(capsys, argv, message):
    assert main(["plan", "--model", str(MIXTRAL), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
