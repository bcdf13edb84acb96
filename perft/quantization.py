"""Quantized fused experts: a 4-bit / 8-bit expert store under PERFT's full-precision adapters.

Since transformers v5 stores an MoE block's experts as fused 3-D parameters
(`gate_up_proj` [E, 2I, d], `down_proj` [E, d, I]), bitsandbytes' `load_in_4bit` quantizes
only `nn.Linear` layers and leaves the experts (most of an MoE's weights) in full precision.
PERFT never trains expert weights, so they can stay quantized and frozen:
`quantize_moe_experts` swaps each fused weight for a `QuantizedExpertWeights` store
(bitsandbytes' functional quantization, one expert at a time: NF4/FP4 with an absmax per
64-value block, or int8 with an absmax per row) and makes the experts module run its eager
(per-expert loop) forward, in which `store[expert]` dequantizes only the experts the router
picked for the current tokens, in the base's compute dtype. The experts module keeps its
call signature `(hidden_states, top_k_index, top_k_weights)`, so PERFT's hooks see it as before.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
import weakref
from typing import Any

import torch
from torch import nn

from perft.arch import find_moe_blocks
from perft.errors import PerftError

QUANT_TYPES_4BIT = ("nf4", "fp4")
SUPPORTED_BITS = (4, 8)
BLOCKSIZE = 64
FUSED_WEIGHT_NAMES = ("gate_up_proj", "down_proj", "up_proj")


def expert_store_bytes_per_param(bits: int, quant_type: str = "nf4", *, blocksize: int = BLOCKSIZE,
                                 row_length: int | None = None) -> float:
    """Bytes one expert weight takes in the quantized store (for memory planning).

    4-bit: half a byte per value plus one fp32 absmax per `blocksize` values. 8-bit: one byte
    plus one fp32 scale per row (`row_length` values; ignored when unknown). bf16 is 2.0.
    """
    check_quant_settings(bits, quant_type)
    if bits == 4:
        return 0.5 + 4.0 / blocksize
    return 1.0 + (4.0 / row_length if row_length else 0.0)


def quantized_store_bytes(shape: tuple[int, ...], bits: int, quant_type: str = "nf4", *,
                          blocksize: int = BLOCKSIZE) -> int:
    """Exact bytes of the `QuantizedExpertWeights` store of a fused weight of `shape` [E, rows, cols].

    Per expert, 4-bit: the packed codes (two values a byte) and one fp32 absmax per `blocksize`
    values, plus the store's 16-entry fp32 code table once; 8-bit: one byte per value and one
    fp32 scale per row. (`expert_store_bytes_per_param` is the same without the rounding.)
    """
    check_quant_settings(bits, quant_type)
    experts, rows, cols = (int(n) for n in shape)
    values = rows * cols
    if bits == 4:
        return experts * ((values + 1) // 2 + 4 * -(-values // blocksize)) + 16 * 4
    return experts * (values + 4 * rows)


def fused_expert_weights(experts: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The experts module's fused 3-D weights (what `quantize_experts_module` replaces), by name."""
    found = []
    for name in FUSED_WEIGHT_NAMES:
        weight = experts._parameters.get(name)
        if weight is not None and weight.dim() == 3:
            found.append((name, weight))
    return found


def check_quant_settings(bits: int, quant_type: str = "nf4") -> None:
    """Refuse settings the store does not implement, naming the ones it does."""
    if bits not in SUPPORTED_BITS:
        raise PerftError(f"cannot quantize experts to {bits} bits: choose bits=4 (nf4/fp4) or bits=8 (int8)")
    if bits == 4 and quant_type not in QUANT_TYPES_4BIT:
        raise PerftError(f"unknown 4-bit quant_type {quant_type!r}: choose one of {', '.join(QUANT_TYPES_4BIT)}")


def bnb_functional() -> Any:
    """bitsandbytes' functional module, or a PerftError saying how to install it."""
    # Its CPU backend warns at import when the optional hub kernel (`kernels` package) is absent;
    # perft never uses that fused 4-bit GEMM, so the warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as err:
        raise PerftError(
            "quantizing the experts needs bitsandbytes (>=0.46, which runs on CPU too): "
            f"pip install 'perft[quant]' (import failed: {err})"
        ) from None
    return bnb_f


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Scales are kept as raw bytes so `model.to(dtype)` moves them but never rounds them.
    return t.float().contiguous().view(torch.uint8)


