"""A PerftModel in the ecosystem's own trainers, unwrapped: plain `transformers.Trainer` and TRL's `SFTTrainer`."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from perft import PerftConfig, PerftModel, get_perft_model
from perft.testing import save_tiny_model

COMBOS = list(itertools.product(("routed", "embedded", "dense", "single"), ("lora", "parallel")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe") / "model")


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def token_data(n: int = 16, length: int = 12, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def adapter_of(model: PerftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def trainer_for(model, out, steps, **extra):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                    save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=3, logging_steps=1)
    args = TrainingArguments(**{**settings, **extra})
    return Trainer(model=model, args=args, train_dataset=token_data(), eval_dataset=token_data(8, seed=1))


@pytest.mark.parametrize("variant,adapter", COMBOS)
def test_plain_trainer_checkpoints_reload_and_resume(model_dir, tmp_path, variant, adapter):
    torch.set_num_threads(1)
    config = PerftConfig(variant=variant, adapter=adapter, rank=4, num_experts=4, top_k=2, dropout=0.0,
                         router_aux_loss_coef=0.01 if variant == "routed" else 0.0)
    torch.manual_seed(0)
    model = get_perft_model(load_base(model_dir), config)
    start = adapter_of(model)
    trainer_for(model, tmp_path / "a", 2).train()
    trained = adapter_of(model)
    assert max_diff(trained, start) > 1e-4  # it did train

    # the checkpoint reloads onto a fresh base
    checkpoint = tmp_path / "a" / "checkpoint-2"
    reloaded = PerftModel.from_pretrained(load_base(model_dir), checkpoint)
    assert reloaded.perft_config.variant == variant and reloaded.perft_config.adapter == adapter
    assert max_diff(adapter_of(reloaded), trained) == 0.0

    # resuming from step 1 reaches the same adapter as the uninterrupted run
    torch.manual_seed(0)
    again = get_perft_model(load_base(model_dir), config)
    trainer_for(again, tmp_path / "a", 2).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert max_diff(adapter_of(again), trained) < 1e-6


def test_plain_trainer_loads_the_best_checkpoint_at_end(model_dir, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_perft_model(load_base(model_dir), PerftConfig(rank=4, dropout=0.0))
    trainer = trainer_for(model, tmp_path, 3, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                          metric_for_best_model="eval_loss", learning_rate=0.5)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    losses = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.endswith(f"checkpoint-{min(losses, key=losses.get)}")
    assert max_diff(adapter_of(model), adapter_of(PerftModel.from_pretrained(load_base(model_dir), best))) == 0.0


def test_trl_sft_trainer_trains_with_the_balance_loss_and_its_checkpoint_reloads(model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_perft_model(load_base(model_dir), PerftConfig(rank=4, dropout=0.0, router_aux_loss_coef=0.5))
    seen = []
    model.register_forward_hook(lambda m, a, k, out: seen.append(out), with_kwargs=True)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=5e-2,
                     save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    data = token_data().remove_columns(["labels", "attention_mask"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data)
    start = adapter_of(model)
    trainer.train()
    assert max_diff(adapter_of(model), start) > 1e-4
    # TRL's fused LM head ran (with the base router's own aux loss), and PerftModel added its balance loss
    out = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in seen[0].items()}
    assert out["log_probs"] is not None and out["perft_aux_loss"] > 0
    nll = -(out["log_probs"].sum() / out["label_mask"].sum())
    assert abs(float(out["loss"] - nll - model.config.router_aux_loss_coef * out["aux_loss"])) < 1e-5
    # what SFTTrainer optimises (it rebuilds the loss from log-probs + aux_loss) counts the balance loss
    model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        own = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert 0.5 * float(own.perft_aux_loss) > 0.5 and abs(float(loss - own.loss)) < 1e-4
    reloaded = PerftModel.from_pretrained(load_base(model_dir), tmp_path / "checkpoint-2")
    assert max_diff(adapter_of(reloaded), adapter_of(model)) == 0.0
    assert os.path.isfile(tmp_path / "checkpoint-2" / "model.safetensors")


def dpo_run(model_dir, tmp_path, trainer_cls):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from perft.testing import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = get_perft_model(load_base(model_dir), PerftConfig(rank=4, dropout=0.0))
    data = Dataset.from_list([{"prompt": "the quick brown", "chosen": " fox jumps", "rejected": " dog 1 2"}] * 8)
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                     use_cpu=True, disable_tqdm=True, save_steps=2, learning_rate=1e-2, logging_steps=1, seed=0)
    trainer = trainer_cls(model=model, args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "rewards/chosen" in h]


def test_dpo_reference_is_the_base_with_adapters_off_without_a_second_copy(model_dir, tmp_path):
    from trl import DPOTrainer

    from perft.training.hf import AdapterDisabledReference, PerftDPOTrainer

    torch.set_num_threads(1)
    ours, logs = dpo_run(model_dir, tmp_path / "perft", PerftDPOTrainer)
    assert isinstance(ours.ref_model, AdapterDisabledReference)
    assert not list(ours.ref_model.parameters())  # no copy of the base
    # step 1: the policy is the untouched base (adapters start as a no-op), so every reward is exactly 0
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0
    assert logs[1]["rewards/margins"] != 0.0
    # plain DPOTrainer loads a second copy of the base from its path as the reference: the same run
    plain, plain_logs = dpo_run(model_dir, tmp_path / "plain", DPOTrainer)
    assert not isinstance(plain.ref_model, AdapterDisabledReference)
    assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in plain_logs], abs=1e-6)
    assert (tmp_path / "perft" / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()
