"""How a PerftModel's adapters are written and read back.

The save format (README.md "Save format"): `adapter_config.json` + `adapter_model.safetensors`
per adapter, the "default" one in the folder itself and any other in `<folder>/<name>/`, as
PEFT lays out named adapters. A checkpoint that plain `transformers.Trainer` writes holds the
model's whole `state_dict()`; the hooks here make that state dict savable (contiguous
tensors) and self-describing (the adapters' configs ride along as one uint8 tensor), so
`PerftModel.from_pretrained(base, checkpoint_dir)` and Trainer's resume read it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from perft.arch import MoEBlockInfo, require_moe_blocks
from perft.config import WEIGHTS_NAME, PerftConfig
from perft.errors import PerftError
from perft.io import atomic_save_safetensors, load_safetensors

if TYPE_CHECKING:
    from perft.model import PerftModel

CONFIGS_KEY = "perft_adapter_configs"  # state_dict entry: the adapters' configs as UTF-8 JSON bytes


def write_adapter(directory: Path, config: PerftConfig, state: dict[str, torch.Tensor]) -> None:
    """One adapter folder, each file written atomically."""
    if directory.exists() and not directory.is_dir():
        raise PerftError(f"cannot save the adapter to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "perft_config": json.dumps(config.to_dict(), sort_keys=True)}
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata=metadata)
    config.save(directory)


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
    actual = base_shapes(base_model, blocks)
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


def read_adapter_dir(directory: Path) -> tuple[PerftConfig, dict[str, torch.Tensor], str]:
    if not directory.is_dir():
        raise PerftError(f"adapter directory {directory} does not exist")
    config = PerftConfig.load(directory)
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
    return config, load_safetensors(weights), str(weights)


def from_trainer_checkpoint(cls: type[PerftModel], base_model: nn.Module, path: Path) -> PerftModel:
    """Rebuild the adapters a `transformers.Trainer` checkpoint of a PerftModel holds (full state dict)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        config_key = next((k for k in keys if k.endswith(CONFIGS_KEY)), None)
        if config_key is None:
            raise PerftError(f"{path} holds no PERFT adapter (no {CONFIGS_KEY} entry): it is not a checkpoint of a "
                             "PerftModel; give the folder save_pretrained wrote")
        saved = json.loads(bytes(handle.get_tensor(config_key).tolist()).decode("utf-8"))
        prefix = config_key[: -len(CONFIGS_KEY)]
        model: PerftModel | None = None
        for name, data in saved["adapters"].items():
            config = PerftConfig.from_dict(data)
            check_compatible(config, base_model)
            if model is None:
                model = cls(base_model, config, name)
            else:
                model.add_adapter(name, config)
        assert model is not None
        for name in model._adapters:
            expected = model._named_adapter_tensors(name)
            missing = sorted(k for k in expected if prefix + k not in keys)
            if missing:
                raise PerftError(f"{path} misses adapter tensors {missing[:3]}: the checkpoint is incomplete")
            model.load_adapter_state_dict(
                {model_key: handle.get_tensor(prefix + k) for k, model_key in expected.items()},
                source=str(path), adapter_name=name)
    model.set_adapter(saved.get("active", model.active_adapter))
    return model


def state_dict_hook(module: PerftModel, state: dict, prefix: str, local_metadata: Any) -> None:
    """Make adapter tensors contiguous (safetensors refuses the transposed `up` view) and add the configs,
    so a checkpoint `transformers.Trainer` writes from `state_dict()` is self-describing."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()
    data = {"active": module.active_adapter, "adapters": {n: c.to_dict() for n, c in module.peft_config.items()}}
    state[prefix + CONFIGS_KEY] = torch.tensor(list(json.dumps(data, sort_keys=True).encode("utf-8")),
                                               dtype=torch.uint8)


def load_state_dict_pre_hook(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    state.pop(prefix + CONFIGS_KEY, None)


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
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


def base_shapes(base_model: nn.Module, blocks: list[MoEBlockInfo]) -> dict[str, Any]:
    return {
        "hidden_size": blocks[0].hidden_size,
        "num_experts": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "moe_blocks": [b.path for b in blocks],
        "num_hidden_layers": getattr(getattr(base_model, "config", None), "num_hidden_layers", None),
    }


