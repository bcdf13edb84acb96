"""`perft demo`: PERFT end to end on the embedded tiny OLMoE, on a CPU, in minutes.

Evaluates the frozen base on the shipped suites, fine-tunes PERFT-R on each suite's train
split (one adapter per suite, as the paper trains one on Commonsense170K and one on
Math50K), evaluates each on its suite's test split and prints the comparison;
`--all-variants` runs every method side by side over several seeds (perft/comparison.py).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perft.errors import PerftError
from perft.io import atomic_write_text

DEMO_TASKS = ("tiny_commonsense", "tiny_math")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a name and the training settings that define it."""

    name: str
    settings: dict[str, Any]


# The default PERFT-R of the demo (the comparison grid of --all-variants is perft.comparison.ALL_METHODS).
DEFAULT_METHOD = Method("PERFT-R (4 experts, top-2, r8)", {"variant": "routed", "num_experts": 4, "top_k": 2, "rank": 8})


@dataclass
class DemoConfig:
    """Settings of the demo run (the defaults fit 2 CPU cores in a few minutes)."""

    output: str = "runs/demo"
    base_model: str | None = None  # default: the embedded tiny OLMoE
    task_dir: str | None = None  # default: the shipped suites
    seed: int = 0
    epochs: float = 3.0
    lr: float = 2e-3
    batch_size: int = 16
    cutoff_len: int = 128
    val_set_size: int = 100  # per suite
    eval_batch_size: int = 48
    max_eval_samples: int | None = None
    max_steps: int | None = None
    threads: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    base_quantization: dict[str, Any] = field(default_factory=dict)  # load_base_model's load_in_4bit etc.


@dataclass
class MethodResult:
    method: str
    seed: int
    accuracy: dict[str, float]  # per task, plus "average"
    trainable: int  # of one adapter (each suite gets its own)
    total: int
    seconds: float  # training and evaluation, both suites
    adapter_dirs: dict[str, str] = field(default_factory=dict)  # per task
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per task
    train_seconds: float = 0.0  # training only, both suites
    peak_memory_mib: float = 0.0  # peak while training (CUDA: allocated; CPU: process RSS), max over suites


class PeakMemory:
    """Peak memory inside `with PeakMemory() as peak:` (`peak.mib`): on CUDA torch's peak allocation;
    on a CPU the process's resident set, sampled every 10 ms (it includes the frozen base model)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.mib = interval, 0.0
        self._stop: Any = None

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB (a lifetime peak)
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
        import threading

        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self.mib = self.rss_mib()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.mib = max(self.mib, self.rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._stop is None:
            self.mib = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, self.rss_mib())


# ---------------------------------------------------------------------------- pieces
def prepare_inputs(cfg: DemoConfig) -> tuple[Path, Path]:
    """(base model dir, task dir holding <task>/{train,test}.json for every demo task)."""
    from perft.tiny import default_base_model_path, default_task_dir

    base = Path(cfg.base_model) if cfg.base_model else default_base_model_path()
    tasks = Path(cfg.task_dir) if cfg.task_dir else default_task_dir()
    for task in DEMO_TASKS:
        for split in ("train", "test"):
            if not (tasks / task / f"{split}.json").is_file():
                raise PerftError(f"{tasks / task / f'{split}.json'} is missing: the demo needs both suites' "
                                 "train and test splits")
    return base, tasks


def evaluate(model: Any, tokenizer: Any, task_dir: Path, output: Path, cfg: DemoConfig,
             tasks: tuple[str, ...] = DEMO_TASKS) -> dict[str, float]:
    """Greedy generation with the paper's prompts and answer extraction; accuracy per task."""
    from perft.evaluation.generation import DecodingSettings
    from perft.evaluation.runner import EvalSettings, Evaluation, prepare_tasks

    prepared = prepare_tasks(tasks, task_dir, max_samples=cfg.max_eval_samples)
    settings = EvalSettings(protocol="generate", decoding=DecodingSettings(greedy=True), batch_size=cfg.eval_batch_size)
    summary = Evaluation(prepared, output, settings).run(model, tokenizer, progress=cfg.progress)
    return {name: entry["accuracy"] for name, entry in summary["tasks"].items()}


