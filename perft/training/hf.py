"""Train a `PerftModel` with `transformers.Trainer` or TRL's `SFTTrainer`.

Both trainers handle a `PerftModel` like any `nn.Module`, except for saving: a module that
is neither a `PreTrainedModel` nor a `PeftModel` is saved as its *whole* state dict (the
frozen base included) and cannot be loaded back as a best checkpoint or on resume.
`PerftTrainerMixin` makes every save write only the adapter (`PerftModel.save_pretrained`)
and every load (resume, best checkpoint) read it back:

    from perft.training.hf import PerftTrainer, PerftSFTTrainer
    trainer = PerftTrainer(model=perft_model, args=TrainingArguments(...), ...)

or mix it into your own subclass: `class MyTrainer(PerftTrainerMixin, Trainer): ...`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from transformers import Trainer

from perft.config import WEIGHTS_NAME
from perft.io import load_safetensors
from perft.model import PerftModel


def _perft_model(trainer: Any) -> PerftModel | None:
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return model if isinstance(model, PerftModel) else None


_SFT_ONLY_KEYS = ("completion_mask", "assistant_masks")


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
    """`transformers.Trainer` that saves and restores only the PERFT adapter."""


@functools.cache
def perft_sft_trainer_class() -> type:
    """`PerftTrainerMixin` + TRL's `SFTTrainer` (TRL is an optional dependency)."""
    from trl import SFTTrainer

    def compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The model's own loss (cross-entropy + load-balance losses), as `transformers.Trainer` computes it.

        SFTTrainer's fused LM-head path calls the backbone directly and would skip the PERFT
        forward (and its PERFT-R balance loss); its entropy / token-accuracy metrics are not
        logged for PERFT models.
        """
        if _perft_model(self) is None:
            return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k not in _SFT_ONLY_KEYS}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return type("PerftSFTTrainer", (PerftTrainerMixin, SFTTrainer), {"compute_loss": compute_loss})


def __getattr__(name: str) -> Any:
    if name == "PerftSFTTrainer":  # lazily, so importing this module does not need trl
        return perft_sft_trainer_class()
    raise AttributeError(name)
