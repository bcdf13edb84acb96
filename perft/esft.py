"""ESFT (Expert-Specialized Fine-Tuning, Wang et al. 2024; deepseek-ai/ESFT) as perft methods.

ESFT trains only the routed experts most relevant to the task and freezes everything else
(attention, routers, the other experts). Relevance is measured on a sample of the training
data with the frozen base, per MoE layer and expert:

- `esft-gate`: the average gate score, the kept routing weight an expert receives per token;
- `esft-token`: the token-selection ratio, the share of (token, top-k slot) pairs routed to it.

Each layer's scores are normalised to shares that sum to 1 (token shares do by construction);
per layer, experts are taken in descending score (ties: lower index first) until their
cumulative share reaches `esft_top_p`, as ESFT's `generate_expert_config.py` does.

The experts of a transformers-v5 model are fused 3-D tensors (`gate_up_proj`, `down_proj`, one
row per expert). Only the chosen rows train: each becomes its own `nn.Parameter` aliasing that
row of the frozen tensor (optimiser state and saved files scale with the chosen experts), and a
parametrization (`ExpertRows`) writes the rows into the fused tensor in place once per forward
of the experts module, so gradients reach the rows without copying the whole fused tensor.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from perft.arch import MoEBlockInfo, require_moe_blocks
from perft.errors import PerftError
from perft.io import atomic_save_safetensors, atomic_write_text, load_safetensors
from perft.methods import ADAPTER_CONFIG, Method, _read_config, copy_adapter_tensors, register_method

if TYPE_CHECKING:
    from perft.training.args import TrainingConfig

WEIGHTS = "adapter_model.safetensors"
SCORE_FUNCTIONS = ("gate", "token")


# ---------------------------------------------------------------------------- scoring
class RouterRecorder:
    """Sums, per MoE block, the kept routing weight and the number of top-k picks of each expert
    over the tokens of the batches run inside `with recorder:` (padding excluded via `mask`)."""

    def __init__(self, blocks: list[MoEBlockInfo]) -> None:
        self.blocks = blocks
        self.gate = {b.path: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        self.token = {b.path: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        self.tokens = 0
        self.mask: torch.Tensor | None = None  # (tokens,) bool of the batch being run
        self._handles: list[Any] = []

    def __enter__(self) -> RouterRecorder:
        for block in self.blocks:
            self._handles.append(block.router.register_forward_hook(self._hook(block)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, block: MoEBlockInfo) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            _, weights, indices = output
            weights, indices = weights.detach().double().cpu(), indices.detach().cpu()
            if self.mask is not None:
                weights, indices = weights[self.mask], indices[self.mask]
            self.gate[block.path].index_add_(0, indices.reshape(-1), weights.reshape(-1))
            self.token[block.path].index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.float64))
        return record

    def shares(self, score: str) -> dict[str, list[float]]:
        """Per block path, each expert's share of the layer's total score (sums to 1)."""
        sums = self.gate if score == "gate" else self.token
        return {path: (s / s.sum()).tolist() if s.sum() > 0 else [0.0] * len(s) for path, s in sums.items()}


def select_experts(shares: list[float], top_p: float) -> list[int]:
    """The smallest set, taken in descending share (ties: lower index first), whose shares sum to >= top_p."""
    order = sorted(range(len(shares)), key=lambda e: -shares[e])
    chosen: list[int] = []
    total = 0.0
    for expert in order:
        if total >= top_p:
            break
        chosen.append(expert)
        total += shares[expert]
    return sorted(chosen)


def sample_token_batches(cfg: TrainingConfig, tokenizer: Any, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The first `esft_sample_tokens` tokens (prompt + response, as trained) of a seeded shuffle of
    the training split, padded into batches."""
    from perft.data.dataset import load_records, split_records, tokenize_examples, validate_records

    records = validate_records(load_records(cfg.data), source=str(cfg.data))
    train, _ = split_records(records, cfg.val_set_size, cfg.split_seed)
    n = len(train) if cfg.max_train_samples is None else min(cfg.max_train_samples, len(train))
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    sequences: list[list[int]] = []
    left = cfg.esft_sample_tokens
    for index in order:
        if left <= 0:
            break
        row = train[index]
        ids = tokenize_examples({k: [row[k]] for k in ("instruction", "input", "output")}, tokenizer,
                                cfg.cutoff_len, True)["input_ids"][0][:left]
        sequences.append(ids)
        left -= len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@torch.no_grad()
