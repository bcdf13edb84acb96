"""How ESFT trains a few rows of a fused expert tensor: three ways side by side, one process.

  rows-inplace   perft's way (perft.esft.ExpertRows): row parameters aliasing the fused tensor,
                 written into it in place once per forward of the experts module
  rows-copy      the same row parameters, but each forward builds a new fused tensor
                 (`torch.index_copy`, out of place: a copy of the whole tensor per forward)
  masked-full    the whole fused tensor trainable, gradients of the other rows zeroed
                 (AdamW keeps moments for the whole tensor)

One training step = forward + backward + AdamW step on an OLMoE model of `--layers` layers with
`--experts` experts (every layer keeps `--chosen` of them). Interleaved, median CPU time of
repeats after warm-up; peak step memory over the resident weights (measure.peak_step_bytes);
optimiser state bytes after one step.

    .venv/bin/python benchmarks/esft_rows.py
    .venv/bin/python benchmarks/esft_rows.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import set_threads  # noqa: E402
from measure import interleaved, markdown_table, median, peak_step_bytes  # noqa: E402

from perft.arch import require_moe_blocks  # noqa: E402
from perft.esft import ExpertRows, attach_expert_rows, fused_expert_tensors  # noqa: E402


class CopiedRows(ExpertRows):
    """ExpertRows building a new fused tensor per forward (the copy perft avoids)."""

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self._current is not None:
            return self._current
        return torch.index_copy(original.detach(), 0, self.index, torch.stack(list(self.rows)))


def build(args: argparse.Namespace, how: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    chosen = list(range(0, args.experts, args.experts // args.chosen))[:args.chosen]
    blocks = require_moe_blocks(model)
    if how == "masked-full":
        model.requires_grad_(False)
        mask = torch.zeros(args.experts, 1, 1)
        mask[chosen] = 1
        for block in blocks:
            for name in fused_expert_tensors(block):
                param = getattr(block.experts, name)
                param.requires_grad_(True)
                param.register_hook(lambda g: g * mask)
    else:
        import perft.esft as esft

        original = esft.ExpertRows
        esft.ExpertRows = CopiedRows if how == "rows-copy" else ExpertRows
        try:
            attach_expert_rows(model, {b.path: chosen for b in blocks})
        finally:
            esft.ExpertRows = original
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--chosen", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.experts, args.chosen, args.tokens, args.repeats = 64, 32, 16, 4, 64, 2
    set_threads(args.threads)
    ids = torch.randint(0, 512, (args.tokens // 128 or 1, min(args.tokens, 128)), generator=torch.Generator().manual_seed(0))
    runs = {how: build(args, how) for how in ("rows-inplace", "rows-copy", "masked-full")}

    def step(how: str) -> None:
        model, optimizer = runs[how]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peaks = {}
    times = interleaved({how: (lambda h=how: step(h)) for how in runs}, warmup=1, repeats=args.repeats,
                        on_warmup=lambda how, rnd: peaks.setdefault(how, peak_step_bytes(lambda: step(how))))
    rows = []
    ours = median(times["cpu"]["rows-inplace"])
    for how, (model, optimizer) in runs.items():
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cpu = median(times["cpu"][how])
        rows.append([how, f"{trainable:,d}", f"{1000 * cpu:.1f}", f"{cpu / ours:.2f}x",
                     f"{peaks.get(how, 0) / 2**20:.1f}", f"{state / 2**20:.2f}"])
    print(f"### ESFT expert rows: {args.layers} layers, {args.experts} experts of {args.hidden}x{args.intermediate}, "
          f"{args.chosen} chosen per layer, {ids.numel()} tokens, {args.threads} thread(s)\n")
    print(markdown_table(["how", "trainable", "step ms (CPU)", "vs rows-inplace", "peak step MiB", "AdamW state MiB"],
                         rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
