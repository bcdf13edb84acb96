"""The fine-tuning methods `perft train` knows: PERFT and the PEFT LoRA baselines, by name.

A method says how to attach its trainable parameters to a frozen base model, how to save
and load them, and how to count them. Training, checkpoints, evaluation, the demo and the
benchmarks go through this registry and never compare method names themselves, so a new
method (ESFT, a hybrid, ...) is one `Method` subclass and one `register_method` call; its
settings come from `TrainingConfig` (see docs/extending.md, "Adding a method").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from perft.errors import PerftError

if TYPE_CHECKING:
    from perft.training.args import TrainingConfig

ADAPTER_CONFIG = "adapter_config.json"


class Method:
    """One way to fine-tune a frozen base model. Subclass, set `name`, implement `build`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_moe: ClassVar[bool] = True  # refuse a base model without MoE blocks before loading it

    # ------------------------------------------------------------------ settings
    def validate(self, cfg: TrainingConfig) -> None:
        """Refuse settings this method cannot honour (called by `TrainingConfig.validate`)."""

    def describe(self, cfg: TrainingConfig) -> str:
        """One phrase for the start of a training log."""
        return f"{self.name} (r={cfg.rank})"

    # ------------------------------------------------------------------ models
    def preflight(self, skeleton: nn.Module, cfg: TrainingConfig) -> None:
        """Fail fast on a base built on the meta device (no weights) that this method cannot adapt."""
        if self.needs_moe:
            from perft.arch import require_moe_blocks

            require_moe_blocks(skeleton)

    def build(self, base: nn.Module, cfg: TrainingConfig) -> nn.Module:
        """Freeze `base` and attach this method's trainable parameters; returns the model to train."""
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` was built by this method (checkpoints dispatch on it). By default: the
        `perft_method` attribute that `build` may set on the model it returns."""
        return getattr(model, "perft_method", None) == self.name

    def recognises(self, directory: Path) -> bool:
        """Whether the saved adapter in `directory` was written by this method. By default: its
        adapter_config.json says `"perft_method": <name>`."""
        return _read_config(directory).get("perft_method") == self.name

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """Attach the adapter saved in `directory` to `base`, for inference (frozen, eval mode)."""
        raise NotImplementedError

    def check_compatible(self, directory: Path, base_config: dict[str, Any], model: str) -> None:
        """Before loading the base `model`: refuse an adapter made for another base (`config.json` as a dict)."""

    def unload(self, model: nn.Module) -> nn.Module:
        """Undo `load`: the base model as it was before (`perft analyze` attaches adapters in turn)."""
        raise PerftError(f"a {self.name} adapter cannot be detached from its base model; load a fresh base instead")

    # ------------------------------------------------------------------ tensors
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained tensors, as saved (by default: every parameter that requires a gradient)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved tensors in (a checkpoint being resumed); a mismatch is a `PerftError`."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the adapter into `directory` (it exists) so that `load` reads it back."""
        raise NotImplementedError

    def parameter_count(self, model: nn.Module) -> tuple[int, int]:
        """(adapter parameters, all parameters) of a model built or loaded by this method."""
        from perft.quantization import quantized_expert_stores

        adapter = sum(v.numel() for v in self.adapter_state(model).values())
        quantized = sum(store.shape.numel() for store in quantized_expert_stores(model))  # not nn.Parameters
        return adapter, sum(p.numel() for p in model.parameters()) + quantized


_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make `cls` available by its `name` (to `--method`, YAML, checkpoints). Usable as a decorator."""
    if not cls.name:
        raise PerftError(f"method class {cls.__name__} has no name")
    _METHODS[cls.name] = cls()
    return cls


def unregister_method(name: str) -> None:
    """Forget a registered method (tests that register a toy one clean up with it)."""
    if name == "perft":
        raise PerftError("the perft method cannot be unregistered")
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise PerftError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}") from None


def method_of(model: nn.Module) -> Method:
    """The method that built `model` (the latest registration first: a hybrid that wraps a PERFT model
    is its own method; PERFT is asked last)."""
    for method in reversed(_METHODS.values()):
        if method.owns(model):
            return method
    raise PerftError(f"{type(model).__name__} was not built by any registered method ({', '.join(_METHODS)})")


def method_for_adapter(directory: str | Path) -> Method:
    """The method that wrote the adapter in `directory` (a clear error if it is not an adapter folder)."""
    path = Path(directory)
    if not path.is_dir():
        raise PerftError(f"adapter directory {path} does not exist; pass the folder `perft train` wrote")
    for method in reversed(_METHODS.values()):  # the latest registration wins; PERFT is the fallback
        if method is not _METHODS["perft"] and method.recognises(path):
            return method
    return get_method("perft")  # PerftConfig.load names what is wrong with the file


def check_adapter_matches(model: str | Path, adapter: str | Path, command: str = "perft") -> Method:
    """The one pre-load check of every command: refuse an adapter made for another base model before the
    (slow) model load, and warn in one line when the base it records is another one. Returns the adapter's
    method. A hub name (no local config.json) is checked after loading."""
    from perft.evaluation.adapter_dirs import warn_if_other_base

    method = method_for_adapter(adapter)
    warn_if_other_base(model, adapter, command)
    base_config = Path(model) / "config.json"
    if not base_config.is_file():
        return method
    try:
        base = json.loads(base_config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return method  # the model load reports it
    if isinstance(base, dict):
        method.check_compatible(Path(adapter), base, str(model))
    return method


def load_adapted(base: nn.Module, adapter: str | Path) -> nn.Module:
    """Attach a saved adapter of any registered method to `base`, for inference."""
    return method_for_adapter(adapter).load(base, Path(adapter))


# ---------------------------------------------------------------------------- PERFT
@register_method
class Perft(Method):
    """PERFT adapter experts on the MoE blocks (perft.model)."""

    name = "perft"
    help = "PERFT adapter experts (variant R/E/D/S)"

    def validate(self, cfg: TrainingConfig) -> None:
        cfg.perft_config()  # PerftConfig's own checks: top_k <= num_experts, rank >= 1, dropout, ...

    def describe(self, cfg: TrainingConfig) -> str:
        return (f"PERFT-{cfg.variant[0].upper()} ({cfg.adapter}, r={cfg.rank}"
                + (f", {cfg.top_k} of {cfg.num_experts} experts" if cfg.variant == "routed" else "")
                + (f", {cfg.num_experts} experts" if cfg.variant == "dense" else "") + ")")

    def preflight(self, skeleton: nn.Module, cfg: TrainingConfig) -> None:
        from perft.model import get_perft_model

        super().preflight(skeleton, cfg)
        get_perft_model(skeleton, cfg.perft_config())

    def build(self, base: nn.Module, cfg: TrainingConfig) -> nn.Module:
        from perft.model import get_perft_model

        return get_perft_model(base, cfg.perft_config())

    def owns(self, model: nn.Module) -> bool:
        from perft.model import PerftModel

        return isinstance(model, PerftModel)

    def recognises(self, directory: Path) -> bool:
        return not _is_peft_adapter(directory)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from perft.model import PerftModel

        return PerftModel.from_pretrained(base, directory).eval()

    def check_compatible(self, directory: Path, base_config: dict[str, Any], model: str) -> None:
        from perft.config import PerftConfig

        config = PerftConfig.load(directory)
        if config.model_type and base_config.get("model_type") and config.model_type != base_config["model_type"]:
            raise PerftError(
                f"adapter {directory} was trained on a {config.model_type} model "
                f"({config.base_model_name_or_path}), not on this {base_config['model_type']} model {model}: "
                "use it with the base model it was made for"
            )
        want = (config.base_shapes or {}).get("hidden_size")
        have = base_config.get("hidden_size") or (base_config.get("text_config") or {}).get("hidden_size")
        if want is not None and have is not None and want != have:
            raise PerftError(
                f"adapter {directory} was built for hidden_size={want} but {model} has hidden_size={have}: "
                f"use it with {config.base_model_name_or_path or 'the base model it was made for'}"
            )

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.adapter_state_dict()

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        model.load_adapter_state_dict(state, source=source)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def unload(self, model: nn.Module) -> nn.Module:
        return model.unload()


# ---------------------------------------------------------------------------- PEFT LoRA baselines
class PeftLora(Method):
    """A PEFT LoRA baseline (perft.baselines); saved and loaded the PEFT way."""

    target: ClassVar[str] = ""

    def validate(self, cfg: TrainingConfig) -> None:
        rank, alpha, dropout = cfg.rank, cfg.alpha, cfg.dropout
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise PerftError(f"rank must be an integer >= 1, got {rank!r}")
        if rank > 2**31 - 1:
            raise PerftError(f"rank must be an integer <= {2**31 - 1}, got {rank!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                      and math.isfinite(alpha) and alpha > 0):
            raise PerftError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not (isinstance(dropout, float) and 0 <= dropout < 1):
            raise PerftError(f"dropout must be a number in [0, 1), got {dropout!r}")

    def describe(self, cfg: TrainingConfig) -> str:
        return f"LoRA baseline {self.name} (r={cfg.rank})"

    def build(self, base: nn.Module, cfg: TrainingConfig) -> nn.Module:
        from perft.baselines import get_lora_baseline

        return get_lora_baseline(base, self.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)

    def owns(self, model: nn.Module) -> bool:
        from peft import PeftModel

        return isinstance(model, PeftModel) and _lora_target(model.peft_config["default"]) == self.target

    def recognises(self, directory: Path) -> bool:
        if not _is_peft_adapter(directory):
            return False
        return ("experts" if _read_config(directory).get("target_parameters") else "attention") == self.target

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(directory)).eval()

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise PerftError(f"{source} does not fit this LoRA model (unexpected tensors {unexpected[:3]})")

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory), safe_serialization=True)

    def parameter_count(self, model: nn.Module) -> tuple[int, int]:
        from perft.quantization import quantized_expert_stores

        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        quantized = sum(store.shape.numel() for store in quantized_expert_stores(model))
        return adapter, sum(p.numel() for p in model.parameters()) + quantized


@register_method
class LoraAttention(PeftLora):
    name = "lora-attn"
    help = "PEFT LoRA on attention q,v (the paper's baseline)"
    target = "attention"
    needs_moe = False


@register_method
class LoraExperts(PeftLora):
    name = "lora-experts"
    help = "PEFT LoRA on the fused expert tensors"
    target = "experts"

    def validate(self, cfg: TrainingConfig) -> None:
        super().validate(cfg)
        if cfg.dropout != 0:
            raise PerftError(
                "lora-experts (PEFT LoRA on the fused expert tensors) does not support dropout: set --dropout 0"
            )


def check_adapter_tensors(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, *,
                          mismatch: str, prefix: str = "") -> None:
    """Refuse a `state` whose names or shapes differ from the model's tensors `targets`;
    `mismatch` says what a different set of names means for this method."""
    missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or extra:
        raise PerftError(f"{source} {mismatch} (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, target in targets.items():
        if tuple(state[name].shape) != tuple(target.shape):
            raise PerftError(f"{source}: {prefix}{name} has shape {tuple(state[name].shape)}, this model needs "
                             f"{tuple(target.shape)}; use the base model it was made for")


def copy_adapter_tensors(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, *,
                         mismatch: str, prefix: str = "") -> None:
    """Copy `state` into `targets` in place, once `check_adapter_tensors` has passed (nothing is
    written when a name or shape is wrong)."""
    check_adapter_tensors(targets, state, source, mismatch=mismatch, prefix=prefix)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(state[name].to(device=target.device, dtype=target.dtype))


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_peft_adapter(directory: Path) -> bool:
    return "peft_type" in _read_config(directory)


def _lora_target(config: Any) -> str:
    return "experts" if getattr(config, "target_parameters", None) else "attention"


# Methods defined in their own modules register on import (they import this module's Method).
from perft import esft as _esft  # noqa: E402,F401
from perft import hybrid as _hybrid  # noqa: E402,F401
