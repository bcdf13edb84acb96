"""`PerftModel`: a frozen Hugging Face MoE model with PERFT adapter experts attached.

Mirrors PEFT's user API (`get_perft_model`, `save_pretrained`, `from_pretrained`,
`print_trainable_parameters`, `disable_adapters`, `unload`) so it drops into existing
training and evaluation scripts, including `transformers.Trainer`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perft.arch import MoEBlockInfo, require_moe_blocks
from perft.config import WEIGHTS_NAME, PerftConfig
from perft.errors import PerftError
from perft.io import atomic_save_safetensors, load_safetensors
from perft.layer import ATTR_NAME, PerftLayer, attach
from perft.routing.live import last_routing_stats, recording

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PerftModel(nn.Module):
    """A base causal LM whose MoE blocks carry PERFT adapter experts; only adapters train."""

    def __init__(self, base_model: nn.Module, config: PerftConfig) -> None:
        super().__init__()
        config = PerftConfig.from_dict(config.to_dict())  # own copy, re-validated
        blocks = require_moe_blocks(base_model)
        if any(isinstance(getattr(b.module, ATTR_NAME, None), PerftLayer) for b in blocks):
            raise PerftError("this model already has PERFT adapters attached: call unload() first, or use it as is")
        blocks = _select_layers(blocks, config.layers)
        _fill_base_facts(config, base_model, blocks)
        self.base_model = base_model
        self.perft_config = config
        for param in base_model.parameters():
            param.requires_grad_(False)
        dtype = _adapter_dtype(config, base_model)
        self._blocks: list[MoEBlockInfo] = blocks
        self._layers: dict[str, PerftLayer] = {}
        self._handles: list = []
        try:
            for block in blocks:
                layer, handles = attach(config, block, dtype)
                self._layers[block.path] = layer
                self._handles.extend(handles)
        except (RuntimeError, MemoryError) as err:
            if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
                raise
            self.unload()
            raise PerftError(
                f"cannot allocate the adapter weights (rank={config.rank}, num_experts={config.num_experts} on "
                f"{len(blocks)} MoE blocks of hidden size {blocks[0].hidden_size}): out of memory; "
                "lower rank or num_experts"
            ) from None

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def perft_layers(self) -> dict[str, PerftLayer]:
        """Module path of each adapted MoE block -> its PerftLayer."""
        return dict(self._layers)

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (with adapters attached), as PEFT names it."""
        return self.base_model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward, plus the PERFT-R load-balance loss when it is enabled.

        The explicit argument names let `transformers.Trainer` see which data columns the
        model consumes.
        """
        args: tuple = ()
        if input_ids is not None:
            if _is_hf_model(self.base_model):
                kwargs["input_ids"] = input_ids
            else:  # a plain torch module takes its input positionally
                args = (input_ids,)
        for name, value in (("attention_mask", attention_mask), ("labels", labels)):
            if value is not None:
                kwargs[name] = value
        # The mask stays set after the call: a gradient-checkpointed layer re-runs its forward
        # during backward and must take the same (masked) path.
        for layer in self._layers.values():
            layer.token_mask = attention_mask
            layer.balance_terms = None
        outputs = self.base_model(*args, **kwargs)
        aux = self.router_balance_loss()
        if aux is not None and isinstance(outputs, dict):
            outputs["perft_aux_loss"] = aux
            if getattr(outputs, "loss", None) is not None:
                outputs["loss"] = outputs.loss + self.perft_config.router_aux_loss_coef * aux.to(outputs.loss.dtype)
        return outputs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def router_balance_loss(self) -> torch.Tensor | None:
        """Switch load-balance loss of the PERFT-R routers over all layers of the last forward."""
        terms = [layer.balance_terms for layer in self._layers.values() if layer.balance_terms is not None]
        if not terms:
            return None
        counts = torch.stack([t[0] for t in terms]).sum(0)
        probs = torch.stack([t[1] for t in terms]).sum(0)
        tokens = torch.stack([t[2] for t in terms]).sum().clamp_min(1.0)
        return counts.shape[0] * torch.sum((counts / tokens) * (probs / tokens))

    # ------------------------------------------------------------------ adapters on/off
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the untouched base model inside this context."""
        previous = {path: layer.enabled for path, layer in self._layers.items()}
        for layer in self._layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for path, layer in self._layers.items():
                layer.enabled = previous[path]

    def unload(self) -> nn.Module:
        """Remove every adapter and hook; return the base model exactly as it was given."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self._blocks:
            if hasattr(block.module, ATTR_NAME):
                delattr(block.module, ATTR_NAME)
        self._layers.clear()
        return self.base_model

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in the documented save format (`<block path>.lora_A`, ...)."""
        state: dict[str, torch.Tensor] = {}
        for path, layer in self._layers.items():
            state[f"{path}.{layer.experts.down_name}"] = layer.experts.down
            state[f"{path}.{layer.experts.up_name}"] = layer.experts.up
            if layer.router is not None:
                state[f"{path}.router"] = layer.router.weight
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "adapter") -> None:
        """Copy saved adapter tensors in; any missing, extra or mis-shaped tensor is a clear error."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise PerftError(
                f"{source} does not fit this model: missing tensors {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                f"unexpected tensors {extra[:4]}{'...' if len(extra) > 4 else ''}; was it saved for another "
                "base model or PERFT config?"
            )
        for name, target in expected.items():
            value = state[name]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise PerftError(
                    f"{source}: tensor {name} has dtype {getattr(value, 'dtype', type(value).__name__)}, "
                    "not a floating-point type; the adapter is corrupted"
                )
            if tuple(value.shape) != tuple(target.shape):
                raise PerftError(
                    f"{source}: tensor {name} has shape {tuple(value.shape)} but this model needs "
                    f"{tuple(target.shape)}; the adapter was built for another base model or config"
                )
            if not torch.isfinite(value.float()).all():
                raise PerftError(f"{source}: tensor {name} contains NaN or Inf values; the adapter is corrupted")
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(state[name].to(device=target.device, dtype=target.dtype))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` (each atomically)."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise PerftError(f"cannot save the adapter to {directory}: it exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", "perft_config": json.dumps(self.perft_config.to_dict(), sort_keys=True)}
        atomic_save_safetensors(directory / WEIGHTS_NAME, self.adapter_state_dict(), metadata=metadata)
        self.perft_config.save(directory)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module | str, adapter_directory: str | Path, *, is_trainable: bool = False, **base_kwargs: Any
    ) -> PerftModel:
        """Attach a saved adapter to `base_model` (a model, or a path/hub name to load it from)."""
        directory = Path(adapter_directory)
        if not directory.is_dir():
            raise PerftError(f"adapter directory {directory} does not exist")
        config = PerftConfig.load(directory)
        if isinstance(base_model, (str, Path)):
            from perft.loading import load_base_model

            base_model = load_base_model(str(base_model), **base_kwargs)
        check_compatible(config, base_model)
        from perft.evaluation.adapter_dirs import (
            warn_if_other_base,  # by content fingerprint (perft.fingerprint)
        )

        warn_if_other_base(getattr(getattr(base_model, "config", None), "_name_or_path", "") or "", directory,
                           "perft")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            from perft.io import pickle_siblings

            pickles = pickle_siblings(weights)
            if pickles:
                raise PerftError(
                    f"no {WEIGHTS_NAME} in {directory}, only the pickle-based {pickles[0]}, which perft refuses to "
                    "load (pickle files can run arbitrary code): convert it to .safetensors with a tool you trust"
                )
            present = sorted(p.name for p in directory.iterdir())
            raise PerftError(f"no {WEIGHTS_NAME} in {directory} (found: {present}); the adapter was not saved completely")
        state = load_safetensors(weights)
        model = cls(base_model, config)
        model.load_adapter_state_dict(state, source=str(weights))
        if not is_trainable:
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
        return model

    # ------------------------------------------------------------------ routing
    def record_routing(self) -> contextlib.AbstractContextManager[None]:
        """Inside `with model.record_routing():` every adapted layer keeps its routing of the last
        forward pass (`PerftLayer.last_routing`); on leaving, recording stops and is cleared."""
        return recording(self._layers)

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        """Adapter routing statistics of the last forward pass, per adapted block path.

        Call it inside `with model.record_routing():`; see `perft.routing` (utilisation,
        entropy, balance coefficient, dead experts).
        """
        return last_routing_stats(self)


def get_perft_model(base_model: nn.Module, config: PerftConfig) -> PerftModel:
    """Freeze `base_model` and attach PERFT adapter experts to its MoE blocks."""
    if not isinstance(config, PerftConfig):
        raise PerftError(f"config must be a PerftConfig, got {type(config).__name__}")
    if not isinstance(base_model, nn.Module):
        raise PerftError(f"base_model must be a torch model (e.g. AutoModelForCausalLM), got {type(base_model).__name__}")
    return PerftModel(base_model, config)


def check_compatible(config: PerftConfig, base_model: nn.Module) -> None:
    """An adapter saved for another model type or other shapes fails here, naming the mismatch."""
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if config.model_type and model_type and config.model_type != model_type:
        raise PerftError(
            f"this adapter was trained on a {config.model_type} model ({config.base_model_name_or_path}), "
            f"not on this {model_type} model: load it onto the base model it was made for"
        )
    if not config.base_shapes:
        return
    blocks = require_moe_blocks(base_model)
    actual = _base_shapes(base_model, blocks)
    for key in ("hidden_size", "num_experts"):
        want, have = config.base_shapes.get(key), actual.get(key)
        if want is not None and want != have:
            raise PerftError(
                f"this adapter was built for {key}={want} but the base model has {key}={have}; "
                f"load it onto {config.base_model_name_or_path or 'the base model it was made for'}"
            )
    missing = sorted(set(config.base_shapes.get("moe_blocks", [])) - set(actual["moe_blocks"]))
    if missing:
        raise PerftError(f"the base model has no MoE block at {missing[:3]}: the adapter was built for a deeper model")


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _select_layers(blocks: list[MoEBlockInfo], layers: list[int] | None) -> list[MoEBlockInfo]:
    if layers is None:
        return blocks
    available = [b.layer for b in blocks]
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise PerftError(f"layers {unknown} have no MoE block; this model's MoE layers are {available}")
    return [b for b in blocks if b.layer in set(layers)]


def _base_shapes(base_model: nn.Module, blocks: list[MoEBlockInfo]) -> dict[str, Any]:
    return {
        "hidden_size": blocks[0].hidden_size,
        "num_experts": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "moe_blocks": [b.path for b in blocks],
        "num_hidden_layers": getattr(getattr(base_model, "config", None), "num_hidden_layers", None),
    }


def _fill_base_facts(config: PerftConfig, base_model: nn.Module, blocks: list[MoEBlockInfo]) -> None:
    base_config = getattr(base_model, "config", None)
    name = getattr(base_config, "_name_or_path", None) or getattr(base_model, "name_or_path", None)
    config.base_model_name_or_path = config.base_model_name_or_path or (str(name) if name else None)
    config.model_type = getattr(base_config, "model_type", None)
    config.base_shapes = _base_shapes(base_model, require_moe_blocks(base_model))
    config.base_shapes["adapted_blocks"] = [b.path for b in blocks]
    from perft.fingerprint import base_fingerprint

    fingerprint = base_fingerprint(name) if name else None  # content, not path (perft.fingerprint)
    if fingerprint:
        config.base_shapes["fingerprint"] = fingerprint


def _adapter_dtype(config: PerftConfig, base_model: nn.Module) -> torch.dtype:
    if config.adapter_dtype != "auto":
        return _DTYPES[config.adapter_dtype]
    return next(base_model.parameters()).dtype
