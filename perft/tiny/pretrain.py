"""`perft pretrain`: pretrain a small OLMoE from scratch on the generated corpus, on CPU.

The recipe behind the embedded default, and a small, seeded MoE pretraining loop for anyone
who studies routing at small scale: a byte-level BPE tokenizer trained on the corpus, an
`OlmoeForCausalLM` (the paper's architecture) with the Switch-style router balance loss,
AdamW with warm-up and cosine decay, packed sequences, one pass over fresh text. With the
same seed, thread count and torch build, two runs give identical weights. The result is
written atomically (a temporary directory renamed into place) with `save_pretrained`
(safetensors) plus the tokenizer and a `pretrain.json` with the settings and measured
statistics (held-out loss per domain against the unigram entropy, routing statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from perft.tiny.corpus import DOMAINS, Document, iter_documents
from perft.tiny.pretrain_config import PRECISIONS, PretrainConfig  # noqa: F401  (re-exported)
from perft.tiny.routing import routing_stats
from perft.tiny.tasks import build_tasks, check_no_leak, problem_keys
from perft.tiny.tokenizer import train_tokenizer
from perft.tiny.world import World

STATS_NAME = "pretrain.json"


def use_bf16(precision: str) -> bool:
    """Whether to run matmuls under bf16 autocast: `auto` does where the CPU has native bf16 (AVX512-BF16/AMX).

    Weights and optimizer state stay fp32 either way; on such CPUs bf16 autocast is ~4x faster.
    """
    if precision == "auto":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return precision == "bf16"


def model_config(cfg: PretrainConfig, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> OlmoeConfig:
    """The `OlmoeConfig` of a run: OLMoE's architecture at the run's sizes."""
    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(1024, cfg.seq_len),
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=False,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def _token_stream(
    docs: Iterator[Document], tokenizer: PreTrainedTokenizerFast, chunk: int = 2048
) -> Iterator[int]:
    """Token ids of documents, each as `<s> text </s>`, encoded in batches."""
    eos = tokenizer.eos_token_id
    while True:
        batch = [next(docs).text for _ in range(chunk)]
        for ids in tokenizer(batch)["input_ids"]:  # the tokenizer adds <s>
            yield from ids
            yield eos


def packed_batches(
    cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast, exclude: frozenset
) -> torch.Tensor:
    """All training sequences for the run, `[steps * batch_size, seq_len]`, shuffled with the seed."""
    need = cfg.steps * cfg.batch_size * cfg.seq_len
    stream = _token_stream(iter_documents(cfg.seed, exclude=exclude), tokenizer)
    flat = torch.tensor([next(stream) for _ in range(need)], dtype=torch.long)
    seqs = flat.view(cfg.steps * cfg.batch_size, cfg.seq_len)
    order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    return seqs[order]


def heldout_documents(cfg: PretrainConfig, exclude: frozenset) -> dict[str, list[str]]:
    """Fresh documents per domain from a stream the training run never reads."""
    out: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for doc in iter_documents(10_000 + cfg.seed, exclude=exclude):
        if len(out[doc.domain]) < cfg.eval_docs_per_domain:
            out[doc.domain].append(doc.text)
        if all(len(v) >= cfg.eval_docs_per_domain for v in out.values()):
            return out
    raise AssertionError("unreachable")  # pragma: no cover


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Mean next-token cross-entropy (nats) over the tokens of `texts`, each scored alone."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i : i + 32], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, tmask = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += nll[tmask].sum().item()
        count += int(tmask.sum())
    return total / max(count, 1)


def unigram_entropy(
    train: torch.Tensor, tokenizer: PreTrainedTokenizerFast, texts: list[str], vocab: int
) -> float:
    """Cross-entropy (nats) of an add-one unigram model fitted on `train` tokens, on `texts`."""
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    ids = [t for row in tokenizer(texts)["input_ids"] for t in row[1:]]
    return float(-logp[torch.tensor(ids)].mean())


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the recipe and write the checkpoint to `cfg.output`; return the statistics."""
    log = log or functools.partial(print, flush=True)
    cfg.validate()
    out = Path(cfg.output)
    from perft.output_dir import OutputFolder

    legacy = (out / STATS_NAME).is_file() and (out / "config.json").is_file()
    with OutputFolder(out, "pretrain", overwrite=cfg.overwrite_output_dir, legacy=legacy):
        return _pretrain(cfg, out, log)