def with_average(scores: dict[str, float]) -> dict[str, float]:
    """`scores` plus "average": the unweighted mean over the demo's tasks (as `perft eval` averages)."""
    return {**scores, "average": statistics.mean(scores[task] for task in DEMO_TASKS)}


def training_config(method: Method, base: Path, train_file: Path, output: Path, cfg: DemoConfig, seed: int) -> Any:
    """The `TrainingConfig` of one method on one suite (`train` validates it; `start_demo` checks it early)."""
    from perft.training.args import TrainingConfig

    settings: dict[str, Any] = {
        "model": str(base), "data": str(train_file), "output": str(output), "seed": seed,
        "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "micro_batch_size": cfg.batch_size,
        "cutoff_len": cfg.cutoff_len, "val_set_size": cfg.val_set_size, "warmup_steps": 20, "eval_steps": 100,
        "save_steps": 100, "save_total_limit": 1, "logging_steps": 10, "dropout": 0.0,
        "train_on_inputs": False,  # response-only loss: see docs/tiny-model.md
        "report_to": "tensorboard", "progress": cfg.progress, "overwrite_output_dir": True, "bf16": "false",
        "max_steps": cfg.max_steps, **method.settings, **cfg.base_quantization, **cfg.extra,
    }
    return TrainingConfig.from_dict(settings, source=f"demo method {method.name}")


def train_method(method: Method, base: Path, train_file: Path, output: Path, cfg: DemoConfig, seed: int) -> Any:
    from perft.training.trainer import train

    return train(training_config(method, base, train_file, output, cfg, seed))


def run_method(method: Method, base: Path, tasks: Path, out: Path, cfg: DemoConfig, seed: int) -> MethodResult:
    """Fine-tune one method with one seed on each suite's train split; evaluate each adapter on its suite."""
    from perft.loading import load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(str(base), padding_side="left")
    scores: dict[str, float] = {}
    adapters: dict[str, str] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    train_seconds, peak = 0.0, 0.0
    for task in DEMO_TASKS:
        started = time.perf_counter()
        with PeakMemory() as memory:
            result = train_method(method, base, tasks / task / "train.json", out / task, cfg, seed)
        train_seconds += time.perf_counter() - started
        peak = max(peak, memory.mib)
        if result.adapter_dir is None:
            raise PerftError(f"training {method.name} on {task} ended without an adapter ({result.status})")
        model = _load_adapted(base, Path(result.adapter_dir), cfg)
        trainable, total = _count_parameters(model, method)
        scores.update(evaluate(model, tokenizer, tasks, out / task / "eval", cfg, tasks=(task,)))
        adapters[task], histories[task] = str(result.adapter_dir), list(result.history)
    return MethodResult(method.name, seed, with_average(scores), trainable, total, time.perf_counter() - start,
                        adapters, histories, train_seconds, peak)


def _load_adapted(base: Path, adapter: Path, cfg: DemoConfig) -> Any:
    from perft.loading import load_base_model
    from perft.methods import load_adapted

    return load_adapted(load_base_model(str(base), dtype="float32", **cfg.base_quantization), adapter)


