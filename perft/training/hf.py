"""Adapter-only checkpoints for `transformers.Trainer` and TRL's `SFTTrainer`.

A PerftModel trains in the plain trainers as it is (`Trainer(model=perft_model, ...)`,
`SFTTrainer(model=perft_model, ...)`): their checkpoints hold the model's whole
`state_dict()`, frozen base included, which resume, `load_best_model_at_end` and
`PerftModel.from_pretrained(base, checkpoint_dir)` all read back (see `perft.model_io`).

What the wrappers here add is size: `PerftTrainerMixin` makes every checkpoint hold only
the adapter (`PerftModel.save_pretrained`: a few MB instead of a copy of the base model per
checkpoint) and reads it back on resume and for the best checkpoint:

    from perft.training.hf import PerftTrainer, PerftSFTTrainer
    trainer = PerftTrainer(model=perft_model, args=TrainingArguments(...), ...)

or mix it into your own subclass: `class MyTrainer(PerftTrainerMixin, Trainer): ...`.
`PerftSFTTrainer` also counts the PERFT-R balance loss when TRL's MoE aux-loss channel is off;
`PerftDPOTrainer` uses the policy's base with adapters off as DPO's reference (as TRL does
for a PEFT model) where the plain DPOTrainer would load a second copy of the base.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn
from transformers import Trainer

from perft.config import WEIGHTS_NAME
from perft.io import load_safetensors
from perft.model import PerftModel


def _perft_model(trainer: Any) -> PerftModel | None:
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return model if isinstance(model, PerftModel) else None


class PerftTrainerMixin:
    """Save and load only the PERFT adapter in `transformers.Trainer` subclasses."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _perft_model(self)
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        if not self.args.should_save:  # type: ignore[attr-defined]
            return
        model.save_pretrained(output_dir)
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)

    def _load_adapter(self, directory: str) -> bool:
        model = _perft_model(self)
        path = os.path.join(directory, WEIGHTS_NAME)
        if model is None or not os.path.isfile(path):
            return False
        model.load_adapter_state_dict(load_safetensors(path), source=path)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self._load_adapter(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        if not self._load_adapter(self.state.best_model_checkpoint):  # type: ignore[attr-defined]
            super()._load_best_model()  # type: ignore[misc]


class PerftTrainer(PerftTrainerMixin, Trainer):
    """`transformers.Trainer` whose checkpoints hold only the PERFT adapter."""


@functools.cache
def perft_sft_trainer_class() -> type:
    """`PerftTrainerMixin` + TRL's `SFTTrainer` (TRL is an optional dependency)."""
    from trl import SFTTrainer

    def compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """TRL's loss, plus the PERFT-R balance loss when TRL's MoE aux-loss channel did not carry it.

        SFTTrainer rebuilds its loss from the fused LM head's log-probs and adds only
        `router_aux_loss_coef * aux_loss`; PerftModel adds its balance loss into that `aux_loss`
        when the channel is on (the default for MoE bases), else it is added here.
        """
        loss, outputs = SFTTrainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        perft = _perft_model(self)
        aux = outputs.get("perft_aux_loss") if isinstance(outputs, dict) else None
        if perft is not None and aux is not None and not outputs.get("perft_aux_in_aux_loss"):
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + perft.perft_config.router_aux_loss_coef * aux.to(loss.dtype) / steps
        return (loss, outputs) if return_outputs else loss

    return type("PerftSFTTrainer", (PerftTrainerMixin, SFTTrainer), {
        "__doc__": "TRL's `SFTTrainer` with adapter-only checkpoints and the PERFT-R balance loss always counted.",
        "compute_loss": compute_loss})


class AdapterDisabledReference(nn.Module):
    """DPO's reference model as PEFT gives it: the policy's own base, run with its adapters off.

    No second copy of the base: calls run the PerftModel's wrapped causal LM inside
    `disable_adapter()`. Attribute reads (config, `base_model`, the LM head) go to that causal
    LM, so TRL's fused LM head patches this object as it would a transformers model.
    """

    def __init__(self, model: PerftModel) -> None:
        super().__init__()
        object.__setattr__(self, "_perft", model)  # not a submodule: its parameters stay the policy's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._perft.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._perft.base_model(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._perft.disable_adapter():
            return super().__call__(*args, **kwargs)


@functools.cache
def perft_dpo_trainer_class() -> type:
    """TRL's `DPOTrainer` with adapter-only checkpoints and, by default, the adapter-disabled base as reference."""
    from trl import DPOTrainer

    def __init__(self: Any, model: Any, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        if ref_model is None and isinstance(model, PerftModel):
            ref_model = AdapterDisabledReference(model)
        DPOTrainer.__init__(self, model, ref_model, *args, **kwargs)

    return type("PerftDPOTrainer", (PerftTrainerMixin, DPOTrainer), {
        "__doc__": "TRL's `DPOTrainer` whose reference is the policy's base with adapters off (no second copy).",
        "__init__": __init__})


def __getattr__(name: str) -> Any:
    if name == "PerftSFTTrainer":  # lazily, so importing this module does not need trl
        return perft_sft_trainer_class()
    if name == "PerftDPOTrainer":
        return perft_dpo_trainer_class()
    raise AttributeError(name)
