"""`perft train` end to end on a tiny OLMoE saved to disk: learning, outputs, bad input, NaN guard."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from perft import PerftModel
from perft.cli import main
from perft.errors import PerftError
from perft.training import NonFiniteLoss, train
from perft.training import checkpoint as ckpt
from tests.helpers.training import (
    adapter_tensors,
    config,
    make_workspace,
    max_abs_diff,
    one_thread,
    tree_snapshot,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), n_records=60)


@pytest.fixture(scope="module")
def finished(ws, tmp_path_factory):
    """A completed 2-epoch PERFT-R run with TensorBoard logs (26 steps, checkpoints every 4)."""
    out = tmp_path_factory.mktemp("run") / "out"
    with one_thread():
        result = train(config(ws, out, epochs=2.0, save_total_limit=2, report_to="tensorboard",
                              train_on_inputs=True))
    return out, result


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_best_adapter_is_exported(finished, ws):
    out, result = finished
    assert result.status == "completed" and result.global_step == result.total_steps == 26
    records = read_metrics(out)
    train_losses = [r["loss"] for r in records if "loss" in r]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    assert min(val.values()) < val[0] - 0.3, val
    assert result.best_step == min((s for s in val if s > 0), key=val.get)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["adapter_from_step"] == result.best_step
    assert max_abs_diff(adapter_tensors(out / "adapter"), adapter_tensors(out / f"checkpoint-{result.best_step}")) == 0
    # router load figures at the start and at every evaluation
    routed = [r for r in records if "router_load" in r]
    assert routed[0]["step"] == 0 and len(routed[0]["router_load"]) == 2
    assert all(abs(sum(row) - 1) < 1e-9 for r in routed for row in r["router_load"].values())
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_checkpoints_rotate_but_the_best_survives(finished):
    out, result = finished
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert steps[-2:] == [24, 26]
    assert set(steps) == {24, 26, result.best_step}
    assert not list(out.glob(".tmp-*"))


def test_saved_adapter_reloads_and_changes_the_model(finished, ws):
    out, _ = finished
    from perft.loading import load_base_model

    with one_thread():
        model = PerftModel.from_pretrained(load_base_model(str(ws["model"])), out / "adapter")
        ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            tuned = model(input_ids=ids).logits
            with model.disable_adapters():
                plain = model(input_ids=ids).logits
    assert (tuned - plain).abs().max() > 1e-3
    assert max_abs_diff({k: v for k, v in model.adapter_state_dict().items()}, adapter_tensors(out / "adapter")) == 0


def _bad_cases(ws, tmp):
    dense = tmp / "dense"
    if not dense.exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(dense)
    files = {
        "malformed.json": '[{"instruction": "a", "output": "b"}',
        "nofield.json": json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}]),
        "empty.json": "[]",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    return [
        (["--data", str(tmp / "missing.json")], "data file"),
        (["--data", str(tmp / "malformed.json")], "is not valid JSON (line 1"),
        (["--data", str(tmp / "nofield.json")], "record 1 of"),
        (["--data", str(tmp / "empty.json")], "holds no records: the data set is empty"),
        (["--model", str(dense)], "no Mixture-of-Experts block found in this llama model"),
        (["--model", str(tmp / "no-model")], "does not exist"),
        (["--top-k", "5", "--num-experts", "4"], "top_k=5 is larger than num_experts=4"),
        (["--rank", "0"], "rank must be an integer >= 1, got 0"),
        (["--micro-batch-size", "8", "--batch-size", "4"], "micro_batch_size=8 is larger than batch_size=4"),
        (["--layers", "7"], "layers [7] have no MoE block"),
    ]


def test_each_bad_input_stops_before_training_and_leaves_output_alone(ws, tmp_path, capsys):
    base = ["train", "--model", str(ws["model"]), "--data", str(ws["data"]), "--rank", "4", "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "2", "--report-to", "none", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".perft-output.json").write_text('{"kind": "train"}')  # a perft train folder holding a user's file
    fresh = tmp_path / "fresh"
    cases = _bad_cases(ws, tmp_path)
    capsys.readouterr()
    for extra, message in cases:
        for target in (out, fresh):
            before = tree_snapshot(target)
            with one_thread():
                code = main([*base, "--output", str(target), *extra])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2, extra
            assert len(err) == 1 and message in err[0], (extra, err)
            assert err[0].startswith("perft train: error: ")
            assert tree_snapshot(target) == before, extra


def test_a_finished_run_is_not_overwritten_or_resumed_with_another_config(finished, ws, capsys):
    out, _ = finished
    before = tree_snapshot(out)
    base = ["train", "--config", str(out / "training_config.yaml")]
    cases = [
        ([], "already holds a run"),
        (["--resume", "--lr", "0.005"], "written by another config (lr: 0.01 -> 0.005)"),
        (["--resume", "--rank", "8"], "written by another config (rank: 4 -> 8)"),
        (["--resume", str(out / "checkpoint-999")], "does not exist"),
    ]
    for extra, message in cases:
        with one_thread():
            code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
    assert tree_snapshot(out) == before


def test_changed_data_is_refused_on_resume(finished, ws, tmp_path, capsys):
    out, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    data = tmp_path / "data.json"
    records = json.loads(ws["data"].read_text())
    records[0]["output"] = "changed"
    data.write_text(json.dumps(records))
    before = tree_snapshot(copy)
    with one_thread():
        code = main(["train", "--config", str(out / "training_config.yaml"), "--output", str(copy), "--data",
                     str(data), "--resume"])
    assert code == 2 and "the data file" in capsys.readouterr().err
    assert tree_snapshot(copy) == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    out = tmp_path / "out"

    def poison(info):
        if info["step"] == 5:
            layer = next(iter(info["model"].perft_layers.values()))
            with torch.no_grad():
                layer.experts.up.fill_(float("nan"))

    with one_thread(), pytest.raises(NonFiniteLoss) as err:
        train(config(ws, out, epochs=2.0), callbacks=[poison])
    message = str(err.value)
    assert "became nan at step 6" in message and f"{out / 'checkpoint-4'}" in message
    assert isinstance(err.value, PerftError)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoint-4").values())
    assert not (out / "adapter").exists()


def test_gradient_checkpointing_and_bf16_flags(ws, tmp_path):
    with one_thread():
        plain = train(config(ws, tmp_path / "a", max_steps=3, dropout=0.0))
        checkpointed = train(config(ws, tmp_path / "b", max_steps=3, dropout=0.0, gradient_checkpointing=True))
        bf16 = train(config(ws, tmp_path / "c", max_steps=3, dropout=0.0, bf16="true", val_set_size=0))
    assert max_abs_diff(adapter_tensors(plain.adapter_dir), adapter_tensors(checkpointed.adapter_dir)) < 1e-6
    assert bf16.status == "completed" and all(
        torch.isfinite(t).all() for t in adapter_tensors(bf16.adapter_dir).values())


@pytest.fixture(scope="module")
def mixtral_ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("mixtral"), n_records=30, arch="mixtral")


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("olmoe", dict(variant="embedded", adapter="parallel")),
        ("olmoe", dict(variant="dense", group_by_length=True, train_on_inputs=True)),
        ("olmoe", dict(variant="single", val_set_size=0, layers=[1])),
        ("mixtral", dict(variant="routed", base_router_aux_loss_coef=0.02, router_aux_loss_coef=0.02)),
    ],
)
def test_every_variant_trains(ws, mixtral_ws, tmp_path, arch, overrides):
    workspace = mixtral_ws if arch == "mixtral" else ws
    with one_thread():
        result = train(config(workspace, tmp_path / "out", max_steps=3, **overrides))
    start = read_metrics(tmp_path / "out")[0]
    assert result.status == "completed" and start["trainable_params"] > 0
    tensors = adapter_tensors(result.adapter_dir)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for name, t in tensors.items() if name.endswith(("lora_B", "adapter_up")))
    if overrides.get("layers"):
        assert all(".layers.1." in name for name in tensors)


def test_wandb_without_the_package_is_a_clear_error(ws, tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here")
    with pytest.raises(PerftError, match="needs the wandb package"):
        train(config(ws, tmp_path / "out", report_to="wandb"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lora-attn", "lora-experts"])
def test_lora_baselines_train_and_reload_with_peft(ws, tmp_path, method):
    from peft import PeftModel

    from perft.loading import load_base_model

    with one_thread():
        result = train(config(ws, tmp_path / "out", method=method, dropout=0.0, max_steps=4, lr=5e-2))
        model = PeftModel.from_pretrained(load_base_model(str(ws["model"])), str(result.adapter_dir))
    trained = adapter_tensors(result.adapter_dir)
    assert trained and all(math.isfinite(v.abs().sum().item()) for v in trained.values())
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names) == (method == "lora-attn")


def test_checkpoint_listing_skips_torn_writes(tmp_path):
    (tmp_path / "checkpoint-8").mkdir()  # no trainer_state.json: killed mid-write in an older layout
    (tmp_path / ".tmp-checkpoint-12").mkdir()
    done = tmp_path / "checkpoint-4"
    done.mkdir()
    (done / ckpt.STATE_NAME).write_text("{}")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    ckpt.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-12").exists()
