"""The command line as the bad-input and hostile-input tests drive it: a workspace with a
finished run, `perft.cli.main` called in-process, and the argv of each command on it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perft.cli import main
from tests.helpers.training import config, make_workspace, one_thread


@dataclass
class Env:
    root: Path
    model: Path
    data: Path
    run: Path  # a finished run with a checkpoint per save step and adapter/
    dataset: Path  # an evaluation data folder with one task, `colours`

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"


def make_env(root: Path, *, n_records: int, max_steps: int, save_steps: int, test_items: int) -> Env:
    """A tiny model and data, one finished run (checkpoints every `save_steps`), one eval task."""
    from perft.training import train

    ws = make_workspace(root / "ws", n_records=n_records)
    run = root / "run"
    with one_thread():
        train(config(ws, run, max_steps=max_steps, save_steps=save_steps, eval_steps=save_steps, val_set_size=4,
                     save_total_limit=None))
    dataset = root / "dataset"
    write_task(dataset, "colours", {"answer_type": "choice", "choices": ["red", "blue"]}, items=test_items)
    return Env(root, ws["model"], ws["data"], run, dataset)


def write_task(dataset: Path, name: str, sidecar: dict[str, Any] | bytes, test: bytes | None = None,
               items: int = 4) -> Path:
    folder = dataset / name
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": f"what colour is the fox {i}", "answer": "red"} for i in range(items)]
    (folder / "test.json").write_bytes(test if test is not None else json.dumps(records).encode())
    (folder / "task.json").write_bytes(sidecar if isinstance(sidecar, bytes) else json.dumps(sidecar).encode())
    return folder


def run_cli(argv: list[str], capfd: Any) -> tuple[int, list[str], str]:
    """(exit status, non-empty stderr lines, stderr) of `perft <argv>` run in this process."""
    capfd.readouterr()
    with one_thread():
        code = main(argv)
    _, err = capfd.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], err


def train_argv(env: Env, out: Path, *extra: str, save_steps: int = 2) -> list[str]:
    return ["train", "--model", str(env.model), "--data", str(env.data), "--output", str(out), "--rank", "4",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--val-set-size", "4",
            "--eval-steps", str(save_steps), "--save-steps", str(save_steps), "--report-to", "none",
            "--no-progress", *extra]


def eval_argv(env: Env, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(env.model), "--tasks", "colours", "--data-dir", str(env.dataset), "--output",
            str(out), "--batch-size", "2", "--no-progress", "--greedy", "--max-new-tokens", "2", *extra]


def analyze_argv(env: Env, out: Path, *extra: str, projection: str = "none") -> list[str]:
    return ["analyze", "--model", str(env.model), "--data", str(env.data), "--output", str(out), "--projection",
            projection, "--no-progress", "--max-samples", "4", *extra]
