"""The analysis report from a short training run: JSON, PNG figures and the HTML page.

A PERFT-R adapter is trained for a few optimiser steps with a plain torch loop, saving
`run/checkpoint-N/` each step; a PERFT-S adapter is saved untrained. The analysis of
both (and of the base model) must produce every figure and numbers that agree with the
saved tensors and the tokenised data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perft import PerftConfig, get_perft_model
from perft.analysis import AnalysisOptions, analyze, write_report
from perft.analysis.geometry import find_checkpoints
from perft.data.prompts import build_prompt
from perft.loading import load_base_model, load_tokenizer
from perft.testing import save_tiny_model, save_tiny_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog and runs far away from home today".split()
FIGURES = {"utilisation", "layer_curves", "topk_weights", "cooccurrence", "groups", "projection", "router_training"}


def make_records(n: int) -> list[dict]:
    return [
        {
            "instruction": " ".join(WORDS[i % 9 : i % 9 + 3 + i % 4]),
            "input": WORDS[(i * 3) % len(WORDS)] if i % 3 == 0 else "",
            "output": WORDS[(i * 5) % len(WORDS)],
            "task": "alpha" if i % 2 else "beta",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    save_tiny_model("olmoe", root / "model")
    save_tiny_tokenizer(root / "model", [" ".join(WORDS) + " Below is an instruction"])
    records = make_records(10)
    (root / "data.json").write_text(json.dumps(records))
    tokenizer = load_tokenizer(str(root / "model"))
    base = load_base_model(str(root / "model"), dtype="float32")

    torch.manual_seed(0)
    config = PerftConfig(variant="routed", num_experts=4, top_k=2, rank=4, dropout=0.0, router_aux_loss_coef=0.01)
    model = get_perft_model(base, config)
    enc = tokenizer([build_prompt(r["instruction"], r["input"], r["output"]) for r in records[:4]],
                    return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in (1, 2, 3):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.save_pretrained(root / "run" / f"checkpoint-{step}")
    model.save_pretrained(root / "routed")
    model.save_pretrained(root / "run" / ".tmp-checkpoint-4")  # a checkpoint still being written: ignored
    model.unload()
    single = get_perft_model(base, PerftConfig(variant="single", rank=4, dropout=0.0))
    single.save_pretrained(root / "single")
    single.unload()
    base.eval()
    return root, base, tokenizer, records


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    root, base, tokenizer, _ = trained
    options = AnalysisOptions(split_by="task", projection="pca", checkpoints=str(root / "run"), with_base=True,
                              batch_size=4, progress=False, keys_per_expert=8)
    result = analyze(base, tokenizer, root / "data.json", [root / "routed", root / "single"], options,
                     model_name="tiny-olmoe")
    out = tmp_path_factory.mktemp("report")
    return result, write_report(result, out), out


def test_report_files(report):
    result, written, out = report
    assert FIGURES <= set(written)
    for name in FIGURES:
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    for run in ("base", "routed", "single"):
        assert f"<td>{run}</td>" in page
    assert json.loads(written["json"].read_text())["runs"][1]["name"] == "routed"


def test_numbers_agree_with_data_and_runs(trained, report):
    root, _, tokenizer, records = trained
    result = report[0]
    assert [r["name"] for r in result["runs"]] == ["base", "routed", "single"]
    texts = [build_prompt(r["instruction"], r["input"], r["output"]) for r in records]
    tokens = sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    assert result["num_tokens"] == tokens and result["num_samples"] == len(records)
    assert result["groups"] == ["alpha", "beta"]
    base, routed, single = result["runs"]
    for layer in ("0", "1"):
        stats = base["layers"][layer]["base"]
        assert sum(stats["counts"]) == tokens * stats["top_k"]
        groups = stats["groups"]
        assert np.add(groups["alpha"]["counts"], groups["beta"]["counts"]).tolist() == stats["counts"]
        # an untrained PERFT-S adapter is an exact no-op: the base routing cannot change
        assert single["layers"][layer]["base"]["counts"] == stats["counts"]
        assert single["layers"][layer]["adapter"] is None
        assert routed["layers"][layer]["cooccurrence"]["pairs"] == tokens * 2 * stats["top_k"]
    assert routed["summary"]["mutual_information"] is not None and single["summary"]["mutual_information"] is None


def test_router_geometry_follows_the_checkpoints(trained, report):
    root, base, _, _ = trained
    series = report[0]["checkpoints"]
    assert series["steps"] == [1, 2, 3]
    assert [s for s, _, _ in find_checkpoints(root / "run")] == [1, 2, 3]
    for layer, block_path in (("0", "model.layers.0.mlp"), ("1", "model.layers.1.mlp")):
        entry = series["layers"][layer]
        for step, geo in zip(entry["steps"], entry["geometry"]):
            router = load_file(str(root / "run" / f"checkpoint-{step}" / "adapter_model.safetensors"))[f"{block_path}.router"]
            assert geo["norms"] == pytest.approx(router.norm(dim=1).tolist(), rel=1e-5)
            base_rows = dict(base.named_parameters())[f"{block_path}.gate.weight"].detach()
            cos = torch.nn.functional.cosine_similarity(router[:, None, :], base_rows[None, :, :], dim=-1)
            assert geo["max_abs_cos_to_base"] == pytest.approx(cos.abs().max(1).values.tolist(), abs=1e-5)
        assert entry["geometry"][0]["norms"] != pytest.approx(entry["geometry"][-1]["norms"])  # it trained


def test_projection_places_every_vector(report):
    projection = report[0]["projection"]
    assert projection["method"] == "pca" and set(projection["layers"]) == {"0", "1"}
    for data in projection["layers"].values():
        assert len(data["base_experts"]) == 8 and len(data["base_keys"]) == 8 * 8  # 8 experts x 8 sampled rows
        routed, single = data["runs"]["routed"], data["runs"]["single"]
        assert len(routed["keys"]) == 4 * 4 and len(routed["experts"]) == 4  # N x r A rows; N router rows
        assert len(single["keys"]) == 4 and single["experts"] is None
        assert data["pca_explained_variance"] >= 0.5
        assert np.isfinite(np.asarray(routed["keys"])).all()
