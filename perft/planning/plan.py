"""`plan_memory`: parameter counts (exact) and per-device memory (exact or estimated) of a run.

Per device, for `gpus` processes under `strategy`:

- frozen weights: base parameters and buffers x their dtype (exact); with `--load-in-4bit` /
  `--load-in-8bit` the fused expert weights at the quantized store's own size (exact: codes
  plus absmax/scales, `perft.quantization.quantized_store_bytes`), the rest in the model dtype;
  under FSDP each device
  holds 1/gpus of the decoder layers plus, while they run, two unsharded decoder layers
  (the one computing and the one prefetched) and the root's embeddings/head (estimated);
- adapter weights, gradients and AdamW's two moments: trainable count x bytes (exact for
  count-exact methods); under DDP its gradient buckets add one more gradient-sized copy
  (estimated); adapters are never sharded (perft's FSDP keeps them whole on every device);
- activations of one micro-batch, with and without gradient checkpointing (estimated,
  `perft.planning.activations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from perft.errors import PerftError
from perft.planning.activations import activation_model, decoder_layers
from perft.planning.methods import TrainableEstimate, meta_model, trainable_estimate

GIB = 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Figure:
    """One number of the plan, and whether it is exact or estimated."""

    name: str
    value: int
    exact: bool
    unit: str = "bytes"
    note: str = ""

    @property
    def label(self) -> str:
        return "exact" if self.exact else "estimated"


@dataclass
class MemoryPlan:
    """The planner's answer for one model, method and device layout."""

    model_type: str
    dtype: str
    method: str
    gpus: int
    strategy: str
    micro_batch_size: int
    cutoff_len: int
    counts: list[Figure] = field(default_factory=list)
    per_device: list[Figure] = field(default_factory=list)
    totals: dict[str, Figure] = field(default_factory=dict)
    quantization: str = ""  # e.g. "experts in 4-bit nf4"; empty for a full-precision base
    notes: list[str] = field(default_factory=list)

    def figure(self, name: str) -> Figure:
        for fig in self.counts + self.per_device + list(self.totals.values()):
            if fig.name == name:
                return fig
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        def row(f: Figure) -> dict[str, Any]:
            return {"name": f.name, "value": f.value, "unit": f.unit, "kind": f.label, "note": f.note}

        return {
            "model_type": self.model_type, "dtype": self.dtype, "method": self.method, "gpus": self.gpus,
            "strategy": self.strategy, "micro_batch_size": self.micro_batch_size, "cutoff_len": self.cutoff_len,
            "counts": [row(f) for f in self.counts], "per_device": [row(f) for f in self.per_device],
            "totals": {k: row(f) for k, f in self.totals.items()}, "quantization": self.quantization,
            "notes": self.notes,
        }


def resolve_model_dtype(setting: str, config: Any) -> str:
    """The frozen base's dtype name: as given, or for `auto` the checkpoint's own (`dtype` in config.json)."""
    if setting != "auto":
        return setting
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def expert_store(module: Any, quantization: tuple[int, str] | None) -> tuple[int, int, int]:
    """(fused expert weights, their bytes in the model dtype, their bytes quantized) in `module`'s MoE blocks."""
    if quantization is None:
        return 0, 0, 0
    from perft.arch import find_moe_blocks
    from perft.quantization import fused_expert_weights, quantized_store_bytes

    count = full = stored = 0
    for block in find_moe_blocks(module):
        for _, weight in fused_expert_weights(block.experts):
            count += weight.numel()
            full += weight.numel() * weight.element_size()
            stored += quantized_store_bytes(tuple(weight.shape), *quantization)
    return count, full, stored


