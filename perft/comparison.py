"""`perft demo --all-variants`: every fine-tuning method on the tiny suites, side by side.

Each method of `ALL_METHODS` is trained once per suite and seed through the demo's pipeline
(perft/demo.py); the results become a markdown table (accuracy per suite, mean ± sd over seeds,
trainable parameters, training time, peak memory) and a PNG of average accuracy against
trainable parameters. Budgets on the tiny OLMoE (d = 128, 8 experts of width 128, 4 layers):
PERFT-R(N, K, r) costs N(2dr + d) per layer, PERFT-D N*2dr, PERFT-S 2dr, PERFT-E E*2dr, LoRA q,v
2*2dr; they are matched near 33-41k parameters. ESFT cannot be matched: one expert of one layer
is 3 * 128 * 128 = 49,152 weights, so ESFT trains 5-20x more, chosen by the data.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from perft.demo import DEMO_TASKS, DemoConfig, Method, MethodResult, run_method, start_demo
from perft.io import atomic_write_text

ALL_METHODS = (
    Method("PERFT-R (4 experts, top-2, r8)", {"variant": "routed", "num_experts": 4, "top_k": 2, "rank": 8}),
    Method("PERFT-R (8 experts, top-2, r4)", {"variant": "routed", "num_experts": 8, "top_k": 2, "rank": 4}),
    Method("PERFT-E (8 base experts, r4)", {"variant": "embedded", "rank": 4}),
    Method("PERFT-D (4 experts, r8)", {"variant": "dense", "num_experts": 4, "rank": 8}),
    Method("PERFT-S (r32)", {"variant": "single", "rank": 32}),
    Method("LoRA q,v (PEFT, r16)", {"method": "lora-attn", "rank": 16}),
    Method("LoRA experts (PEFT, r2)", {"method": "lora-experts", "rank": 2}),
    Method("PERFT-R (4 experts, top-2, r4) + LoRA q,v (r8)",
           {"method": "perft+lora-attn", "variant": "routed", "num_experts": 4, "top_k": 2, "rank": 4,
            "lora_attn_rank": 8}),
    Method("ESFT-gate (top-p 0.2)", {"method": "esft-gate", "esft_top_p": 0.2}),
    Method("ESFT-token (top-p 0.2)", {"method": "esft-token", "esft_top_p": 0.2}),
)
GENERATED_START = "<!-- perft demo --all-variants: generated from here -->"
GENERATED_END = "<!-- perft demo --all-variants: generated up to here -->"


def run_all_variants(cfg: DemoConfig, seeds: tuple[int, ...] = (0, 1, 2), results_file: str | None = None,
                     methods: tuple[Method, ...] = ALL_METHODS, jobs: int = 1) -> list[MethodResult]:
    """Every method over `seeds`; writes the markdown table (and its PNG beside it, under img/).

    `jobs` > 1 runs that many (method, seed) pairs at once, each in its own process with
    `cfg.threads` threads: every run is seeded and single-process, so the scores are the ones a
    sequential run gives (a test pins this); only the training times see the shared cores.
    """
    out = Path(cfg.output)
    base, tasks, _, base_scores = start_demo(cfg, methods)
    runs = [(number, method, seed) for number, method in enumerate(methods) for seed in seeds]
    done: dict[tuple[int, int], MethodResult] = {}

    def record(number: int, seed: int, result: MethodResult) -> None:
        done[number, seed] = result
        ordered = [done[key] for key in sorted(done)]
        atomic_write_text(out / "results.json", json.dumps([r.__dict__ for r in ordered], indent=1, default=str))

    if jobs <= 1:
        for number, method, seed in runs:
            print(f"perft demo --all-variants: {method.name}, seed {seed}")
            record(number, seed, run_method(method, base, tasks, _run_dir(out, number, method, seed), cfg, seed))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(cfg.threads,)) as pool:
            pending = {pool.submit(run_method, method, base, tasks, _run_dir(out, number, method, seed), cfg, seed):
                       (number, method, seed) for number, method, seed in runs}
            for future in as_completed(pending):
                number, method, seed = pending[future]
                record(number, seed, future.result())
                print(f"perft demo --all-variants: {method.name}, seed {seed} done ({len(done)}/{len(runs)})")
    results = [done[key] for key in sorted(done)]
    figure = Path(results_file).parent / "img" / f"{Path(results_file).stem}.png" if results_file else out / "results.png"
    plot_accuracy_vs_parameters(results, figure)
    table = format_results_markdown(base_scores, results, cfg, seeds,
                                    figure.relative_to(Path(results_file).parent) if results_file else None)
    print("\n" + table + f"\nperft demo --all-variants: plot -> {figure}")
    if results_file:
        write_generated(Path(results_file), table)
    return results


def _run_dir(out: Path, number: int, method: Method, seed: int) -> Path:
    slug = method.name.split(" (")[0].replace(" ", "").replace(",", "").replace("+", "-").lower()
    return out / f"{slug}-{number}-seed{seed}"


def _start_worker(threads: int | None) -> None:
    """A `--jobs` worker process: the same torch thread count as a sequential run."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def write_generated(path: Path, table: str) -> None:
    """Write `table` into `path` between the generated-section markers, keeping any text around them
    (notes written by hand survive a rerun); a file without markers is replaced."""
    block = f"{GENERATED_START}\n{table}\n{GENERATED_END}"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if GENERATED_START in text and GENERATED_END in text:
        head, rest = text.split(GENERATED_START, 1)
        text = head + block + rest.split(GENERATED_END, 1)[1]
    else:
        text = block + "\n"
    atomic_write_text(path, text)


