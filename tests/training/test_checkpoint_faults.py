"""Fault injection: `perft train` is SIGKILLed at 14 points (10 named points of a checkpoint
write and of the loop, the checkpoint rotation, the final export, and an external kill at a
moment the test does not choose), and resumed with `--resume auto` after each kill.

After every kill: no `checkpoint-*` directory is torn (each one loads completely), and the
next run resumes from the newest complete checkpoint (its log says so). At the end the
adapter, the optimiser state and the metrics equal those of an uninterrupted run with the
same seed, exactly.

Runs are real processes. To keep the suite fast, most are forked from one "fork server"
that has imported perft, torch and transformers once (each child runs `perft.cli.main`,
exactly what `python -m perft train` runs); one run is a plain `python -m perft train`
subprocess, killed from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from perft.config import PerftConfig
from perft.io import load_safetensors
from perft.training import checkpoint as ckpt
from tests.helpers.training import PYTHON, config, config_flags, make_workspace, max_abs_diff, subprocess_env

STEPS, SAVE = 12, 2  # 20 training records, batch 4: 5 steps per epoch, so the run crosses two epochs

SERVER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import perft.training.trainer, perft.cli.train, transformers, datasets  # noqa: F401  (imported once, shared)
    from perft.cli import main

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: one `perft train` run, output to its log file
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(job["env"])
                code = main(job["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        result = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(result), flush=True)
    """
)