def score_experts(model: nn.Module, batches: list[dict[str, torch.Tensor]], blocks: list[MoEBlockInfo]) -> RouterRecorder:
    """Run the frozen `model` over `batches` and record its routers (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    recorder = RouterRecorder(blocks)
    try:
        with recorder:
            for batch in batches:
                recorder.mask = batch["attention_mask"].reshape(-1).bool()
                recorder.tokens += int(recorder.mask.sum())
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        model.train(was_training)
        recorder.mask = None
    return recorder


# ---------------------------------------------------------------------------- trainable expert rows
def fused_expert_tensors(block: MoEBlockInfo) -> list[str]:
    """Names of the experts module's fused per-expert tensors (3-D, one row per expert)."""
    names = [n for n, p in block.experts.named_parameters(recurse=False) if p.dim() == 3
             and p.shape[0] == block.num_experts]
    if parametrize.is_parametrized(block.experts):
        names += [n for n, p in block.experts.parametrizations.items() if p.original.dim() == 3]
    if not names:
        raise PerftError(f"the experts of {block.path} have no fused 3-D expert tensors; ESFT needs the "
                         "transformers-v5 layout (gate_up_proj / down_proj with one row per expert)")
    return sorted(names)


class ExpertRows(nn.Module):
    """Parametrization of one fused expert tensor: the rows `experts` are trainable parameters.

    The row parameters alias the frozen tensor's storage where they can (same device), so the
    optimiser updates the fused tensor in place. Once per forward of the experts module the rows
    are written into the frozen tensor's storage (`index_copy_` on a detached alias: the written
    rows carry gradients back to the row parameters, the rest of the tensor stays a constant)."""

    def __init__(self, original: torch.Tensor, experts: list[int]) -> None:
        super().__init__()
        self.experts = list(experts)
        self.register_buffer("index", torch.tensor(self.experts, dtype=torch.long), persistent=False)
        alias = original.detach()
        self.rows = nn.ParameterList([nn.Parameter(alias[e], requires_grad=True) for e in self.experts])
        for row in self.rows:
            row.aliases_frozen = True  # counted once in "all parameters" (perft.training.modeling)
        self._current: torch.Tensor | None = None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self._current is not None:
            return self._current
        fused = original.detach()
        fused.index_copy_(0, self.index.to(fused.device), torch.stack(list(self.rows)).to(fused.dtype))
        return fused

    def begin(self, original: torch.Tensor) -> None:
        """Start of a forward of the experts module: write the rows once, reuse the result."""
        self._current = None
        self._current = self.forward(original)

    def end(self) -> None:
        self._current = None


def attach_expert_rows(base: nn.Module, experts: dict[str, list[int]]) -> None:
    """Freeze `base` and make the rows `experts[<block path>]` of every fused expert tensor trainable."""
    base.requires_grad_(False)
    blocks = {b.path: b for b in require_moe_blocks(base)}
    for path, chosen in experts.items():
        if not chosen:
            continue
        block = blocks[path]
        names = fused_expert_tensors(block)
        rows: list[ExpertRows] = []
        for name in names:
            row = ExpertRows(getattr(block.experts, name), chosen)
            parametrize.register_parametrization(block.experts, name, row, unsafe=True)
            rows.append(row)

        def begin(module: nn.Module, args: Any, rows: list[ExpertRows] = rows, names: list[str] = names) -> None:
            for r, name in zip(rows, names):
                r.begin(module.parametrizations[name].original)

        def end(module: nn.Module, args: Any, output: Any, rows: list[ExpertRows] = rows) -> None:
            for r in rows:
                r.end()

        block.experts.register_forward_pre_hook(begin)
        block.experts.register_forward_hook(end, always_call=True)


def expert_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """The chosen expert rows, keyed `<experts path>.<tensor>.<expert>` (the saved format)."""
    out: dict[str, torch.Tensor] = {}
    selection: dict[str, list[int]] = model.esft_selection["experts"]
    blocks = {b.path: b for b in require_moe_blocks(model)}
    for path, chosen in selection.items():
        block = blocks[path]
        prefix = f"{path}.{block.arch.experts_attr}"
        for name in fused_expert_tensors(block):
            if parametrize.is_parametrized(block.experts, name):
                row = block.experts.parametrizations[name][0]
                for e, p in zip(row.experts, row.rows):
                    out[f"{prefix}.{name}.{e}"] = p
            else:
                fused = getattr(block.experts, name)
                for e in chosen:
                    out[f"{prefix}.{name}.{e}"] = fused[e]
    return out


