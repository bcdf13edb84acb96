"""`perft train` / `perft eval` with --load-in-4bit / --load-in-8bit on a tiny OLMoE saved to disk."""

from __future__ import annotations

import pytest
import torch

from perft import PerftModel
from perft.cli import main
from perft.errors import PerftError
from perft.loading import load_base_model
from perft.quantization import quantized_expert_stores
from perft.training import train
from tests.helpers.training import REPO, adapter_tensors, config, make_workspace, max_abs_diff, one_thread

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws-q"), n_records=40)


@pytest.fixture(scope="module")
def run_4bit(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-q") / "out"
    with one_thread():
        result = train(config(ws, out, load_in_4bit=True, epochs=1.0))
    return out, result


def test_training_on_a_4bit_base_learns_and_saves_a_portable_adapter(run_4bit, ws):
    out, result = run_4bit
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.status == "completed" and losses[-1] < losses[0] - 0.3
    with one_thread():
        quantized = load_base_model(str(ws["model"]), load_in_4bit=True)
        assert [s.bits for s in quantized_expert_stores(quantized)] == [4] * 4
        on_quantized = PerftModel.from_pretrained(quantized, out / "adapter")
        on_full = PerftModel.from_pretrained(str(ws["model"]), out / "adapter")  # the fp32 base
        assert not quantized_expert_stores(on_full)
        ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = on_quantized(input_ids=ids).logits, on_full(input_ids=ids).logits
    assert max_abs_diff(on_full.adapter_state_dict(), adapter_tensors(out / "adapter")) == 0
    assert 0 < (a - b).abs().max().item() < 0.1


def test_loading_flags_reach_the_base(ws):
    with one_thread():
        model = PerftModel.from_pretrained(str(ws["model"]), _tiny_adapter(ws), load_in_8bit=True)
    assert [s.quant_type for s in quantized_expert_stores(model)] == ["int8"] * 4


def _tiny_adapter(ws):
    directory = ws["root"] / "zero-adapter"
    if not directory.exists():
        from perft import PerftConfig, get_perft_model

        get_perft_model(load_base_model(str(ws["model"])), PerftConfig(num_experts=2, top_k=1, rank=2)).save_pretrained(
            directory)
    return directory


@pytest.mark.parametrize("flags,message", [
    (["--load-in-4bit", "--load-in-8bit"], "exclude each other"),
    (["--bnb-4bit-quant-type", "fp4"], "applies only with --load-in-4bit"),
])
def test_contradictory_flags_are_refused_before_training(ws, tmp_path, capsys, flags, message):
    code = main(["train", "--model", str(ws["model"]), "--data", str(ws["data"]), "--output", str(tmp_path / "o"),
                 *flags])
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(PerftError, match=message):
        load_base_model(str(ws["model"]), **{f.lstrip("-").replace("-", "_"): True for f in flags if f != "fp4"}
                        if flags[0] != "--bnb-4bit-quant-type" else {"bnb_4bit_quant_type": "fp4"})


def test_eval_cli_runs_on_a_4bit_base(tmp_path, capsys):
    assets = REPO / "perft" / "assets"
    with one_thread():
        code = main(["eval", "--model", str(assets / "tiny-olmoe"), "--load-in-4bit", "--tasks", "tiny_commonsense",
                     "--data-dir", str(assets / "tasks" / "dataset"), "--max-samples", "8", "--output",
                     str(tmp_path / "e"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tiny_commonsense" in captured.out


@pytest.mark.slow
def test_ddp_on_a_4bit_base_matches_one_process(tmp_path):
    """Two gloo processes (DDP) on a 4-bit base train the same adapter as one process, as on a full base."""
    import subprocess

    from tests.helpers.training import PYTHON, config_flags, subprocess_env

    ws = make_workspace(tmp_path / "ws", n_records=42)
    settings = dict(dropout=0.0, epochs=1.0, eval_steps=3, save_steps=3, eval_batch_size=3, micro_batch_size=2,
                    load_in_4bit=True)
    with one_thread():
        train(config(ws, tmp_path / "single", **settings))
    cfg = config(ws, tmp_path / "ddp", strategy="ddp", **settings)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "perft", "train",
           *config_flags(cfg)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diff = max_abs_diff(adapter_tensors(tmp_path / "ddp" / "checkpoint-9"), adapter_tensors(tmp_path / "single" / "checkpoint-9"))
    assert diff < 1e-6, diff