def _by_method(results: list[MethodResult]) -> dict[str, list[MethodResult]]:
    by_method: dict[str, list[MethodResult]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    return by_method


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_results_markdown(base: dict[str, float], results: list[MethodResult], cfg: DemoConfig,
                            seeds: tuple[int, ...], figure: Path | None = None) -> str:
    columns = (*DEMO_TASKS, "average")
    lines = [
        "# Every method on the embedded tiny OLMoE",
        "",
        f"Regenerate with `{regenerate_command(cfg, seeds)}` "
        f"(seeds {', '.join(map(str, seeds))}; {_budget(cfg)}, lr {cfg.lr:g} unless the method sets its own, batch "
        f"{cfg.batch_size}, one adapter per suite, fine-tuned on that suite's train split; greedy generation, the "
        "paper's prompts and answer extraction). Accuracy in %, mean ± standard deviation over seeds; trainable "
        "parameters of one adapter (ESFT: of the larger of its two suites' selections); training time for both "
        "suites; peak memory while training (on a CPU the process's resident set, frozen base included).",
        "",
        "| method | trainable params | trainable % | " + " | ".join(columns) + " | train s | peak MiB |",
        "|---|---:|---:|" + "---:|" * len(columns) + "---:|---:|",
        "| frozen base | 0 | 0 | " + " | ".join(f"{100 * base[c]:.1f}" for c in columns) + " | | |",
    ]
    for name, runs in _by_method(results).items():
        cells = []
        for c in columns:
            mean, sd = _mean_sd([100 * r.accuracy[c] for r in runs])
            cells.append(f"{mean:.1f} ± {sd:.1f}")
        trainable = max(r.trainable for r in runs)
        lines.append(f"| {name} | {trainable:,d} | {100 * trainable / runs[0].total:.2f} | " + " | ".join(cells)
                     + f" | {statistics.mean(r.train_seconds for r in runs):.0f} | "
                     f"{max(r.peak_memory_mib for r in runs):.0f} |")
    if figure is not None:
        lines += ["", f"![average accuracy against trainable parameters]({figure.as_posix()})"]
    lines += ["", "Per seed (" + " / ".join(DEMO_TASKS) + ", %):", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, runs in _by_method(results).items():
        per_seed = {r.seed: " / ".join(f"{100 * r.accuracy[t]:.1f}" for t in DEMO_TASKS) for r in runs}
        lines.append(f"| {name} | " + " | ".join(per_seed.get(s, "") for s in seeds) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_parameters(results: list[MethodResult], path: Path) -> Path:
    """Average accuracy (mean, error bar = sd over seeds) against trainable parameters, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    markers = "osD^vP*Xhp<>"
    for i, (name, runs) in enumerate(_by_method(results).items()):
        mean, sd = _mean_sd([100 * r.accuracy["average"] for r in runs])
        ax.errorbar([max(r.trainable for r in runs)], [mean], yerr=[sd], fmt=markers[i % len(markers)],
                    color=f"C{i % 10}", capsize=4, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("average accuracy, % (mean ± sd over seeds)")
    ax.set_title("Fine-tuning methods on the embedded tiny OLMoE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _budget(cfg: DemoConfig) -> str:
    steps = f"{cfg.max_steps} optimiser steps" if cfg.max_steps else f"{cfg.epochs:g} epochs"
    samples = f", first {cfg.max_eval_samples} test items per task" if cfg.max_eval_samples else ""
    return steps + samples


def regenerate_command(cfg: DemoConfig, seeds: tuple[int, ...]) -> str:
    parts = ["perft demo --all-variants", f"--seeds {','.join(map(str, seeds))}"]
    if cfg.max_steps:
        parts.append(f"--max-steps {cfg.max_steps}")
    if cfg.max_eval_samples:
        parts.append(f"--max-eval-samples {cfg.max_eval_samples}")
    if cfg.threads:
        parts.append(f"--threads {cfg.threads}")
    parts.append("--results docs/results-tiny.md")
    return " ".join(parts)
