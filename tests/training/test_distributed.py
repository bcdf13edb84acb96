"""Two processes over gloo (torchrun) train the same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess

import pytest

from perft.training import train
from tests.helpers.training import (
    PYTHON,
    adapter_tensors,
    config,
    config_flags,
    make_workspace,
    max_abs_diff,
    one_thread,
    subprocess_env,
)

# 42 records - 8 val = 34 train; batch 4 = micro 2 x (2 accumulation on 1 process | 1 on each of 2):
# the last global batch holds 2 examples, one micro-batch, so rank 1 runs a zero-weight pass there,
# and 8 validation records in chunks of 3 leave rank 1 one chunk short as well.
SETTINGS = dict(dropout=0.0, epochs=1.0, eval_steps=3, save_steps=3, eval_batch_size=3, micro_batch_size=2)
STEPS = 9


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), n_records=42)


@pytest.fixture(scope="module")
def single(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    with one_thread():
        result = train(config(ws, out, **SETTINGS))
    assert result.global_step == STEPS
    return out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(ws, single, tmp_path, strategy):
    out = tmp_path / "out"
    cfg = config(ws, out, strategy=strategy, **SETTINGS)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "perft", "train",
           *config_flags(cfg)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stdout
    assert proc.stdout.count("trainable params:") == 1  # rank 0 alone reports
    final = f"checkpoint-{STEPS}"
    diff = max_abs_diff(adapter_tensors(out / final), adapter_tensors(single / final))
    assert diff < 1e-6, diff
    assert sorted(p.name for p in (out / final).glob("rng_state_*.safetensors")) == [
        "rng_state_0.safetensors", "rng_state_1.safetensors"]
    ours, theirs = metrics(out), metrics(single)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]  # written once, by rank 0
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
