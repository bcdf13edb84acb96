"""One optimiser step of `perft train` equals a reference step written here from scratch.

The paper's loss for one global batch split into micro-batches m = 1..M (any mix of
accumulation and processes):

    L = sum_m [ CE_sum(m) / T  +  (c_R * B_R(m) + c_base * B_base(m)) / M ]

CE_sum(m) is the cross-entropy summed over micro-batch m's target tokens, T the number of target
tokens of the whole global batch, and B the Switch load-balance loss of the PERFT-R routers and
of the frozen base routers over all layers (N * sum_n f_n P_n, padding masked). The batch's
micro-batches hold different numbers of targets, so normalising the cross-entropy per
micro-batch, dropping a coefficient or not dividing the balance losses by M all change the
gradient. The gradient is read from AdamW's first moment in the checkpoint (exp_avg = 0.1 g).
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from perft.io import load_safetensors
from perft.training import train
from tests.helpers.training import (
    ANIMALS,
    COLOURS,
    PYTHON,
    config,
    config_flags,
    make_workspace,
    one_thread,
    subprocess_env,
)

N_RECORDS = 12
SETTINGS = dict(dropout=0.0, batch_size=N_RECORDS, val_set_size=0, max_steps=1, save_steps=1, eval_steps=1,
                warmup_steps=0, max_grad_norm=0.0, lr=1e-2, router_aux_loss_coef=0.3,
                base_router_aux_loss_coef=0.2, logging_steps=1, seed=11, cutoff_len=128)


def records() -> list[dict[str, str]]:
    """Distinct lengths (so the longest-first order is unique) and responses of 4 to 10 tokens."""
    out = []
    for i in range(N_RECORDS):
        animal = ANIMALS[i % len(ANIMALS)]
        colour = COLOURS[i % len(COLOURS)]
        out.append({"instruction": f"what colour is the {animal}", "input": " ".join(["the quick fox"] * i),
                    "output": f"the {animal} is {colour}" + " the quick" * ((5 * i) % 4)})
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import json

    ws = make_workspace(tmp_path_factory.mktemp("arith"), n_records=N_RECORDS)
    ws["data"].write_text(json.dumps(records()), encoding="utf-8")
    return ws


def switch_loss(probs: list[torch.Tensor], top: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """N * sum_n f_n P_n over all layers' non-padding tokens; f_n counts every top-k slot."""
    keep = mask.reshape(-1).float()
    n = probs[0].shape[-1]
    counts = sum((F.one_hot(t, n).sum(1).float() * keep[:, None]).sum(0) for t in top)
    mass = sum((p.float() * keep[:, None]).sum(0) for p in probs)
    tokens = keep.sum() * len(probs)
    return n * torch.sum(counts / tokens * (mass / tokens))


def reference_gradient(ws, cfg, micro: int, with_balance: bool = True) -> dict[str, torch.Tensor]:
    """The gradient of L above, from the model's forward outputs and this file's own arithmetic."""
    from transformers import set_seed

    from perft.data.collate import PaddingCollator
    from perft.data.dataset import prepare_data
    from perft.loading import load_base_model, load_tokenizer
    from perft.model import get_perft_model

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cutoff_len=cfg.cutoff_len, val_set_size=0, split_seed=cfg.split_seed,
                        train_on_inputs=cfg.train_on_inputs)
    set_seed(cfg.seed)  # the adapter initialisation perft train draws
    model = get_perft_model(load_base_model(cfg.model, dtype="float32"), cfg.perft_config())
    model.train()
    routers = {name: module for name, module in model.named_modules() if type(module).__name__ == "AdapterRouter"}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in routers.values():
        module.register_forward_hook(lambda _m, _i, out: seen.append((out[0], out[2])))
    rows = data.train
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    collate = PaddingCollator(tokenizer.pad_token_id)
    chunks = [order[i:i + micro] for i in range(0, len(order), micro)]
    batches = [collate([{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in c]) for c in chunks]
    targets = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert len(batches) == 1 or len(set(targets)) > 1, targets  # the micro-batches hold different numbers of targets
    total_targets = sum(targets)
    base_k = model.config.num_experts_per_tok
    for batch in batches:
        seen.clear()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
        ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum")
        loss = ce_sum / total_targets
        if with_balance:
            assert len(seen) == len(routers)
            adapter_balance = switch_loss([p for p, _ in seen], [t for _, t in seen], batch["attention_mask"])
            base_probs = [torch.softmax(r.float(), dim=-1) for r in out.router_logits]
            base_top = [p.topk(base_k, dim=-1).indices for p in base_probs]
            base_balance = switch_loss(base_probs, base_top, batch["attention_mask"])
            loss = loss + (cfg.router_aux_loss_coef * adapter_balance
                           + cfg.base_router_aux_loss_coef * base_balance) / len(batches)
        loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def perft_gradient(checkpoint) -> dict[str, torch.Tensor]:
    moments = load_safetensors(checkpoint / "optimizer.safetensors")
    return {key.split("::")[0]: value / 0.1 for key, value in moments.items() if key.endswith("::exp_avg")}


def assert_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float = 2e-5) -> float:
    assert sorted(ours) == sorted(reference) and ours
    worst = 0.0
    for name, g in reference.items():
        scale = g.abs().max().item() + 1e-12
        worst = max(worst, (ours[name] - g).abs().max().item() / scale)
    assert worst < tol, worst
    return worst


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)).item() for k in b)


def test_one_step_equals_the_reference_for_accumulation_1_and_4(ws, tmp_path):
    with one_thread():
        runs = {}
        for micro in (N_RECORDS, 3):
            out = tmp_path / f"micro{micro}"
            cfg = config(ws, out, micro_batch_size=micro, **SETTINGS)
            train(cfg)
            runs[micro] = (cfg, out / "checkpoint-1")
        for micro, (cfg, checkpoint) in runs.items():
            reference = reference_gradient(ws, cfg, micro)
            assert_same(perft_gradient(checkpoint), reference)
            # The balance losses matter at this size, so a wrong coefficient or divisor is seen.
            assert relative_gap(reference_gradient(ws, cfg, micro, with_balance=False), reference) > 1e-2
        # The cross-entropy part is the same for every split; the balance part is per micro-batch.
        a, b = (perft_gradient(c) for _, c in runs.values())
        assert relative_gap(a, b) > 1e-4


def test_two_gloo_processes_take_the_reference_step(ws, tmp_path):
    out = tmp_path / "two"
    cfg = config(ws, out, micro_batch_size=N_RECORDS // 2, **SETTINGS)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "perft", "train",
           *config_flags(cfg)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stdout
    with one_thread():
        reference = reference_gradient(ws, cfg, N_RECORDS // 2)
    assert_same(perft_gradient(out / "checkpoint-1"), reference)
