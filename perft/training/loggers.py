"""Metric loggers of `perft train` behind one small interface: JSON Lines, TensorBoard, W&B.

A record is a dict with a `step` and scalar values, plus optionally `router_load` (per routed
layer, each adapter expert's share of the top-K slots). `metrics.jsonl` keeps every record
whole; TensorBoard and W&B receive the scalars. Only the main process logs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perft.errors import PerftError


class MetricLogger:
    """The interface: `log` each record, `text` once at the start, `close` at the end."""

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def text(self, tag: str, text: str, step: int) -> None:
        """A block of text (the run description); ignored by loggers without a text view."""

    def close(self) -> None:
        """Flush and release whatever the logger holds."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k not in ("step", "router_load") and isinstance(v, (int, float))}


class JsonlLogger(MetricLogger):
    """Appends each record as one JSON line (the file a resumed run trims and continues)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class TensorBoardLogger(MetricLogger):
    """Scalars under `train/` and `eval/` (validation loss, router figures), router load per expert."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in scalars(record).items():
            group = "eval" if key == "val_loss" or key.startswith("router") else "train"
            self.writer.add_scalar(f"{group}/{key}", value, step)
        for path, row in (record.get("router_load") or {}).items():
            for i, x in enumerate(row):
                self.writer.add_scalar(f"router_load/{path}/expert{i}", x, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """Scalars to a Weights & Biases run (resumed under the same name)."""

    def __init__(self, project: str | None, name: str | None, config: dict[str, Any], directory: Path) -> None:
        import wandb

        self.run = wandb.init(project=project, name=name, config=config, dir=str(directory), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check_reporters(reporters: Sequence[str]) -> None:
    """Before anything is written: every requested reporter can be opened."""
    if "wandb" in reporters:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise PerftError("--report-to wandb needs the wandb package: pip install wandb, "
                             "or use --report-to tensorboard") from None


def open_loggers(reporters: Sequence[str], output: Path, metrics: Path, start_step: int, *,
                 wandb_project: str | None = None, run_name: str | None = None,
                 config: dict[str, Any] | None = None) -> list[MetricLogger]:
    """The JSONL log always, then each of `reporters` ("tensorboard", "wandb"; "none" adds nothing)."""
    loggers: list[MetricLogger] = [JsonlLogger(metrics)]
    if "tensorboard" in reporters:
        loggers.append(TensorBoardLogger(output / "logs", start_step))
    if "wandb" in reporters:
        loggers.append(WandbLogger(wandb_project, run_name, config or {}, output))
    return loggers