def _count_parameters(model: Any, method: Method) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a loaded adapted model."""
    from perft.methods import get_method

    return get_method(method.settings.get("method", "perft")).parameter_count(model)


# ---------------------------------------------------------------------------- the demo
def start_demo(cfg: DemoConfig, methods: tuple[Method, ...]) -> tuple[Path, Path, Any, dict[str, float]]:
    """What every demo run begins with: threads, inputs and settings checked, tokenizer, and the
    frozen base's scores. Settings are checked before the base is evaluated, so a bad one fails at once."""
    import torch

    from perft.loading import load_base_model, load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, tasks = prepare_inputs(cfg)
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < 1:
        raise PerftError(f"--max-eval-samples must be at least 1, got {cfg.max_eval_samples}")
    for method in methods:
        training_config(method, base, tasks / DEMO_TASKS[0] / "train.json", Path(cfg.output), cfg, cfg.seed).validate()
    print(f"perft demo: base model {base}\nperft demo: tasks {', '.join(DEMO_TASKS)} from {tasks}")
    tokenizer = load_tokenizer(str(base), padding_side="left")
    base_model = load_base_model(str(base), dtype="float32", **cfg.base_quantization).eval()
    base_scores = with_average(evaluate(base_model, tokenizer, tasks, Path(cfg.output) / "base" / "eval", cfg))
    return base, tasks, tokenizer, base_scores


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Base vs PERFT-R on both suites; writes table, loss curve and routing picture under cfg.output."""
    out = Path(cfg.output)
    started = time.perf_counter()
    base, tasks, tokenizer, base_scores = start_demo(cfg, (DEFAULT_METHOD,))
    base_seconds = time.perf_counter() - started
    tuned = run_method(DEFAULT_METHOD, base, tasks, out / "perft-r", cfg, cfg.seed)

    table = format_demo_table(base_scores, tuned, base_seconds)
    print("\n" + table)
    figures = {"loss_curve": plot_loss_curve(tuned.history, out / "loss_curve.png")}
    figures["routing"] = plot_routing(base, tokenizer, tasks, tuned.adapter_dirs, out, cfg)
    summary = {
        "base": base_scores,
        "perft_r": tuned.accuracy,
        "method": tuned.method,
        "trainable_params": tuned.trainable,
        "total_params": tuned.total,
        "train_and_eval_seconds": round(tuned.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "adapters": tuned.adapter_dirs,
        "figures": {k: str(v) for k, v in figures.items() if v},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "table.txt", table + "\n")
    for name, path in summary["figures"].items():
        print(f"perft demo: {name.replace('_', ' ')} -> {path}")
    where = ", ".join(f"{task}: {path}" for task, path in tuned.adapter_dirs.items())
    print(f"perft demo: done in {summary['total_seconds']:.0f} s; adapters in {where}")
    return summary


def format_demo_table(base: dict[str, float], tuned: MethodResult, base_seconds: float) -> str:
    header = f"{'task':<18} {'base':>8} {'PERFT-R':>9}"
    lines = [f"accuracy in % (greedy generation, the paper's prompts and answer extraction); "
             f"{tuned.method}, one adapter per suite",
             header, "-" * len(header)]
    for task in (*DEMO_TASKS, "average"):
        lines.append(f"{task:<18} {100 * base[task]:>8.1f} {100 * tuned.accuracy[task]:>9.1f}")
    lines.append("-" * len(header))
    lines.append(f"trainable parameters: {tuned.trainable:,d} of {tuned.total:,d} "
                 f"({100 * tuned.trainable / tuned.total:.2f}%) per adapter")
    lines.append(f"time: base evaluation {base_seconds:.0f} s, PERFT-R training + evaluation {tuned.seconds:.0f} s")
    return "\n".join(lines)


def plot_loss_curve(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Training and validation loss over optimiser steps, one pair of curves per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    drawn = False
    for i, (task, history) in enumerate(histories.items()):
        train = [(h["step"], h["loss"]) for h in history if "loss" in h and "lr" in h]
        val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", label=f"{task}: train", lw=1.0, alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", color=f"C{i}", label=f"{task}: validation", lw=1.5)
        drawn = drawn or bool(train or val)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("PERFT-R on the embedded tiny OLMoE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_routing(base: Path, tokenizer: Any, tasks: Path, adapters: dict[str, str], out: Path,
                 cfg: DemoConfig) -> Path | None:
    """Adapter- and base-expert utilisation per layer: each suite's adapter on that suite's test prompts.

    routing.json holds one whole analysis per suite; the figure puts their runs side by side.
    """
    from perft.analysis.pipeline import AnalysisOptions, analyze
    from perft.analysis.plots import plot_utilisation
    from perft.loading import load_base_model

    model = load_base_model(str(base), dtype="float32", **cfg.base_quantization).eval()
    options = AnalysisOptions(projection=None, batch_size=32, progress=cfg.progress)
    results: dict[str, Any] = {}
    for task, adapter in adapters.items():
        data = out / "data" / f"routing-{task}.json"
        records = json.loads((tasks / task / "test.json").read_text(encoding="utf-8"))[:120]
        atomic_write_text(data, json.dumps(records, ensure_ascii=False) + "\n")
        results[task] = analyze(model, tokenizer, data, [adapter], options, model_name=str(base))
        for run in results[task]["runs"]:
            run["name"] = f"PERFT-R on {task}"
    atomic_write_text(out / "routing.json", json.dumps(results, indent=1, default=str) + "\n")
    return plot_utilisation({"runs": [run for r in results.values() for run in r["runs"]]}, out / "routing.png")

