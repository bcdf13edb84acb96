"""Greedy generation throughput (tokens/s) of the frozen base and of the adapted models.

Same methods and targets as `step_time.py`; each repeat runs every method once in a
rotating order, median over repeats after warm-up. One prompt (batch 1) of `--prompt`
random tokens, exactly `--new-tokens` generated with the KV cache; tokens/s counts the
generated tokens over the whole `generate` call (prefill included). PEFT models are not
merged (as during training-time evaluation); PEFT's expert LoRA rebuilds the full expert
weights on every forward, which its row shows.

    .venv/bin/python benchmarks/generation.py --target layer small --dtype fp32
    .venv/bin/python benchmarks/generation.py --quick
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
from models import ALL_METHODS, DTYPES, Method  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", nargs="+", choices=("layer", "small"), default=["layer", "small"])
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    return measure.parse_generation_args(p, argv)


def run_group(target: str, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    base, desc = models.base_for(target, dtype, quick=args.quick, backend=args.backend, causal_lm=True)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, base.config.vocab_size, (1, args.prompt), generator=gen)
    methods: dict[str, Method] = {}
    r_params = None
    for name in sorted(args.methods, key=lambda n: n != "perft-r"):
        methods[name] = models.build_method(name, base, perft_r_params=r_params)
        if name == "perft-r":
            r_params = methods[name].trainable
    methods = {n: methods[n] for n in args.methods}
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, use_cache=True)
    lengths: dict[str, int] = {}

    def runner(name: str, m: Method) -> Any:
        m.model.eval()

        def run() -> None:
            with torch.no_grad():
                out = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            lengths[name] = out.shape[1] - ids.shape[1]

        return run

    fns = {n: runner(n, m) for n, m in methods.items()}
    times = measure.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    result = {"target": target, "dtype": dtype_name, "description": desc, "prompt": args.prompt,
              "new_tokens": args.new_tokens, "backend": args.backend, "methods": {}}
    for n, m in methods.items():
        cpu, wall = measure.median(times["cpu"][n]), measure.median(times["wall"][n])
        result["methods"][n] = {"trainable": m.trainable, "note": m.note, "generated": lengths.get(n),
                                "gen_cpu_s": times["cpu"][n], "gen_wall_s": times["wall"][n],
                                "tokens_per_cpu_s": lengths.get(n, 0) / cpu, "tokens_per_wall_s": lengths.get(n, 0) / wall}
    return result


def render(result: dict[str, Any]) -> str:
    ms = result["methods"]
    b_cpu = ms.get("base", {}).get("tokens_per_cpu_s", float("nan"))
    b_wall = ms.get("base", {}).get("tokens_per_wall_s", float("nan"))
    header = ["method", "trainable", "generated", "tokens / CPU s", "/ base", "tokens / wall s", "/ base", "setting"]
    rows = [[n, f"{r['trainable']:,}", str(r["generated"]), f"{r['tokens_per_cpu_s']:.1f}",
             measure.fmt_ratio(r["tokens_per_cpu_s"], b_cpu), f"{r['tokens_per_wall_s']:.1f}",
             measure.fmt_ratio(r["tokens_per_wall_s"], b_wall), "frozen base" if n == "base" else r["note"]]
            for n, r in ms.items()]
    spread = ""
    if ms.get("base", {}).get("gen_cpu_s"):
        parts = []
        for kind in ("cpu", "wall"):
            values = ms["base"][f"gen_{kind}_s"]
            parts.append(f"{kind} {min(values):.3f}-{max(values):.3f} s ({(max(values) / min(values) - 1) * 100:.1f}% spread)")
        spread = f"base generate() over {len(ms['base']['gen_cpu_s'])} repeats: " + ", ".join(parts)
    title = (f"### generation, {result['target']} ({result['description']}), {result['dtype']}, batch 1, "
             f"prompt {result['prompt']}, {result['new_tokens']} new tokens, experts backend {result['backend']}")
    return f"{title}\n\n{measure.markdown_table(header, rows)}\n\n{spread}\n"


def main(argv: list[str] | None = None) -> int:
    return measure.run_benchmark("generation.py", "generation", parse_args(argv), argv, run_group, render)


if __name__ == "__main__":
    raise SystemExit(main())
