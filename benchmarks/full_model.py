"""Full-size models on one machine: every PERFT variant and LoRA q,v against the frozen base.

Random weights with the exact shapes of a published model, built directly in bf16 (no fp32
copy is ever made), gradient checkpointing on, one micro-batch of `--seq-len` tokens:

  step time   forward + backward (+ AdamW step for the adapters) of each method, against the
              frozen base's own forward + backward (gradients to the input embeddings only);
              interleaved rounds, median (see measure.interleaved)
  peak memory weights + adapters + the step's peak (resident memory sampled during the warm-up
              round, or the torch profiler), against the base's weights; the planner's estimate beside it
  generation  greedy tokens/s, batch 1, KV cache

Models: `olmoe` (OLMoE-1B-7B-0924: 6.92B parameters, 12.9 GiB in bf16) and `qwen3` (Qwen3-30B-A3B's
layer shapes, 128 experts top-8, truncated to `--qwen3-layers` decoder layers so it fits in
24 GiB). `--small` swaps in tiny shapes of the same families (seconds; the test runs it).

    flock /tmp/perft-bigmem.lock .venv/bin/python benchmarks/full_model.py --model olmoe
    .venv/bin/python benchmarks/full_model.py --small
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import measure  # noqa: E402
import models  # noqa: E402

# The paper's OLMoE presets (configs/olmoe-commonsense-*.yaml); LoRA q,v at rank 16.
METHODS: dict[str, dict[str, Any]] = {
    "perft-r": {"variant": "routed", "num_experts": 4, "top_k": 2, "rank": 16},
    "perft-e": {"variant": "embedded", "rank": 16},
    "perft-d": {"variant": "dense", "num_experts": 4, "rank": 16},
    "perft-s": {"variant": "single", "rank": 16},
    "lora-qv": {"method": "lora-attn", "rank": 16},
}
ALL = ("base", *METHODS)
# By name only: PERFT-E with adapters in the base's dtype (bf16) instead of the default fp32.
EXTRA: dict[str, dict[str, Any]] = {"perft-e-auto": {"variant": "embedded", "rank": 16, "adapter_dtype": "auto"}}


def model_config(name: str, *, small: bool, qwen3_layers: int) -> Any:
    """The published shapes (OLMoE-1B-7B-0924, Qwen3-30B-A3B) or, with `small`, tiny ones of the family."""
    import transformers as tf

    if name == "olmoe":
        sizes = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)
        if small:
            sizes.update(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
        cfg = tf.OlmoeConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=False,
                             pad_token_id=1, eos_token_id=50279 if not small else 2, bos_token_id=None)
    elif name == "qwen3":
        sizes = dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                     num_hidden_layers=qwen3_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8)
        if small:
            sizes.update(vocab_size=512, hidden_size=64, moe_intermediate_size=16, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=16, num_experts_per_tok=4)
        cfg = tf.Qwen3MoeConfig(**sizes, max_position_embeddings=32768, tie_word_embeddings=False,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=0,
                                eos_token_id=2, bos_token_id=None)
    else:
        raise ValueError(name)
    cfg.dtype = "bfloat16"
    cfg._experts_implementation = "eager"  # the fastest backend on CPU (docs/benchmarks.md)
    return cfg


def build_base(cfg: Any) -> torch.nn.Module:
    """Random weights in bf16, created in bf16 (transformers sets the default dtype during init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def training_config(name: str) -> Any:
    from perft.training.args import TrainingConfig

    settings = dict({**METHODS, **EXTRA}.get(name, {}))
    return TrainingConfig(**{"alpha": 2.0 * settings.get("rank", 16), "dropout": 0.0, **settings})


def build(name: str, base: torch.nn.Module, random_adapters: bool = False) -> tuple[torch.nn.Module, int]:
    """`name` on a weight-sharing copy of the frozen base; (model, trainable count).

    The adapters start as the exact no-op they are at step 0, so the base routes every token as
    the frozen base does and a step-time ratio is the adapters' own cost. `random_adapters`
    gives PERFT's `up` tensors mid-training values instead: on random base weights, whose
    routing collapses onto a few experts after the first layer, that spreads the routing and
    the eager experts loop then runs more experts (docs/benchmarks.md, "Full-size models").
    """
    from perft.methods import get_method

    model = models.share_weights_copy(base)
    if name != "base":
        torch.manual_seed(1)
        cfg = training_config(name)
        model = get_method(cfg.method).build(model, cfg)
        if random_adapters:
            models.randomize_adapters(model, seed=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, models.count_trainable(model)


def experts_hit(model: torch.nn.Module, ids: torch.Tensor, top_k: int) -> float:
    """Distinct experts the tokens `ids` are routed to, averaged over the MoE layers (a forward
    pass's expert work on the eager backend grows with it)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True, use_cache=False).router_logits
    return sum(torch.unique(layer.float().topk(top_k, -1).indices).numel() for layer in logits) / len(logits)


def make_step(model: torch.nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    model.train()

    def step() -> None:
        x = embeds.detach().requires_grad_(True)  # gradients reach the input even for the frozen base
        model(inputs_embeds=x, labels=labels, use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def planner_figures(cfg: Any, name: str, seq_len: int) -> dict[str, int]:
    from perft.planning import plan_memory

    settings = training_config(name) if name != "base" else training_config("perft-s")
    settings.model_dtype, settings.cutoff_len = "bfloat16", seq_len
    plan = plan_memory(cfg, settings, gpus=1, micro_batch_size=1)
    fig = {f.name: f.value for f in plan.per_device}
    trainable = 0 if name == "base" else plan.figure("trainable parameters").value
    return {"trainable": trainable, "activations_ckpt": fig["activations (checkpointing)"],
            "total_ckpt": plan.totals["checkpointing"].value, "frozen": fig["frozen weights"]}


def peak_rss_above_start(fn: Any, interval: float = 0.005) -> int:
    """Peak resident memory during `fn` above its value at the start, sampled every `interval` s.

    The profiler's per-allocation trace (measure.peak_step_bytes) takes many minutes on a
    7B-parameter step; large tensors are mmap-ed and handed back to the OS when freed, so
    resident memory follows the step's tensors closely enough at this size.
    """
    import gc
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * page

    gc.collect()
    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], rss()) - start)


def run_group(target: str, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config(target, small=args.small, qwen3_layers=args.qwen3_layers)
    t0 = time.time()
    base = build_base(cfg)
    build_s = time.time() - t0
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, cfg.vocab_size, (1, args.seq_len), generator=gen)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    built, steps, rows = {}, {}, {}
    for name in args.methods:
        built[name], trainable = build(name, base, args.random_adapters)
        hit = experts_hit(built[name], ids, cfg.num_experts_per_tok)
        steps[name] = make_step(built[name], embeds, ids)
        rows[name] = {"trainable": trainable, "planner": planner_figures(cfg, name, args.seq_len), "experts_hit": hit}
    peaks: dict[str, int] = {}

    def warm(name: str, _round: int) -> None:
        if args.memory == "profiler":
            peaks[name] = measure.peak_step_bytes(steps[name])
        elif args.memory == "rss":
            peaks[name] = peak_rss_above_start(steps[name])
        else:
            steps[name]()
            peaks[name] = 0

    times = measure.interleaved(steps, warmup=1, repeats=args.repeats, on_warmup=warm)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=gen)
    for name, model in built.items():
        model.eval()
        model.config.use_cache = True
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
            elapsed = time.perf_counter() - start
        rows[name].update(
            step_cpu=measure.median(times["cpu"][name]), step_wall=measure.median(times["wall"][name]),
            peak_step=peaks[name], adapter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()
                                                     if p.requires_grad),
            generated=int(out.shape[1] - prompt.shape[1]), tokens_per_s=(out.shape[1] - prompt.shape[1]) / elapsed)
    desc = (f"{target}: {sum(p.numel() for p in base.parameters()):,} parameters, hidden {cfg.hidden_size}, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, vocab "
            f"{cfg.vocab_size}, bf16, random weights (built in {build_s:.0f} s)")
    return {"target": target, "dtype": dtype_name, "description": desc, "weights": weights, "rows": rows,
            "seq_len": args.seq_len, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _size(value: float) -> str:
    return f"{value / 1024**3:.2f} GiB" if value >= 1024**3 / 10 else f"{value / 1024**2:.1f} MiB"


def render(result: dict[str, Any]) -> str:
    rows, weights = result["rows"], result["weights"]
    base = rows.get("base", {})
    table = []
    for name, r in rows.items():
        held = weights + r["adapter_bytes"] + r["peak_step"]  # the step peak holds grads and the new Adam moments
        plan = r["planner"]
        table.append([
            name, f"{r['trainable']:,}", f"{plan['trainable']:,}" if name != "base" else "-",
            f"{r['step_cpu']:.2f} s", measure.fmt_ratio(r["step_cpu"], base.get("step_cpu", float("nan"))),
            _size(r["peak_step"]), _size(plan["activations_ckpt"]),
            _size(held), f"{held / weights:.3f}x", _size(plan["total_ckpt"]),
            f"{r['tokens_per_s']:.2f}", measure.fmt_ratio(r["tokens_per_s"], base.get("tokens_per_s", float("nan"))),
            f"{r.get('experts_hit', float('nan')):.1f}",
        ])
    header = ["method", "trainable", "planner trainable", "step (CPU)", "/ base", "step peak",
              "planner activations", "held", "/ weights", "planner total", "gen tok/s", "/ base", "experts hit"]
    return (f"### {result['description']}\n\n{measure.markdown_table(header, table)}\n\n"
            f"seq {result['seq_len']} tokens, micro-batch 1, gradient checkpointing; base weights "
            f"{_size(weights)}; process peak RSS {_size(result['max_rss'])}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="target", nargs="+", choices=("olmoe", "qwen3"), default=["olmoe"])
    p.add_argument("--methods", nargs="+", choices=(*ALL, *EXTRA), default=list(ALL))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--qwen3-layers", type=int, default=8, help="decoder layers of the Qwen3-MoE-shaped model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", choices=("rss", "profiler", "none"), default="rss",
                   help="step peak from sampled resident memory (default), the torch profiler (slow at full size) "
                        "or not at all")
    p.add_argument("--random-adapters", action="store_true",
                   help="give the adapters mid-training values instead of the step-0 no-op (changes the random "
                   "base's routing: see build)")
    p.add_argument("--small", action="store_true", help="tiny shapes of the same families: checks the logic")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if "base" not in args.methods:
        args.methods.insert(0, "base")
    if args.small:
        args.seq_len, args.repeats, args.new_tokens = 32, 1, 4
    args.dtype = ["bf16"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return measure.run_benchmark("full_model.py", "full-size models, bf16, random weights", args, argv, run_group,
                                render)


if __name__ == "__main__":
    sys.exit(main())