def _pretrain(cfg: PretrainConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # BPE training in one thread: same merges every run
    try:
        world = World()
        tasks = build_tasks(world)
        exclude = problem_keys()
        stream = iter_documents(cfg.seed, world, exclude)
        sample = [next(stream) for _ in range(cfg.tokenizer_docs)]
        check_no_leak([d.text for d in sample], [d.key for d in sample], tasks)
        tokenizer = train_tokenizer([d.text for d in sample], vocab_size=cfg.vocab_size)
        vocab = int(math.ceil(len(tokenizer) / 64) * 64)
        log(f"tokenizer: {len(tokenizer)} tokens (model vocab {vocab})")

        data = packed_batches(cfg, tokenizer, exclude)
        heldout = heldout_documents(cfg, exclude)
        log(f"data: {data.numel():,} training tokens in {data.shape[0]} sequences of {cfg.seq_len}")

        config = model_config(cfg, vocab, tokenizer)
        model = OlmoeForCausalLM(config)
        bf16 = use_bf16(cfg.precision)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: OLMoE {n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, "
            f"{cfg.num_experts} experts top-{cfg.top_k}, bf16 autocast: {bf16}"
        )

        # Weight decay on projection and expert matrices only: not on embeddings, norms, or the
        # routers (decaying router weights keeps their logits small and the routing needlessly flat).
        decayed = {
            n for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and ".gate." not in n
        }
        decay = [p for n, p in model.named_parameters() if n in decayed]
        no_decay = [p for n, p in model.named_parameters() if n not in decayed]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        history: list[dict[str, float]] = []
        model.train()
        t0 = time.time()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                output = model(input_ids=batch, labels=batch, output_router_logits=True)
            opt.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                aux = output.aux_loss.item()
                lm = output.loss.item() - cfg.router_aux_loss_coef * aux
                history.append({"step": step, "loss": lm, "aux_loss": aux, "lr": lr_at(step, cfg)})
                rate = (step + 1) * batch.numel() / (time.time() - t0)
                log(
                    f"step {step:5d}  loss {lm:.4f}  aux {aux:.3f}  lr {lr_at(step, cfg):.2e}  {rate:,.0f} tok/s"
                )
        train_seconds = time.time() - t0

        model.eval()
        losses = {d: heldout_loss(model, tokenizer, texts) for d, texts in heldout.items()}
        all_texts = [t for texts in heldout.values() for t in texts]
        stats: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "parameters": n_params,
            "bf16_autocast": bf16,
            "active_parameters_per_token": _active_params(config),
            "train_tokens": data.numel(),
            "train_seconds": round(train_seconds, 1),
            "heldout_loss": {d: round(v, 4) for d, v in losses.items()},
            "heldout_loss_mean": round(heldout_loss(model, tokenizer, all_texts), 4),
            "unigram_entropy": round(unigram_entropy(data, tokenizer, all_texts, vocab), 4),
            "routing": routing_stats(model, tokenizer, heldout),
            "history": history,
        }
        stats["total_seconds"] = round(time.time() - start, 1)
        _save_atomically(model, tokenizer, stats, out)
        log(summary(stats))
        log(f"saved to {out}")
        return stats
    finally:
        torch.use_deterministic_algorithms(previous_det)


def _active_params(config: OlmoeConfig) -> int:
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 4 * d * d + config.num_experts * d + config.num_experts_per_tok * 3 * d * f + 4 * d
    return layers * per_layer + 2 * config.vocab_size * d + d


def _save_atomically(
    model: OlmoeForCausalLM, tokenizer: PreTrainedTokenizerFast, stats: dict, out: Path
) -> None:
    """Write everything into a temporary sibling directory, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.backend_tokenizer.no_padding()  # evaluation padded batches; ship it as trained
        tokenizer.save_pretrained(str(tmp))
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        from perft.output_dir import LOCK_NAME, MARKER_NAME, move_aside, user_entries

        (tmp / MARKER_NAME).write_text(json.dumps({"kind": "pretrain", "written_by": "perft"}) + "\n")
        if out.exists() and user_entries(out):  # an older model (or, with --overwrite-output-dir, anything):
            moved = move_aside(out)  # moved aside whole, never deleted
            print(f"moved the previous contents of {out} aside to {moved}", flush=True)
        elif out.exists():  # only our lock file: the folder is replaced by the new one
            (out / LOCK_NAME).unlink(missing_ok=True)
            (out / MARKER_NAME).unlink(missing_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary(stats: dict[str, Any]) -> str:
    """A readable report of a run's statistics."""
    r = stats["routing"]
    lines = [
        f"held-out loss {stats['heldout_loss_mean']:.3f} nats/token (unigram entropy {stats['unigram_entropy']:.3f})",
        "  per domain: " + ", ".join(f"{d} {v:.3f}" for d, v in stats["heldout_loss"].items()),
        f"routing over {r['num_experts']} experts, top-{r['top_k']} "
        "(entropies normalised by log(num_experts); 1.0 = uniform):",
        "  layer  usage-entropy  token-router-entropy  MI(domain;expert)/H(domain)  top-2 share per domain",
    ]
    for i, layer in enumerate(r["layers"]):
        shares = " ".join(f"{d[:5]}:{s['top2_share']:.2f}" for d, s in layer["domains"].items())
        lines.append(
            f"  {i:5d}  {layer['usage_entropy']:13.3f}  {layer['token_entropy']:20.3f}  "
            f"{layer['domain_mutual_information']:27.3f}  {shares}"
        )
    return "\n".join(lines)
