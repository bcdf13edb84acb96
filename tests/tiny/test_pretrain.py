"""`perft pretrain` (tiny sizes) is deterministic and saves a loadable checkpoint; the shipped one routes non-uniformly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from perft.cli import main
from perft.errors import PerftError
from perft.tiny import SHIPPED_MODEL, default_base_model_path
from perft.tiny.corpus import DOMAINS, iter_documents
from perft.tiny.pretrain import PretrainConfig, pretrain
from perft.tiny.routing import routing_stats
from perft.tiny.tasks import problem_keys

TINY = [
    "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--hidden-size", "32", "--num-heads", "2",
    "--num-layers", "2", "--num-experts", "4", "--intermediate-size", "32", "--tokenizer-docs", "1500",
    "--eval-docs-per-domain", "4", "--vocab-size", "600", "--log-every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--output", str(root / "a"), *TINY]) == 0
    assert main(["pretrain", "--output", str(root / "b"), *TINY]) == 0
    return root / "a", root / "b"


def test_pretrain_is_deterministic(two_runs):
    a, b = (load_file(str(d / "model.safetensors")) for d in two_runs)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (two_runs[0] / "tokenizer.json").read_text() == (two_runs[1] / "tokenizer.json").read_text()


def test_pretrain_output_loads_like_any_checkpoint(two_runs):
    out = two_runs[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "olmoe" and model.config.num_experts == 4
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    ids = tokenizer("Ada lives in Oakvale.", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size >= len(tokenizer)
    stats = json.loads((out / "pretrain.json").read_text())
    assert stats["config"]["steps"] == 3 and set(stats["heldout_loss"]) == set(DOMAINS)
    assert len(stats["routing"]["layers"]) == 2
    assert not list(out.parent.glob(".a.*")), "temporary directories left behind"


def test_pretrain_rejects_impossible_settings(tmp_path):
    with pytest.raises(PerftError, match="top-k"):
        pretrain(PretrainConfig(output=str(tmp_path / "x"), num_experts=2, top_k=3))
    assert main(["pretrain", "--output", str(tmp_path / "x"), "--hidden-size", "30", "--num-heads", "4"]) == 2
    assert not (tmp_path / "x").exists()


def test_shipped_checkpoint_loads_and_routes_non_uniformly():
    assert default_base_model_path() == SHIPPED_MODEL
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir())
    assert size < 30 * 2**20
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL)
    texts: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for doc in iter_documents(99, exclude=problem_keys()):
        if len(texts[doc.domain]) < 12:
            texts[doc.domain].append(doc.text)
        if all(len(v) == 12 for v in texts.values()):
            break
    stats = routing_stats(model, tokenizer, texts)
    layers = stats["layers"]
    assert len(layers) == model.config.num_hidden_layers
    # A freshly initialised router scores ~1.0 on both entropies (uniform); the trained one is
    # confident per token in its deepest layer and uses its experts unevenly ...
    assert min(layer["token_entropy"] for layer in layers) < 0.7
    assert min(layer["usage_entropy"] for layer in layers) < 0.9
    # ... and which experts a token goes to depends on the domain of the text.
    assert max(layer["domain_mutual_information"] for layer in layers) > 0.03
    assert max(d["top2_share"] for layer in layers for d in layer["domains"].values()) > 0.5
