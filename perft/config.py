"""`PerftConfig`: what to attach to a Mixture-of-Experts model, validated before any work."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perft.adapter_kinds import ACTIVATIONS as _ACTIVATION_FUNCTIONS
from perft.adapter_kinds import DROPOUT_MASKS, DROPOUT_SITES, INIT_SCHEMES, adapter_kinds
from perft.errors import PerftError

VARIANTS = ("routed", "embedded", "dense", "single")  # the built-in ones; perft.variants.variant_names() has all
ACTIVATIONS = tuple(_ACTIVATION_FUNCTIONS)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "auto")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


@dataclass
class PerftConfig:
    """Configuration of PERFT adapter experts (arXiv 2411.08212).

    variant: `routed` (PERFT-R, own router, top_k of num_experts), `embedded` (PERFT-E, one
        adapter per base expert, gated by the frozen base router), `dense` (PERFT-D,
        num_experts always active) or `single` (PERFT-S, one always-active adapter).
    adapter: a registered adapter kind (perft/adapter_kinds.py): `lora` ((alpha/rank) B A x) or
        `parallel` (U act(D x)).
    init: how `lora_A` / `adapter_down` start: `normal` (the released PERFT code's N(0, 2/r))
        or `kaiming` (PEFT's Kaiming-uniform). `lora_B` / `adapter_up` always start at zero.
        A saved config without this field (perft before it existed) reads as `kaiming`, the
        scheme those adapters were created with.
    dropout_at: `input` (on x, one mask shared by a block's experts) or `hidden` (after the
        down projection, one mask per expert); None: the kind's own (LoRA input, parallel
        hidden, as the released code). A saved config without it reads as `input`.
    dropout_masks: at the `input` site, `shared` (one mask per block, the default) or
        `per_expert` (each expert its own mask, as the released code; slower, see
        docs/training.md). The `hidden` site always draws one per expert. A saved config
        without it reads as `shared`.
    normalize_top_k: renormalise the kept PERFT-R weights; None follows the base model.
    router_aux_loss_coef: Switch-style load-balance loss on the PERFT-R router, added to the loss.
    layers: indices of the MoE layers that get adapters (None: all).
    adapter_dtype: dtype of adapter weights; `float32` (default) keeps them in full precision
        while the base runs in bf16, as the paper does; `auto` follows the base model.
    """

    variant: str = "routed"
    adapter: str = "lora"
    num_experts: int = 4
    top_k: int = 2
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.05
    init: str = "normal"
    dropout_at: str | None = None
    dropout_masks: str = "shared"
    activation: str = "silu"
    normalize_top_k: bool | None = None
    router_aux_loss_coef: float = 0.0
    layers: list[int] | None = None
    adapter_dtype: str = "float32"
    router_init_std: float = 0.02
    # Filled in when the config is attached to a model.
    base_model_name_or_path: str | None = None
    model_type: str | None = None
    base_shapes: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()
        if self.alpha is None:
            self.alpha = float(2 * self.rank)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `PerftError` naming the first impossible setting and how to fix it."""
        from perft.variants import get_variant  # the registry imports adapters; import it lazily

        variant = get_variant(self.variant)
        _check_choice("adapter", self.adapter, adapter_kinds())
        _check_choice("init", self.init, INIT_SCHEMES)
        if self.dropout_at is not None:
            _check_choice("dropout_at", self.dropout_at, DROPOUT_SITES)
        _check_choice("dropout_masks", self.dropout_masks, DROPOUT_MASKS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _check_int("rank", self.rank, minimum=1)
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        variant.validate(self)
        if self.alpha is not None and (not _is_number(self.alpha) or not math.isfinite(self.alpha)):
            raise PerftError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.alpha is not None and not self.alpha > 0:  # issue 15: alpha 0 makes the adapter a constant no-op
            raise PerftError(f"alpha must be > 0 (the adapter's scale alpha/rank), got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise PerftError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not _is_number(self.router_aux_loss_coef) or not (
            math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0
        ):
            raise PerftError(f"router_aux_loss_coef must be a finite number >= 0, got {self.router_aux_loss_coef!r}")
        if not _is_number(self.router_init_std) or not (math.isfinite(self.router_init_std)
                                                        and self.router_init_std > 0):
            raise PerftError(f"router_init_std must be a finite number > 0, got {self.router_init_std!r}")
        if self.normalize_top_k is not None and not isinstance(self.normalize_top_k, bool):
            raise PerftError(f"normalize_top_k must be true, false or null, got {self.normalize_top_k!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise PerftError(f"layers must be a list of MoE layer indices, got {self.layers!r}")
            if len(self.layers) == 0:
                raise PerftError("layers is empty: give at least one MoE layer index, or null for all layers")
            self.layers = sorted(set(self.layers))
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise PerftError(f"format_version must be an integer, got {self.format_version!r}; the adapter config is damaged")
        if self.format_version > FORMAT_VERSION:
            raise PerftError(
                f"this adapter was written by a newer perft (format {self.format_version}, "
                f"this perft reads up to {FORMAT_VERSION}): upgrade perft"
            )

        for name in ("base_model_name_or_path", "model_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise PerftError(f"{name} must be text or null, got {getattr(self, name)!r}")
        if not isinstance(self.base_shapes, dict):
            raise PerftError(f"base_shapes must be a mapping, got {type(self.base_shapes).__name__}; "
                             "the adapter config is damaged")
        for key in ("hidden_size", "num_experts", "top_k", "num_hidden_layers"):
            value = self.base_shapes.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise PerftError(f"base_shapes.{key} must be an integer, got {value!r}; the adapter config is damaged")
        blocks = self.base_shapes.get("moe_blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise PerftError(f"base_shapes.moe_blocks must be a list of module paths, got {blocks!r}")

    @property
    def scaling(self) -> float:
        """LoRA scale alpha/rank."""
        return float(self.alpha) / self.rank

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerftConfig:
        if not isinstance(data, dict):
            raise PerftError(f"a PERFT config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PerftError(f"unknown PERFT config field(s) {unknown}; known fields: {sorted(known)}")
        if "init" not in data:  # written before `init` existed: those adapters started Kaiming-uniform
            data = {**data, "init": "kaiming", "dropout_at": data.get("dropout_at", "input")}
        try:
            return cls(**data)
        except TypeError as err:  # pragma: no cover - dataclass argument errors
            raise PerftError(f"invalid PERFT config: {err}") from None

    def save(self, directory: str | Path) -> Path:
        from perft.io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PerftConfig:
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise PerftError(f"no {CONFIG_NAME} in {path.parent}: is this a PERFT adapter directory?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, absurd numbers, absurd nesting
            raise PerftError(f"{path} is not valid JSON ({err}); the adapter directory is damaged") from None
        return cls.from_dict(data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PerftError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PerftError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
