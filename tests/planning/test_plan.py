"""`perft plan`: exact parameter counts for the paper's models from their published configs,
exact byte figures, the FSDP/DDP layouts, every supported architecture, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perft.cli import main
from perft.planning import load_model_config, meta_model, plan_memory
from perft.testing import TINY_ARCHITECTURES, tiny_config
from perft.training import TrainingConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OLMOE, MIXTRAL = FIXTURES / "olmoe-1b-7b-0924", FIXTURES / "mixtral-8x7b-v0.1"


def run_plan(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def figures(plan: dict) -> dict[str, dict]:
    return {f["name"]: f for f in plan["counts"] + plan["per_device"] + list(plan["totals"].values())}


def test_olmoe_perft_r_counts_are_the_published_ones(capsys):
    plan = figures(run_plan(capsys, "--model", str(OLMOE), "--variant", "routed", "--num-experts", "4",
                            "--top-k", "2", "--rank", "16", "--micro-batch-size", "1"))
    # OLMoE-1B-7B: 6,919,161,856 frozen; PERFT-R 4 x r16 per block: 4 x (2 x 16 x 2048) + 4 x 2048 router,
    # x 16 blocks = 4,325,376; together 6,923,487,232 (the figure print_trainable_parameters shows as "all params")
    assert plan["base parameters"]["value"] == 6_919_161_856
    assert plan["trainable parameters"]["value"] == 4_325_376 == 16 * (4 * 2 * 16 * 2048 + 4 * 2048)
    assert plan["total parameters"]["value"] == 6_923_487_232
    assert {plan[k]["kind"] for k in ("base parameters", "trainable parameters", "total parameters")} == {"exact"}
    # bytes that are counts times dtype sizes are exact: bf16 base (config.json's torch_dtype), fp32 adapters
    assert plan["frozen weights"]["kind"] == "exact"
    assert 2 * 6_919_161_856 <= plan["frozen weights"]["value"] < 2 * 6_919_161_856 + 4096  # + rotary buffers
    assert plan["adapter weights"]["value"] == plan["gradients"]["value"] == 4 * 4_325_376
    assert plan["optimizer state"]["value"] == 8 * 4_325_376
    assert plan["activations"]["kind"] == plan["total"]["kind"] == "estimated"
    assert plan["activations (checkpointing)"]["value"] < plan["activations"]["value"]


def test_mixtral_preset_counts(capsys):
    plan = figures(run_plan(capsys, "--config", str(CONFIGS / "mixtral-commonsense-perft-r.yaml"),
                            "--model", str(MIXTRAL)))
    assert plan["base parameters"]["value"] == 46_702_792_704
    # the preset: 8 experts top-2, r8, on 32 blocks of width 4096
    assert plan["trainable parameters"]["value"] == 32 * (8 * 2 * 8 * 4096 + 8 * 4096) == 17_825_792


def test_lora_qv_counts_and_fsdp_shards_the_frozen_weights(capsys):
    ddp = figures(run_plan(capsys, "--model", str(OLMOE), "--method", "lora-attn", "--rank", "16", "--gpus", "4"))
    fsdp = figures(run_plan(capsys, "--model", str(OLMOE), "--method", "lora-attn", "--rank", "16", "--gpus", "4",
                            "--strategy", "fsdp"))
    assert ddp["trainable parameters"]["value"] == 16 * 2 * 16 * (2048 + 2048) == 2_097_152
    assert fsdp["frozen weights"]["kind"] == "estimated"
    skeleton = meta_model(load_model_config(str(OLMOE)), dtype=torch.bfloat16)
    layer = sum(p.numel() for p in skeleton.model.layers[0].parameters()) * 2
    root = 2 * 2 * 50304 * 2048 + 2 * 2048  # embeddings, LM head, final norm stay whole
    assert fsdp["frozen weights"]["value"] == -(-16 * layer // 4) + root + 2 * layer + 512
    assert ddp["gradients"]["value"] == 2 * 4 * 2_097_152 and ddp["gradients"]["kind"] == "estimated"  # + buckets
    assert fsdp["gradients"]["value"] == 4 * 2_097_152  # adapters stay whole, one all-reduce
    # per device, the micro-batch defaults to batch / processes, as in perft train
    assert run_plan(capsys, "--model", str(OLMOE), "--gpus", "4")["micro_batch_size"] == 4


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("variant", ["routed", "embedded"])
def test_counts_equal_the_real_model_for_every_architecture(arch, variant):
    from transformers import AutoModelForCausalLM

    from perft import get_perft_model

    config = tiny_config(arch)
    settings = TrainingConfig(variant=variant, num_experts=3, top_k=2, rank=4, model_dtype="float32",
                              micro_batch_size=2, cutoff_len=16)
    plan = plan_memory(config, settings)
    torch.manual_seed(0)
    real = get_perft_model(AutoModelForCausalLM.from_config(config), settings.perft_config())
    trainable, total = real.get_nb_trainable_parameters()
    assert plan.figure("trainable parameters").value == trainable
    assert plan.figure("total parameters").value == total
    assert plan.figure("activations").value > 0 and plan.figure("activations (checkpointing)").value > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", str(OLMOE), "--rank", "0"], "rank must be an integer >= 1"),
    (["--model", str(OLMOE), "--gpus", "0"], "--gpus must be an integer >= 1"),
    (["--model", str(OLMOE), "--num-experts", "2", "--top-k", "3"], "top_k=3 is larger than num_experts=2"),
    (["--model", str(FIXTURES / "missing")], "does not exist"),
    (["--model", str(FIXTURES)], "has no config.json"),
    ([], "no --model given"),
])
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_text_output_labels_every_figure(capsys):
    assert main(["plan", "--model", str(OLMOE), "--variant", "single"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 11 and all(line.split()[-1] in ("exact", "estimated") or " exact " in line
                                    or " estimated " in line for line in lines)
