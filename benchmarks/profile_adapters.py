"""Where the adapter time goes: torch.profiler tables of the adapter part of one layer.

Profiles `PerftLayer.delta` forward+backward (as in training) on one OLMoE-shaped layer's
input for the stacked PERFT-R / PERFT-E and the per-expert loop reference, and prints the
operators by self CPU time plus the share spent in matrix products.

    .venv/bin/python benchmarks/profile_adapters.py --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402
import models  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::matmul")


def profile_step(step: Callable[[], None]) -> tuple[Any, float]:
    """Run `step` once to warm up, then once under the CPU profiler: (key averages, total self CPU µs)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    return averages, sum(e.self_cpu_time_total for e in averages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=tuple(models.DTYPES), default="fp32")
    p.add_argument("--methods", nargs="+", default=["perft-r", "loop-r", "perft-e"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--step-methods", nargs="*", default=[],
                   help="also profile one whole layer step (forward+backward) of these methods, e.g. lora-experts")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    machine.set_threads(args.threads)
    dtype = models.DTYPES[args.dtype]
    base, _ = models.base_for("layer", dtype, quick=args.quick, backend="eager")
    hidden = base.config.hidden_size
    tokens = 64 if args.quick else args.tokens
    gen = torch.Generator().manual_seed(99)
    x0 = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gy = torch.randn(tokens, hidden, generator=gen).to(dtype)
    print(f"# adapter profile ({' '.join(sys.argv[1:])}): {tokens} tokens, {args.dtype}, threads {args.threads}")
    for name in args.methods:
        method = models.build_method(name, base)
        path, layer = next(iter(method.model.perft_layers.items()))
        block = method.model.base_model.get_submodule(path)
        with torch.no_grad():
            _, w, idx = block.gate(x0)
        params = [q for q in layer.parameters() if q.requires_grad]

        def step(layer=layer, params=params, w=w, idx=idx) -> None:
            x = x0.detach().requires_grad_(True)
            layer.delta(x, idx, w).backward(gy)
            for q in params:
                q.grad = None

        averages, total = profile_step(step)
        mm = sum(e.self_cpu_time_total for e in averages if e.key in MATMULS)
        print(f"\n## {name} ({method.note}): {total / 1e3:.1f} ms self CPU, "
              f"{100 * mm / max(total, 1):.0f}% in matrix products")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    embeds, grad = x0.unsqueeze(0), gy.unsqueeze(0)
    r_params = models.build_method("perft-r", base).trainable if args.step_methods else None
    for name in args.step_methods:
        method = models.build_method(name, base, perft_r_params=r_params)
        model = method.model.train()
        params = [q for q in model.parameters() if q.requires_grad]

        def full_step(model=model, params=params) -> None:
            x = embeds.detach().requires_grad_(True)
            model(inputs_embeds=x, use_cache=False).last_hidden_state.backward(grad)
            for q in params:
                q.grad = None

        averages, total = profile_step(full_step)
        print(f"\n## whole layer step, {name} ({method.note}): {total / 1e3:.0f} ms self CPU")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
