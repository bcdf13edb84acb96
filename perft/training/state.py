"""`TrainState`: where a run is, exactly what its checkpoint's `trainer_state.json` stores.

Besides the step and the best validation loss, it holds the logging window: the sums over
the steps since the last `loss` record (loss, balance loss, tokens, time, PERFT-R router
counts). A run resumed from a checkpoint taken in the middle of a window therefore logs the
same numbers as an uninterrupted run, whether or not `logging_steps` divides `save_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perft.errors import PerftError


@dataclass
class LogWindow:
    """Sums over the optimiser steps since the last training-metrics record."""

    loss: float = 0.0
    aux: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    time: float = 0.0
    # PERFT-R top-K slot counts per routed layer, summed over processes (see RouterLoad.consolidate)
    router_counts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stats: dict[str, float], elapsed: float) -> None:
        self.loss += stats["loss"]
        self.aux += stats["aux"]
        self.steps += 1
        self.tokens += stats["tokens"]
        self.time += elapsed

    def record(self, step: int, steps_per_epoch: int, lr: float, grad_norm: float) -> dict[str, Any]:
        """The `loss` record of this window (router figures are added by the caller)."""
        n = max(self.steps, 1)
        return {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": self.loss / n,
                "aux_loss": self.aux / n, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": self.tokens / max(self.time, 1e-9)}

    def reset(self) -> None:
        """Start a new window (in place: the router counts dict is shared with the RouterLoad)."""
        self.loss = self.aux = self.tokens = self.time = 0.0
        self.steps = 0
        self.router_counts.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "aux": self.aux, "steps": self.steps, "tokens": self.tokens, "time": self.time,
                "router_counts": {k: list(v) for k, v in self.router_counts.items()}}

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> LogWindow:
        def bad(what: str) -> PerftError:
            return PerftError(f"{source} is damaged (logging window: {what}); resume from an older checkpoint")

        if not isinstance(data, dict):
            raise bad(repr(data)[:40])
        values: dict[str, Any] = {}
        for key in ("loss", "aux", "tokens", "time", "steps"):
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{key} {value!r}")
            values[key] = value
        if not isinstance(values["steps"], int) or values["steps"] < 0:
            raise bad(f"steps {values['steps']!r}")
        counts = data.get("router_counts", {})
        if not isinstance(counts, dict) or not all(
                isinstance(row, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
                for row in counts.values()):
            raise bad("router_counts")
        return cls(**{k: float(v) if k != "steps" else v for k, v in values.items()},
                   router_counts={str(k): [float(x) for x in v] for k, v in counts.items()})


@dataclass
class TrainState:
    """The progress of one run; `to_checkpoint` / `from_checkpoint` are its `trainer_state.json`."""

    global_step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    window: LogWindow = field(default_factory=LogWindow)

    def improve(self, step: int, val_loss: float) -> bool:
        """Record a validation loss; True when it is the best so far (step 0, the base, never counts)."""
        better = self.best_val_loss is None or val_loss < self.best_val_loss
        if step > 0 and better:
            self.best_val_loss, self.best_step = val_loss, step
        return better

    def to_checkpoint(self, *, steps_per_epoch: int, batch_size: int, **identity: Any) -> dict[str, Any]:
        """The JSON payload of `trainer_state.json`; `identity`: fingerprint, data_hash, world_size, method."""
        step = self.global_step
        return {
            "global_step": step,
            "epoch": step // steps_per_epoch,
            "step_in_epoch": step % steps_per_epoch,
            "examples_seen": step * batch_size,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "history": self.history,
            "log_window": self.window.to_dict(),
            **identity,
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], source: Path) -> TrainState:
        """From a `read_state` payload (already checked); a checkpoint without a window starts an empty one."""
        window = LogWindow.from_dict(state["log_window"], source) if "log_window" in state else LogWindow()
        return cls(global_step=int(state["global_step"]), best_val_loss=state.get("best_val_loss"),
                   best_step=state.get("best_step"), history=list(state.get("history", [])), window=window)


class NonFiniteLoss(PerftError):
    """The loss or gradient became NaN/Inf; the run stopped before applying that step."""


@dataclass
class TrainResult:
    """What a run did, for scripts and tests."""

    output_dir: Path
    adapter_dir: Path | None
    status: str  # "completed" or "interrupted"
    global_step: int
    total_steps: int
    best_step: int | None = None
    best_val_loss: float | None = None
    signal: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
