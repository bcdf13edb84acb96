"""The train state a checkpoint stores, logging window included: a run resumed between two
`loss` records logs exactly what an uninterrupted run logs (issue 19: save 4 / log 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perft.errors import PerftError
from perft.training import train
from perft.training.state import LogWindow, TrainState
from tests.helpers.training import config, one_thread


def test_window_round_trips_through_the_checkpoint_payload():
    state = TrainState(global_step=8, best_val_loss=1.5, best_step=4, history=[{"step": 4, "val_loss": 1.5}])
    state.window.add({"loss": 2.0, "aux": 0.25, "tokens": 100.0}, 0.5)
    state.window.add({"loss": 4.0, "aux": 0.75, "tokens": 300.0}, 1.5)
    state.window.router_counts["model.layers.0.mlp"] = [3.0, 1.0]
    payload = json.loads(json.dumps(state.to_checkpoint(steps_per_epoch=5, batch_size=4, method="perft")))
    assert (payload["epoch"], payload["step_in_epoch"], payload["examples_seen"]) == (1, 3, 32)
    back = TrainState.from_checkpoint(payload, Path("trainer_state.json"))
    assert back == state
    record = back.window.record(8, 5, lr=0.1, grad_norm=1.0)
    assert (record["loss"], record["aux_loss"], record["tokens_per_s"]) == (3.0, 0.5, 200.0)
    back.window.reset()
    assert back.window == LogWindow()


def test_a_checkpoint_without_a_window_starts_an_empty_one_and_a_damaged_one_is_refused():
    old = {"global_step": 3, "history": []}
    assert TrainState.from_checkpoint(old, Path("s.json")).window == LogWindow()
    with pytest.raises(PerftError, match="logging window: loss"):
        TrainState.from_checkpoint({**old, "log_window": {"loss": "nan?"}}, Path("s.json"))
    with pytest.raises(PerftError, match="router_counts"):
        TrainState.from_checkpoint({**old, "log_window": {"router_counts": {"a": ["x"]}}}, Path("s.json"))


class Stop(Exception):
    pass


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_resume_between_log_records_logs_what_an_uninterrupted_run_logs(train_workspace, tmp_path):
    settings = dict(save_steps=4, eval_steps=4, logging_steps=10, max_steps=12)
    with one_thread():
        train(config(train_workspace, tmp_path / "ref", **settings))

    def stop_after_checkpoint_8(info: dict) -> None:
        if info["step"] == 9:
            raise Stop

    out = tmp_path / "resumed"
    with one_thread():
        with pytest.raises(Stop):
            train(config(train_workspace, out, **settings), callbacks=[stop_after_checkpoint_8])
        state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
        assert state["log_window"]["steps"] == 8  # steps 1-8 since the step-0 record, none logged yet
        train(config(train_workspace, out, resume="latest", **settings))
    ours, reference = _records(out), _records(tmp_path / "ref")
    step10 = [r for r in ours if r["step"] == 10 and "loss" in r]
    assert len(step10) == 1 and "router_max_load_x_n" in step10[0]
    assert ours == reference  # the step-10 loss is the mean over steps 1-10 (not 9-10), router load included
