"""Measuring side by side: interleaved timing (every repeat runs every method once, in a
rotating order, median after warm-up), peak step memory, and the shared driver and tables."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import machine_info, set_threads  # noqa: E402


# ---------------------------------------------------------------------------- measuring
def interleaved(fns: dict[str, Callable[[], None]], *, warmup: int, repeats: int,
                on_warmup: Callable[[str, int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each fn: `warmup` untimed rounds, then `repeats` timed rounds, each
    round calling every fn once in a rotating order. `on_warmup(name, round)` replaces the plain
    call in warm-up rounds (e.g. to measure memory there).

    Returns {"cpu": {name: [...]}, "wall": {name: [...]}}. "cpu" is this process's CPU time
    (`time.process_time`): with one torch thread it is the work done, and stays put when other
    jobs on a shared machine take the core away (wall time does not).
    """
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.freeze()  # the library objects alive now are never garbage: keep them out of collections
    for rnd in range(warmup + repeats):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            if rnd < warmup:
                if on_warmup is not None:
                    on_warmup(name, rnd)
                else:
                    fns[name]()
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {"cpu": cpu, "wall": wall}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_step_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes held by tensors allocated during one call of `fn`.

    Uses torch.profiler's memory events: with `profile_memory=True` every allocation and free
    through the c10 CPU allocator is reported with the running total of bytes allocated while
    profiling. The peak of that total minus its value when the call starts is the step's peak
    over the resident weights: activations saved for backward, temporaries, gradients. (Work
    buffers that oneDNN/MKL allocate themselves are not seen; they are the same for every
    method using the same kernels.)
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as handle:
            events = json.load(handle).get("traceEvents", [])
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    if not mem:
        return 0
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in mem) - start)



# ---------------------------------------------------------------------------- tables
def fmt_ratio(value: float, base: float) -> str:
    if base != base or value != value or base == 0:
        return "-"
    return f"{value / base:.3f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_benchmark(script: str, title: str, args: Any, argv: list[str] | None,
                  run_group: Callable[[str, str, Any], dict[str, Any]],
                  render: Callable[[dict[str, Any]], str]) -> int:
    """The shared driver of the benchmark scripts: every (target, dtype) group, printed and saved as JSON."""
    set_threads(args.threads)
    info = machine_info(args.threads)
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {title}  ({command})")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results = []
    for target in args.target:
        for dtype_name in args.dtype:
            t0 = time.time()
            result = run_group(target, dtype_name, args)
            result["wall_s"] = time.time() - t0
            results.append(result)
            print("\n" + render(result) + f"(group wall time {result['wall_s']:.0f} s)", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": info, "results": results}, indent=1))
    return 0


def parse_generation_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the flags every generation benchmark shares (prompt, tokens, repeats, ...) and parse;
    `--quick` shrinks the run to check that everything runs."""
    p.add_argument("--prompt", type=int, default=32, help="prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="eager", help="transformers experts_implementation of the base")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few tokens: checks that everything runs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.new_tokens, args.repeats = 8, 4, 1
    return args
