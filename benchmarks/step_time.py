"""Forward+backward step time, peak step memory and trainable parameters of PERFT and its peers.

Compared side by side in one process, interleaved (every repeat runs every method once, in a
rotating order), median of repeats after warm-up:

  base          the frozen model alone, gradients to the inputs only (the floor of any adapter)
  perft-r/e/d/s PERFT with the paper's typical settings (see models.PERFT_SETTINGS)
  lora-qv       PEFT LoRA on attention q,v at about PERFT-R's trainable-parameter count
  lora-experts  PEFT LoRA on the fused expert tensors (`target_parameters`), same budget
  loop-r        PERFT-R computed by a per-expert Python loop (index, compute, index_add_): the
                routed_loop variant registered in models.py, same tensors and router

Targets: `layer` (one decoder layer with OLMoE-1B-7B's shapes, random weights, a 1-layer
`OlmoeModel` fed `inputs_embeds`) and `small` (the embedded small model, or the same recipe
with random weights if it has not been built). Peak memory is measured in the warm-up round
(see `measure.peak_step_bytes`); the adapter part is timed in isolation on one layer.

    .venv/bin/python benchmarks/step_time.py --target layer --dtype fp32
    .venv/bin/python benchmarks/step_time.py --quick        # seconds; shapes too small to mean anything
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import models  # noqa: E402
from models import ALL_METHODS, DTYPES, EXTRA_METHODS, PERFT_LIKE, Method  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", nargs="+", choices=("layer", "small"), default=None,
                   help="what to benchmark (default: layer; with --quick: layer small)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS),
                   help=f"any of {', '.join(ALL_METHODS + EXTRA_METHODS)}, each optionally as METHOD@BACKEND (run "
                        "on the base with another experts backend, e.g. base@grouped_mm)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (layer: one sequence)")
    p.add_argument("--seq-len", type=int, default=256, help="small model: sequence length (batch = tokens / seq-len)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="eager",
                   help="transformers experts_implementation of the base (eager: the fastest on CPU, see docs)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory measurement")
    p.add_argument("--adapter-repeats", type=int, default=7, help="repeats of the isolated adapter timing")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: checks that everything runs")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    for name in args.methods:
        if name.split("@", 1)[0] not in ALL_METHODS + EXTRA_METHODS:
            p.error(f"unknown method {name!r}")
    if args.target is None:
        args.target = ["layer", "small"] if args.quick else ["layer"]
    if args.quick:
        args.tokens, args.seq_len, args.repeats, args.adapter_repeats = 64, 32, 1, 2
    if args.tokens % args.seq_len and "small" in args.target:
        p.error("--tokens must be a multiple of --seq-len")
    return args


# ---------------------------------------------------------------------------- steps
def make_step(method: Method, target: str, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step's compute: forward, backward to the inputs and the trainable tensors."""
    model = method.model
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step() -> None:
        x = inputs["embeds"].detach().requires_grad_(True)
        if target == "layer":
            out = model(inputs_embeds=x, use_cache=False).last_hidden_state
            out.backward(inputs["grad"])
        else:
            model(inputs_embeds=x, labels=inputs["labels"], use_cache=False).loss.backward()
        for p in params:
            p.grad = None

    return step