# ---------------------------------------------------------------------------- the methods
class Esft(Method):
    """ESFT: train only the routed experts most relevant to the training data (see the module doc)."""

    score: ClassVar[str] = ""

    def validate(self, cfg: TrainingConfig) -> None:
        p = cfg.esft_top_p
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise PerftError(f"esft_top_p must be a number in (0, 1], got {p!r}")
        n = cfg.esft_sample_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PerftError(f"esft_sample_tokens must be an integer >= 1, got {n!r}")
        if cfg.strategy == "fsdp":
            raise PerftError(f"{self.name} trains expert rows that alias the frozen fused tensors, which FSDP "
                             "flattens: use --strategy ddp")

    def describe(self, cfg: TrainingConfig) -> str:
        return f"ESFT-{self.score} (top-p {cfg.esft_top_p:g}, scored on {cfg.esft_sample_tokens} tokens)"

    def preflight(self, skeleton: nn.Module, cfg: TrainingConfig) -> None:
        for block in require_moe_blocks(skeleton):
            fused_expert_tensors(block)

    def build(self, base: nn.Module, cfg: TrainingConfig) -> nn.Module:
        from perft.loading import load_tokenizer

        if torch.cuda.is_available():
            base.to(torch.device("cuda", torch.cuda.current_device()))  # score on the accelerator
        blocks = require_moe_blocks(base)
        tokenizer = load_tokenizer(cfg.tokenizer or str(cfg.model), trust_remote_code=cfg.trust_remote_code)
        recorder = score_experts(base, sample_token_batches(cfg, tokenizer), blocks)
        shares = recorder.shares(self.score)
        selection = {
            "score_function": self.score, "top_p": float(cfg.esft_top_p), "sample_tokens": recorder.tokens,
            "experts": {path: select_experts(s, float(cfg.esft_top_p)) for path, s in shares.items()},
            "scores": {path: [round(v, 6) for v in s] for path, s in shares.items()},
        }
        return self.attach(base, selection)

    def attach(self, base: nn.Module, selection: dict[str, Any]) -> nn.Module:
        """Freeze `base` and make the experts `selection["experts"]` trainable (the model `build` returns)."""
        attach_expert_rows(base, selection["experts"])
        base.perft_method = self.name
        base.esft_selection = selection
        return base

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in expert_rows(model).items()}

    def load_adapter_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        copy_adapter_tensors(expert_rows(model), state, source,
                             mismatch="holds other experts than this model trains: was it saved with another "
                             "expert selection?")

    def save(self, model: nn.Module, directory: Path) -> None:
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in expert_rows(model).items()}
        atomic_save_safetensors(directory / WEIGHTS, state, metadata={"format": "pt"})
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        record = {"perft_method": self.name, **model.esft_selection,
                  "base_model_name_or_path": getattr(config, "_name_or_path", None),
                  "model_type": getattr(config, "model_type", None), "hidden_size": hidden}
        atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(record, indent=1) + "\n")

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """Write the saved expert rows into `base`'s fused tensors (no hooks: a plain fine-tuned model)."""
        config = _read_config(directory)
        weights = Path(directory) / WEIGHTS
        if not weights.is_file():
            raise PerftError(f"no {WEIGHTS} in {directory}: the ESFT adapter was not saved completely")
        selection = {k: config.get(k) for k in ("score_function", "top_p", "sample_tokens", "experts", "scores")}
        known = {b.path for b in require_moe_blocks(base)}
        if not isinstance(selection["experts"], dict) or not set(selection["experts"]) <= known:
            raise PerftError(f"{directory / ADAPTER_CONFIG} names MoE blocks this model lacks: "
                             "use the base model the ESFT adapter was made for")
        base.requires_grad_(False)
        base.perft_method = self.name
        base.esft_selection = selection
        state = load_safetensors(weights)
        original = {k: v.detach().clone() for k, v in expert_rows(base).items()}
        self.load_adapter_state(base, state, str(weights))
        base.esft_original_rows = original  # what `unload` writes back
        return base.eval()

    def unload(self, model: nn.Module) -> nn.Module:
        """Write the base's own rows back into the fused tensors (a model returned by `load`)."""
        original = getattr(model, "esft_original_rows", None)
        if original is None:
            raise PerftError("this ESFT model was not loaded with `load`: there are no base rows to restore")
        with torch.no_grad():
            for name, target in expert_rows(model).items():
                target.copy_(original[name])
        for attr in ("esft_original_rows", "esft_selection", "perft_method"):
            delattr(model, attr)
        return model

    def check_compatible(self, directory: Path, base_config: dict[str, Any], model: str) -> None:
        config = _read_config(directory)
        for key in ("model_type", "hidden_size"):
            want = config.get(key)
            have = base_config.get(key) or (base_config.get("text_config") or {}).get(key)
            if want is not None and have is not None and want != have:
                raise PerftError(f"ESFT adapter {directory} was trained on a model with {key}={want}, but {model} "
                                 f"has {key}={have}: use it with the base model it was made for")

    def parameter_count(self, model: nn.Module) -> tuple[int, int]:
        rows = expert_rows(model)
        aliases = {id(p) for p in rows.values()}
        total = sum(p.numel() for p in model.parameters() if id(p) not in aliases)
        return sum(v.numel() for v in rows.values()), total


@register_method
class EsftGate(Esft):
    name = "esft-gate"
    help = "ESFT: train the experts with the highest average gate score (--esft-top-p)"
    score = "gate"


@register_method
class EsftToken(Esft):
    name = "esft-token"
    help = "ESFT: train the experts with the highest token-selection share (--esft-top-p)"
    score = "token"
