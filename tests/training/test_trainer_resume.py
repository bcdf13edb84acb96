"""A run stopped by SIGKILL (even while writing a checkpoint) or SIGTERM, then resumed with
`--resume`, ends exactly where an uninterrupted run of the same seed ends."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap

import pytest

from perft.training import checkpoint as ckpt
from perft.training import train
from tests.helpers.training import (
    PYTHON,
    adapter_tensors,
    config,
    make_workspace,
    max_abs_diff,
    one_thread,
    subprocess_env,
)

STEPS = 26  # 52 training records, batch 4, 2 epochs; dropout 0.05 on, so RNG state matters


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), n_records=60)


@pytest.fixture(scope="module")
def reference(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    with one_thread():
        result = train(config(ws, out, epochs=2.0, save_total_limit=None))
    assert result.global_step == STEPS
    return out


def assert_same_run(out, reference):
    final = f"checkpoint-{STEPS}"
    assert max_abs_diff(adapter_tensors(out / final), adapter_tensors(reference / final)) == 0.0
    assert max_abs_diff(adapter_tensors(out / "adapter"), adapter_tensors(reference / "adapter")) == 0.0
    from safetensors.torch import load_file

    ours = load_file(str(out / final / "optimizer.safetensors"))
    theirs = load_file(str(reference / final / "optimizer.safetensors"))
    assert max_abs_diff(ours, theirs) == 0.0
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    key = lambda records: [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]  # noqa: E731
    assert key(val) == key(ref)


KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from perft.training import TrainingConfig, train
    from perft.training import checkpoint as ckpt

    cfg = TrainingConfig.from_dict(json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    original = ckpt.replace_dir

    def replace_dir(tmp, final):
        if final.name == f"checkpoint-{kill_at}":  # written completely, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        original(tmp, final)

    ckpt.replace_dir = replace_dir
    train(cfg)
    """
)


def test_sigkill_while_writing_a_checkpoint_then_resume_matches(ws, reference, tmp_path):
    out = tmp_path / "out"
    cfg = config(ws, out, epochs=2.0, save_total_limit=None)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([PYTHON, str(script), json.dumps(cfg.to_dict()), "12"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 8]
    assert (out / ".tmp-checkpoint-12" / ckpt.STATE_NAME).is_file()  # the torn write the kill left behind
    seen: list[int] = []
    with one_thread():
        result = train(config(ws, out, epochs=2.0, save_total_limit=None, resume="latest"),
                       callbacks=[lambda info: seen.append(info["step"])])
    assert result.status == "completed" and result.global_step == STEPS
    assert seen == list(range(9, STEPS + 1))  # continued after checkpoint-8, did not start over
    assert not (out / ".tmp-checkpoint-12").exists()
    assert_same_run(out, reference)


def test_sigterm_saves_a_checkpoint_and_resume_matches(ws, reference, tmp_path):
    import os

    out = tmp_path / "out"

    def terminate(info):
        if info["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with one_thread():
        stopped = train(config(ws, out, epochs=2.0, save_total_limit=None), callbacks=[terminate])
    assert (stopped.status, stopped.global_step, stopped.signal) == ("interrupted", 6, signal.SIGTERM)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]
    assert not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    seen: list[int] = []
    with one_thread():
        result = train(config(ws, out, epochs=2.0, save_total_limit=None, resume="auto"),
                       callbacks=[lambda info: seen.append(info["step"])])
    assert result.global_step == STEPS and seen == list(range(7, STEPS + 1))
    assert_same_run(out, reference)
