"""The GPU check: is PERFT on this device right, and what does it cost there? (< 8 min on one GPU)

1. correctness: the tiny OLMoE with every PERFT variant (LoRA and parallel adapters) and LoRA
   q,v: loss and adapter gradients on the device in bf16 (base bf16, adapters fp32, as trained)
   against the same model in fp32 on the CPU; bf16 tolerance (see `TOLERANCE`);
2. cost: step time (forward + backward) and peak memory against the frozen base, for one
   decoder layer with OLMoE-1B-7B's shapes and for the full OLMoE-1B-7B-shaped model (random
   weights, bf16, gradient checkpointing, AdamW step);
3. one greedy generation with PERFT-R on the full model (tokens/s).

    python benchmarks/gpu_check.py                 # on a CUDA device
    python benchmarks/gpu_check.py --small         # tiny shapes, runs end to end on a CPU (the test runs this)

It exits non-zero when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import full_model  # noqa: E402
import measure  # noqa: E402
import models  # noqa: E402

# bf16 keeps 8 bits of mantissa: a loss agrees to ~1e-2 relative; gradients accumulated over
# a whole model agree in direction (cosine 0.995-0.99998 on a CPU in bf16) far better than element
# by element; a wrong gate or a dropped expert turns the cosine far lower.
TOLERANCE = {"loss_rel": 2e-2, "grad_cosine": 0.98, "grad_norm_rel": 5e-2}
VARIANTS: dict[str, dict[str, Any]] = {
    **{f"perft-{v[0]}-{a}": {"variant": v, "adapter": a} for v in ("routed", "embedded", "dense", "single")
       for a in ("lora", "parallel")},
    "lora-qv": {"method": "lora-attn"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiny_loss_and_grads(settings: dict, device: torch.device, dtype: torch.dtype) -> tuple[float, dict]:
    """Loss and adapter gradients of one step of the tiny OLMoE with `settings` on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    from perft.methods import get_method
    from perft.testing import tiny_config
    from perft.training.args import TrainingConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("olmoe", num_experts_per_tok=2))
    cfg = TrainingConfig(**settings, dropout=0.0, rank=4, num_experts=4, top_k=2)
    torch.manual_seed(1)
    model = get_method(cfg.method).build(base, cfg)
    models.randomize_adapters(model, seed=2)  # a non-zero adapter, so the gradients reach every tensor
    with torch.no_grad():  # PEFT's lora_B starts at zero too
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.to(device)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(4)).to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def check_correctness(device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for name, settings in VARIANTS.items():
        ref_loss, ref = tiny_loss_and_grads(settings, torch.device("cpu"), torch.float32)
        loss, got = tiny_loss_and_grads(settings, device, torch.bfloat16)
        a = torch.cat([ref[k].reshape(-1) for k in sorted(ref)])
        b = torch.cat([got[k].reshape(-1) for k in sorted(ref)])
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        norm_rel = float(abs(b.norm() - a.norm()) / a.norm())
        loss_rel = abs(loss - ref_loss) / abs(ref_loss)
        ok = (loss_rel <= TOLERANCE["loss_rel"] and cosine >= TOLERANCE["grad_cosine"]
              and norm_rel <= TOLERANCE["grad_norm_rel"])
        rows.append({"method": name, "loss_cpu_fp32": ref_loss, "loss_device_bf16": loss, "loss_rel": loss_rel,
                     "grad_cosine": cosine, "grad_norm_rel": norm_rel, "tensors": len(ref), "ok": ok})
    return rows


def time_and_peak(step: Any, device: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes above the start) of `step`."""
    step()  # warm-up (and the optimizer's state)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        peak = measure.peak_step_bytes(step)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return measure.median(times), peak


def layer_costs(device: torch.device, small: bool, repeats: int) -> list[dict[str, Any]]:
    """One OLMoE-1B-7B-shaped decoder layer in bf16: step time and peak memory against the frozen base."""
    base, _ = models.layer_model(quick=small, backend="grouped_mm" if device.type == "cuda" else "eager")
    base = base.to(device=device, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64 if small else 2048, base.config.hidden_size, generator=gen).to(device, torch.bfloat16)
    gy = torch.randn(x.shape, generator=gen).to(device, torch.bfloat16)
    rows = []
    for name in ("base", "perft-r", "perft-e", "perft-d", "perft-s", "lora-qv"):
        method = models.build_method(name, base)
        model = method.model.to(device).train()

        def step(model: Any = model) -> None:
            inp = x.detach().requires_grad_(True)
            model(inputs_embeds=inp, use_cache=False).last_hidden_state.backward(gy)
            for p in model.parameters():
                p.grad = None

        seconds, peak = time_and_peak(step, device, repeats)
        rows.append({"method": name, "trainable": method.trainable, "step_s": seconds, "peak_bytes": peak})
    return rows


def model_costs(device: torch.device, small: bool, repeats: int, new_tokens: int) -> dict[str, Any]:
    """The OLMoE-1B-7B-shaped model in bf16 with gradient checkpointing; one generation with PERFT-R."""
    cfg = full_model.model_config("olmoe", small=small, qwen3_layers=0)
    if device.type == "cuda":
        cfg._experts_implementation = "grouped_mm"
    with torch.device(device):
        base = full_model.build_base(cfg)
    seq = 32 if small else 256
    ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    rows, generation = [], {}
    for name in ("base", "perft-r", "perft-e", "perft-d", "perft-s", "lora-qv"):
        model, trainable = full_model.build(name, base)
        model.to(device)
        seconds, peak = time_and_peak(full_model.make_step(model, embeds, ids), device, repeats)
        rows.append({"method": name, "trainable": trainable, "step_s": seconds, "peak_bytes": peak})
        if name == "perft-r":
            model.eval()
            model.config.use_cache = True
            prompt = ids[:, :16]
            with torch.no_grad():
                sync(device)
                t0 = time.perf_counter()
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
                sync(device)
            generated = int(out.shape[1] - prompt.shape[1])
            generation = {"method": name, "tokens": generated, "tokens_per_s": generated / (time.perf_counter() - t0)}
        del model
    return {"weights_bytes": weights, "rows": rows, "generation": generation}


def cost_table(rows: list[dict[str, Any]], weights: int | None = None) -> str:
    base = rows[0]
    table = [[r["method"], f"{r['trainable']:,}", f"{r['step_s'] * 1000:.1f} ms", measure.fmt_ratio(r["step_s"], base["step_s"]),
              f"{r['peak_bytes'] / 2**20:.1f} MiB", measure.fmt_ratio(r["peak_bytes"], base["peak_bytes"])]
             + ([measure.fmt_ratio(weights + r["peak_bytes"] + 4 * r["trainable"] * 4, weights)] if weights else [])
             for r in rows]
    header = ["method", "trainable", "step", "/ base", "step peak", "/ base"] + (["held / weights"] if weights else [])
    return measure.markdown_table(header, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes: the whole check runs on a CPU in a minute")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.small:
        args.repeats, args.new_tokens = 1, 4
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    t_start = time.time()
    print(f"# GPU check on {name} ({device}){' --small' if args.small else ''}; torch {torch.__version__}", flush=True)
    correctness = check_correctness(device)
    print("\n## tiny OLMoE: device bf16 against CPU fp32\n")
    print(measure.markdown_table(
        ["method", "loss CPU fp32", "loss device bf16", "loss rel", "grad cosine", "grad norm rel", "ok"],
        [[r["method"], f"{r['loss_cpu_fp32']:.5f}", f"{r['loss_device_bf16']:.5f}", f"{r['loss_rel']:.2e}",
          f"{r['grad_cosine']:.5f}", f"{r['grad_norm_rel']:.2e}", "yes" if r["ok"] else "NO"] for r in correctness]),
        flush=True)
    layer = layer_costs(device, args.small, args.repeats)
    print("\n## one OLMoE-1B-7B-shaped decoder layer, bf16, " + ("64" if args.small else "2048") + " tokens\n")
    print(cost_table(layer), flush=True)
    full = model_costs(device, args.small, args.repeats, args.new_tokens)
    print(f"\n## OLMoE-1B-7B-shaped model, bf16, gradient checkpointing; weights "
          f"{full['weights_bytes'] / 2**30:.2f} GiB\n")
    print(cost_table(full["rows"], full["weights_bytes"]))
    gen = full["generation"]
    print(f"\ngeneration ({gen['method']}, batch 1, greedy): {gen['tokens']} tokens, {gen['tokens_per_s']:.1f} tokens/s")
    failed = [r["method"] for r in correctness if not r["ok"]]
    print(f"\ncorrectness: {'all ' + str(len(correctness)) + ' passed' if not failed else 'FAILED: ' + ', '.join(failed)}"
          f"; wall time {time.time() - t_start:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "small": args.small, "correctness": correctness,
                                         "layer": layer, "model": full}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
