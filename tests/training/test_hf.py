"""A PerftModel trains through `transformers.Trainer` and TRL's `SFTTrainer`, saving only its adapter."""

from __future__ import annotations

import json

import pytest
import torch

from perft import PerftConfig, PerftModel, get_perft_model
from perft.data.collate import PaddingCollator
from perft.data.dataset import prepare_data
from perft.data.prompts import build_prompt
from perft.loading import load_base_model, load_tokenizer
from tests.helpers.training import adapter_tensors, make_workspace, max_abs_diff, one_thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), n_records=48)


def perft_model(ws, coef=0.01):
    torch.manual_seed(0)
    return get_perft_model(load_base_model(str(ws["model"])),
                           PerftConfig(rank=4, num_experts=4, top_k=2, dropout=0.0, router_aux_loss_coef=coef))


def test_trainer_saves_adapters_and_loads_the_best_and_resumes(ws, tmp_path):
    from transformers import TrainingArguments

    from perft.training.hf import PerftTrainer

    tokenizer = load_tokenizer(str(ws["model"]))
    data = prepare_data(ws["data"], tokenizer, cutoff_len=64, val_set_size=8, split_seed=42, train_on_inputs=True)
    train_ds, val_ds = data.train, data.val  # Trainer drops the columns PerftModel.forward does not name

    def make(model, steps, best=True):
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=2e-2,
            eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=best,
            metric_for_best_model="eval_loss", report_to=[], use_cpu=True,
            logging_steps=2, disable_tqdm=True, seed=1)
        return PerftTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                            data_collator=PaddingCollator(tokenizer.pad_token_id), processing_class=tokenizer)

    with one_thread():
        model = perft_model(ws)
        trainer = make(model, 6)
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    for checkpoint in tmp_path.glob("checkpoint-*"):
        names = {p.name for p in checkpoint.iterdir()}
        assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    # load_best_model_at_end put the best adapter back into the model (and does so again from scratch)
    assert max_abs_diff({k: v.detach() for k, v in model.adapter_state_dict().items()},
                        adapter_tensors(best)) == 0.0
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()
    trainer._load_best_model()
    assert max_abs_diff({k: v.detach() for k, v in model.adapter_state_dict().items()},
                        adapter_tensors(best)) == 0.0
    reloaded = PerftModel.from_pretrained(load_base_model(str(ws["model"])), best)
    assert max_abs_diff(reloaded.adapter_state_dict(), adapter_tensors(best)) == 0.0
    # resuming reads the adapter back (a fresh, untrained model ends up with the checkpoint's weights)
    with one_thread():
        fresh = perft_model(ws)
        make(fresh, 6, best=False).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert max_abs_diff({k: v.detach() for k, v in fresh.adapter_state_dict().items()},
                        adapter_tensors(tmp_path / "checkpoint-6")) == 0.0


def test_sft_trainer_trains_a_perft_model_with_its_balance_loss(ws, tmp_path):
    import datasets
    from trl import SFTConfig

    from perft.training.hf import PerftSFTTrainer

    tokenizer = load_tokenizer(str(ws["model"]))
    records = json.loads(ws["data"].read_text())
    dataset = datasets.Dataset.from_list(
        [{"prompt": build_prompt(r["instruction"], r.get("input")), "completion": r["output"]} for r in records])
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=2e-2,
                     save_steps=8, report_to=[], use_cpu=True, logging_steps=1, max_length=64,
                     gradient_checkpointing=False, disable_tqdm=True, seed=1)
    with one_thread():
        model = perft_model(ws)
        trainer = PerftSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        batch = next(iter(trainer.get_train_dataloader()))
        model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch))
            own = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    assert own.perft_aux_loss is not None and torch.allclose(loss, own.loss)  # the PERFT-R balance loss counts
    saved = tmp_path / "checkpoint-8"
    assert "model.safetensors" not in {p.name for p in saved.iterdir()}
    reloaded = PerftModel.from_pretrained(load_base_model(str(ws["model"])), saved)
    tensors = reloaded.adapter_state_dict()
    assert any(name.endswith("lora_B") and t.abs().max() > 0 for name, t in tensors.items())
