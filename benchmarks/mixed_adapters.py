"""Mixed-batch generation: 8 rows served by 8 different adapters vs the same rows by one adapter.

One batch of 8 prompts, greedy generation with the KV cache, on one frozen base carrying 8
PERFT adapters (one per row in the mixed case). Measured side by side in one run, each repeat
calling every case once in a rotating order; median over repeats after warm-up. Cases:

- `1 adapter`: `set_adapter("a0")`, plain `generate` (the ordinary single-adapter path);
- `1 adapter via adapter_names`: the same, through the mixed-batch path (all rows "a0");
- `8 adapters`: `adapter_names=["a0", ..., "a7"]`, one adapter per row.

The goal (issue 14) is 8 adapters at >= 0.8x the tokens/s of one.

    .venv/bin/python benchmarks/mixed_adapters.py --target layer small
    .venv/bin/python benchmarks/mixed_adapters.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import models  # noqa: E402
from models import DTYPES  # noqa: E402

from perft import PerftConfig, get_perft_model  # noqa: E402

ROWS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", nargs="+", choices=("layer", "small"), default=["layer", "small"])
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    p.add_argument("--variant", default="routed", help="variant of the 8 adapters")
    return measure.parse_generation_args(p, argv)


def run_group(target: str, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    base, desc = models.base_for(target, DTYPES[dtype_name], quick=args.quick, backend=args.backend, causal_lm=True)
    config = PerftConfig(variant=args.variant, num_experts=8, top_k=2, rank=16, dropout=0.0)
    model = get_perft_model(base, config, adapter_name="a0")
    for i in range(1, ROWS):
        model.add_adapter(f"a{i}", config)
    for i in range(ROWS):  # every adapter mid-training (non-zero), each different
        model.set_adapter(f"a{i}")
        models.randomize_adapters(model, seed=i)
    model.set_adapter("a0")
    model.eval()
    ids = torch.randint(3, base.config.vocab_size, (ROWS, args.prompt), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  use_cache=True, attention_mask=torch.ones_like(ids))
    cases = {"1 adapter": None, "1 adapter via adapter_names": ["a0"] * ROWS,
             "8 adapters": [f"a{i}" for i in range(ROWS)]}
    generated: dict[str, int] = {}

    def runner(name: str, names: list[str] | None) -> Any:
        def run() -> None:
            with torch.no_grad():
                out = model.generate(ids, adapter_names=names, **kwargs)
            generated[name] = (out.shape[1] - ids.shape[1]) * ROWS

        return run

    times = measure.interleaved({n: runner(n, names) for n, names in cases.items()},
                               warmup=args.warmup, repeats=args.repeats)
    result = {"target": target, "dtype": dtype_name, "description": desc, "prompt": args.prompt,
              "new_tokens": args.new_tokens, "variant": args.variant, "backend": args.backend, "cases": {}}
    for name in cases:
        cpu, wall = measure.median(times["cpu"][name]), measure.median(times["wall"][name])
        result["cases"][name] = {"generated": generated.get(name), "gen_cpu_s": times["cpu"][name],
                                 "gen_wall_s": times["wall"][name], "tokens_per_cpu_s": generated[name] / cpu,
                                 "tokens_per_wall_s": generated[name] / wall}
    return result


def render(result: dict[str, Any]) -> str:
    cases = result["cases"]
    one_cpu, one_wall = cases["1 adapter"]["tokens_per_cpu_s"], cases["1 adapter"]["tokens_per_wall_s"]
    header = ["case", "generated", "tokens / CPU s", "/ 1 adapter", "tokens / wall s", "/ 1 adapter"]
    rows = [[n, str(r["generated"]), f"{r['tokens_per_cpu_s']:.1f}", measure.fmt_ratio(r["tokens_per_cpu_s"], one_cpu),
             f"{r['tokens_per_wall_s']:.1f}", measure.fmt_ratio(r["tokens_per_wall_s"], one_wall)]
            for n, r in cases.items()]
    title = (f"### mixed-batch generation, {result['target']} ({result['description']}), {result['dtype']}, "
             f"batch {ROWS}, prompt {result['prompt']}, {result['new_tokens']} new tokens, "
             f"8 PERFT-{result['variant']} adapters (N=8, top-2, r16)")
    return f"{title}\n\n{measure.markdown_table(header, rows)}\n"


def main(argv: list[str] | None = None) -> int:
    return measure.run_benchmark("mixed_adapters.py", "mixed-batch generation", parse_args(argv), argv, run_group,
                                render)


if __name__ == "__main__":
    raise SystemExit(main())
