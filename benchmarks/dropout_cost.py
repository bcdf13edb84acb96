"""What adapter dropout costs: one layer's adapter experts, forward+backward, side by side.

Modes, interleaved in one run (median of repeats): no dropout; torch's generator (a user's own
loop); masks keyed by (seed, step, sample) as `perft train` draws them (perft/dropout.py). For
LoRA the mask covers the input [T, d]; for the parallel adapter the [T, N*r] middle, one mask
per expert. For LoRA, `per-expert` is `dropout_masks="per_expert"`: keyed masks, one per
expert, each expert's down projection on its own masked copy of the input. Shapes default to OLMoE-1B-7B's (d 2048) with PERFT-R's benchmark setting (8
experts, r 16) and 2048 tokens, as benchmarks/step_time.py's `layer` target; compare the
milliseconds with that benchmark's step time (docs/benchmarks.md).

    .venv/bin/python benchmarks/dropout_cost.py
    .venv/bin/python benchmarks/dropout_cost.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from perft.adapters import AdapterExperts
from perft.dropout import keyed_dropout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: checks that it runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.hidden, args.tokens, args.seq_len, args.repeats = 64, 64, 16, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = max(args.tokens // args.seq_len, 1)
    x = torch.randn(batch * args.seq_len, args.hidden)
    weights = torch.rand(x.shape[0], args.experts)
    mask = torch.ones(batch, args.seq_len)
    print(f"adapter fwd+bwd, {x.shape[0]} tokens, d {args.hidden}, {args.experts} experts x r {args.rank}, "
          f"{args.threads} thread(s); median of {args.repeats}")
    for kind in ("lora", "parallel"):
        experts = AdapterExperts(kind, args.experts, args.hidden, args.rank, dropout=0.05).train()
        with torch.no_grad():
            experts.up.normal_(0, 0.01)
        modes = {"off": (0.0, False, "shared"), "torch": (0.05, False, "shared"), "keyed": (0.05, True, "shared")}
        if kind == "lora":
            modes["per-expert"] = (0.05, True, "per_expert")
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats + 1):  # the first round warms up
            for mode, (p, keyed, masks) in modes.items():
                experts.dropout_p, experts.dropout_masks = p, masks
                start = time.perf_counter()
                if keyed:
                    with keyed_dropout(experts, seed=42, step=3, sample_ids=range(batch), attention_mask=mask):
                        experts(x, weights).sum().backward()
                else:
                    experts(x, weights).sum().backward()
                times[mode].append(time.perf_counter() - start)
                experts.zero_grad(set_to_none=True)
        median = {m: statistics.median(t[1:] if len(t) > 1 else t) * 1e3 for m, t in times.items()}
        print(f"{kind:9s} off {median['off']:8.1f} ms | torch {median['torch']:8.1f} ms | keyed {median['keyed']:8.1f} ms"
              f" | keyed - off {median['keyed'] - median['off']:+7.1f} ms | keyed / torch "
              f"{median['keyed'] / median['torch']:.2f}x")
        if "per-expert" in median:
            print(f"{kind:9s} per-expert input masks {median['per-expert']:8.1f} ms | per-expert / keyed "
                  f"{median['per-expert'] / median['keyed']:.2f}x | per-expert - off "
                  f"{median['per-expert'] - median['off']:+7.1f} ms")


if __name__ == "__main__":
    main()