def plan_memory(config: Any, settings: Any, *, gpus: int = 1, micro_batch_size: int | None = None) -> MemoryPlan:
    """Plan `settings` (a `TrainingConfig`: method flags, model_dtype, cutoff_len, strategy) for a
    transformers `config`, on `gpus` devices; nothing is allocated, nothing is read but the config."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise PerftError(f"gpus must be an integer >= 1, got {gpus!r}")
    dtype_name = resolve_model_dtype(settings.model_dtype, config)
    dtype = DTYPES[dtype_name]
    from perft.quantization import expert_quantization

    quant = expert_quantization(getattr(settings, "load_in_4bit", False), getattr(settings, "load_in_8bit", False),
                                getattr(settings, "bnb_4bit_quant_type", "nf4"))
    skeleton = meta_model(config, dtype=dtype, trust_remote_code=settings.trust_remote_code)
    base_params = sum(p.numel() for p in skeleton.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    # with a quantized base the fused experts are held in the store (buffers, never sharded by FSDP)
    expert_count, expert_full, store_bytes = expert_store(skeleton, quant)
    weight_bytes = full_bytes - expert_full
    layer_bytes = [sum(p.numel() * p.element_size() for p in layer.parameters()) - expert_store(layer, quant)[1]
                   for layer in decoder_layers(skeleton)]
    est: TrainableEstimate = trainable_estimate(skeleton, settings)
    model = est.model if est.model is not None else skeleton
    micro = micro_batch_size if micro_batch_size is not None else settings.micro_batch_size_for(gpus)
    tokens = micro * settings.cutoff_len
    act_bytes = 2 if settings.bf16 == "true" else dtype.itemsize
    acts = activation_model(model, act_bytes)

    plan = MemoryPlan(getattr(config, "model_type", "?"), dtype_name, est.description, gpus, settings.strategy,
                      micro, settings.cutoff_len)
    if quant is not None:
        label = f"4-bit {quant[1]}" if quant[0] == 4 else "8-bit int8"
        plan.quantization = f"fused experts in {label}"
        plan.notes.append(f"the checkpoint is read in {dtype_name} on the CPU and its experts quantized there: "
                          f"host memory holds the full-precision base ({full_bytes / GIB:.2f} GiB) while loading")
    share = est.trainable / base_params if base_params else 0.0
    plan.counts = [
        Figure("base parameters", base_params, True, "params"),
        Figure("trainable parameters", est.trainable, est.exact, "params", f"{100 * share:.4f}% of the base"),
        Figure("total parameters", base_params + est.trainable, est.exact, "params"),
    ]
    fsdp = settings.strategy == "fsdp" and gpus > 1
    frozen = weight_bytes + buffer_bytes + store_bytes
    if quant is not None:
        rest = base_params - expert_count
        what = (f"{expert_count:,} expert weights in {plan.quantization.removeprefix('fused experts in ')} "
                f"({store_bytes / GIB:.2f} GiB with scales) + {rest:,} params in {dtype_name} + buffers")
    else:
        what = f"{base_params:,} params in {dtype_name} + buffers"
    if fsdp:
        sharded = sum(layer_bytes)
        root = weight_bytes - sharded  # embeddings, final norm, LM head: gathered for the whole step
        biggest = max(layer_bytes, default=0)
        whole = " + the whole quantized expert store (buffers are not sharded)" if quant is not None else ""
        frozen_dev = Figure("frozen weights", -(-sharded // gpus) + root + 2 * biggest + buffer_bytes + store_bytes,
                            False, note=f"1/{gpus} of the decoder layers + 2 gathered layers + embeddings/head "
                                        f"({dtype_name}){whole}")
    else:
        frozen_dev = Figure("frozen weights", frozen, True, note=what)
    adapter = est.trainable * est.bytes_per_param
    grads = Figure("gradients", adapter * (2 if settings.strategy == "ddp" and gpus > 1 else 1),
                   est.exact and not (settings.strategy == "ddp" and gpus > 1),
                   note="+ DDP's gradient buckets" if settings.strategy == "ddp" and gpus > 1 else "")
    plan.per_device = [
        frozen_dev,
        Figure("adapter weights", adapter, est.exact, note=f"{est.bytes_per_param} bytes per parameter"),
        grads,
        Figure("optimizer state", 2 * adapter, est.exact, note="AdamW: two moments per trainable parameter"),
        Figure("activations", acts.bytes(tokens, checkpointing=False), False,
               note=f"micro-batch {micro} x {settings.cutoff_len} tokens, no checkpointing"),
        Figure("activations (checkpointing)", acts.bytes(tokens, checkpointing=True), False,
               note="--gradient-checkpointing"),
    ]
    fixed = sum(f.value for f in plan.per_device[:4])
    plan.totals = {
        "no checkpointing": Figure("total", fixed + plan.per_device[4].value, False),
        "checkpointing": Figure("total (checkpointing)", fixed + plan.per_device[5].value, False),
    }
    return plan


def _size(value: int, unit: str) -> str:
    if unit == "params":
        return f"{value:,}"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 10 else f"{value / 1024**2:.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the table `perft plan` prints."""
    stored = f" ({plan.quantization})" if plan.quantization else ""
    lines = [f"model: {plan.model_type}, frozen base in {plan.dtype}{stored}; method: {plan.method}",
             f"layout: {plan.gpus} device(s), {plan.strategy}; micro-batch {plan.micro_batch_size} x "
             f"{plan.cutoff_len} tokens", "", "parameters"]
    for f in plan.counts:
        lines.append(f"  {f.name:<30} {_size(f.value, f.unit):>18}  {f.label:<9}  {f.note}".rstrip())
    lines += ["", "memory per device"]
    for f in plan.per_device + list(plan.totals.values()):
        lines.append(f"  {f.name:<30} {_size(f.value, f.unit):>18}  {f.label:<9}  {f.note}".rstrip())
    if plan.notes:
        lines += [""] + [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