class QuantizedExpertWeights(nn.Module):
    """One fused expert weight [E, rows, cols], stored quantized expert by expert.

    `store[e]` is expert e's weight dequantized to `compute_dtype` (what the eager experts
    forward reads as `self.gate_up_proj[expert_idx]`); `dequantize()` is all of them.
    """

    def __init__(self, weight: torch.Tensor, bits: int, quant_type: str = "nf4",
                 *, compute_dtype: torch.dtype | None = None, blocksize: int = BLOCKSIZE) -> None:
        super().__init__()
        check_quant_settings(bits, quant_type)
        bnb_f = bnb_functional()
        if weight.dim() != 3:
            raise PerftError(f"a fused expert weight is 3-D [experts, rows, cols]; got shape {tuple(weight.shape)}")
        self.bits, self.blocksize = bits, blocksize
        self.quant_type = quant_type if bits == 4 else "int8"
        self.expert_shape = tuple(weight.shape[1:])
        self.num_experts = weight.shape[0]
        # An empty floating buffer whose dtype *is* the compute dtype, so `model.to(dtype)` moves it too.
        self.register_buffer("dtype_marker", torch.empty(0, dtype=compute_dtype or weight.dtype, device=weight.device),
                             persistent=False)
        codes, scales = [], []
        with torch.no_grad():
            for e in range(self.num_experts):  # one expert at a time: peak extra memory is one expert
                w = weight[e].detach()
                if bits == 4:
                    packed, state = bnb_f.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=quant_type,
                                                        compress_statistics=False)
                    codes.append(packed.reshape(-1))
                    scales.append(state.absmax.float())
                    code = state.code
                else:
                    int8, row_scale, _ = bnb_f.int8_vectorwise_quant(w.float())
                    codes.append(int8)
                    scales.append(row_scale.float())
        self.register_buffer("codes", torch.stack(codes), persistent=False)
        self.register_buffer("scale_bytes", _as_bytes(torch.stack(scales)), persistent=False)
        if bits == 4:
            self.register_buffer("code_bytes", _as_bytes(code), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype_marker.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, *self.expert_shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dim(self) -> int:
        return 3

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_expert(int(expert))
        recorder = getattr(_RECORDER, "current", None)
        if recorder is not None:
            recorder.record(weight, self, int(expert))
        return weight

    def dequantize_expert(self, expert: int) -> torch.Tensor:
        bnb_f = bnb_functional()
        scale = self.scale_bytes[expert].view(torch.float32)
        if self.bits == 8:
            return bnb_f.int8_vectorwise_dequant(self.codes[expert], scale).to(self.compute_dtype)
        state = bnb_f.QuantState(absmax=scale, shape=torch.Size(self.expert_shape), code=self.code_bytes.view(torch.float32),
                                 blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.compute_dtype)
        return bnb_f.dequantize_4bit(self.codes[expert].unsqueeze(1), state)

    def dequantize(self) -> torch.Tensor:
        return torch.stack([self.dequantize_expert(e) for e in range(self.num_experts)])

    def extra_repr(self) -> str:
        return f"{self.quant_type}, shape={tuple(self.shape)}, compute_dtype={self.compute_dtype}"


def _eager_forward(experts: nn.Module) -> Any:
    """The experts class's own per-expert loop (under transformers' implementation switch)."""
    forward = type(experts).forward
    return getattr(forward, "__wrapped__", forward)


class _DequantizedForBackward:
    """Keeps autograd from holding dequantized expert weights between forward and backward.

    `F.linear(x, W)` saves W to compute x's gradient; for a quantized base that would keep every
    selected expert in full precision until backward, undoing the saving. Inside the experts
    forward, weights made by `store[e]` are saved as (store, expert, view) and dequantized again
    in backward, as bitsandbytes' own 4-bit matmul does.
    """

    def __init__(self) -> None:
        self.made: dict[int, tuple[weakref.ref, QuantizedExpertWeights, int]] = {}

    def record(self, weight: torch.Tensor, store: QuantizedExpertWeights, expert: int) -> None:
        self.made[id(weight)] = (weakref.ref(weight), store, expert)

    def pack(self, t: torch.Tensor) -> Any:
        base = t if t._base is None else t._base
        entry = self.made.get(id(base))
        if entry is None or entry[0]() is not base:
            return t
        return (entry[1], entry[2], t is base, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        store, expert, whole, size, stride, offset = packed
        weight = store.dequantize_expert(expert)
        return weight if whole else weight.as_strided(size, stride, offset)


_RECORDER = threading.local()


def _quantized_experts_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    forward = _eager_forward(self)
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    recorder = _DequantizedForBackward()
    previous, _RECORDER.current = getattr(_RECORDER, "current", None), recorder
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            return forward(self, *args, **kwargs)
    finally:
        _RECORDER.current = previous


def quantized_expert_stores(model: nn.Module) -> list[QuantizedExpertWeights]:
    return [m for m in model.modules() if isinstance(m, QuantizedExpertWeights)]


def _bnb_linear_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def attach_store(experts: nn.Module, name: str, store: QuantizedExpertWeights) -> None:
    """Put `store` in place of the experts module's fused weight `name` and switch it to the quantized forward."""
    experts._parameters.pop(name, None)
    experts.add_module(name, store)
    experts.forward = types.MethodType(_quantized_experts_forward, experts)


def quantize_experts_module(experts: nn.Module, bits: int = 4, quant_type: str = "nf4", *,
                            compute_dtype: torch.dtype | None = None, blocksize: int = BLOCKSIZE) -> int:
    """Quantize one fused-experts module's 3-D weights in place; returns how many it quantized."""
    count = 0
    for name, weight in fused_expert_weights(experts):
        attach_store(experts, name, QuantizedExpertWeights(weight.data, bits, quant_type, compute_dtype=compute_dtype,
                                                           blocksize=blocksize))
        count += 1
    return count


def quantize_moe_experts(model: nn.Module, bits: int = 4, quant_type: str = "nf4", *,
                         compute_dtype: torch.dtype | None = None, blocksize: int = BLOCKSIZE,
                         verbose: bool = True) -> nn.Module:
    """Quantize every MoE block's fused expert weights in place and return the model.

    bits=4 stores NF4 or FP4 (`quant_type`), bits=8 int8. The experts then compute in
    `compute_dtype` (default: the dtype the weights had). Expert biases, routers and the rest
    of the model are untouched; pass a `BitsAndBytesConfig` to `from_pretrained` to quantize
    the model's linear layers too (perft then quantizes the fused experts bitsandbytes skipped).
    Call it before `get_perft_model` (or on the wrapped model: adapters are never quantized).
    """
    check_quant_settings(bits, quant_type)
    bnb_functional()
    blocks = find_moe_blocks(model)
    if not blocks:
        raise PerftError("quantize_moe_experts found no MoE block in this model; it quantizes fused MoE experts only")
    count = sum(quantize_experts_module(block.experts, bits, quant_type, compute_dtype=compute_dtype,
                                        blocksize=blocksize) for block in blocks)
    if count == 0 and not quantized_expert_stores(model):
        raise PerftError("the MoE blocks of this model have no fused 3-D expert weights (gate_up_proj/down_proj) to quantize")
    linears = _bnb_linear_count(model)
    if verbose and count and linears:
        label = f"{bits}-bit {quant_type}" if bits == 4 else "8-bit int8"
        print(f"perft: bitsandbytes quantized {linears} linear layers but skipped the {count} fused expert weights "
              f"of {len(blocks)} MoE blocks; perft quantized those to {label}", file=sys.stderr)
    return model


def expert_storage_bytes(model: nn.Module) -> int:
    """Bytes held by the model's fused expert weights (quantized stores and full-precision ones)."""
    total = 0
    for block in find_moe_blocks(model):
        for name in FUSED_WEIGHT_NAMES:
            weight = getattr(block.experts, name, None)
            if isinstance(weight, QuantizedExpertWeights):
                total += weight.storage_bytes()
            elif isinstance(weight, torch.Tensor):
                total += weight.numel() * weight.element_size()
    return total


# ------------------------------------------------------------------ loading options (CLI flags)
def expert_quantization(load_in_4bit: bool = False, load_in_8bit: bool = False,
                        bnb_4bit_quant_type: str = "nf4") -> tuple[int, str] | None:
    """(bits, quant_type) from the transformers-style loading flags, or None for a full-precision base."""
    if load_in_4bit and load_in_8bit:
        raise PerftError("--load-in-4bit and --load-in-8bit exclude each other: choose one")
    if not load_in_4bit and bnb_4bit_quant_type != "nf4":
        raise PerftError(f"--bnb-4bit-quant-type {bnb_4bit_quant_type} applies only with --load-in-4bit")
    if load_in_4bit:
        check_quant_settings(4, bnb_4bit_quant_type)
        return 4, bnb_4bit_quant_type
    return (8, "nf4") if load_in_8bit else None


QUANTIZATION_HELP = {
    "load_in_4bit": "store the base's fused MoE experts in 4 bits (bitsandbytes NF4/FP4; needs perft[quant]); "
                    "attention and embeddings stay in the model dtype",
    "load_in_8bit": "store the base's fused MoE experts in int8 (bitsandbytes; needs perft[quant])",
    "bnb_4bit_quant_type": "4-bit data type of --load-in-4bit",
}


def add_quantization_arguments(parser: Any) -> None:
    """--load-in-4bit / --load-in-8bit / --bnb-4bit-quant-type on an argparse CLI."""
    parser.add_argument("--load-in-4bit", action="store_true", help=QUANTIZATION_HELP["load_in_4bit"])
    parser.add_argument("--load-in-8bit", action="store_true", help=QUANTIZATION_HELP["load_in_8bit"])
    parser.add_argument("--bnb-4bit-quant-type", default="nf4", choices=QUANT_TYPES_4BIT,
                        help=QUANTIZATION_HELP["bnb_4bit_quant_type"] + " (default: nf4)")


def quantization_kwargs(args: Any) -> dict[str, Any]:
    """The `load_base_model` keyword arguments the flags of `add_quantization_arguments` ask for."""
    return {name: getattr(args, name) for name in QUANTIZATION_HELP if hasattr(args, name)}
