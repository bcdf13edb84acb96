"""`PerftModel`: a frozen Hugging Face MoE model with PERFT adapter experts attached.

Mirrors PEFT's user API (`get_perft_model`, `save_pretrained`, `from_pretrained`,
`print_trainable_parameters`, `disable_adapter`, `unload`, named adapters with `add_adapter`,
`load_adapter`, `set_adapter`, `delete_adapter`, and mixed-batch inference with
`adapter_names=[...]`) so it drops into existing training and evaluation scripts, including
`transformers.Trainer` and TRL's trainers (see docs/coming-from-peft.md).

`base_model` is the wrapped causal LM (perft's documented meaning, used everywhere). TRL
patches a model's `forward` with its fused LM head, which calls `model.base_model` expecting
the backbone (transformers' meaning); PerftModel runs such a patch on the wrapped causal LM,
where `base_model` is the backbone, after its own per-forward set-up (`__setattr__`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perft.arch import MoEBlockInfo, require_moe_blocks
from perft.config import PerftConfig
from perft.errors import PerftError
from perft.layer import ATTR_NAME, PerftLayer, attach_all
from perft.mixed_batch import stack_mixed_adapters
from perft.model_io import (
    check_compatible,
    check_state,
    from_trainer_checkpoint,
    load_state_dict_pre_hook,
    read_adapter_dir,
    state_dict_hook,
    write_adapter,
)
from perft.peft_compat import NotMergeableMixin, is_fused_lm_head_patch, transformers_peft_refusal
from perft.routing.live import last_routing_stats, recording

DEFAULT_ADAPTER = "default"
BASE_ROWS = "__base__"  # in adapter_names: this row runs the base model without any adapter


class PerftModel(NotMergeableMixin, nn.Module):
    """A base causal LM whose MoE blocks carry PERFT adapter experts; only adapters train."""

    def __init__(self, base_model: nn.Module, config: PerftConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        blocks = require_moe_blocks(base_model)
        if any(isinstance(getattr(b.module, ATTR_NAME, None), PerftLayer) for b in blocks):
            raise PerftError("this model already has PERFT adapters attached: call unload() first, or use it as is")
        self.base_model = base_model
        for param in base_model.parameters():
            param.requires_grad_(False)
        self._blocks: list[MoEBlockInfo] = blocks
        self.peft_config: dict[str, PerftConfig] = {}  # adapter name -> config, as PEFT names it
        self._adapters: dict[str, dict[str, PerftLayer]] = {}
        self._handles: dict[str, list] = {}
        self._inference: set[str] = set()
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)
        self._register_state_dict_hook(state_dict_hook)
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or name.startswith("_"):
                raise
            refusal = transformers_peft_refusal(name)
            if refusal is not None:
                raise refusal from None
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_fused_lm_head_patch(value, self):
            # TRL's add_fused_lm_head: a forward written for a transformers model, reading `self.base_model`
            # as the backbone. Keep it and run it on the wrapped causal LM, after PerftModel's own set-up.
            object.__setattr__(self, "_fused_forward", value.__func__)
            return
        super().__setattr__(name, value)

    @property
    def perft_config(self) -> PerftConfig:
        """The active adapter's config."""
        return self.peft_config[self.active_adapter]

    @property
    def _layers(self) -> dict[str, PerftLayer]:
        return self._adapters.get(self.active_adapter, {})

    @property
    def perft_layers(self) -> dict[str, PerftLayer]:
        """Module path of each adapted MoE block -> its PerftLayer, for the active adapter."""
        return dict(self._layers)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (with adapters attached), as PEFT names it."""
        return self.base_model

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward, plus the PERFT-R load-balance loss when it is enabled.

        `adapter_names` (one per row; "__base__" for none) runs each row with its own adapter.
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
        for layer in self._all_layers():
            layer.token_mask = attention_mask
            layer.balance_terms = None
        fused = self.__dict__.get("_fused_forward")
        with self._mixed_batch(adapter_names, _batch_size(input_ids, kwargs)):
            if fused is not None and kwargs.get("fused_lm_head"):
                outputs = fused(self.base_model, *args, **kwargs)
            else:
                kwargs.pop("fused_lm_head", None)
                outputs = self.base_model(*args, **kwargs)
        aux = self.router_balance_loss()
        if aux is not None and isinstance(outputs, dict):
            coef = self.perft_config.router_aux_loss_coef
            outputs["perft_aux_loss"] = aux
            if getattr(outputs, "loss", None) is not None:
                outputs["loss"] = outputs.loss + coef * aux.to(outputs.loss.dtype)
            base_coef = getattr(getattr(self.base_model, "config", None), "router_aux_loss_coef", 0.0) or 0.0
            if fused is not None and outputs.get("aux_loss") is not None and base_coef:
                # TRL's SFTTrainer rebuilds its loss from log_probs + router_aux_loss_coef * aux_loss: ride along
                outputs["aux_loss"] = outputs["aux_loss"] + (coef / base_coef) * aux.to(outputs["aux_loss"].dtype)
                outputs["perft_aux_in_aux_loss"] = True
        return outputs

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's generate; `adapter_names` (one per row) as in `forward`."""
        ids = args[0] if args else kwargs.get("input_ids")
        with self._mixed_batch(adapter_names, None if ids is None else ids.shape[0]):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Sequence[str] | None, batch_size: int | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        unknown = sorted(set(names) - set(self.peft_config) - {BASE_ROWS})
        if unknown:
            raise PerftError(f"adapter_names names unknown adapters {unknown}; loaded adapters: "
                             f"{sorted(self.peft_config)} (and {BASE_ROWS!r} for the base model)")
        if batch_size is not None and batch_size != len(names):
            raise PerftError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows: "
                             "give one adapter name per row")
        saved = [(layer, layer.enabled, layer.rows) for layer in self._all_layers()]
        for adapter, layers in self._adapters.items():
            rows = torch.tensor([name == adapter for name in names])
            for layer in layers.values():
                layer.enabled, layer.rows = bool(rows.any()), rows
        handles = stack_mixed_adapters(self._blocks, self._adapters, names)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, enabled, rows in saved:
                layer.enabled, layer.rows = enabled, rows

    def router_balance_loss(self) -> torch.Tensor | None:
        """Switch load-balance loss of the PERFT-R routers over all layers of the last forward."""
        terms = [layer.balance_terms for layer in self._layers.values() if layer.balance_terms is not None]
        if not terms:
            return None
        counts = torch.stack([t[0] for t in terms]).sum(0)
        probs = torch.stack([t[1] for t in terms]).sum(0)
        tokens = torch.stack([t[2] for t in terms]).sum().clamp_min(1.0)
        return counts.shape[0] * torch.sum((counts / tokens) * (probs / tokens))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The base model's gradient checkpointing; refuses `use_reentrant=True` with the balance loss on."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant") and any(
            layer.compute_balance for layer in self._all_layers()
        ):
            raise PerftError(
                "gradient checkpointing with use_reentrant=True drops the gradient of the PERFT-R load-balance "
                "loss (it is computed inside the checkpointed layers, whose side outputs reentrant checkpointing "
                "does not track): use gradient_checkpointing_kwargs={'use_reentrant': False} (the default), or "
                "router_aux_loss_coef=0"
            )
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                      **kwargs)

    # ------------------------------------------------------------------ named adapters (PEFT's names)
    def add_adapter(self, adapter_name: str, peft_config: PerftConfig) -> None:
        """Attach a new adapter `adapter_name` (any variant) beside the others; it is not made active."""
        _check_adapter_name(adapter_name)
        if not isinstance(peft_config, PerftConfig):
            raise PerftError(f"add_adapter takes a PerftConfig, got {type(peft_config).__name__} (a PEFT config "
                             "configures PEFT tuners; PERFT adapters are configured with perft.PerftConfig)")
        if adapter_name in self.peft_config:
            raise PerftError(f"an adapter named {adapter_name!r} is already loaded: delete_adapter it first or "
                             "choose another name")
        config = PerftConfig.from_dict(peft_config.to_dict())  # own copy, re-validated
        attr = ATTR_NAME if adapter_name == DEFAULT_ADAPTER else f"{ATTR_NAME}_{adapter_name}"
        layers, handles = attach_all(config, self.base_model, self._blocks, attr)
        self.peft_config[adapter_name] = config
        self._adapters[adapter_name] = layers
        self._handles[adapter_name] = handles
        self.set_adapter(self.active_adapter if self.active_adapter in self._adapters else adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one adapter that runs (and trains, unless loaded for inference)."""
        self._require_adapter(adapter_name)
        self.active_adapter = adapter_name
        for name, layers in self._adapters.items():
            active = name == adapter_name
            for layer in layers.values():
                layer.enabled = active
                layer.requires_grad_(active and name not in self._inference)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter; deleting the active one makes another remaining adapter active."""
        self._require_adapter(adapter_name)
        if len(self._adapters) == 1:
            raise PerftError(f"{adapter_name!r} is the only adapter: use unload() to get the base model back")
        names = {id(layer) for layer in self._adapters[adapter_name].values()}
        for block in self._blocks:
            for child_name, child in list(block.module.named_children()):
                if id(child) in names:
                    delattr(block.module, child_name)
        for handle in self._handles.pop(adapter_name):
            handle.remove()
        del self._adapters[adapter_name], self.peft_config[adapter_name]
        self._inference.discard(adapter_name)
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self._adapters)))

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        """Load a saved adapter directory under `adapter_name` beside the others (it is not made active)."""
        if kwargs:
            raise PerftError(f"load_adapter does not take {sorted(kwargs)}: PERFT adapters load from a local "
                             "directory written by save_pretrained")
        config, state, source = read_adapter_dir(Path(model_id))
        check_compatible(config, self.base_model)
        self.add_adapter(adapter_name, config)
        try:
            self.load_adapter_state_dict(state, source=source, adapter_name=adapter_name)
        except PerftError:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._inference.add(adapter_name)
            self.set_adapter(self.active_adapter)

    def _require_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self._adapters:
            raise PerftError(f"no adapter named {adapter_name!r}; loaded adapters: {sorted(self._adapters)}")

    def _all_layers(self) -> list[PerftLayer]:
        return [layer for layers in self._adapters.values() for layer in layers.values()]

    # ------------------------------------------------------------------ adapters on/off
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the untouched base model inside this context (PEFT's name)."""
        previous = [(layer, layer.enabled) for layer in self._all_layers()]
        for layer, _ in previous:
            layer.enabled = False
        try:
            yield
        finally:
            for layer, enabled in previous:
                layer.enabled = enabled

    disable_adapters = disable_adapter  # perft's earlier name, kept

    def enable_adapters(self) -> None:
        """Adapters are on outside `disable_adapter()`; this re-activates the active adapter (as set_adapter)."""
        self.set_adapter(self.active_adapter)

    def unload(self) -> nn.Module:
        """Remove every adapter and hook; return the base model exactly as it was given."""
        for name in list(self._adapters):
            for handle in self._handles.pop(name, []):
                handle.remove()
        for block in self._blocks:
            for child_name, child in list(block.module.named_children()):
                if isinstance(child, PerftLayer):
                    delattr(block.module, child_name)
        self._adapters.clear()
        return self.base_model

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; quantized expert weights count as the weights they hold."""
        from perft.quantization import quantized_expert_stores

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + sum(s.shape.numel() for s in quantized_expert_stores(self))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors in the documented save format (`<block path>.lora_A`, ...)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        self._require_adapter(name)
        state: dict[str, torch.Tensor] = {}
        for path, layer in self._adapters[name].items():
            state[f"{path}.{layer.experts.down_name}"] = layer.experts.down
            state[f"{path}.{layer.experts.up_name}"] = layer.experts.up
            if layer.router is not None:
                state[f"{path}.router"] = layer.router.weight
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "adapter",
                                adapter_name: str | None = None) -> None:
        """Copy saved adapter tensors in; any missing, extra or mis-shaped tensor is a clear error."""
        expected = self.adapter_state_dict(adapter_name)
        check_state(state, expected, source)
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(state[name].to(device=target.device, dtype=target.dtype))


    def _named_adapter_tensors(self, adapter_name: str) -> dict[str, str]:
        """`state_dict()` key of each tensor of one adapter -> its key in the save format."""
        names: dict[str, str] = {}
        for path, layer in self._adapters[adapter_name].items():
            attr = next(n for n, c in self.base_model.get_submodule(path).named_children() if c is layer)
            prefix = f"base_model.{path}.{attr}."
            names[prefix + "experts.down"] = f"{path}.{layer.experts.down_name}"
            names[prefix + "experts.up"] = f"{path}.{layer.experts.up_name}"
            if layer.router is not None:
                names[prefix + "router.weight"] = f"{path}.router"
        return names

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True, **kwargs: Any) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` (each atomically) per adapter.

        The "default" adapter goes into `save_directory` itself, any other into
        `save_directory/<name>/`, as PEFT lays them out.
        """
        if not safe_serialization:
            raise PerftError("perft writes adapters only as safetensors (pickle files can run code when loaded): "
                             "drop safe_serialization=False")
        unknown = sorted(set(kwargs) - {"state_dict", "save_embedding_layers"})
        if unknown:
            raise PerftError(f"save_pretrained does not take {unknown}; it takes selected_adapters=[...]")
        names = list(self._adapters) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require_adapter(name)
        if not is_main_process:
            return
        for name in names:
            directory = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
            write_adapter(directory, self.peft_config[name], self.adapter_state_dict(name))

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module | str, adapter_directory: str | Path, *, adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False, **base_kwargs: Any
    ) -> PerftModel:
        """Attach a saved adapter to `base_model` (a model, or a path/hub name to load it from).

        `adapter_directory` is a `save_pretrained` folder or a checkpoint that `transformers.Trainer`
        wrote for a PerftModel (its `model.safetensors` carries the adapters and their configs).
        """
        if isinstance(base_model, PerftModel):
            raise PerftError("base_model is already a PerftModel: add this adapter to it with "
                             "model.load_adapter(adapter_directory, adapter_name=...), or pass model.unload()")
        directory = Path(adapter_directory)
        if not directory.is_dir():
            raise PerftError(f"adapter directory {directory} does not exist")
        if isinstance(base_model, (str, Path)):
            from perft.loading import load_base_model

            base_model = load_base_model(str(base_model), **base_kwargs)
        if not (directory / "adapter_config.json").is_file() and (directory / "model.safetensors").is_file():
            model = from_trainer_checkpoint(cls, base_model, directory / "model.safetensors")
        else:
            config, state, source = read_adapter_dir(directory)
            check_compatible(config, base_model)
            from perft.evaluation.adapter_dirs import warn_if_other_base  # by content (perft.fingerprint)

            warn_if_other_base(getattr(getattr(base_model, "config", None), "_name_or_path", "") or "", directory,
                               "perft")
            model = cls(base_model, config, adapter_name)
            model.load_adapter_state_dict(state, source=source)
        if not is_trainable:
            model.eval()
            model._inference.update(model._adapters)
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


def get_perft_model(base_model: nn.Module, config: PerftConfig, adapter_name: str = DEFAULT_ADAPTER) -> PerftModel:
    """Freeze `base_model` and attach PERFT adapter experts to its MoE blocks."""
    if not isinstance(config, PerftConfig):
        raise PerftError(f"config must be a PerftConfig, got {type(config).__name__}")
    if not isinstance(base_model, nn.Module):
        raise PerftError(f"base_model must be a torch model (e.g. AutoModelForCausalLM), got {type(base_model).__name__}")
    return PerftModel(base_model, config, adapter_name)



def _check_adapter_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name == BASE_ROWS:
        raise PerftError(f"adapter name {name!r} must be a plain identifier (letters, digits, _), not {BASE_ROWS!r}")


def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int | None:
    embeds = kwargs.get("inputs_embeds")
    source = input_ids if input_ids is not None else embeds
    return None if source is None else int(source.shape[0])


def _is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)