def build_inputs(target: str, base: torch.nn.Module, tokens: int, seq_len: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1234)
    d = base.config.hidden_size
    if target == "layer":
        embeds = torch.randn(1, tokens, d, generator=gen).to(dtype)
        return {"embeds": embeds, "grad": torch.randn(1, tokens, d, generator=gen).to(dtype)}
    ids = torch.randint(3, base.config.vocab_size, (tokens // seq_len, seq_len), generator=gen)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    return {"embeds": embeds, "labels": ids}


# ---------------------------------------------------------------------------- adapter part
def adapter_part(methods: dict[str, Method], tokens: int, dtype: torch.dtype, repeats: int) -> dict[str, dict]:
    """Isolated adapter cost on the first adapted layer: fwd+bwd at `tokens`, fwd at 1 token."""
    perft = {n: m for n, m in methods.items() if n in PERFT_LIKE}
    if not perft:
        return {}
    first = next(iter(perft.values()))
    path, layer = next(iter(first.model.perft_layers.items()))
    block = first.model.base_model.get_submodule(path)
    d = layer.experts.hidden_size
    gen = torch.Generator().manual_seed(99)
    x0 = torch.randn(tokens, d, generator=gen).to(dtype)
    gy = torch.randn(tokens, d, generator=gen).to(dtype)
    with torch.no_grad():
        _, base_w, base_idx = block.gate(x0)
    one = x0[:1].clone()
    one_w, one_idx = base_w[:1].clone(), base_idx[:1].clone()

    train_fns: dict[str, Callable[[], None]] = {}
    infer_fns: dict[str, Callable[[], None]] = {}
    for name, m in perft.items():
        lay = next(iter(m.model.perft_layers.values()))
        params = [p for p in lay.parameters() if p.requires_grad]

        def train(lay: Any = lay, params: list = params) -> None:
            x = x0.detach().requires_grad_(True)
            lay.delta(x, base_idx, base_w).backward(gy)
            for p in params:
                p.grad = None

        def infer(lay: Any = lay) -> None:
            with torch.no_grad():
                for _ in range(20):
                    lay.delta(one, one_idx, one_w)

        train_fns[name], infer_fns[name] = train, infer
    result: dict[str, dict] = {n: {} for n in perft}
    train_t = measure.interleaved(train_fns, warmup=1, repeats=repeats)
    infer_t = measure.interleaved(infer_fns, warmup=2, repeats=repeats * 3)
    for n in perft:
        result[n]["train_ms"] = measure.median(train_t["cpu"][n]) * 1e3
        result[n]["train_wall_ms"] = measure.median(train_t["wall"][n]) * 1e3
        result[n]["infer_1tok_us"] = measure.median(infer_t["cpu"][n]) / 20 * 1e6
    if "perft-r" in perft and "loop-r" in perft:  # the reference computes the same function
        with torch.no_grad():
            a = next(iter(perft["perft-r"].model.perft_layers.values())).delta(x0[:256])
            b = next(iter(perft["loop-r"].model.perft_layers.values())).delta(x0[:256])
        result["loop-r"]["max_abs_diff_vs_perft_r"] = float((a.float() - b.float()).abs().max())
    return result


# ---------------------------------------------------------------------------- one run
def run_group(target: str, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    t0 = time.time()
    base, desc = models.base_for(target, dtype, quick=args.quick, backend=args.backend)
    inputs = build_inputs(target, base, args.tokens, args.seq_len, dtype)
    methods: dict[str, Method] = {}
    r_params = None
    order = sorted(args.methods, key=lambda n: n != "perft-r")  # perft-r first: its size sets the LoRA ranks
    for name in order:
        methods[name] = models.build_method(name, base, perft_r_params=r_params)
        if name == "perft-r":
            r_params = methods[name].trainable
    methods = {n: methods[n] for n in args.methods}
    steps = {n: make_step(m, target, inputs) for n, m in methods.items()}
    build_s = time.time() - t0

    memory: dict[str, int] = {}

    def warm(name: str, rnd: int) -> None:
        if rnd == 0 and not args.no_memory:
            memory[name] = measure.peak_step_bytes(steps[name])
        else:
            steps[name]()

    times = measure.interleaved(steps, warmup=args.warmup, repeats=args.repeats, on_warmup=warm)
    part = adapter_part(methods, args.tokens, dtype, args.adapter_repeats)
    result = {
        "target": target, "dtype": dtype_name, "description": desc, "tokens": args.tokens,
        "backend": args.backend, "build_s": build_s, "methods": {},
    }
    for n, m in methods.items():
        result["methods"][n] = {
            "trainable": m.trainable, "note": m.note,
            "step_cpu_s": times["cpu"][n], "step_cpu_median_s": measure.median(times["cpu"][n]),
            "step_wall_s": times["wall"][n], "step_wall_median_s": measure.median(times["wall"][n]),
            "peak_step_bytes": memory.get(n), **part.get(n, {}),
        }
    return result


def render(result: dict[str, Any]) -> str:
    ms = result["methods"]
    base = ms.get("base", {})
    b_cpu, b_wall = base.get("step_cpu_median_s", float("nan")), base.get("step_wall_median_s", float("nan"))
    b_mem = base.get("peak_step_bytes") or float("nan")
    loop = ms.get("loop-r", {}).get("train_ms", float("nan"))
    header = ["method", "trainable", "step CPU ms", "CPU / base", "CPU - base ms", "step wall ms", "wall / base",
              "peak MiB", "peak / base", "adapter fwd+bwd ms", "loop-r / this", "adapter fwd 1 tok us", "setting"]
    rows = []
    for n, r in ms.items():
        cpu, wall = r["step_cpu_median_s"], r["step_wall_median_s"]
        mem = r.get("peak_step_bytes")
        train = r.get("train_ms")
        rows.append([
            n, f"{r['trainable']:,}", f"{cpu * 1e3:.0f}", measure.fmt_ratio(cpu, b_cpu),
            "-" if n == "base" else f"{(cpu - b_cpu) * 1e3:+.0f}",
            f"{wall * 1e3:.0f}", measure.fmt_ratio(wall, b_wall),
            "-" if mem is None else f"{mem / 2**20:.1f}", "-" if mem is None else measure.fmt_ratio(mem, b_mem),
            "-" if train is None else f"{train:.1f}",
            "-" if train is None else measure.fmt_ratio(loop, train),
            "-" if r.get("infer_1tok_us") is None else f"{r['infer_1tok_us']:.0f}",
            r["note"],
        ])
    spread = ""
    if base.get("step_cpu_s"):
        parts = []
        for kind in ("cpu", "wall"):
            values = base[f"step_{kind}_s"]
            lo, hi = min(values), max(values)
            parts.append(f"{kind} {lo * 1e3:.0f}-{hi * 1e3:.0f} ms ({(hi / lo - 1) * 100:.1f}% spread)")
        spread = f"base step over {len(base['step_cpu_s'])} repeats: " + ", ".join(parts)
    title = f"### {result['target']} ({result['description']}), {result['dtype']}, {result['tokens']} tokens, " \
            f"experts backend {result['backend']}"
    extra = ""
    if "max_abs_diff_vs_perft_r" in ms.get("loop-r", {}):
        extra = f"\nloop-r vs perft-r adapter output, max |diff|: {ms['loop-r']['max_abs_diff_vs_perft_r']:.2e}"
    return f"{title}\n\n{measure.markdown_table(header, rows)}\n\n{spread}{extra}\n"


def main(argv: list[str] | None = None) -> int:
    return measure.run_benchmark("step_time.py", "step time", parse_args(argv), argv, run_group, render)


if __name__ == "__main__":
    raise SystemExit(main())
