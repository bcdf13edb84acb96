"""Activation memory of one training micro-batch, from the model's module structure (an estimate).

The base is frozen, so its linear layers keep nothing for backward (the gradient to their
input needs only the weight); what autograd keeps per token is what the non-linear and
element-wise operators need: the fp32 copies inside the RMSNorms, the attention inputs and
output (q, k, v, o and the log-sum-exp of a fused SDPA kernel), per routed expert its gate,
up and activation (3 x expert width) and its output (for the routing-weight product), the
router's fp32 probabilities, the inputs of trainable linear layers (LoRA), and PERFT's
adapter input and fp32 [N x r] middle. The loss head keeps the logits in the model dtype and
fp32 log-probabilities, and its backward holds two more fp32 logit-sized buffers at the peak.
With gradient checkpointing a decoder layer keeps only its input and recomputes the rest
during its own backward, so one layer's activations are alive at a time.

Everything is derived from module shapes on the meta device, so it holds for any
architecture built from the usual parts; `tests/planning` checks it against peak memory
measured on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FP32 = 4


@dataclass
class ActivationModel:
    """Bytes per token: each decoder layer's saved activations, a layer's checkpointed input, the loss head."""

    per_layer: list[int]
    checkpoint_input: int
    head: int

    def bytes(self, tokens: int, *, checkpointing: bool) -> int:
        """Peak activation bytes of one micro-batch of `tokens` tokens (forward + backward).

        On top of what is kept, a layer's backward holds gradients of its intermediate
        tensors while it runs: a third of the largest layer's kept bytes, measured on CPU.
        """
        biggest = max(self.per_layer, default=0)
        if checkpointing:
            layers = len(self.per_layer) * self.checkpoint_input + biggest
        else:
            layers = sum(self.per_layer)
        return tokens * (layers + biggest // 3 + self.head)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from perft.training.distributed import decoder_layers as find

    return find(model)


def _linear_width(module: nn.Module, names: tuple[str, ...], attr: str = "out_features") -> int:
    total = 0
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in names and hasattr(child, attr):
            total += int(getattr(child, attr))
    return total


def _attention_bytes(layer: nn.Module, b: int) -> int:
    attn = next((m for n, m in layer.named_children() if "attn" in n or "attention" in n), None)
    if attn is None:
        return 0
    q = _linear_width(attn, ("q_proj", "q_b_proj", "query"))
    kv = _linear_width(attn, ("k_proj", "v_proj", "kv_b_proj", "key", "value"))
    o = _linear_width(attn, ("o_proj", "dense", "out_proj"), attr="in_features")
    heads = int(getattr(attn, "num_heads", 0) or getattr(getattr(attn, "config", None), "num_attention_heads", 0) or 0)
    # k, v are expanded to every query head for SDPA when grouped: count them at q's width
    return b * (q + max(kv, 2 * q) + o) + FP32 * heads


def _norm_bytes(layer: nn.Module, d: int, q: int, k: int) -> int:
    total = 0
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" not in leaf or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        if any(part.startswith("perft_adapter") for part in name.split(".")):
            continue
        width = q if leaf.startswith("q_") else k if leaf.startswith("k_") else d
        total += FP32 * width
    return total


def _moe_bytes(layer: nn.Module, b: int) -> int:
    from perft.arch import find_moe_blocks

    total = 0
    for block in find_moe_blocks(layer):
        experts = block.experts
        down = getattr(experts, "down_proj", None)
        width = int(down.shape[-1]) if down is not None and down.dim() == 3 else 0
        total += block.top_k * b * (3 * width + block.hidden_size) + FP32 * 2 * block.num_experts
    return total


def _dense_mlp_bytes(layer: nn.Module, b: int) -> int:
    """Shared experts and dense MLPs: gate, up and the activation kept per token."""
    total = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] == "up_proj" and isinstance(module, nn.Linear):
            total += 3 * b * module.out_features
    return total


def _trainable_linear_bytes(layer: nn.Module) -> int:
    """LoRA and other trainable linear layers keep their input for the weight gradient."""
    total = 0
    for module in layer.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            total += module.in_features * module.weight.element_size()
    return total


def _perft_bytes(layer: nn.Module, b: int) -> int:
    from perft.layer import PerftLayer

    total = 0
    for module in layer.modules():
        if isinstance(module, PerftLayer):
            ex = module.experts
            fp = ex.down.element_size()
            routed = 3 * FP32 * ex.num_experts if module.router is not None else 0
            total += b * ex.hidden_size + max(fp, FP32) * ex.num_experts * ex.rank + routed
    return total


def activation_model(model: nn.Module, act_bytes: int) -> ActivationModel:
    """The `ActivationModel` of a (meta-device) causal LM with its method attached, at `act_bytes` per element."""
    config = model.config
    d = int(config.hidden_size)
    layers = decoder_layers(model)
    per_layer = []
    grads_flow = False  # the input of the first layers carries no gradient until a trainable tensor joins
    for layer in layers:
        attn = next((m for n, m in layer.named_children() if "attn" in n or "attention" in n), layer)
        grads_flow = grads_flow or any(p.requires_grad for p in attn.parameters())
        q = _linear_width(attn, ("q_proj", "q_b_proj"))
        k = _linear_width(attn, ("k_proj",))
        base = 0
        if grads_flow:  # the frozen operators keep their inputs only when a gradient must pass through them
            base = (_norm_bytes(layer, d, q, k) + _attention_bytes(layer, act_bytes) + _moe_bytes(layer, act_bytes)
                    + _dense_mlp_bytes(layer, act_bytes))
        per_layer.append(base + _trainable_linear_bytes(layer) + _perft_bytes(layer, act_bytes))
        grads_flow = grads_flow or any(p.requires_grad for p in layer.parameters())
    vocab = int(config.vocab_size)
    head = vocab * (act_bytes + 3 * FP32) + FP32 * d
    return ActivationModel(per_layer, act_bytes * d, head)
