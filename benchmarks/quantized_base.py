"""PERFT-R on OLMoE-1B-7B's full shapes with a bf16, an 8-bit and a 4-bit expert store.

Run under the big-memory lock (the bf16 case holds ~14 GiB):

    flock /tmp/perft-bigmem.lock python benchmarks/quantized_base.py

Each base runs in its own child process (so resident memory is that base's alone), one after
the other, and the parent prints their ratios side by side. Weights are random: the model is
built on the meta device and filled decoder layer by decoder layer, so no fp32 copy and no
full-precision expert tensor beyond one layer's ever exists. Quantizing with bitsandbytes'
CPU kernels takes ~45 s per OLMoE layer on one core, so layer 0's experts are quantized for
real and layers 1-15 hold copies of its store (the same bytes and the same dequantization
work per step as stores of their own; `--quantize-all-layers` quantizes every layer).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BASES = ("bf16", "8bit", "4bit")
BITS = {"8bit": 8, "4bit": 4}
GiB = 2**30


def olmoe_config(layers: int) -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=4096, pad_token_id=1, bos_token_id=None, eos_token_id=50279)


def _fill(module: torch.nn.Module, generator: torch.Generator) -> None:
    for param in module.parameters(recurse=False):
        if param.dim() >= 2:
            param.data.normal_(0, 0.02, generator=generator)
        else:
            param.data.fill_(1.0)


def build(base: str, layers: int, quantize_all: bool, seed: int = 0) -> torch.nn.Module:
    """OLMoE with random bf16 weights; for a quantized base the experts go straight into the store."""
    from transformers import AutoModelForCausalLM

    from perft.quantization import QuantizedExpertWeights, attach_store

    config = olmoe_config(layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, experts_implementation="eager")
    generator = torch.Generator().manual_seed(seed)
    first_stores: dict[str, QuantizedExpertWeights] = {}
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        shapes = {name: experts._parameters.pop(name).shape for name in ("gate_up_proj", "down_proj")}
        layer.to_empty(device="cpu")
        for module in layer.modules():
            _fill(module, generator)
        for name, shape in shapes.items():
            if base == "bf16":
                weight = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
                experts.register_parameter(name, torch.nn.Parameter(weight, requires_grad=False))
                continue
            if index == 0 or quantize_all:
                weight = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
                store = QuantizedExpertWeights(weight, BITS[base])
                del weight
                first_stores.setdefault(name, store)
            else:
                store = copy.deepcopy(first_stores[name])
            attach_store(experts, name, store)
        gc.collect()
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device="cpu")
        _fill(module, generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq buffer, computed again
    return model


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise) and restart the peak count."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    except OSError:
        pass


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def perft_r_config() -> Any:
    """The measured PERFT-R (N=8, top-2, r=16, alpha 32, no dropout), every adapter field explicit."""
    from perft.training import TrainingConfig

    return TrainingConfig(method="perft", variant="routed", adapter="lora", num_experts=8, top_k=2, rank=16,
                          alpha=32.0, dropout=0.0, init="normal", dropout_at=None, activation="silu",
                          normalize_top_k=None, router_aux_loss_coef=0.0, layers=None, adapter_dtype="float32")


def child(args: argparse.Namespace) -> dict[str, Any]:
    from perft.methods import get_method
    from perft.quantization import expert_storage_bytes

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = build(args.child, args.layers, args.quantize_all_layers)
    build_s = time.perf_counter() - start
    experts_bytes = expert_storage_bytes(base)
    weights_bytes = model_bytes(base)
    model = get_method("perft").build(base, perft_r_config())
    release_freed_memory()
    rss_built = rss_bytes()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 50000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"base": args.child, "build_s": build_s, "experts_bytes": experts_bytes, "weights_bytes": weights_bytes,
            "rss_built": rss_built, "rss_peak": rss_bytes("VmHWM"), "step_s": statistics.median(times[args.warmup:]),
            "steps": args.steps, "tokens": args.tokens, "threads": args.threads, "loss": loss.item()}


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ref = next((r for r in results if r["base"] == "bf16"), results[0])
    lines = [f"OLMoE-1B-7B shapes ({args.layers} layers, 64 experts top-8, random weights), PERFT-R N=8 top-2 r=16 "
             f"fp32 adapters, 1 x {args.tokens} tokens, {args.threads} thread(s), median of {args.steps} step(s) after "
             f"{args.warmup} warm-up", "",
             "| base | expert store GiB | all weights GiB | resident before training GiB | peak resident while training GiB | "
             "peak vs bf16 | step s | step vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['base']} | {r['experts_bytes'] / GiB:.2f} | {r['weights_bytes'] / GiB:.2f} | "
                     f"{r['rss_built'] / GiB:.2f} | {r['rss_peak'] / GiB:.2f} | {r['rss_peak'] / ref['rss_peak']:.3f}x | "
                     f"{r['step_s']:.1f} | {r['step_s'] / ref['step_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated: bf16, 8bit, 4bit")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (OLMoE-1B-7B: 16)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per step (one sequence)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize-all-layers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = []
    for base in args.bases.split(","):
        cmd = [sys.executable, __file__, "--child", base, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{base}: {results[-1]}", file=sys.stderr)
    print(render(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