class ForkServer:
    """Runs `perft train` jobs as forked children of one warm Python process."""

    def __init__(self, directory: Path) -> None:
        script = directory / "fork_server.py"
        script.write_text(SERVER)
        env = {**subprocess_env(), "PERFT_FAULT_INJECT": ""}
        self.proc = subprocess.Popen([PYTHON, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        self.count = 0
        self.directory = directory

    def run(self, argv: list[str], fault: str = "") -> tuple[dict[str, int], str]:
        self.count += 1
        log = self.directory / f"run-{self.count}.log"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": {ckpt.FAULT_ENV: fault}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the fork server died"
        return json.loads(reply), log.read_text(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ws = make_workspace(root / "ws", n_records=24)
    server = ForkServer(root)
    yield ws, server, root
    server.close()


def train_argv(ws: dict[str, Path], out: Path) -> list[str]:
    cfg = config(ws, out, max_steps=STEPS, save_steps=SAVE, eval_steps=SAVE, val_set_size=4, save_total_limit=2,
                 resume="auto")
    return ["train", *config_flags(cfg)]


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of every `checkpoint-*` directory, after loading each one completely (or failing)."""
    steps = []
    for directory in sorted(out.glob("checkpoint-*")):
        state = ckpt.read_state(directory)  # raises on a missing or damaged trainer_state.json
        assert directory.name == f"checkpoint-{state['global_step']}"
        PerftConfig.load(directory)
        assert load_safetensors(directory / "adapter_model.safetensors")
        load_safetensors(directory / "optimizer.safetensors")
        load_safetensors(directory / "rng_state_0.safetensors")
        for name in ("optimizer.json", "scheduler.json", "rng_state_0.json"):
            json.loads((directory / name).read_text(encoding="utf-8"))
        steps.append(state["global_step"])
    adapter = out / "adapter"
    if adapter.exists():  # the exported adapter is never torn either
        PerftConfig.load(adapter)
        load_safetensors(adapter / "adapter_model.safetensors")
    return sorted(steps)


def newest_expected(point: str, step: int) -> int | None:
    """The newest complete checkpoint a kill at `point` of `step` leaves."""
    if point in ("after_rename", "rotate", "export", "summary"):
        saved = step
    elif point == "step":
        saved = step - step % SAVE
    else:  # inside the checkpoint write of `step`, or in the evaluation just before it
        saved = step - SAVE
    return saved or None


def resumed_at(log: str) -> int | None:
    lines = [line for line in log.splitlines() if line.startswith("resumed at step ")]
    assert len(lines) <= 1, log[-2000:]
    return int(lines[0].split()[-1]) if lines else None


def metrics(out: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # timing differs run to run


# (fault point, step) in the order the kills happen; each run resumes where the last one left off.
KILLS = [
    ("step", 1),  # before any checkpoint: the next run starts afresh
    ("after_adapter", 2),
    ("after_rename", 2),
    ("after_rng", 4),
    ("eval", 4),
    ("after_optimizer", 4),
    ("before_state", 4),
    ("before_rename", 4),
    ("checkpoint_start", 6),
    ("rotate", 6),  # checkpoint-2 is being deleted
    ("step", 9),
    ("external", 10),  # a plain `python -m perft train`, SIGKILLed by this test as checkpoint-10 is written
    ("export", STEPS),
    ("summary", STEPS),
]


def kill_from_outside(argv: list[str], out: Path, step: int, log: Path) -> tuple[int, str]:
    """Start `python -m perft train`; SIGKILL it as soon as the checkpoint of `step` is being written."""
    with open(log, "w") as handle:
        proc = subprocess.Popen([PYTHON, "-m", "perft", *argv], env=subprocess_env(), stdout=handle,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / f".tmp-checkpoint-{step}").exists() or (out / f"checkpoint-{step}").exists():
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return proc.returncode, log.read_text(errors="replace")


def test_sigkill_at_every_point_then_resume_equals_an_uninterrupted_run(setup):
    ws, server, root = setup
    reference = root / "reference"
    status, log = server.run(train_argv(ws, reference))
    assert status == {"exit": 0}, log[-3000:]
    assert complete_checkpoints(reference) == [STEPS - SAVE, STEPS]

    out = root / "out"
    argv = train_argv(ws, out)
    newest: int | None = None  # the newest complete checkpoint so far
    for point, step in KILLS:
        if point == "external":
            code, log = kill_from_outside(argv, out, step, root / "external.log")
            assert code == -signal.SIGKILL, log[-3000:]
        else:
            assert point in ckpt.FAULT_POINTS
            status, log = server.run(argv, fault=f"{point}:{step}")
            assert status == {"signal": signal.SIGKILL}, (point, step, log[-3000:])
        assert resumed_at(log) == newest, (point, step, log[-3000:])  # resumed from the newest complete one
        steps = complete_checkpoints(out)  # no torn checkpoint, whatever the point
        newest = steps[-1] if steps else None
        if point == "external":
            assert newest in (step - SAVE, step)  # killed while checkpoint-10 was being written or just after
        else:
            assert newest == newest_expected(point, step), (point, step, steps)
        if point == "rotate":
            assert steps == [step - SAVE, step] and (out / f".trash-checkpoint-{step - 2 * SAVE}").exists()
        if point == "export":
            assert not (out / "adapter").exists() and (out / ".tmp-adapter").is_dir()
        if point == "summary":
            assert (out / "adapter").is_dir() and not (out / "train_summary.json").exists()

    status, log = server.run(argv)
    assert status == {"exit": 0}, log[-3000:]
    assert resumed_at(log) == STEPS
    assert complete_checkpoints(out) == [STEPS - SAVE, STEPS]
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [".perft-output.json"]  # temporaries and trash cleared; perft's own marker stays
    for name in (f"checkpoint-{STEPS}/adapter_model.safetensors", f"checkpoint-{STEPS}/optimizer.safetensors",
                 "adapter/adapter_model.safetensors"):
        assert max_abs_diff(load_safetensors(out / name), load_safetensors(reference / name)) == 0.0, name
    assert metrics(out) == metrics(reference)  # nothing lost, nothing logged twice
    ours = json.loads((out / "train_summary.json").read_text())
    theirs = json.loads((reference / "train_summary.json").read_text())
    assert {k: v for k, v in ours.items() if k != "adapter"} == {k: v for k, v in theirs.items() if k != "adapter"}
    assert os.environ.get(ckpt.FAULT_ENV) is None  # the hook is inert in this (the test's) process
