"""ESFT (perft/esft.py): expert selection against a reference computed here from recorded router
logits, only the chosen expert rows train (everything else bit-for-bit unchanged), optimiser
state sized by the chosen rows, and save/load round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch

from perft.arch import require_moe_blocks
from perft.errors import PerftError
from perft.esft import sample_token_batches, select_experts
from perft.io import load_safetensors
from perft.loading import load_base_model
from perft.methods import get_method, load_adapted, method_for_adapter
from tests.helpers.training import config, one_thread


def test_select_experts_takes_the_fewest_experts_reaching_top_p():
    assert select_experts([0.1, 0.4, 0.2, 0.3], 0.5) == [1, 3]  # 0.4 + 0.3 = 0.7 >= 0.5
    assert select_experts([0.1, 0.4, 0.2, 0.3], 0.4) == [1]  # the first already reaches it
    assert select_experts([0.1, 0.4, 0.2, 0.3], 0.71) == [1, 2, 3]
    assert select_experts([0.25, 0.25, 0.25, 0.25], 0.5) == [0, 1]  # ties: lower index first
    assert select_experts([0.25, 0.25, 0.25, 0.25], 1.0) == [0, 1, 2, 3]


def reference_selection(base, batches, score: str, top_p: float) -> tuple[dict, dict]:
    """From router logits recorded here: softmax, top-k, renormalise as the block does, sum per expert."""
    blocks = require_moe_blocks(base)
    logits: dict[str, list[torch.Tensor]] = {b.path: [] for b in blocks}
    handles = [b.router.register_forward_hook(lambda m, a, out, p=b.path: logits[p].append(out[0].detach()))
               for b in blocks]
    with torch.no_grad():
        for batch in batches:
            base(**batch)
    for h in handles:
        h.remove()
    mask = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    shares, chosen = {}, {}
    for block in blocks:
        probs = torch.cat(logits[block.path]).double().softmax(-1)[mask]
        top, idx = probs.topk(block.top_k, dim=-1)
        if block.normalizes_top_k:
            top = top / top.sum(-1, keepdim=True)
        totals = [0.0] * block.num_experts
        for row_w, row_i in zip(top.tolist(), idx.tolist()):
            for w, e in zip(row_w, row_i):
                totals[e] += w if score == "gate" else 1.0
        shares[block.path] = [t / sum(totals) for t in totals]
        ranked = sorted(range(block.num_experts), key=lambda e: -shares[block.path][e])
        kept, acc = [], 0.0
        for e in ranked:
            if acc >= top_p:
                break
            kept.append(e)
            acc += shares[block.path][e]
        chosen[block.path] = sorted(kept)
    return shares, chosen


@pytest.mark.parametrize("score", ["gate", "token"])
def test_selection_matches_a_reference_from_recorded_router_logits(train_workspace, tmp_path, score):
    from perft.loading import load_tokenizer

    cfg = config(train_workspace, tmp_path, method=f"esft-{score}", esft_top_p=0.6, esft_sample_tokens=500,
                 val_set_size=8)
    tokenizer = load_tokenizer(str(train_workspace["model"]))
    batches = sample_token_batches(cfg, tokenizer)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 500
    ref_shares, ref_chosen = reference_selection(load_base_model(str(train_workspace["model"])).eval(),
                                                 batches, score, 0.6)
    with one_thread():
        model = get_method(cfg.method).build(load_base_model(str(train_workspace["model"])), cfg)
    selection = model.esft_selection
    assert selection["experts"] == ref_chosen
    for path, shares in ref_shares.items():
        assert selection["scores"][path] == pytest.approx(shares, abs=1e-6)
    assert selection["sample_tokens"] == 500
    # not a trivial selection: fewer than all experts, and not just the lowest indices
    assert all(0 < len(c) < 8 for c in ref_chosen.values())
    assert any(c != list(range(len(c))) for c in ref_chosen.values())


def test_gate_and_token_scores_differ_on_the_same_sample(train_workspace, tmp_path):
    built = {}
    with one_thread():
        for score in ("gate", "token"):
            cfg = config(train_workspace, tmp_path, method=f"esft-{score}", esft_sample_tokens=400)
            built[score] = get_method(cfg.method).build(load_base_model(str(train_workspace["model"])), cfg)
    gate, token = (built[s].esft_selection["scores"] for s in ("gate", "token"))
    assert gate.keys() == token.keys()
    assert any(gate[p] != token[p] for p in gate)
    for shares in (*gate.values(), *token.values()):
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def trained(train_workspace, tmp_path_factory):
    """esft-gate trained 4 steps; the in-memory model and its saved adapter."""
    from perft.training import train

    out = tmp_path_factory.mktemp("esft") / "run"
    seen = {}
    with one_thread():
        result = train(config(train_workspace, out, method="esft-gate", esft_top_p=0.5, esft_sample_tokens=400,
                              max_steps=4, val_set_size=0, save_steps=2, dropout=0.0, warmup_steps=0),
                       callbacks=[lambda info: seen.update(info)])
    return seen["model"], result


def _effective(model) -> dict[str, torch.Tensor]:
    """name -> tensor as the forward sees it (parametrized fused tensors resolved)."""
    out = {}
    for name, module in model.named_modules():
        for pname in [n for n, _ in module.named_parameters(recurse=False)] + list(
                getattr(module, "parametrizations", {}).keys()):
            full = f"{name}.{pname}" if name else pname
            if ".parametrizations." in full:
                continue
            out[full] = getattr(module, pname).detach().clone()
    return out


def test_only_the_chosen_expert_rows_moved(train_workspace, trained):
    model, result = trained
    assert (result.status, result.global_step) == ("completed", 4)
    base = _effective(load_base_model(str(train_workspace["model"])))
    model.eval()
    after = _effective(model)
    assert after.keys() == base.keys()
    chosen = model.esft_selection["experts"]
    moved_rows = 0
    for name, before in base.items():
        block = next((p for p in chosen if name.startswith(f"{p}.experts.")), None)
        if block is None:
            assert torch.equal(after[name], before), name  # attention, routers, norms, embeddings
            continue
        for e in range(before.shape[0]):
            if e in chosen[block]:
                assert (after[name][e] != before[e]).float().mean() > 0.5, (name, e)
                moved_rows += 1
            else:
                assert torch.equal(after[name][e], before[e]), (name, e)
    assert moved_rows == 2 * sum(len(c) for c in chosen.values())  # gate_up_proj and down_proj rows


def test_trainable_parameters_and_optimizer_state_scale_with_the_chosen_experts(train_workspace, trained, tmp_path):
    from safetensors import safe_open

    model, result = trained
    chosen = model.esft_selection["experts"]
    blocks = require_moe_blocks(load_base_model(str(train_workspace["model"])))
    per_expert = sum(p[0].numel() for p in (blocks[0].experts.gate_up_proj, blocks[0].experts.down_proj))
    rows = sum(len(c) for c in chosen.values())
    assert 0 < rows < 8 * len(blocks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == rows * per_expert
    assert get_method("esft-gate").parameter_count(model)[0] == rows * per_expert
    optimizer = load_safetensors(result.output_dir / "checkpoint-4" / "optimizer.safetensors")
    moments = sum(v.numel() for k, v in optimizer.items() if k.endswith(("::exp_avg", "::exp_avg_sq")))
    assert moments == 2 * rows * per_expert  # AdamW's two moments, no whole fused tensors
    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * rows


def test_save_and_load_round_trip_exactly(train_workspace, trained):
    model, result = trained
    method = method_for_adapter(result.adapter_dir)
    assert method is get_method("esft-gate")
    config_json = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config_json["experts"] == model.esft_selection["experts"]
    assert config_json["top_p"] == 0.5 and config_json["score_function"] == "gate"
    loaded = load_adapted(load_base_model(str(train_workspace["model"])), result.adapter_dir)
    saved, back = method.adapter_state(model), method.adapter_state(loaded)
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert method.parameter_count(loaded) == method.parameter_count(model)


def test_a_state_for_other_experts_is_refused(train_workspace, trained):
    model, _ = trained
    method = get_method("esft-gate")
    state = dict(method.adapter_state(model))
    name = next(iter(state))
    state[name.rsplit(".", 1)[0] + ".99"] = state.pop(name)
    with pytest.raises(PerftError, match="other experts"):
        method.load_adapter_state(model, state, "x")


def test_built_model_starts_as_the_base_and_bad_settings_are_refused(train_workspace, tmp_path):
    cfg = config(train_workspace, tmp_path, method="esft-token", esft_sample_tokens=200)
    base = load_base_model(str(train_workspace["model"])).eval()
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    with one_thread():
        model = get_method("esft-token").build(load_base_model(str(train_workspace["model"])), cfg).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    from perft.cli import build_parser
    from perft.training.modeling import parameter_counts

    trainable, total = parameter_counts(model)
    assert total == sum(p.numel() for p in base.parameters())  # the aliasing rows are not counted twice
    assert (trainable, total) == get_method("esft-token").parameter_count(model)
    from perft.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--method",
                                      "esft-gate", "--esft-top-p", "0.35", "--esft-sample-tokens", "123"])
    assert (config_from_args(args).esft_top_p, config_from_args(args).esft_sample_tokens) == (0.35, 123)
    for bad, match in (({"esft_top_p": 0.0}, "esft_top_p"), ({"esft_top_p": 1.5}, "esft_top_p"),
                       ({"esft_sample_tokens": 0}, "esft_sample_tokens"), ({"strategy": "fsdp"}, "FSDP")):
        with pytest.raises(PerftError, match=match):
            config(train_workspace, tmp_path, method="esft-gate", **bad).validate()


def test_analyze_takes_the_esft_adapter_and_restores_the_base(train_workspace, trained):
    from perft.analysis.pipeline import AnalysisOptions, analyze
    from perft.loading import load_tokenizer

    _, result = trained
    base = load_base_model(str(train_workspace["model"])).eval()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    options = AnalysisOptions(projection=None, with_base=True, batch_size=8, progress=False, max_samples=24)
    with one_thread():
        out = analyze(base, load_tokenizer(str(train_workspace["model"])), train_workspace["data"],
                      [result.adapter_dir], options)
    assert [(r["name"], r["method"]) for r in out["runs"]] == [("base", None), ("adapter", "esft-gate")]
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the rows were written back
    assert not hasattr(base, "esft_selection")
    base_layers, esft_layers = out["runs"][0]["layers"], out["runs"][1]["layers"]
    assert base_layers.keys() == esft_layers.keys()
    assert base_layers != esft_layers  # trained experts change the hidden states later routers see


def test_gradient_checkpointing_gives_the_same_steps(train_workspace, tmp_path):
    """The rows are written once per forward of the experts module, recomputation included."""
    from perft.training import train

    losses = {}
    for checkpointing in (False, True):
        seen: list[float] = []
        with one_thread():
            train(config(train_workspace, tmp_path / str(checkpointing), method="esft-token", esft_sample_tokens=300,
                         max_steps=3, val_set_size=0, save_steps=3, dropout=0.0, warmup_steps=0, micro_batch_size=4,
                         gradient_checkpointing=checkpointing), callbacks=[lambda info, s=seen: s.append(info["loss"])])
        losses[checkpointing] = seen
    assert len(losses[True]) == 3 and losses[True] == losses[False]
    assert losses[False][2] < losses[False][0]


def test_eval_and_analyze_pre_check_accept_its_base_and_refuse_another(train_workspace, trained):
    from perft.methods import check_adapter_matches
    from perft.tiny import default_base_model_path

    _, result = trained
    assert check_adapter_matches(train_workspace["model"], result.adapter_dir) is get_method("esft-gate")
    with pytest.raises(PerftError, match="hidden_size=32.*hidden_size=128"):
        check_adapter_matches(default_base_model_path(), result.adapter_dir)  # the embedded tiny OLMoE, d=128
